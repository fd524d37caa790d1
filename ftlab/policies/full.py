"""Full fine-tuning: every weight trains."""

from __future__ import annotations

from torch import nn

from ftlab.errors import ConfigError
from ftlab.policies.base import Policy, layer_decay_scale, set_trainable
from ftlab.policies.layers import ModelParts


class Full(Policy):
    """Full fine-tuning: every weight of the model trains."""

    name = "full"

    def __init__(self, layer_lr_decay: float = 1.0):
        """
        Args:
            layer_lr_decay: Layer-wise learning-rate decay (1.0 = off). The head gets the base rate, each
                transformer block below it this factor times the one above (e.g. 0.9), the embeddings least.
                An LM head tied to the embeddings is one weight with them: it gets the embeddings' rate.
        """
        if not 0 < layer_lr_decay <= 1:
            raise ConfigError(f"policy.layer_lr_decay={layer_lr_decay} must be in (0, 1]; use e.g. 0.9, or 1.0 for off")
        self.layer_lr_decay = layer_lr_decay

    def apply(self, model: nn.Module, task) -> nn.Module:
        set_trainable(model, lambda name: True)
        return model

    def lr_scale(self, name: str, parts: ModelParts) -> float:
        return layer_decay_scale(name, parts, self.layer_lr_decay)
