"""What every policy does: decide which parameters train, and how they group for the optimizer."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable

from torch import nn

from ftlab.errors import ConfigError
from ftlab.policies.layers import ModelParts, find_parts

# Biases and norm weights are not decayed (the usual AdamW practice, as in BERT and HF Trainer).
_NO_DECAY = re.compile(r"(^|\.)(bias|LayerNorm\.weight|layer_norm\.weight|norm\.weight|ln_\w+\.weight)$|norm")


def set_trainable(model: nn.Module, is_trainable) -> None:
    """One line that every policy ends in: `requires_grad` from a predicate on the parameter name."""
    for name, param in model.named_parameters():
        param.requires_grad_(bool(is_trainable(name)))


def compile_patterns(patterns: Iterable[str], option: str) -> list[re.Pattern]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ConfigError(f"{option}: {p!r} is not a valid regular expression ({err}); fix the pattern") from None
    return compiled


class Policy(ABC):
    """How a pretrained model is adapted: which weights train (set in `apply`), and their learning rates."""

    name: str = "policy"

    def validate(self, model: nn.Module, task) -> None:  # noqa: B027 - optional hook
        """Check the options against the model's structure (called on a weightless skeleton, before any
        weights load). Raise ConfigError naming the bad value."""

    @abstractmethod
    def apply(self, model: nn.Module, task) -> nn.Module:
        """Set `requires_grad` (and wrap the model, for adapters); return the model to train."""

    def lr_scale(self, name: str, parts: ModelParts) -> float:
        """Learning-rate multiplier for a parameter (layer-wise decay overrides this)."""
        return 1.0

    def will_train(self, name: str) -> bool:
        """Whether a frozen parameter starts training later in the run (gradual unfreezing). Trainable
        parameters and these go to the optimizer; frozen weights never do."""
        return False

    @property
    def changes_trainable_set(self) -> bool:
        """Whether parameters start training mid-run (strategies that fix their partitions at start,
        like DeepSpeed ZeRO, cannot follow)."""
        return False

    def on_epoch_start(self, model: nn.Module, epoch: int) -> list[str]:
        """Hook for schedules (gradual unfreezing); returns names of parameters that changed."""
        return []

    @property
    def changes_frozen_weights(self) -> bool:
        """Whether `apply` changes weights it leaves frozen (then they are not the pretrained ones, and
        checkpoints must hold them: checkpoints.leave_frozen_out)."""
        return False

    def meta_init_blocker(self) -> str | None:
        """Why the parameters `apply` creates cannot be initialised before the pretrained weights are loaded
        (they are computed from them), or None. Sharded loading applies the policy to a weightless model."""
        return None

    def initial_values(self, model: nn.Module, names: list[str]) -> dict:
        """Initial values (host tensors, whole) of the parameters `apply` created on a meta-device model."""
        return {}

    def copied_params(self, names: list[str]) -> dict[str, str]:
        """Parameters `apply` created as copies of others (name -> the original's name)."""
        return {}

    def describe(self) -> dict:
        """Fields logged to the run summary and trackers."""
        return {"policy": self.name}

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups: one per (learning rate, decay) pair, trainable-eventually only."""
        parts = find_parts(model)
        groups: dict[tuple[float, bool], dict] = {}
        for name, param in model.named_parameters():
            if not (param.requires_grad or self.will_train(name)):
                continue
            scale = self.lr_scale(name, parts)
            decay = not _NO_DECAY.search(name)
            group = groups.setdefault(
                (scale, decay),
                {"params": [], "names": [], "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0},
            )
            group["params"].append(param)
            group["names"].append(name)
        if not groups:
            raise ConfigError(f"policy {self.name!r} leaves no parameter to train; make at least one trainable")
        return list(groups.values())


def layer_decay_scale(name: str, parts: ModelParts, decay: float) -> float:
    """Layer-wise learning-rate decay: the top (head) gets the base rate, each block below `decay` times
    the one above, the embeddings the smallest."""
    if decay == 1.0:
        return 1.0
    top = len(parts.blocks) + 1
    return decay ** (top - parts.depth(name))
