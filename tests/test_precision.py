"""What each precision trains in, read off the run (summary.json `dtypes`), with gradient clipping on:
`*-mixed` keeps fp32 weights, gradients, optimizer state and gradient reduction even for a checkpoint stored
in bf16; `bf16-true` is bf16 throughout, on purpose. Single device here; DDP and the sharded strategies in
tests/test_strategies.py."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftlab.cli import run_cli
from tests.conftest import TINY, _tokenizer, fit_args, run_ftlab

FP32 = {"params": "float32", "master_params": "float32", "grads": "float32", "optimizer_state": "float32"}
BF16 = {k: "bfloat16" for k in FP32}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="session")
def bf16_llama(tmp_path_factory) -> Path:
    """A tiny Llama stored in bf16, as Llama/Qwen/Mistral checkpoints are (config dtype bfloat16)."""
    import torch
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bf16-llama")
    tok = _tokenizer(folder)
    spec = dict(TINY["llama"])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id, **spec)
    AutoModel.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text()).get("dtype") == "bfloat16"
    return folder


@pytest.mark.parametrize("precision,expected", [("bf16-mixed", FP32), ("bf16-true", BF16), ("32-true", FP32)])
def test_each_precision_trains_with_clipping_in_the_dtypes_it_promises(tmp_path, bf16_llama, reviews_csv, precision,
                                                                        expected):
    # Lightning's mixed-precision plugin refused gradient clipping with the fused AdamW at the first step
    cli = run_cli(fit_args(tmp_path, bf16_llama, reviews_csv, f"--trainer.precision={precision}",
                           "--trainer.gradient_clip_val=0.5", "--trainer.max_steps=3", "--test_after_fit=false"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["dtypes"] == expected
    assert cli.model.optim.fused is None and cli.trainer.optimizers[0].defaults["fused"]  # the fused kernel ran
    # the evaluation sums (the loss weighted by tokens) stay float64 in a module bf16-true casts whole: in bf16
    # a sum of thousands of tokens stops growing, in fp16 it overflows
    assert cli.model.val_loss.weight.dtype == cli.model.val_loss.mean_value.dtype == torch.float64
    # `ftlab export` of the run's checkpoint writes what the fit's own export wrote: bf16-true's weights in
    # bf16 (it built the model in fp32 before: twice the host memory, and an fp32 export)
    out = run_ftlab("export", f"--run={tmp_path}", f"--out={tmp_path / 'again'}")
    assert out.returncode == 0, out.stderr[-3000:]
    fit, again = (load_file(folder / "model.safetensors") for folder in (tmp_path / "export", tmp_path / "again"))
    assert fit.keys() == again.keys() and {t.dtype for t in again.values()} == {DTYPES[expected["params"]]}
    for name, tensor in fit.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name


@pytest.mark.parametrize("precision,expected", [("bf16-mixed", {**FP32, "reduce": "float32"}),
                                                ("bf16-true", {**BF16, "reduce": "bfloat16"})])
def test_ddp_precision_and_reduce_dtype(tmp_path, bf16_llama, reviews_csv, precision, expected):
    out = run_ftlab(*fit_args(tmp_path, bf16_llama, reviews_csv, "--trainer.strategy=ddp", "--trainer.devices=2",
                              f"--trainer.precision={precision}", "--trainer.gradient_clip_val=0.5",
                              "--trainer.max_steps=3", "--test_after_fit=false"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["dtypes"] == expected and summary["replicas_in_sync"]
    assert f"{precision} trains in: params {expected['params']}" in out.stderr



@pytest.mark.parametrize("extra", [
    pytest.param(["--model.policy=Adapter"], id="lora-trained-head"),
    pytest.param(["--model.policy=Adapter", "--model.quantization.bits=4"], id="qlora-trained-head"),
    pytest.param(["--model.policy=Freeze", "--model.policy.init_args.top_k_layers=0",
                  "--model.policy.init_args.unfreeze_every=1", "--model.policy.init_args.unfreeze_max_layers=1"],
                 id="freeze-gradual-unfreezing"),
])
def test_mixed_precision_trains_fp32_over_a_base_loaded_in_bf16(tmp_path, bf16_llama, reviews_csv, extra):
    # the recipes' `model.dtype: bfloat16` under bf16-mixed: the frozen base in bf16 (no fp32 copy of it), and
    # what trains in fp32. The trained head (peft's modules_to_save copy) and the blocks unfrozen later were left
    # in bf16, AdamW stepping on bf16 weights; the summary's dtypes read only the first trained tensor
    import torch

    from ftlab.quantization import quantized_numels

    cli = run_cli(fit_args(tmp_path, bf16_llama, reviews_csv, "--trainer.precision=bf16-mixed", "--model.dtype=bfloat16",
                           "--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--test_after_fit=false", *extra))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["dtypes"] == FP32
    model = cli.model.model
    quantized = quantized_numels(model)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and id(p) not in quantized}
    assert any(".layers.1." in n or "score" in n for n in trained)  # a head, or the block unfrozen at epoch 1
    assert set(trained.values()) == {torch.float32}, trained
    assert frozen and set(frozen.values()) == {torch.bfloat16}, frozen  # QLoRA: peft's fp32 upcast undone too
    assert len(quantized) == (14 if "--model.quantization.bits=4" in extra else 0)
    # `ftlab estimate` on the run's own config counts each weight in the dtype the run keeps it in
    from ftlab.estimate.cli import estimate, parser
    from ftlab.estimate.memory import quantized_weight_bytes

    layers = {id(m.weight): m for m in model.modules() if id(getattr(m, "weight", None)) in quantized}
    real = sum(quantized_weight_bytes(quantized[id(p)], 4, True, layers[id(p)].out_features)
               if id(p) in quantized else p.numel() * p.element_size() for p in model.parameters())
    est = estimate(parser().parse_args(["--config", str(tmp_path / "config.yaml"), "--no-activations"]), [])
    assert est["params"]["bytes"] == real
