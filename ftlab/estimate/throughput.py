"""Training speed from FLOPs: tokens/s = MFU x peak FLOP/s x devices / FLOPs per token.

FLOPs per trained token (Kaplan et al. 2020; Narayanan et al. 2021): a forward pass costs 2 per parameter
plus the attention scores (2 x 2 x blocks x length x hidden). Backward costs the forward again for the
activation gradients of every block down to the lowest trainable one, plus 2 per trainable parameter for
the weight gradients: full fine-tuning 3x forward; adapters ~2x forward; a frozen backbone ~1x.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Dense bf16 tensor-core peak (TFLOP/s) and memory (GiB) per GPU, from the vendors' data sheets.
GPUS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 141.0),
    "H100": (989.0, 80.0),
    "H100-PCIE": (756.0, 80.0),
    "A100-80GB": (312.0, 80.0),
    "A100-40GB": (312.0, 40.0),
    "L40S": (362.0, 48.0),
    "A10": (125.0, 24.0),
    "L4": (121.0, 24.0),
    "RTX4090": (165.0, 24.0),
    "V100": (125.0, 32.0),
    "T4": (65.0, 16.0),
}
NO_BF16 = {"V100", "T4"}  # before Ampere: fit keeps 32-true there unless the config says otherwise


@dataclass
class SpeedEstimate:
    flops_per_token: float
    tokens_per_s: float
    step_time_s: float
    steps: int | None
    wall_time_s: float | None


def flops_per_token(total_params: int, trainable_params: int, blocks: int, grad_blocks: int, hidden: int,
                    seq_len: int, full: bool) -> float:
    forward = 2.0 * total_params + 4.0 * blocks * seq_len * hidden
    if full:
        return 3.0 * forward
    activation_grads = forward * (grad_blocks / max(blocks, 1))
    return forward + activation_grads + 2.0 * trainable_params


@dataclass(frozen=True)
class ModelFlops:
    """What `flops_per_token` needs, read from a real model with its policy applied: the training step's
    FLOPs of any batch shape from one object (train/mfu)."""

    total_params: int
    trainable_params: int
    blocks: int
    grad_blocks: int
    hidden: int
    full: bool

    @classmethod
    def of(cls, model: nn.Module, total_params: int | None = None, trainable_params: int | None = None) -> ModelFlops:
        """From `model` as it trains now. `total_params` / `trainable_params`: counts taken before a strategy
        sharded the parameters (a ZeRO-3 rank holds empty placeholders); default: counted here."""
        from ftlab.policies.layers import find_parts

        parts = find_parts(model)
        blocks = len(parts.blocks)
        named = list(model.named_parameters())
        total = total_params if total_params is not None else sum(p.numel() for _, p in named)
        trainable = trainable_params if trainable_params is not None else \
            sum(p.numel() for _, p in named if p.requires_grad)
        # activation gradients run from the loss down to the lowest trainable parameter: depth 0 (embeddings)
        # needs every block, depth i (block i-1) the blocks from there up, the head alone none
        lowest = min((parts.depth(n) for n, p in named if p.requires_grad), default=blocks + 1)
        config = getattr(model, "config", None)
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 0)
        return cls(total, trainable, blocks, min(blocks, blocks + 1 - lowest), hidden, trainable >= total)

    def per_token(self, seq_len: int) -> float:
        return flops_per_token(self.total_params, self.trainable_params, self.blocks, self.grad_blocks, self.hidden,
                               seq_len, self.full)

    def batch(self, rows: int, seq_len: int) -> float:
        """FLOPs of one training step on rows x seq_len computed tokens (padding computes like any token)."""
        return rows * seq_len * self.per_token(seq_len)


def speed(flops: float, peak_tflops: float, mfu: float, devices: int, tokens_per_step: int,
          steps: int | None) -> SpeedEstimate:
    tokens_per_s = mfu * peak_tflops * 1e12 * devices / flops
    step = tokens_per_step / tokens_per_s
    return SpeedEstimate(flops, tokens_per_s, step, steps, step * steps if steps else None)
