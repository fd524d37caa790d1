"""`ftlab slurm submit --prepare`: the data is tokenised before the training job (here, or by a CPU job the
training job depends on), so that its nodes never wait on it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.conftest import run_ftlab
from tests.slurm.conftest import job_field, wait_job, write_config

SHAPE = ["--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10", "--signal-lead", "30"]


def _config(tmp_path: Path, tiny_bert: Path, reviews_csv: Path) -> tuple[Path, Path]:
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "runs" / "p"), tiny_bert, reviews_csv, max_epochs=1)
    data = yaml.safe_load(cfg.read_text())
    data["data"]["init_args"]["cache_dir"] = str(cache)
    cfg.write_text(yaml.safe_dump(data))
    return cfg, cache


def test_auto_prepares_small_data_here_and_nothing_once_cached(tmp_path, tiny_bert, reviews_csv):
    cfg, cache = _config(tmp_path, tiny_bert, reviews_csv)
    dry = run_ftlab("slurm", "submit", "--config", str(cfg), *SHAPE, "--no-cluster-check", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "data: local (--prepare auto: 0.0 MB of local data, tokenised here before sbatch)" in dry.stderr
    assert not cache.exists()  # a dry run prepares nothing
    prepared = run_ftlab("prepare", "--config", str(cfg), cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    again = run_ftlab("slurm", "submit", "--config", str(cfg), *SHAPE, "--no-cluster-check", "--dry-run",
                      "--prepare", "job", cwd=tmp_path)
    assert "data: none (the tokenised data is in the cache already" in again.stderr


def test_preparation_job_runs_before_the_training_job(slurm_cluster, tmp_path, tiny_bert, reviews_csv):
    cfg, cache = _config(tmp_path, tiny_bert, reviews_csv)
    out = run_ftlab("slurm", "submit", "--config", str(cfg), *SHAPE, "--prepare", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    prep, fit = re.findall(r"submitted Slurm job (\d+)", out.stdout)
    assert wait_job(fit, timeout=600) == "COMPLETED", out.stdout
    assert job_field(prep, "JobState") == "COMPLETED"
    # the training job started only after the preparation ended (afterok), and read its cache
    assert job_field(fit, "StartTime") >= job_field(prep, "EndTime")
    log = (tmp_path / "runs" / "p" / f"prepare-{prep}.out").read_text()
    (key,) = [p for p in cache.iterdir() if p.is_dir()]
    assert f"ftlab prepare: {key} (prepared in" in log
    assert (tmp_path / "runs" / "p" / "summary.json").exists()
