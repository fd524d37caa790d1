"""Optimizer and learning-rate schedule: AdamW with warmup, then linear or cosine decay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from ftlab.errors import ConfigError

_SCHEDULES = {
    "linear": get_linear_schedule_with_warmup,
    "cosine": get_cosine_schedule_with_warmup,
    "constant": lambda opt, num_warmup_steps, num_training_steps: get_constant_schedule_with_warmup(opt, num_warmup_steps),
}


@dataclass
class Optim:
    """AdamW settings and the learning-rate schedule."""

    lr: float = 5e-5
    """Peak learning rate (after warmup); layer-wise decay scales it per block."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norm weights)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.06
    """Share of the training steps spent warming the learning rate up from 0."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup: linear to 0, cosine to 0, or constant."""
    fused: bool | None = None
    """Fused AdamW kernel (default: on wherever torch has it; ~7x faster optimizer step on CPU)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"model.optim.lr={self.lr} must be positive (e.g. 5e-5 for full, 1e-3 for LoRA)")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"model.optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"model.optim.weight_decay={self.weight_decay} must be >= 0")

    def build(self, param_groups: list[dict], total_steps: int, allow_fused: bool = True):
        """AdamW over the groups and its schedule; `allow_fused=False` picks the unfused kernel when
        `fused` is left unset (16-mixed: see FineTuneModule.configure_optimizers)."""
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups]
        fused = self.fused
        if fused is None:
            fused = allow_fused and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                                        for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=fused or None)
        warmup = int(self.warmup_ratio * total_steps)
        scheduler = _SCHEDULES[self.schedule](optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))
        return optimizer, scheduler
