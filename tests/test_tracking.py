"""Monitoring, read back from what the loggers really wrote (W&B offline run files, CSV)."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import fit_args, run_ftlab

SECRET = "fake-wandb-key-0123456789abcdef0123456789abcdef"
WANDB_ENV = {"WANDB_MODE": "offline", "WANDB_API_KEY": SECRET, "WANDB_SILENT": "true"}


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of one offline W&B run, through wandb's own reader."""
    wandb_cli = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    out = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def history(records):
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def merged(records, kind: str) -> dict:
    """The final state of the run's config or summary: its update records applied in order."""
    state = {}
    for r in records:
        if r.get("type") == kind:
            state.update(r[kind]["update"])
    return state


def run_id(records):
    return next(r["run"]["run_id"] for r in records if r.get("type") == "run")


def wandb_args(project="ftlab-tests"):
    return ["--trainer.logger=WandbLogger", f"--trainer.logger.project={project}", "--trainer.log_every_n_steps=1"]


def test_ddp_fit_logs_one_wandb_run_with_config_metrics_and_summary(tmp_path, tiny_bert, reviews_csv):
    run = tmp_path / "run"
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.strategy=ddp", "--trainer.devices=2",
                              *wandb_args()), env=WANDB_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 1 logs nothing of its own
    records = wandb_records(runs[0])

    steps = history(records)
    keys = set().union(*steps)
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/step_time_s", "train/samples_per_s",
                "train/tokens_per_s", "val/accuracy", "val/loss", "test/accuracy", "test/f1_macro"):
        assert key in keys, key
    assert sum("train/loss" in s for s in steps) >= 8  # per step, not per epoch

    cfg = merged(records, "config")
    assert cfg["model"]["policy"]["class_path"] == "ftlab.policies.Full"
    assert cfg["data"]["init_args"]["batch_size"] == 16
    assert cfg["run"]["world_size"] == 2 and cfg["run"]["policy"] == "full" and cfg["run"]["trainable_params"] > 0

    on_disk = json.loads((run / "summary.json").read_text())
    logged = merged(records, "summary")
    assert on_disk["world_size"] == 2
    for key in ("test/accuracy", "val/accuracy", "trainable_params", "steps", "wall_time_s"):
        assert logged[key] == on_disk[key], key

    # the API key is in no file the run wrote (W&B's binary log included)
    leaked = [str(p) for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_resume_continues_the_same_wandb_run(tmp_path, tiny_bert, reviews_csv):
    run = tmp_path / "run"
    first = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=1", *wandb_args()), env=WANDB_ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=2", *wandb_args(),
                                  f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"), env=WANDB_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {run_id(wandb_records(r)) for r in runs}
    assert len(ids) == 1, ids
    # a fresh fit (no checkpoint) goes to a new run dir (the used one is refused), with a W&B run of its own
    fresh_dir = tmp_path / "fresh"
    fresh = run_ftlab(*fit_args(fresh_dir, tiny_bert, reviews_csv, "--trainer.max_epochs=1", *wandb_args()),
                      env=WANDB_ENV)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    newest = next((fresh_dir / "wandb").glob("offline-run-*"))
    assert run_id(wandb_records(newest)) not in ids


def test_csv_logger_and_logging_off(tmp_path, tiny_bert, reviews_csv):
    run = tmp_path / "run"
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.logger=CSVLogger",
                              f"--trainer.logger.save_dir={run}", "--trainer.logger.name=csv",
                              "--trainer.log_every_n_steps=2", "--trainer.accumulate_grad_batches=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    [metrics] = list(run.glob("csv/*/metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    for key in ("train/loss", "train/lr", "train/tokens_per_s", "val/accuracy", "test/accuracy"):
        assert any(r.get(key) for r in rows), key
    # each step's metrics at one x value: Lightning's loss, ftlab's rates and learning rate, the grad norm
    # (ftlab logged its own one step later, and the grad norm a step before Lightning wrote it)
    steps = {key: {int(r["step"]) for r in rows if r.get(key)} for key in
             ("train/loss", "train/lr", "train/step_time_s", "train/grad_norm")}
    assert steps["train/loss"] == steps["train/lr"] == steps["train/step_time_s"] == steps["train/grad_norm"], steps
    assert steps["train/loss"] == set(range(1, 10, 2))  # 5 steps an epoch (2 x 16 rows), every other one logged
    assert not (run / "wandb").exists()
    assert (run / "config.yaml").exists()  # in the run dir, not only in the logger's folder


def test_tensorboard_logger(tmp_path, tiny_bert, reviews_csv):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.logger=TensorBoardLogger",
                              f"--trainer.logger.save_dir={run}", "--trainer.log_every_n_steps=1"))
    assert out.returncode == 0, out.stderr[-3000:]
    [events] = {p.parent for p in run.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/accuracy", "test/accuracy"} <= tags, tags
    assert len(acc.Scalars("train/loss")) >= 8


def test_deepspeed_grad_norm_and_the_export_as_a_wandb_artifact(tmp_path, tiny_bert, reviews_csv):
    """ZeRO keeps gradients in its partitions (p.grad is None): the norm comes from the engine. The export goes
    to W&B as a model artifact when asked."""
    run = tmp_path / "run"
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=1", "--trainer.strategy=deepspeed_stage_2",
                              "--outputs.wandb_artifact=true", *wandb_args()), env=WANDB_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    records = wandb_records(next((run / "wandb").glob("offline-run-*")))
    norms = [s["train/grad_norm"] for s in history(records) if "train/grad_norm" in s]
    assert len(norms) == json.loads((run / "summary.json").read_text())["steps"] and all(n > 0 for n in norms)
    artifacts = [r for r in records if r.get("type") == "artifact"]
    assert len(artifacts) == 1, [r.get("type") for r in records]
    art = artifacts[0]["artifact"]
    assert art["type"] == "model" and art["name"] == f"run-{run_id(records)}"
    files = {c["path"] for c in art["manifest"]["contents"]}
    assert {"model/config.json", "model/model.safetensors"} <= files
    assert "staging" not in json.dumps(art)  # the export is uploaded as it is, not copied to a staging folder first
