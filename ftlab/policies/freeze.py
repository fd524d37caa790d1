"""Transfer learning with a frozen backbone: linear probe, top-k blocks, name patterns, gradual unfreezing."""

from __future__ import annotations

from torch import nn

from ftlab.errors import ConfigError
from ftlab.policies.base import Policy, compile_patterns, layer_decay_scale, set_trainable
from ftlab.policies.layers import ModelParts, find_parts


class Freeze(Policy):
    """Freeze the pretrained backbone; train the task head and, optionally, the top blocks or named parts."""

    name = "freeze"

    def __init__(
        self,
        train_head: bool = True,
        top_k_layers: int = 0,
        trainable: list[str] | None = None,
        unfreeze_every: int = 0,
        unfreeze_max_layers: int | None = None,
        layer_lr_decay: float = 1.0,
    ):
        """
        Args:
            train_head: Train the task head (everything outside the backbone, e.g. `classifier`). With
                nothing else set this is a linear probe.
            top_k_layers: Also train the top k transformer blocks (found from the model, any architecture).
            trainable: Regular expressions (searched in parameter names) of further parameters to train,
                e.g. `["pooler", "LayerNorm"]`. Each must match at least one parameter.
            unfreeze_every: Gradual unfreezing (ULMFiT): every N epochs unfreeze the next block down from
                the top. 0 = off.
            unfreeze_max_layers: Stop gradual unfreezing at this many trainable blocks (default: all).
            layer_lr_decay: Layer-wise learning-rate decay (1.0 = off): each block gets this factor times
                the rate of the block above it; the head gets the base rate (a head tied to the
                embeddings is one weight with them: the embeddings' rate).
        """
        if top_k_layers < 0:
            raise ConfigError(f"policy.top_k_layers={top_k_layers} must be >= 0")
        if unfreeze_every < 0:
            raise ConfigError(f"policy.unfreeze_every={unfreeze_every} must be >= 0 (0 = off)")
        if unfreeze_max_layers is not None and unfreeze_max_layers < 0:
            raise ConfigError(f"policy.unfreeze_max_layers={unfreeze_max_layers} must be >= 0")
        if not 0 < layer_lr_decay <= 1:
            raise ConfigError(f"policy.layer_lr_decay={layer_lr_decay} must be in (0, 1]; e.g. 0.8, or 1.0 for off")
        self.train_head = train_head
        self.top_k_layers = top_k_layers
        self.trainable = list(trainable or [])
        self.unfreeze_every = unfreeze_every
        self.unfreeze_max_layers = unfreeze_max_layers
        self.layer_lr_decay = layer_lr_decay
        self._patterns = compile_patterns(self.trainable, "policy.trainable")
        self._unfrozen = top_k_layers
        self._parts: ModelParts | None = None

    def validate(self, model: nn.Module, task) -> None:
        parts = find_parts(model)
        names = [n for n, _ in model.named_parameters()]
        for pattern in self._patterns:
            if not any(pattern.search(n) for n in names):
                examples = ", ".join(sorted({n.rsplit(".", 1)[0] for n in names})[:8])
                raise ConfigError(
                    f"policy.trainable: pattern {pattern.pattern!r} matches no parameter of this model; "
                    f"use a part of a parameter name such as: {examples}, ..."
                )
        needs_blocks = self.top_k_layers or self.unfreeze_every
        if needs_blocks and not parts.blocks:
            raise ConfigError(
                "policy.top_k_layers / unfreeze_every: no list of transformer blocks was found in this model; "
                "name the parameters to train with policy.trainable instead"
            )
        if self.top_k_layers > len(parts.blocks):
            raise ConfigError(
                f"policy.top_k_layers={self.top_k_layers} but the model has {len(parts.blocks)} blocks; "
                f"use at most {len(parts.blocks)} (or policy: Full)"
            )
        if not (self.train_head or self.top_k_layers or self._patterns or self.unfreeze_every):
            raise ConfigError("policy Freeze with train_head=false and nothing else trainable trains nothing; "
                              "set train_head, top_k_layers or trainable")

    def _max_blocks(self) -> int:
        total = len(self._parts.blocks)
        return total if self.unfreeze_max_layers is None else min(total, self.unfreeze_max_layers)

    def _trains(self, name: str, n_blocks: int) -> bool:
        parts = self._parts
        if self.train_head and parts.is_head(name):
            return True
        i = parts.block_index(name)
        if i is not None and i >= len(parts.blocks) - n_blocks:
            return True
        return any(p.search(name) for p in self._patterns)

    def apply(self, model: nn.Module, task) -> nn.Module:
        self._parts = find_parts(model)
        set_trainable(model, lambda name: self._trains(name, self._unfrozen))
        return model

    def will_train(self, name: str) -> bool:
        n = self._max_blocks() if self.unfreeze_every else self._unfrozen
        return self._trains(name, max(n, self._unfrozen))

    @property
    def changes_trainable_set(self) -> bool:
        return self.unfreeze_every > 0

    def on_epoch_start(self, model: nn.Module, epoch: int) -> list[str]:
        if not self.unfreeze_every or epoch == 0:
            return []
        target = min(self._max_blocks(), self.top_k_layers + epoch // self.unfreeze_every)
        if target <= self._unfrozen:
            return []
        self._unfrozen = target
        changed = []
        for name, param in model.named_parameters():
            if not param.requires_grad and self._trains(name, target):
                param.requires_grad_(True)
                changed.append(name)
        return changed

    def lr_scale(self, name: str, parts: ModelParts) -> float:
        return layer_decay_scale(name, parts, self.layer_lr_decay)

    def describe(self) -> dict:
        return {"policy": self.name, "top_k_layers": self.top_k_layers, "unfreeze_every": self.unfreeze_every}
