"""DeepSpeed on CPU, as a laptop user starts it."""

import os
import time

from ftlab.strategies.deepspeed import STALE_LOCK_S, check_op_build_lock, stale_build_lock
from tests.conftest import fit_args, run_ftlab


def _lock(root, age_s):
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_build_lock_left_by_a_killed_build_is_refused_in_one_line(tmp_path, tiny_bert, reviews_csv):
    """Without the check the run waits on the lock forever (torch's FileBaton): here, past the timeout."""
    lock = _lock(tmp_path / "extensions", age_s=2 * STALE_LOCK_S)
    out = run_ftlab(*fit_args(tmp_path / "run", tiny_bert, reviews_csv, "--trainer.strategy=deepspeed_stage_2",
                              "--trainer.devices=1"),
                    env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}, timeout=240)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"{lock} was left by an interrupted build of DeepSpeed's CPU communication op" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_build_in_progress_is_left_to_finish(tmp_path, monkeypatch):
    """A lock a process holds open is a build running now (DeepSpeed waits for it, as it should), however old;
    one nobody holds is stale once past a few seconds."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock(tmp_path, age_s=10 * STALE_LOCK_S)
    with open(lock):  # held, as torch's builder holds it
        check_op_build_lock()
    assert stale_build_lock() == str(lock)
    os.utime(lock)  # just taken or just released: not yet stale
    assert stale_build_lock() is None
