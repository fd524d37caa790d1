"""The strategy layer: the one place that knows about devices and processes."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.utilities import rank_zero_info


def split_cpu_threads(trainer) -> None:
    """Several ranks on one CPU host must share its cores: without a limit each rank starts one thread per
    core and 2 ranks on 2 cores ran ~30x slower. torchrun sets OMP_NUM_THREADS; Lightning's own launcher
    does not, so do it here (before the ranks are launched, so they inherit it). A user's setting wins."""
    if trainer.strategy.root_device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = max(1, trainer.num_devices)
    if local_ranks == 1:
        return
    threads = max(1, (os.cpu_count() or 1) // local_ranks)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    rank_zero_info(f"ftlab: {local_ranks} CPU ranks on this host: {threads} thread(s) each (OMP_NUM_THREADS)")
