"""What happens when a run fails: no rank left behind, and a report a user can act on."""

from __future__ import annotations

import os
import re
import signal

import lightning as L
import torch


class StopLocalRanksOnError(L.Callback):
    """When this process fails, SIGKILL the ranks it launched itself (Lightning's launcher starts ranks
    1.. of a node as child processes of rank 0).

    Why: Lightning kills them only on Ctrl-C. On any other error, rank 0 exits and a rank that hangs (the
    very case a collective timeout reports) keeps its memory and devices forever. Under srun or torchrun
    the launcher has no children; those tools end the job's other ranks themselves."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        launcher = trainer.strategy.launcher
        if launcher is not None and getattr(launcher, "procs", None):
            launcher.kill(signal.SIGKILL)


def collective_timeout_report(err: BaseException) -> str | None:
    """A one-line report for a collective that timed out (a rank hung or died), else None."""
    text = str(err)
    # only timeouts of torch.distributed (gloo, NCCL, the c10d store), not any error that says "timeout"
    distributed = isinstance(err, torch.distributed.DistError) or re.search(r"gloo|nccl|c10d|TCPStore", text, re.I)
    if not isinstance(err, RuntimeError) or not distributed or not re.search(r"[Tt]imed out|timeout", text):
        return None
    from lightning.pytorch.utilities import rank_zero_only

    rank = rank_zero_only.rank if rank_zero_only.rank is not None else os.environ.get("RANK", "?")
    ms = re.search(r"[Tt]imed out[^\n]*?(\d+)\s*ms", text)
    waited = f" after {int(ms.group(1)) / 1000:g} s" if ms else ""
    return (f"rank {rank}: a collective operation timed out{waited} (--collective_timeout); another rank hung or "
            f"died (see its log). If steps legitimately take longer, raise --collective_timeout. "
            f"[{text.strip().splitlines()[0][:160]}]")
