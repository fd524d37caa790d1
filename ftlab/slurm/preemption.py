"""Preempted or time-limited Slurm jobs: checkpoint at a step boundary, requeue, and resume by themselves."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def restart_count() -> int:
    """How many times Slurm has restarted this job (0 for a first start or outside Slurm)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def in_slurm_job() -> bool:
    return SLURMEnvironment.detect()


class Preemption(L.Callback):
    """On the requeue signal (USR1: `#SBATCH --signal=USR1@<seconds>` before the time limit, or
    `scancel --signal=USR1 JOB`), finish the current step on every rank, save `last` (atomically), stop,
    and requeue the job. The requeued job resumes from that checkpoint with no flag from the user.

    Why not Lightning's own handler (SLURMEnvironment auto_requeue): it saves from inside the signal
    handler, at whatever point the signal interrupted: after the optimizer step but before the loop's
    counters advance (the resumed run repeats a step), or on one rank while the others wait in a
    collective (a sharded save then deadlocks). Here the handler only sets a flag, and the ranks agree on
    it at the end of a step, where every checkpoint of the run is taken.
    """

    def __init__(self, signum: int = signal.SIGUSR1):
        self.signum = signum
        self.requested = False
        self.preempted = False
        self._previous = None
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._previous = signal.signal(self.signum, self._on_signal)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def _on_signal(self, signum, frame) -> None:
        self.requested = True  # nothing else here: a signal handler may run in the middle of anything

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # only where an optimizer step just ended: mid-accumulation, the gradients gathered so far are in no
        # checkpoint, and the resumed step would miss them
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if self.preempted or not stepped or not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        from ftlab.checkpoints import run_checkpoint

        path = run_checkpoint(trainer).save_last_now(trainer)
        rank_zero_info(f"ftlab: requeue signal: saved {path} at step {trainer.global_step}; stopping to requeue")
        self.preempted = True
        trainer.should_stop = True
        # stop now: Lightning would train on until min_epochs/min_steps, and validate before stopping, both
        # past the saved checkpoint and into the time the signal lead leaves for the requeue
        trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = 0, None
        trainer.limit_val_batches = 0

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def requeue(self) -> None:
        """Put this job back in the queue (rank 0, after the loggers have closed)."""
        job = os.environ.get("SLURM_JOB_ID", "")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        if not re.fullmatch(r"[0-9_]+", job):
            rank_zero_warn(f"ftlab: no Slurm job id to requeue ({job!r}); resume with --ckpt_path last")
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode != 0:
            rank_zero_warn(f"ftlab: `scontrol requeue {job}` failed ({result.stderr.strip()}); the job is not "
                           "requeued: resubmit it, it resumes from checkpoints/last.ckpt with --ckpt_path last")
        else:
            rank_zero_info(f"ftlab: requeued Slurm job {job}")


def find_preemption(trainer) -> Preemption | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, Preemption)), None)


def was_preempted(trainer) -> bool:
    cb = find_preemption(trainer)
    return bool(cb and cb.preempted)
