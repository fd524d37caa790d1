"""`ftlab estimate` models the memory options: QLoRA's quantized base (bytes of the real bitsandbytes layers),
8-bit AdamW state (bytes of the real optimizer's state), activation checkpointing and the chunked loss (the
probes, scaled, against a training step of the whole model, measured the same way)."""

import math

import pytest
import torch
from transformers import LlamaConfig

from ftlab.estimate.memory import (
    activation_memory,
    adamw_8bit_state_bytes,
    probe_batch,
    quantized_weight_bytes,
    state_per_rank,
    step_activations,
)
from ftlab.module import FineTuneModule
from ftlab.policies import Adapter, Full
from ftlab.quantization import Quantization, is_quantized_layer
from ftlab.tasks import CausalLM

pytest.importorskip("bitsandbytes")


def test_quantized_layer_bytes_equal_bitsandbytes(tiny_models):
    """Every 4-bit weight of a real QLoRA load: packed values, block scales (double-quantized) and lookup
    tables, as the estimate counts them; and 8-bit (LLM.int8) weights with their row scales."""
    from transformers import AutoModelForCausalLM

    for bits in (4, 8):
        quantization = Quantization(bits=bits)
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32,
                                                     quantization_config=quantization.hf_config(torch.float32))
        layers = [m for m in model.modules() if is_quantized_layer(m)]
        assert layers
        for layer in layers:
            w = layer.weight
            if bits == 4:
                qs, tensors = w.quant_state, [w]
                while qs is not None:
                    tensors += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if t is not None]
                    qs = getattr(qs, "state2", None)
            else:
                tensors = [w, getattr(w, "SCB", None) if getattr(w, "SCB", None) is not None else layer.state.SCB]
            real = sum(t.numel() * t.element_size() for t in tensors)
            assert real == quantized_weight_bytes(layer.in_features * layer.out_features, bits, True,
                                                  layer.out_features), (bits, layer)


def test_8bit_adamw_state_bytes_equal_bitsandbytes():
    """The state of bitsandbytes' AdamW8bit after a step, tensor by tensor (8-bit moments with block scales
    for matrices from 256 elements and 1-D tensors from 4,096, fp32 below), against `state_per_rank` for that
    optimizer."""
    from ftlab.optim import Optim

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.Linear(96, 16),  # 12,288 / 96 / 1,536 / 16
                              torch.nn.Linear(16, 8, bias=False))  # 128
    model = torch.nn.ModuleDict({"mlp": mlp, "norm": torch.nn.LayerNorm(8192)})  # 8,192 x 2
    optimizer = Optim(name="adamw_8bit").optimizer([{"params": list(model.parameters())}])
    (mlp(torch.randn(4, 128)).sum() + model["norm"](torch.randn(2, 8192)).square().sum()).backward()
    optimizer.step()
    shared = {id(v) for s in optimizer.state.values() for k, v in s.items() if k.startswith("qmap")}
    real = sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items()
               if torch.is_tensor(v) and not k.startswith("qmap") and k != "step")
    assert len(shared) <= 2  # the quantization maps are shared by every tensor: not counted per tensor
    sizes = [p.numel() for p in model.parameters()]
    assert real == sum(adamw_8bit_state_bytes(p.numel(), p.ndim >= 2) for p in model.parameters())
    kinds = [optimizer.state[p]["state1"].dtype for p in model.parameters()]
    assert kinds == [torch.uint8, torch.float32, torch.uint8, torch.float32, torch.float32, torch.uint8, torch.uint8]
    _, _, est = state_per_rank(model, [sum(sizes)], "ddp", 1, optimizer="adamw_8bit")
    _, _, fp32 = state_per_rank(model, [sum(sizes)], "ddp", 1)
    assert est.bytes == real and fp32.bytes == 8 * sum(sizes) and est.numel == fp32.numel
    assert est.bytes < 0.3 * fp32.bytes  # ~1/4 for the matrices and large 1-D tensors; small 1-D ones keep fp32


def _whole(config, task, policy, checkpointing: bool, batch: int, seq: int):
    from ftlab.compute import enable_activation_checkpointing

    torch.manual_seed(0)
    model = policy.apply(task.auto_class.from_config(config).train(), task)
    if checkpointing:
        enable_activation_checkpointing(model)
    return step_activations(model, task, probe_batch(task, config, batch, seq, seq))


