"""The CLI end to end, as a user runs it, on tiny models built from configs and saved to disk."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from ftlab.cli import run_cli
from tests.conftest import REPO, fit_args, run_ftlab


def batch_of(cli):
    dm = cli.datamodule
    return {k: v for k, v in next(iter(dm.test_dataloader())).items() if k != "labels"}


@pytest.mark.parametrize("kind,policy", [("bert", "Full"), ("llama", "Adapter"), ("gpt2", "Freeze")])
def test_fit_writes_run_dir_and_export_reloads_with_same_logits(tmp_path, tiny_models, reviews_csv, kind, policy):
    run = tmp_path / "run"
    cli = run_cli(fit_args(run, tiny_models[kind], reviews_csv, policy=policy))
    summary = json.loads((run / "summary.json").read_text())
    for key in ("task", "policy", "trainable_params", "total_params", "steps", "epochs", "train_tokens",
                "wall_time_s", "peak_memory_mb", "world_size", "strategy", "val/accuracy", "test/accuracy",
                "test/f1_macro"):
        assert key in summary, key
    assert summary["policy"] == policy.lower()
    assert summary["steps"] == 2 * 10 and summary["epochs"] == 2 and summary["world_size"] == 1
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    assert summary["train_tokens"] > summary["train_samples"] == 2 * 160
    # the rates leave out the validations (2, one per epoch), which the wall time includes
    training = summary["wall_time_s"] - summary["val_time_s"]
    assert 0 < summary["val_time_s"] < training
    assert summary["train_samples_per_s"] == pytest.approx(summary["train_samples"] / training, rel=0.02)
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    # validate/test/predict under no_grad, as on gloo (where the tests run), not inference mode (Lightning's on NCCL)
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["inference_mode"] is False
    assert not cli.trainer.validate_loop.inference_mode and not cli.trainer.test_loop.inference_mode

    trained = cli.model.model.eval()
    batch = batch_of(cli)
    with torch.no_grad():
        expected = trained(**batch).logits
    if policy == "Adapter":
        merged = AutoModelForSequenceClassification.from_pretrained(run / "export" / "merged").eval()
        base = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind], num_labels=2)
        adapter = PeftModel.from_pretrained(base, run / "export" / "adapter").eval()
        models = [merged, adapter]
    else:
        models = [AutoModelForSequenceClassification.from_pretrained(run / "export").eval()]
    for model in models:
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert models[0].config.id2label == {0: "neg", 1: "pos"}


def test_learns_the_task(tmp_path, tiny_bert, reviews_csv):
    run = tmp_path / "run"
    run_cli(fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=4"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test/accuracy"] >= 0.9, summary


def test_validate_and_resume_from_checkpoint(tmp_path, tiny_bert, reviews_csv):
    run = tmp_path / "run"
    run_cli(fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=1"))
    ckpt = run / "checkpoints" / "last.ckpt"
    first = json.loads((run / "summary.json").read_text())

    val = run_cli(["validate", *fit_args(run, tiny_bert, reviews_csv)[1:], f"--ckpt_path={ckpt}"])
    assert val.trainer.callback_metrics["val/accuracy"] == pytest.approx(first["val/accuracy"])
    # evaluating elsewhere leaves the fit's description of the run; without a checkpoint (the pretrained
    # model) its metrics stay out of the run's summary
    out = run_ftlab("test", *fit_args(run, tiny_bert, reviews_csv, "--trainer.devices=2", "--trainer.strategy=ddp",
                                      f"--ckpt_path={ckpt}")[1:])
    assert out.returncode == 0, out.stderr[-2000:]
    after = json.loads((run / "summary.json").read_text())
    assert {k: after[k] for k in ("world_size", "strategy", "steps")} == {k: first[k] for k in ("world_size", "strategy", "steps")}
    assert after["test/accuracy"] == pytest.approx(first["test/accuracy"])
    untrained = run_ftlab("validate", *fit_args(run, tiny_bert, reviews_csv)[1:])
    assert untrained.returncode == 0 and "not written to summary.json" in untrained.stderr, untrained.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["val/loss"] == first["val/loss"]
    exported = run_ftlab("validate", *fit_args(run, tiny_bert, reviews_csv)[1:], f"--model.name_or_path={run / 'export'}")
    assert exported.returncode == 0 and "not written to summary.json" not in exported.stderr, exported.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["val/loss"] == pytest.approx(first["val/loss"], abs=1e-5)

    run_cli(["predict", *fit_args(run, tiny_bert, reviews_csv)[1:], f"--ckpt_path={ckpt}"])
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 40 and {p["label"] for p in predictions} <= {"neg", "pos"}
    accuracy = sum(p["label"] == p["true_label"] for p in predictions) / len(predictions)
    assert accuracy == pytest.approx(first["test/accuracy"])

    # the checkpoint of another config (a Full run's, evaluated as a LoRA run): one line, not torch's key list
    other = run_ftlab("validate", *fit_args(run, tiny_bert, reviews_csv, f"--ckpt_path={ckpt}", policy="Adapter")[1:])
    assert other.returncode == 2 and "the checkpoint's weights are not this run's model's" in other.stderr, \
        other.stderr[-2000:]
    assert "Traceback" not in other.stderr
    # a model folder without its tokenizer (transformers made one of 5 tokens: every word [UNK], exit 0)
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run / "export" / name, bare / name)
    out = run_ftlab(*fit_args(tmp_path / "bare", bare, reviews_csv))
    assert out.returncode == 2 and f"model.name_or_path (data.tokenizer)='{bare}' holds no tokenizer files" in \
        out.stderr, out.stderr[-2000:]

    resumed = run_cli(fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}"))
    assert resumed.trainer.global_step == 20
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["train_samples"] == 320  # counters continue across the resume


def test_print_config_and_help(tiny_bert, reviews_csv, tmp_path):
    out = run_ftlab(*fit_args(tmp_path, tiny_bert, reviews_csv, "--model.policy=Adapter", "--model.policy.r=16",
                              policy="Adapter"), "--print_config")
    assert out.returncode == 0, out.stderr
    assert "class_path: ftlab.policies.Adapter" in out.stdout and "r: 16" in out.stdout
    help_text = run_ftlab("fit", "--help").stdout
    assert "--model.name_or_path" in help_text and "Hugging Face hub id" in help_text
    assert help_text.startswith("usage: python -m ftlab ")  # not LightningCLI's __main__.py
    policy_help = run_ftlab("fit", "--model.policy.help", "Freeze").stdout
    assert "--model.policy.top_k_layers" in policy_help and "Gradual unfreezing" in policy_help


# `python -m ftlab fit --config X --print_config` for every config, in one process (one start-up, not one each)
PRINT_CONFIGS = """
import contextlib, io, json, sys
from ftlab.__main__ import main
result = {}
for name in sys.argv[1:]:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(["fit", f"--config=configs/{name}.yaml", "--print_config"])
    except SystemExit as stop:  # --print_config prints, then exits
        code = stop.code
    result[name] = [code, out.getvalue()]
print(json.dumps(result))
"""


def test_every_shipped_config_parses():
    names = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert {"quickstart", "ner-wnut16", "sft-smollm2-chatterbot", "seq2seq-t5-small", "distill-minilm-sentiment",
            "domain-adapt-minilm-plots"} <= set(names)
    out = subprocess.run([sys.executable, "-c", PRINT_CONFIGS, *names], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    for name in names:
        code, printed = result[name]
        assert code in (0, None), (name, code, out.stderr[-3000:])
        assert "name_or_path:" in printed, (name, printed[-2000:])
