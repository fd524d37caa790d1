"""A real Slurm cluster on this machine (slurm/local-cluster.sh) and helpers to follow its jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

CLUSTER = REPO / "slurm" / "local-cluster.sh"


def _why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (it starts slurmctld, slurmd and munged)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """Brings the cluster up (installing Debian's packages if needed); stops it afterwards if it was not
    running before. Skips where that cannot work, unless FTLAB_REQUIRE_ROOT_TESTS=1 (CI), where it fails."""
    why = _why_no_cluster()
    if why:
        if os.environ.get("FTLAB_REQUIRE_ROOT_TESTS") == "1":
            pytest.fail(f"FTLAB_REQUIRE_ROOT_TESTS=1 but {why}")
        pytest.skip(why)
    was_up = subprocess.run([str(CLUSTER), "status"]).returncode == 0
    up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    yield
    if not was_up:
        subprocess.run([str(CLUSTER), "down"], capture_output=True, timeout=120)


def job_field(job: str, name: str) -> str | None:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    for item in out.split():
        if item.startswith(name + "="):
            return item.split("=", 1)[1]
    return None


def wait_job(job: str, timeout: float = 300) -> str:
    """Wait for a final state. A requeued job starts again by itself at its begin time (cred_expire + 1 s
    after the requeue): released earlier, Slurm kills it as "non-startable: Job credential revoked"."""
    end = time.time() + timeout
    while time.time() < end:
        state = job_field(job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job])
    return "WAIT_TIMEOUT"


def wait_for_text(path: Path, text: str, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


def write_config(path: Path, run_dir: str, model: Path, data: Path, **trainer) -> Path:
    """A small fit config, as a user would write it."""
    cfg = {
        "trainer": {"default_root_dir": run_dir, "max_epochs": 2, "accelerator": "cpu", "logger": False,
                    "enable_progress_bar": False, **trainer},
        "model": {"name_or_path": str(model), "optim": {"lr": 0.01}},
        "data": {"class_path": "TextClassificationData",
                 "init_args": {"source": str(data), "batch_size": 16, "val_size": 40, "test_size": 40}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path
