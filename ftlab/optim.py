"""Optimizer and learning-rate schedule: AdamW (fused), 8-bit AdamW, Adafactor or SGD, with warmup, then
linear or cosine decay down to a minimum learning rate (or constant)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, partial
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from ftlab.errors import ConfigError

_DEFAULT_WARMUP_RATIO = 0.06


def _lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """The learning-rate multiplier at `step`: linear warmup from 0 over `warmup` steps, then the decay to
    `min_ratio` at `total` (linear and cosine; with min_ratio 0, transformers' own schedules)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if schedule == "constant":
        return 1.0
    progress = min(1.0, float(step - warmup) / float(max(1, total - warmup)))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * max(0.0, decay)


def _bitsandbytes_optim():
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as err:  # pragma: no cover - a dependency of ftlab
        raise ConfigError(f"model.optim.name=adamw_8bit needs bitsandbytes ({err}); pip install bitsandbytes") from None
    return bnb_optim


MATRIX_MIN_8BIT_SIZE = 256
"""A weight matrix of at least this many elements (one block of bitsandbytes' block-wise state) gets 8-bit
AdamW moments; 1-D tensors keep bitsandbytes' own minimum (`min_8bit_size`, 4,096)."""


@cache
def _adamw_8bit_class() -> type[torch.optim.Optimizer]:
    class AdamW8bit(_bitsandbytes_optim().AdamW8bit):
        """bitsandbytes' AdamW8bit with 8-bit moments for every weight matrix of one block or more.

        bitsandbytes keeps tensors under 4,096 elements in 32 bits to spare biases and norms; that rule also
        keeps LoRA's small B matrices (e.g. 192 x 16 for a k projection) in 32 bits, a third of a LoRA
        run's state. The state is quantized per 256-element block, so a small matrix quantizes like any
        block of a large one."""

        def get_config(self, gindex, pindex, group):
            config = super().get_config(gindex, pindex, group)
            if group["params"][pindex].ndim >= 2:
                config["min_8bit_size"] = min(config["min_8bit_size"], MATRIX_MIN_8BIT_SIZE)
            return config

    return AdamW8bit


@dataclass
class Optim:
    """The optimizer and the learning-rate schedule."""

    name: Literal["adamw", "adamw_8bit", "adafactor", "sgd"] = "adamw"
    """adamw: torch's AdamW (fused where torch has it). adamw_8bit: bitsandbytes' AdamW8bit (block-wise 8-bit
    moments: ~1/4 of AdamW's state bytes; every weight matrix of >= 256 elements, LoRA's included, gets 8-bit
    state; 1-D tensors under 4,096 elements, such as biases and norms, keep 32-bit state). adafactor:
    transformers' Adafactor at the fixed `lr` (relative_step and scale_parameter off; factored second
    moment, no first). sgd: torch's SGD with `momentum`."""
    lr: float = 5e-5
    """Peak learning rate (after warmup); layer-wise decay scales it per block."""
    weight_decay: float = 0.01
    """Weight decay (not applied to biases and norm weights): decoupled for adamw, adamw_8bit and
    adafactor, L2 (added to the gradient) for sgd."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (adamw, adamw_8bit)."""
    eps: float = 1e-8
    """AdamW epsilon (adamw, adamw_8bit)."""
    momentum: float = 0.0
    """SGD momentum (sgd only)."""
    warmup_ratio: float | None = None
    """Share of the training steps spent warming the learning rate up from 0 (default 0.06 unless
    `warmup_steps` is given; set one of the two)."""
    warmup_steps: int | None = None
    """Warmup length in optimizer steps, instead of `warmup_ratio`."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup: linear or cosine down to `min_lr_ratio` x lr at the last step, or constant."""
    min_lr_ratio: float = 0.0
    """Where linear and cosine decay end, as a share of `lr` (e.g. 0.1: down to lr/10)."""
    fused: bool | None = None
    """Fused AdamW kernel (adamw only; default: on wherever torch has it; ~7x faster optimizer step on CPU)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"model.optim.lr={self.lr} must be positive (e.g. 5e-5 for full, 1e-3 for LoRA)")
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ConfigError(f"model.optim.warmup_ratio={self.warmup_ratio} and warmup_steps={self.warmup_steps} are "
                              "both set; give one of them")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"model.optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"model.optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.weight_decay < 0:
            raise ConfigError(f"model.optim.weight_decay={self.weight_decay} must be >= 0")
        if not 0 <= self.min_lr_ratio < 1:
            raise ConfigError(f"model.optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1)")
        if self.min_lr_ratio and self.schedule == "constant":
            raise ConfigError(f"model.optim.min_lr_ratio={self.min_lr_ratio} applies to the linear and cosine schedules, "
                              "not constant; use schedule: linear or cosine, or min_lr_ratio: 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"model.optim.momentum={self.momentum} must be in [0, 1)")
        if self.momentum and self.name != "sgd":
            raise ConfigError(f"model.optim.momentum={self.momentum} is an SGD option; with name {self.name} leave it 0 "
                              "(AdamW's momentum is betas[0])")
        if self.fused and self.name != "adamw":
            raise ConfigError(f"model.optim.fused=true is an option of torch's AdamW; name {self.name} has no fused kernel")

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` optimizer steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        ratio = _DEFAULT_WARMUP_RATIO if self.warmup_ratio is None else self.warmup_ratio
        return int(ratio * total_steps)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The learning-rate multiplier at optimizer step `step` (0-based) of `total_steps`."""
        return _lr_factor(step, warmup=self.warmup(total_steps), total=max(total_steps, 1), schedule=self.schedule,
                          min_ratio=self.min_lr_ratio)

    def optimizer(self, param_groups: list[dict], allow_fused: bool = True) -> torch.optim.Optimizer:
        """The optimizer over the groups (their `names` dropped); `allow_fused=False` picks the unfused AdamW
        kernel when `fused` is left unset (16-mixed: see FineTuneModule.configure_optimizers)."""
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups]
        if self.name == "adamw_8bit":
            return _adamw_8bit_class()(groups, lr=self.lr, betas=self.betas, eps=self.eps,
                                       weight_decay=self.weight_decay)
        if self.name == "adafactor":
            from transformers.optimization import Adafactor

            # a fixed learning rate (the schedule's): no relative step, no scaling by the parameter's RMS
            return Adafactor(groups, lr=self.lr, relative_step=False, scale_parameter=False, warmup_init=False,
                             weight_decay=self.weight_decay)
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        fused = self.fused
        if fused is None:
            fused = allow_fused and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                                        for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=fused or None)

    def build(self, param_groups: list[dict], total_steps: int, allow_fused: bool = True):
        """The optimizer over the groups and its schedule (see `optimizer`)."""
        optimizer = self.optimizer(param_groups, allow_fused)
        total = max(total_steps, 1)
        warmup = self.warmup(total_steps)
        if warmup > total:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"ftlab: model.optim.warmup_steps={warmup} is longer than the run ({total} optimizer steps): "
                           "the learning rate never reaches model.optim.lr")
        factor = partial(_lr_factor, warmup=warmup, total=total, schedule=self.schedule, min_ratio=self.min_lr_ratio)
        return optimizer, LambdaLR(optimizer, factor)
