"""Training speed from FLOPs: tokens/s = MFU x peak FLOP/s x devices / FLOPs per token.

FLOPs per trained token (Kaplan et al. 2020; Narayanan et al. 2021): a forward pass costs 2 per parameter
plus the attention scores (2 x 2 x blocks x length x hidden). Backward costs the forward again for the
activation gradients of every block down to the lowest trainable one, plus 2 per trainable parameter for
the weight gradients: full fine-tuning 3x forward; adapters ~2x forward; a frozen backbone ~1x.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def speed(flops: float, peak_tflops: float, mfu: float, devices: int, tokens_per_step: int,
          steps: int | None) -> SpeedEstimate:
    tokens_per_s = mfu * peak_tflops * 1e12 * devices / flops
    step = tokens_per_step / tokens_per_s
    return SpeedEstimate(flops, tokens_per_s, step, steps, step * steps if steps else None)
