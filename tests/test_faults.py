"""Failures in the middle of a run: a hung rank, a diverging loss, a full disk. Each ends the run with
one line that says what happened, and leaves the last good checkpoint intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tests.conftest import children, fit_args, run_ftlab, start_ftlab, wait_for


def test_a_hung_rank_ends_the_job_with_the_rank_and_timeout_named(tmp_path, tiny_bert, reviews_csv):
    run = tmp_path / "run"
    proc = start_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.strategy=ddp", "--trainer.devices=2",
                                 "--trainer.max_epochs=1000", "--checkpoint.every_n_train_steps=1",
                                 "--collective_timeout=60"))  # it also bounds the start-up (the store waits for rank 1)
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    (rank1,) = children(proc.pid)
    os.kill(rank1, signal.SIGSTOP)  # rank 1 hangs; rank 0 waits for it in the next all-reduce
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("ftlab: error: rank 0: a collective operation timed out after 60 s"), err[-2000:]
    assert "--collective_timeout" in last
    assert not Path(f"/proc/{rank1}").exists() or "Z" in Path(f"/proc/{rank1}/stat").read_text().split()[2]


def test_nonfinite_loss_is_skipped_then_stops_naming_step_and_batch(tmp_path, tiny_bert, reviews_csv):
    run = tmp_path / "run"
    # a learning rate this large turns the weights, then the loss, into inf/NaN after the first update
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--model.optim.lr=1e30", "--model.optim.warmup_ratio=0",
                              "--model.optim.schedule=constant", "--checkpoint.every_n_train_steps=1",
                              "--checkpoint.save_top_k=-1",
                              "--model.skip_nonfinite_steps=2", "--trainer.logger=CSVLogger",
                              f"--trainer.logger.save_dir={run}", "--trainer.log_every_n_steps=1"))
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "non-finite training loss" in last and "(epoch 0, batch 3)" in last, last  # batches 1, 2 skipped
    assert "skip_nonfinite_steps (now 2)" in last
    assert "(1 of 2 allowed)" in out.stderr and "(2 of 2 allowed)" in out.stderr
    ckpt = run / "checkpoints" / "last.ckpt"
    assert f"last good checkpoint: {ckpt}" in last
    saved = {p.name: torch.load(p, weights_only=True) for p in ckpt.parent.glob("epoch=*.ckpt")}
    assert sorted(saved) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"]
    first, latest = saved["epoch=0-step=1.ckpt"]["state_dict"], saved["epoch=0-step=3.ckpt"]["state_dict"]
    for name, tensor in first.items():  # the skipped steps changed no weight
        assert torch.equal(tensor, latest[name]), name


class NonFiniteOn(Callback):
    """Added to a test run (`--trainer.callbacks+=tests.test_faults.NonFiniteOn`): one rank's one training
    batch of the first epoch comes out of the embeddings as NaN (a bad batch there), so its loss is NaN."""

    def __init__(self, batch: int = 3, rank: int = 1):
        self.batch, self.rank, self.now = batch, rank, False

    def on_train_start(self, trainer, pl_module) -> None:
        def poison(module, args, output):
            return output * float("nan") if self.now else output

        pl_module.model.get_input_embeddings().register_forward_hook(poison)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.now = trainer.current_epoch == 0 and batch_idx == self.batch and trainer.global_rank == self.rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.now = False


@pytest.mark.parametrize("strategy", [["--trainer.strategy=ddp"],
                                      ["--trainer.strategy=ftlab.strategies.FSDP", "--trainer.strategy.state_dict_type=full"]],
                         ids=["ddp", "fsdp"])
def test_a_nonfinite_micro_batch_on_one_rank_skips_its_whole_step_on_every_rank(strategy, tmp_path, tiny_bert,
                                                                                reviews_csv):
    """2 ranks, 2 micro-batches a step: rank 1's batch 3 (the second of step 2) has a NaN loss. Every rank
    skips step 2 whole (batch 2's gradients too, already accumulated unreduced), then trains on."""
    run = tmp_path / "run"
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, *strategy, "--trainer.devices=2",
                              "--trainer.accumulate_grad_batches=2", "--trainer.max_epochs=1",
                              "--model.optim.warmup_ratio=0", "--model.skip_nonfinite_steps=1",
                              "--checkpoint.every_n_train_steps=1", "--checkpoint.save_top_k=-1",
                              "--trainer.callbacks+=tests.test_faults.NonFiniteOn"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "non-finite loss at step 1 (epoch 0, batch 3): step skipped (1 of 1 allowed)" in out.stderr, out.stderr[-3000:]
    ckpts = run / "checkpoints"
    saved = {p.name: torch.load(p, weights_only=True) for p in ckpts.glob("epoch=*.ckpt")}
    # 80 rows a rank in batches of 16: 5 batches, 3 steps (the last on batch 4 alone), step 2 skipped
    assert sorted(saved) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"], sorted(saved)
    first, skipped, last = (saved[f"epoch=0-step={i}.ckpt"]["state_dict"] for i in (1, 2, 3))
    for name, tensor in first.items():
        assert torch.equal(tensor, skipped[name]), name  # the skipped step changed no weight
    assert any(not torch.equal(skipped[n], last[n]) for n in last)  # the step after it trained
    assert saved["epoch=0-step=3.ckpt"]["ftlab_skipped_steps"] == 1  # a resume does not renew the allowance
    summary = json.loads((run / "summary.json").read_text())
    assert summary.get("replicas_in_sync", "sharded") in (True, "sharded") and summary["steps"] == 3, summary


def test_a_skipped_first_step_still_reports_what_the_run_trains_in(tmp_path, tiny_bert, reviews_csv):
    run = tmp_path / "run"
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.max_steps=3", "--model.skip_nonfinite_steps=1",
                              "--test_after_fit=false", "--trainer.callbacks+=tests.test_faults.NonFiniteOn",
                              "--trainer.callbacks.batch=0", "--trainer.callbacks.rank=0"))
    assert out.returncode == 0 and "(epoch 0, batch 0): step skipped" in out.stderr, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())  # read after step 2 (step 1 made no optimizer state)
    assert summary["steps"] == 3 and summary["dtypes"]["optimizer_state"] == "float32", summary["dtypes"]


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("FTLAB_REQUIRE_ROOT_TESTS") != "1",
                               reason="mounting a small tmpfs (a disk that fills up) needs root")


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of a chosen size: a tmpfs, mounted for the test."""
    mounts = []

    def make(size: str) -> Path:
        point = tmp_path / f"disk-{size}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)
        mounts.append(point)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


@ROOT_ONLY
def test_a_disk_too_small_for_two_checkpoints_is_refused_before_training(small_disk, tiny_bert, reviews_csv):
    run = small_disk("300k") / "run"  # the tiny model's checkpoint is ~260 kB; a save needs room for two
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv))
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "a save needs room for two" in last and "free" in last, last
    assert not (run / "checkpoints" / "last.ckpt").exists()


@ROOT_ONLY
def test_a_disk_that_fills_during_training_keeps_the_last_checkpoint(small_disk, tiny_bert, reviews_csv):
    disk = small_disk("3m")
    run = disk / "run"
    proc = start_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=1000",
                                 "--checkpoint.every_n_train_steps=1", "--checkpoint.save_top_k=1",
                                 "--checkpoint.monitor=train/loss"))
    ckpt = run / "checkpoints" / "last.ckpt"
    wait_for(ckpt, proc)
    try:  # another job fills the disk
        with open(disk / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 65536)
    except OSError:
        pass
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "no space left on the device" in last and "the previous checkpoint is intact" in last, last
    assert torch.load(ckpt, weights_only=True)["global_step"] >= 1  # whole and loadable
    (best,) = ckpt.parent.glob("epoch=*.ckpt")  # retention deleted nothing it could not replace
    assert torch.load(best, weights_only=True)["global_step"] >= 1
    assert not list(ckpt.parent.glob("*.partial"))
