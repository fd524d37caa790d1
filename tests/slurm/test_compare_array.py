"""`ftlab compare --slurm` on the local Slurm cluster: the runs of a comparison as one job array (2 variants
x 1 seed, 2 steps each), the report as a job after it; a rerun queues no finished run again."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.conftest import run_ftlab
from tests.slurm.conftest import job_field, wait_job, write_config

SECRET = "fake-wandb-key-0cc175b9c0f1b6a831c399e269772661"
SHAPE = ["--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10", "--max-parallel", "2"]


def test_compare_runs_as_one_array_then_the_report(slurm_cluster, tmp_path, tiny_bert, reviews_csv):
    cfg = write_config(tmp_path / "task.yaml", "runs/unused", tiny_bert, reviews_csv, devices=1)
    variants = tmp_path / "variants.yaml"
    variants.write_text(yaml.safe_dump({"head": ["--model.policy=Freeze", "--model.optim.lr=0.05"],
                                        "lora": ["--model.policy=Adapter", "--model.policy.r=4"]}))
    runs_dir = "runs/it's $(touch pwned)"  # a value a shell would expand, in every script
    cmd = ["compare", "--config", str(cfg), "--variants-file", str(variants), "--budget-steps", "2",
           "--runs-dir", runs_dir, "--slurm", *SHAPE]
    out = run_ftlab(*cmd, cwd=tmp_path, env={"WANDB_API_KEY": SECRET}, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    array = re.search(r"submitted Slurm job array (\d+): 2 run\(s\)", out.stdout).group(1)
    report_job = re.search(r"submitted Slurm job (\d+): the report", out.stdout).group(1)
    assert job_field(report_job, "Dependency") in (f"afterany:{array}_*(unfulfilled)", f"afterany:{array}(unfulfilled)",
                                                   None, "(null)")
    assert wait_job(report_job, timeout=900) == "COMPLETED"
    root = tmp_path / runs_dir / "compare-task"
    tasks = subprocess.run(["scontrol", "-o", "show", "job", array], capture_output=True, text=True).stdout.splitlines()
    assert len(tasks) == 2 and all("JobState=COMPLETED" in t and "Restarts=0" in t for t in tasks), tasks
    assert sorted(re.search(r"ArrayTaskId=(\S+)", t).group(1) for t in tasks) == ["0", "1"]
    report = json.loads((root / "report.json").read_text())
    for name in ("head", "lora"):
        run = root / name / "seed0"
        s = json.loads((run / "summary.json").read_text())
        assert s["steps"] == 2 and report["variants"][name]["metric_mean"] == s["test/accuracy"]
        assert (run / "fit.log").read_text().count("ftlab: job ") == 1  # ran once
        assert (root / "report.json").stat().st_mtime > (run / "summary.json").stat().st_mtime
    logs = list((root / "slurm").glob("*.out"))
    assert sum("array task" in p.read_text() for p in logs) == 2
    assert not (tmp_path / "pwned").exists()
    scripts = list((root / "slurm").glob("*.sbatch"))
    assert len(scripts) == 2 and "#SBATCH --array=0-1%2" in (root / "slurm" / "runs.sbatch").read_text()
    assert not [p for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]

    again = run_ftlab(*cmd, cwd=tmp_path, timeout=600)  # everything finished: only the report is queued
    assert again.returncode == 0, again.stderr[-3000:]
    assert "every run finished before" in again.stdout and "job array" not in again.stdout
    job = re.search(r"submitted Slurm job (\d+): the report", again.stdout).group(1)
    assert wait_job(job, timeout=600) == "COMPLETED"


def test_dry_run_prints_the_array_and_the_report_job(tmp_path, tiny_bert, reviews_csv):
    """No cluster needed: the scripts, every value quoted (bash reads back the run directories as given)."""
    cfg = write_config(tmp_path / "task.yaml", "runs/unused", tiny_bert, reviews_csv, devices=1)
    runs_dir = "runs/it's $(touch pwned)"
    out = run_ftlab("compare", "--config", str(cfg), "--variants", "freeze,lora", "--seeds", "2",
                    "--runs-dir", runs_dir, "--slurm", "--dry-run", "--no-cluster-check", *SHAPE, cwd=tmp_path,
                    timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    array, follow = out.stdout.split("#!/bin/bash\n")[1:]
    assert "#SBATCH --array=0-3%2" in array and "#SBATCH --cpus-per-task=1" in array
    block = array.split("# >>> ftlab settings", 1)[1].split("# <<< ftlab settings", 1)[0]
    dirs = subprocess.run(["bash", "-c", block + '\nprintf "%s\\n" "${FTLAB_ARGS[@]}"'], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    root = Path(tmp_path / runs_dir / "compare-task")
    assert dirs == [str(root / v / f"seed{s}") for v in ("freeze", "lora") for s in (0, 1)]
    assert "--report-only" in follow.splitlines()[-1] and not (tmp_path / "pwned").exists()
    assert not root.exists()  # a dry run writes nothing
    # --tune lr: the first rung's runs are the array, and the job after it submits the next stage
    tune = run_ftlab("compare", "--config", str(cfg), "--variants", "freeze,lora", "--tune", "lr", "--lr-grid", "0.1,1",
                     "--runs-dir", runs_dir, "--slurm", "--dry-run", "--no-cluster-check", *SHAPE, cwd=tmp_path,
                     timeout=300)
    assert tune.returncode == 0, tune.stderr[-3000:]
    array, follow = tune.stdout.split("#!/bin/bash\n")[1:]
    block = array.split("# >>> ftlab settings", 1)[1].split("# <<< ftlab settings", 1)[0]
    dirs = subprocess.run(["bash", "-c", block + '\nprintf "%s\\n" "${FTLAB_ARGS[@]}"'], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    assert "#SBATCH --array=0-3%2" in array and dirs == [
        str(root / v / "tune" / f"rung0-lr{lr}") for v, lrs in (("freeze", ("0.0003", "0.003")), ("lora", ("0.0002", "0.002")))
        for lr in lrs]
    last = follow.splitlines()[-1]
    assert last.endswith("--slurm-continue") and "--dry-run" not in last and "--report-only" not in last