@pytest.mark.parametrize("policy_name", ["Full", "Adapter"])
def test_checkpointing_and_chunked_loss_against_the_whole_model(tiny_models, policy_name):
    """Probes of 1 and 2 blocks, scaled to 4 blocks and batch 4, against a step of the whole model: what it
    keeps for backward and its peak, with each option; and the options cut what they should."""
    config = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    results = {}
    for name, options in {"plain": {}, "checkpointing": {"activation_checkpointing": True},
                          "chunked": {"activation_checkpointing": True, "loss_chunk_size": 32}}.items():
        policy = Full() if policy_name == "Full" else Adapter(r=4, dropout=0.0)
        module = FineTuneModule(str(tiny_models["llama"]), task=CausalLM(), policy=policy, **options)
        est = activation_memory(module, config, 4, 48, 48)
        whole = _whole(config, module.task, Full() if policy_name == "Full" else Adapter(r=4, dropout=0.0),
                       bool(options), 4, 48)
        assert est.kept == pytest.approx(whole.kept, rel=0.05), (name, est, whole)
        assert est.peak == pytest.approx(whole.peak, rel=0.05), (name, est, whole)
        assert est.peak >= est.kept
        results[name] = est
    assert results["checkpointing"].kept < results["plain"].kept  # the blocks keep only their inputs
    # a vocabulary of 4,096 over a hidden size of 32: the logits are most of the step; chunks of 32 tokens
    assert results["chunked"].peak < 0.5 * results["checkpointing"].peak


def test_estimate_command_reports_each_option(tiny_models, tmp_path):
    """The command on a causal-LM config: QLoRA's base well under its fp32 bytes, 8-bit AdamW's state, the
    options named in the report."""
    from tests.conftest import run_ftlab

    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}\n')
    args = ["--model.name_or_path", str(tiny_models["llama"]), "--model.task=CausalLM", "--data=LanguageModelingData",
            f"--data.source={data}", "--data.max_length=32", "--data.batch_size=2", "--trainer.accelerator=cpu",
            "--model.policy=Adapter", "--model.policy.r=4"]
    plain = run_ftlab("estimate", "--json", *args, "--data.max_train_rows=100")
    assert plain.returncode == 0, plain.stderr[-2000:]
    import json

    plain = json.loads(plain.stdout)
    # 100 examples pack into fewer rows, unknown before the data is prepared: no step count made of them
    assert plain["steps"] is None and plain["train_rows"] is None
    out = run_ftlab("estimate", *args, "--model.quantization.bits=4", "--model.optim.name=adamw_8bit",
                    "--model.loss_chunk_size=16")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "base quantized: nf4 4-bit" in out.stdout and "AdamW 8-bit" in out.stdout
    assert "activation checkpointing; loss in chunks of 16 tokens" in out.stdout
    quant = run_ftlab("estimate", "--json", *args, "--model.quantization.bits=4", "--data.max_train_rows=100",
                      "--data.packing=false")
    est = json.loads(quant.stdout)
    assert est["steps"] == 50 and est["train_rows"] == 100  # unpacked: a row an example, 2 a batch
    assert est["quantization"] == "nf4 4-bit, double-quantized scales" and est["activation_checkpointing"]
    assert est["params"]["numel"] == plain["params"]["numel"] and est["params"]["bytes"] < plain["params"]["bytes"]
    assert math.isfinite(est["activation_peak_bytes"]) and est["activation_peak_bytes"] > 0


def test_a_frozen_reference_copy_is_counted_where_the_task_loads_one(tiny_models, tmp_path):
    """DPO with the Full policy loads a frozen copy of the model as its reference (in the compute dtype, sharded
    like the model under fsdp): the estimate counts it on each device; with an adapter (switched off for the
    reference) or precomputed reference log-probs there is none."""
    from ftlab.estimate.cli import estimate, parser
    from tests.tasks.conftest import write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", 40)
    base = ["--model.name_or_path", str(tiny_models["llama"]), "--model.task=Preference", "--data=PreferenceData",
            f"--data.source={pairs}", "--data.max_length=32", "--trainer.accelerator=cpu",
            "--trainer.precision=bf16-mixed"]

    def run(*extra, devices=1):
        return estimate(parser().parse_args(["--no-activations", "--devices", str(devices)]), [*base, *extra])

    full = run("--model.policy=Full")
    assert full["frozen"] == {"numel": full["total_params"], "bytes": 2 * full["total_params"]}  # bf16, whole
    assert "reference copy" in full["frozen_model"]
    plain = {k: v for k, v in full.items() if k in ("params", "grads", "optimizer")}
    assert full["total_bytes"] == sum(v["bytes"] for v in plain.values()) + full["frozen"]["bytes"]
    sharded = run("--model.policy=Full", "--trainer.strategy=fsdp", devices=2)
    assert sharded["frozen"]["numel"] == math.ceil(full["total_params"] / 2) and "sharded" in sharded["frozen_model"]
    for extra in (["--model.policy=Adapter"], ["--model.policy=Full", "--model.task.precompute_reference=true"]):
        none = run(*extra)
        assert none["frozen"] == {"numel": 0, "bytes": 0} and none["frozen_model"] is None, extra
