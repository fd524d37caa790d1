"""QLoRA (`model.quantization`): a tiny Llama loaded 4-bit by bitsandbytes (NF4 forward and backward run on CPU)
with LoRA/DoRA on top, trained through the CLI on one device and on 2 ranks (FSDP2, DDP); the base really is
4-bit, checkpoints leave it out and load back, and the merged export is a full-precision model plain
transformers loads, with the trained model's logits. Combinations that cannot work are refused before
anything loads."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

pytest.importorskip("bitsandbytes")

from ftlab.__main__ import main  # noqa: E402
from ftlab.cli import run_cli  # noqa: E402
from ftlab.export import export_streamed, local_gather  # noqa: E402
from ftlab.policies import Adapter  # noqa: E402
from ftlab.quantization import Quantization, is_quantized_layer  # noqa: E402
from ftlab.tasks import SequenceClassification  # noqa: E402
from tests.conftest import fit_args, nudge_trainable, run_ftlab  # noqa: E402

IDS = torch.tensor([[2, 5, 9, 12, 20, 3], [2, 7, 22, 3, 0, 0]])
MASK = (IDS != 0).long()


def _quantized_bytes(model) -> tuple[int, int, int]:
    """(bytes of the packed 4-bit weights, of those and their block scales, of the same weights in fp32). Left out:
    each layer's lookup tables (16 NF4 values, 256 for the double-quantized scales), ~1 KB whatever the layer's
    size: they dominate at this toy width only."""
    packed = scaled = fp32 = 0
    for m in model.modules():
        if is_quantized_layer(m):
            w = m.weight
            assert type(w).__name__ == "Params4bit" and w.dtype == torch.uint8
            state = w.quant_state
            assert state.quant_type == "nf4" and state.nested  # double quantization: the scales are 8-bit too
            packed += w.numel() * w.element_size()
            scaled += sum(t.numel() * t.element_size() for t in (w, state.absmax, state.state2.absmax))
            fp32 += m.in_features * m.out_features * 4
    return packed, scaled, fp32


def _quantized_adapter_model(folder, method: str, bits: int = 4):
    quantization = Quantization(bits=bits)
    base = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, quantization_config=quantization.hf_config(torch.float32), dtype=torch.float32)
    base.config.pad_token_id = 0
    return Adapter(method=method, r=4).apply(quantization.prepare(base), SequenceClassification())


@pytest.mark.parametrize("method,bits", [("lora", 4), ("dora", 4), ("lora", 8)])
def test_quantized_base_merges_into_a_full_precision_export(tmp_path, tiny_models, method, bits):
    torch.manual_seed(0)
    model = _quantized_adapter_model(tiny_models["llama"], method, bits)
    nudge_trainable(model)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=IDS, attention_mask=MASK).logits
    export_streamed(model, local_gather, str(tmp_path / "export"))

    config = json.loads((tmp_path / "export" / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export" / "merged").eval()
    assert not any(is_quantized_layer(m) for m in plain.modules())
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    # 4-bit: the layers compute with the dequantized weights, as the export holds them; LLM.int8 rounds the
    # activations to int8 too, which a full-precision model does not
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if bits == 4 else {"rtol": 0, "atol": 5e-3}
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS, attention_mask=MASK).logits, before, **tolerance)
        # merged on copies: the live model is untouched (still 4-bit, same logits)
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, before, rtol=0, atol=0)

    # checkpoints leave the quantized base out, and load back strictly into a freshly quantized model
    state = model.state_dict()
    assert not any(k.endswith(("base_layer.weight", ".absmax", ".quant_map", ".SCB", ".weight_format"))
                   or "quant_state" in k for k in state)
    assert any("lora_A" in k for k in state)
    fresh = _quantized_adapter_model(tiny_models["llama"], method, bits).eval()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS, attention_mask=MASK).logits, before, rtol=0, atol=0)


def test_qlora_fit_through_the_cli(tmp_path, tiny_models, reviews_csv):
    """QLoRA with 8-bit AdamW, warmup_steps and a cosine decay to a minimum learning rate."""
    run = tmp_path / "run"
    cli = run_cli(fit_args(run, tiny_models["llama"], reviews_csv, "--model.quantization.bits=4",
                           "--model.optim.name=adamw_8bit", "--model.optim.warmup_steps=2",
                           "--model.optim.schedule=cosine", "--model.optim.min_lr_ratio=0.1",
                           "--trainer.val_check_interval=5", "--test_after_fit=false", policy="Adapter"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20
    losses = [p["val/loss"] for p in summary["val_history"]]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == "AdamW8bit"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.1)  # the schedule ended at min_lr_ratio x lr
    measured = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    assert summary["optimizer_state_bytes_per_rank"] == [measured]

    model = cli.model.model.eval()
    packed, scaled, fp32 = _quantized_bytes(model)
    assert packed * 8 == fp32 and scaled <= 0.2 * fp32, (packed, scaled, fp32)  # 4 bits a weight, ~0.13x with scales

    plain = AutoModelForSequenceClassification.from_pretrained(run / "export" / "merged").eval()
    # the count of parameters is of values, not of the packed 4-bit tensor elements: the base's + LoRA's + head copy
    assert summary["total_params"] == sum(p.numel() for p in plain.parameters()) + summary["trainable_params"]
    with torch.no_grad():
        trained = model(input_ids=IDS, attention_mask=MASK).logits
        torch.testing.assert_close(plain(input_ids=IDS, attention_mask=MASK).logits, trained, rtol=1e-4, atol=1e-5)

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any("base_layer.weight" in k for k in checkpoint["state_dict"])  # the 4-bit base is rebuilt, not saved
    assert not any("embed_tokens" in k or "norm" in k for k in checkpoint["state_dict"])  # nor the frozen rest
    cli.model.load_state_dict(checkpoint["state_dict"], strict=True)  # as a resume loads it
    # `ftlab export` of the checkpoint rebuilds the quantized base and merges into it as the fit's export did
    out = run_ftlab("export", f"--run={run}", f"--out={tmp_path / 'again'}")
    assert out.returncode == 0, out.stderr[-3000:]
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "again" / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS, attention_mask=MASK).logits, trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy,precision", [("fsdp", "32-true"), ("fsdp", "bf16-mixed"), ("ddp", "32-true")])
def test_qlora_on_two_ranks(strategy, precision, tmp_path, tiny_models, reviews_csv):
    """2 CPU ranks. FSDP2: the packed 4-bit weights are stored in the dtype FSDP2 gathers in (bf16 under
    bf16-mixed, the GPU recipe's case) and split like any tensor; the block scales stay whole on each rank.
    DDP: the replicas stay equal. The export, gathered from the shards, is the trained model."""
    from peft import PeftModel

    run = tmp_path / "run"
    out = run_ftlab(*fit_args(run, tiny_models["llama"], reviews_csv, "--model.quantization.bits=4",
                              f"--trainer.strategy={strategy}", "--trainer.devices=2", "--model.policy.dropout=0",
                              f"--trainer.precision={precision}",
                              "--trainer.val_check_interval=5", "--test_after_fit=false", policy="Adapter"),
                    timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["world_size"] == 2 and f"{precision} trains in" in out.stderr
    losses = [p["val/loss"] for p in summary["val_history"]]
    assert losses[-1] < losses[0], losses
    params = summary["param_numel_per_rank"]  # elements held (packed 4-bit weights included)
    if strategy == "fsdp":  # the 4-bit weights too
        assert max(params) < 0.6 * sum(params), params
    else:
        assert summary["replicas_in_sync"] and params[0] == params[1]

    plain = AutoModelForSequenceClassification.from_pretrained(run / "export" / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_models["llama"], num_labels=2, quantization_config=Quantization().hf_config(torch.float32))
    base.config.pad_token_id = plain.config.pad_token_id
    trained = PeftModel.from_pretrained(Quantization().prepare(base), run / "export" / "adapter").eval()
    with torch.no_grad():  # the adapter on a 4-bit base, as it trained, and the merged full-precision export
        torch.testing.assert_close(plain(input_ids=IDS, attention_mask=MASK).logits,
                                   trained(input_ids=IDS, attention_mask=MASK).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra,message", [
    (["--model.quantization.bits=4"], "model.quantization with policy full: a quantized base cannot train"),
    (["--model.policy=Adapter", "--model.quantization.bits=4", "--trainer.strategy=deepspeed_stage_2",
      "--trainer.devices=2"], "model.quantization under DeepSpeed"),
    (["--model.policy=Adapter", "--model.quantization.bits=8", "--trainer.strategy=fsdp", "--trainer.devices=2"],
     "model.quantization.bits=8 under FSDP"),
    (["--model.optim.name=adamw_8bit", "--trainer.strategy=fsdp", "--trainer.devices=2"],
     "model.optim.name=adamw_8bit under FSDP"),
    (["--model.optim.name=adamw_8bit", "--trainer.strategy=deepspeed_stage_2_offload", "--trainer.devices=2"],
     "model.optim.name=adamw_8bit under DeepSpeed"),
    (["--model.optim.name=adafactor", "--trainer.strategy=deepspeed_stage_1", "--trainer.devices=2"],
     "model.optim.name=adafactor under DeepSpeed"),
    (["--model.optim.name=adafactor", "--trainer.strategy=fsdp", "--trainer.devices=2"],
     "model.optim.name=adafactor under FSDP"),
    (["--model.optim.warmup_steps=3", "--model.optim.warmup_ratio=0.1"], "are both set; give one of them"),
    (["--model.quantization.bits=3"], "bits"),
])
def test_impossible_combinations_are_refused_up_front(extra, message, tmp_path, tiny_models, reviews_csv, capsys):
    assert main(fit_args(tmp_path / "run", tiny_models["llama"], reviews_csv, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err, err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
