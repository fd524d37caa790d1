"""A callback the DeepSpeed resume tests add to a real run (`--trainer.callbacks+=tests.strategies.probe.ZeroProbe`):
it writes the optimizer's state, gathered whole, when training starts (after a resume has loaded its
checkpoint) and when it ends, so that a test can tell whether the state a run saved is the state the
resumed run continues from."""

from __future__ import annotations

import os

import lightning as L
import torch


class ZeroProbe(L.Callback):
    """Writes `<folder>/start-<step>.pt` and `end-<step>.pt` on rank 0: per trained parameter, DeepSpeed's fp32
    master weights and AdamW's two moments (whole, gathered from every rank's partition), and AdamW's step count.
    The data consumed so far (global batches) is there too."""

    def __init__(self, folder: str):
        self.folder = folder

    def _dump(self, trainer, pl_module, when: str) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        zero = trainer.strategy.deepspeed_engine.optimizer
        state = {}
        for name, p in pl_module.model.named_parameters():
            if p.requires_grad:  # collectives: every rank, the same parameters in the same order
                get = safe_get_full_optimizer_state if hasattr(p, "ds_id") else _zero12_full_state(zero)
                state[name] = {"fp32": safe_get_full_fp32_param(p).cpu(),
                               "exp_avg": get(p, "exp_avg").cpu(), "exp_avg_sq": get(p, "exp_avg_sq").cpu()}
        inner = zero.optimizer
        steps = {float(s["step"]) for s in inner.state.values() if "step" in s}
        if trainer.is_global_zero:
            os.makedirs(self.folder, exist_ok=True)
            position = trainer.datamodule.state_dict() if hasattr(trainer.datamodule, "state_dict") else {}
            torch.save({"params": state, "adam_steps": sorted(steps), "position": position,
                        "world_size": trainer.world_size},
                       os.path.join(self.folder, f"{when}-{trainer.global_step}.pt"))

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path:  # a fresh run has no optimizer state before its first step
            self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "end")


def _zero12_full_state(zero):
    """ZeRO-1/2: a parameter's whole optimizer state `key`, read from the flat partitions the torch optimizer
    steps on (DeepSpeed's own accessor reads views it links only after a universal load)."""
    import torch.distributed as dist

    def get(p, key):
        whole = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        mapping = p._hp_mapping
        if mapping is not None:  # the fragment this rank's partition holds
            flat = zero.optimizer.state[zero.single_partition_of_fp32_groups[mapping.param_group_index]][key]
            hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            whole.narrow(0, lp.start, lp.numel).copy_(flat.narrow(0, hp.start, hp.numel))
        dist.all_reduce(whole, group=p._dp_group)
        return whole.view(p.shape)

    return get


class GatheredProbe(L.Callback):
    """Counts, after every training batch, the FSDP units of the frozen teacher (`pl_module.teacher`) still
    gathered whole, and writes the largest count to `<folder>/gathered-rank<r>.txt`: a frozen model that
    only runs forward must be resharded after each forward, or it stays whole on every device."""

    def __init__(self, folder: str):
        self.folder = folder
        self.most = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in pl_module.teacher.modules() if isinstance(m, FSDPModule)]
        gathered = sum(bool(m._get_fsdp_state()._fsdp_param_group.is_unsharded) for m in units
                       if m._get_fsdp_state()._fsdp_param_group is not None)
        self.most = max(self.most, gathered if units else -1)

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"gathered-rank{trainer.global_rank}.txt"), "w") as f:
            f.write(str(self.most))


class TraceProbe(L.Callback):
    """Writes `<folder>/trace-rank<r>.txt`: after each training batch, whether ZeRO-3's parameter coordinator
    holds a complete module trace (what its prefetching and parameter reuse need). A trace is recorded in
    the first step and complete from the second on, unless something re-enters the engine's root module mid-step
    (each entry resets the trace)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.states: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        coordinator = trainer.strategy.deepspeed_engine.optimizer.parameter_offload.get_param_coordinator()
        self.states.append("complete" if coordinator.is_complete_trace() else
                           "recording" if coordinator.is_record_trace() else "invalid")

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"trace-rank{trainer.global_rank}.txt"), "w") as f:
            f.write(" ".join(self.states))
