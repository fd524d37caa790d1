"""Jobs on a real Slurm cluster of 2 nodes (slurm/local-cluster.sh): the rendered templates, submitted
through `ftlab slurm submit` (and once by hand), 2-node DDP and FSDP, preemption with requeue and resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab.__main__ import main
from tests.conftest import REPO, run_ftlab
from tests.slurm.conftest import job_field, wait_for_text, wait_job, write_config

SHAPE = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10", "--signal-lead", "30"]
EPOCHS = 60  # 5 steps an epoch: long enough to signal a job mid-run
WANDB = {"logger": {"class_path": "WandbLogger", "init_args": {"project": "ftlab-slurm-tests", "offline": True}}}
SECRET = "fake-wandb-key-8f14e45fceea167a5a36dedd4bea2543"
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": SECRET}


def submit(cfg: Path, *extra: str, cwd: Path) -> tuple[str, Path]:
    out = run_ftlab("slurm", "submit", "--config", str(cfg), *SHAPE, *extra, cwd=cwd, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    job = re.search(r"submitted Slurm job (\d+)", out.stdout).group(1)
    log = Path(re.search(r"log: +(.*)", out.stdout).group(1).strip())
    return job, log


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory, tiny_bert, reviews_csv):
    """A 2-node DDP job run through, in a run directory whose name a shell would expand, and Slurm too (%x: its
    log goes where ftlab says only if the % is escaped)."""
    work = tmp_path_factory.mktemp("slurm-ddp")
    run = "runs/ddp %x $(touch pwned) `touch pwned2` 'q'"
    cfg = write_config(work / "ddp.yaml", run, tiny_bert, reviews_csv, max_epochs=EPOCHS)
    job, log = submit(cfg, cwd=work)
    state = wait_job(job)
    assert state == "COMPLETED", log.read_text()[-3000:]
    return work, work / run, log


def test_two_node_ddp_job_runs_both_ranks(uninterrupted):
    work, run_dir, log = uninterrupted
    text = log.read_text()
    assert "device   2 x cpu on 2 nodes" in text  # the run header, printed once both ranks have joined
    for noise in ("Trainable params", "Total FLOPs", "is deprecated", "Traceback"):  # a quiet console in the log too
        assert noise not in text, (noise, text[-3000:])
    s = summary(run_dir)
    assert (s["world_size"], s["num_nodes"], s["strategy"]) == (2, 2, "DDPStrategy")
    assert s["steps"] == EPOCHS * 5  # 160 training rows / (16 per rank x 2 ranks)
    assert not (work / "pwned").exists() and not (work / "pwned2").exists()  # the name stayed a name
    assert (run_dir / "export" / "config.json").exists()


def test_preempted_job_checkpoints_requeues_and_resumes(uninterrupted, tmp_path, tiny_bert, reviews_csv):
    """USR1 mid-run: saved, requeued, resumed exactly. With options that each broke it: min_epochs (Lightning
    trained on past the save), a ModelCheckpoint of the user's (the save went to it, which has no such save:
    AttributeError) and save_weights_only (the saved `last` could not resume)."""
    user_checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"monitor": "val/loss", "filename": "best"}}
    cfg = write_config(tmp_path / "pre.yaml", "runs/pre", tiny_bert, reviews_csv, max_epochs=EPOCHS,
                       min_epochs=EPOCHS, callbacks=[user_checkpoint], **WANDB)
    cfg.write_text(cfg.read_text() + "checkpoint:\n  save_weights_only: true\n")
    job, log = submit(cfg, cwd=tmp_path)
    wait_for_text(log, "ftlab fit: run directory")  # the header: every rank has joined, the model is loaded
    wait_for_text(tmp_path / "runs/pre/wandb-run-id", "")  # W&B is up, training is under way
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    assert wait_job(job) == "COMPLETED", log.read_text()[-3000:]
    assert int(job_field(job, "Restarts")) == 1
    text = log.read_text()
    saved = re.search(r"requeue signal: saved (\S+) at step (\d+)", text)
    assert saved, text[-3000:]
    assert 0 < int(saved.group(2)) < EPOCHS * 5
    assert f"Restoring states from the checkpoint path at {saved.group(1)}" in text
    assert text.count("ftlab: Slurm restart 1: resuming from runs/pre/checkpoints/last.ckpt") == 1  # rank 0 only
    s, ref = summary(tmp_path / "runs/pre"), summary(uninterrupted[1])
    assert s["steps"] == ref["steps"]
    assert s["val/loss"] == pytest.approx(ref["val/loss"], rel=1e-4, abs=1e-7)  # resumed exactly
    runs = sorted((tmp_path / "runs/pre/wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one per start of the job...
    assert len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # ...continuing one W&B run id
    written = [p for p in (tmp_path / "runs/pre").rglob("*") if p.is_file()]
    assert written and not [p for p in written if SECRET.encode() in p.read_bytes()]  # the job got the key only
    # from its environment: no script, config, log, checkpoint or W&B file holds it


def test_two_node_fsdp_job(slurm_cluster, tmp_path, tiny_bert, reviews_csv):
    cfg = write_config(tmp_path / "fsdp.yaml", "runs/fsdp", tiny_bert, reviews_csv, strategy="fsdp")
    job, log = submit(cfg, cwd=tmp_path)
    assert wait_job(job) == "COMPLETED", log.read_text()[-3000:]
    s = summary(tmp_path / "runs/fsdp")
    assert (s["world_size"], s["num_nodes"], s["strategy"]) == (2, 2, "FSDP")
    per_rank, total = s["param_numel_per_rank"], s["total_params"]
    assert len(per_rank) == 2 and max(per_rank) < total  # each node holds a shard


def test_template_by_hand_and_a_cancelled_job_is_not_requeued(slurm_cluster, tmp_path, tiny_bert, reviews_csv):
    """The template used by hand, as its header says (sbatch options, then ftlab's arguments); then
    `scancel` (SIGTERM, not the requeue signal) ends the job for good."""
    cfg = write_config(tmp_path / "c.yaml", "runs/c", tiny_bert, reviews_csv, max_epochs=5000)
    (tmp_path / "runs/slurm-logs").mkdir(parents=True)
    out = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                          "--gpus-per-node=0", str(REPO / "slurm/fit.sbatch"), "--config", str(cfg)],
                         cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "FTLAB_PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    log = tmp_path / f"runs/slurm-logs/ftlab-{job}.out"
    try:
        wait_for_text(log, "ftlab fit: run directory")  # the header: both ranks have joined
    finally:
        subprocess.run(["scancel", job], check=True)  # a job of 5000 epochs must not outlive a failed wait
    assert wait_job(job, timeout=60) == "CANCELLED"
    assert int(job_field(job, "Restarts")) == 0
    assert "requeue signal" not in log.read_text()


@pytest.mark.parametrize("shape, expected", [
    (["--partition", "gpuu"], "--partition 'gpuu' is not a partition of this cluster; choose from 'debug'"),
    (["--nodes", "5"], "--nodes 5: partition 'debug' has 2 node(s)"),
    (["--cpus-per-task", "64"], "= 64 CPUs per node"),
])
def test_shape_the_cluster_cannot_hold_is_refused(slurm_cluster, tmp_path, tiny_bert, reviews_csv, shape, expected,
                                                  capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "x.yaml", "runs/x", tiny_bert, reviews_csv)
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert main(["slurm", "submit", "--config", str(cfg), *SHAPE, *shape]) == 2
    assert expected in capsys.readouterr().err
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "runs").exists()
