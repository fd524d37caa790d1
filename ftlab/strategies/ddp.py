"""DDP (Lightning's own strategy): what ftlab adds to it."""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


def rewrap_after_trainable_change(strategy) -> None:
    """Called after parameters started training mid-run (gradual unfreezing). DDP registers its gradient
    all-reduce only for the parameters that required grad when it wrapped the model: newly unfrozen ones
    would train on each rank's own gradients and the replicas drift apart. So DDP wraps the model again.
    (FSDP: see FSDP.follow_trainable_change; DeepSpeed is refused up front: check_combination.)"""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
        return
    old = strategy.model
    old.reducer._remove_autograd_hooks()  # its hooks would still all-reduce into the old buckets
    strategy.model = old.module
    strategy.configure_ddp()
