"""Model compute options: activation checkpointing keeps fewer activations for the same gradients, each
attention kernel keeps packed rows apart, and compiled blocks compute what eager ones do. (What cannot run is
refused before loading: tests/test_bad_input.py.)"""

import pytest
import torch

from ftlab.estimate.memory import saved_activation_bytes
from ftlab.module import FineTuneModule
from ftlab.policies import Adapter
from ftlab.tasks import CausalLM

IDS = torch.tensor([[2, 7, 9, 30, 3, 11, 12, 13], [2, 15, 20, 3, 5, 6, 7, 8]])


def _model(path, **options) -> torch.nn.Module:
    torch.manual_seed(0)  # the same LoRA initialisation in every model built here
    return FineTuneModule(str(path), task=CausalLM(), **options).build_model(None)


def _step(model) -> tuple[float, int, dict]:
    """Loss, bytes kept for backward, and the gradients of one training step."""
    model.zero_grad()
    kept, out = saved_activation_bytes(model, lambda: model(input_ids=IDS, labels=IDS))
    out.loss.backward()
    return out.loss.item(), kept, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("policy", [None, Adapter(dropout=0.0)], ids=["full", "lora"])
def test_activation_checkpointing_keeps_less_for_the_same_gradients(tiny_models, policy):
    plain = FineTuneModule(str(tiny_models["llama"]), task=CausalLM(), policy=policy)
    torch.manual_seed(0)
    base_loss, base_kept, base_grads = _step(plain.build_model(None))
    ckpt = FineTuneModule(str(tiny_models["llama"]), task=CausalLM(), policy=policy, activation_checkpointing=True)
    torch.manual_seed(0)
    loss, kept, grads = _step(ckpt.build_model(None))
    assert loss == pytest.approx(base_loss, abs=1e-6)
    assert grads.keys() == base_grads.keys() and grads  # frozen inputs (LoRA) still get their gradients
    for name, grad in grads.items():
        torch.testing.assert_close(grad, base_grads[name], rtol=1e-5, atol=1e-6)
    assert kept < 0.8 * base_kept  # blocks keep only their inputs (the logits of a tiny model dominate the rest)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_each_attention_kernel_keeps_packed_examples_apart(tiny_models, kernel):
    """A packed row (two examples, each with position ids from 0, no attention mask: what LanguageModelingData
    packs), run as the causal-LM task runs it, gives each example the logits it has alone."""
    model = _model(tiny_models["llama"], attn_implementation=kernel).eval()
    assert model.config._attn_implementation == kernel
    a, b = IDS[0, :5], IDS[1, :6]
    packed = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None]
    with torch.no_grad():
        together = CausalLM().forward(model, {"input_ids": packed, "position_ids": positions}).logits[0]
        alone = [CausalLM().forward(model, {"input_ids": x[None]}).logits[0] for x in (a, b)]
    torch.testing.assert_close(together[:5], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[5:], alone[1], rtol=1e-4, atol=1e-5)


def test_compiled_blocks_compute_what_eager_blocks_do(tiny_models):
    eager_loss, _, eager_grads = _step(_model(tiny_models["llama"]))
    compiled = _model(tiny_models["llama"], compile=True)
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in compiled.model.layers)
    loss, _, grads = _step(compiled)
    assert loss == pytest.approx(eager_loss, abs=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5)



def test_flash_attention_with_packed_batches_of_several_rows_is_refused():
    """transformers' flash-attention path keeps packed examples apart only in a batch of one row (it reads
    the packing from position_ids only then): a larger packed batch would train with cross-example attention."""
    from types import SimpleNamespace

    from ftlab.compute import check_packed_rows
    from ftlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"flash_attention_2 with packed rows .* data.batch_size=4"):
        check_packed_rows("flash_attention_2", SimpleNamespace(packing=True, batch_size=4))
    check_packed_rows("flash_attention_2", SimpleNamespace(packing=True, batch_size=1))  # one row: kept apart
    check_packed_rows("flash_attention_2", SimpleNamespace(packing=False, batch_size=4))  # padded rows, masked
    check_packed_rows("sdpa", SimpleNamespace(packing=True, batch_size=4))


def test_flash_attention_without_a_half_precision_is_refused():
    """flash-attn computes in fp16/bf16 only: under 32-true (no autocast) over fp32 weights the queries are
    fp32 and the first forward failed, after the weights had loaded. Refused at setup; mixed precisions and half
    weights pass (this machine has no flash-attn, so the check is called as setup calls it)."""
    from ftlab.compute import check_attention
    from ftlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"flash_attention_2 with trainer.precision=32-true and fp32 weights: .* "
                                          r"fp16 or bf16 only"):
        check_attention("flash_attention_2", "cuda", "32-true", "float32")
    # autocast, or half weights (transformers casts the queries to the projections' dtype): past the check
    for precision, weights in (("bf16-mixed", "float32"), ("bf16-true", "bfloat16"), ("16-mixed", "float32"),
                               ("32-true", "bfloat16")):
        with pytest.raises(ConfigError, match="needs the flash-attn package"):
            check_attention("flash_attention_2", "cuda", precision, weights)
    check_attention("sdpa", "cuda", "32-true")
