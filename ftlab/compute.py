"""How the model computes: its attention kernel, activation checkpointing and `torch.compile`. Model
options (`model.attn_implementation`, `model.activation_checkpointing`, `model.compile`) that trade memory
for compute or start-up time for speed, applied the same way under every strategy and policy."""

from __future__ import annotations

import importlib.util

from torch import nn

from ftlab.errors import ConfigError, did_you_mean

ATTENTION = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def check_attention(name: str | None, device_type: str | None = None, precision: str | None = None,
                    weight_dtype: str | None = None) -> None:
    """Refuse an attention kernel that cannot run here before any weights load (transformers would only say
    so after loading them); the device and the precision are checked once known."""
    if name is None:
        return
    if name not in ATTENTION:
        raise ConfigError(f"model.attn_implementation={name!r} is not an attention kernel; {did_you_mean(name, ATTENTION)}")
    if name == "flash_attention_2" and precision in ("32-true", "64-true") and weight_dtype in (None, "float32",
                                                                                              "float64"):
        # no autocast and fp32 weights: the queries are fp32 (transformers casts them to the projections' dtype),
        # and flash-attn takes fp16/bf16 only: it failed at the first forward, after the weights had loaded
        raise ConfigError(f"model.attn_implementation=flash_attention_2 with trainer.precision={precision} and fp32 "
                          "weights: flash attention computes in fp16 or bf16 only; use trainer.precision bf16-mixed, "
                          "or model.dtype bfloat16, or sdpa")
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn --no-build-isolation); or use sdpa")
        if device_type not in (None, "cuda"):
            raise ConfigError(f"model.attn_implementation=flash_attention_2 runs on CUDA GPUs only, this run is on "
                              f"{device_type}; use sdpa")


def check_packed_rows(name: str | None, data) -> None:
    """Packed LM rows carry each example's positions and no attention mask; sdpa, eager and flex attention
    build the block-diagonal mask from them, but transformers' flash-attention path separates the examples
    only in a batch of one row (in larger ones every example would attend to those packed before it)."""
    batch = getattr(data, "batch_size", 1)
    if name == "flash_attention_2" and getattr(data, "packing", False) and batch > 1:
        raise ConfigError(f"model.attn_implementation=flash_attention_2 with packed rows (data.packing) and "
                          f"data.batch_size={batch}: flash attention keeps packed examples apart only in batches of "
                          "one row; use sdpa, or data.batch_size 1 with a longer data.max_length, or data.packing false")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward instead of keeping them: about the
    memory of one block's activations instead of all of them, for ~1/3 more compute. Non-reentrant
    (torch's recommended form): it works with frozen inputs (peft, frozen blocks), FSDP2 and DDP."""
    base = getattr(model, "get_base_model", lambda: model)()
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.activation_checkpointing: {type(base).__name__} does not support gradient "
                          "checkpointing; turn it off")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_blocks(model: nn.Module) -> int:
    """`torch.compile` each transformer block in place (as torchtitan does): one small graph compiled once
    and reused by every block of the same shapes, instead of one whole-model graph that breaks at every
    Python-side branch of the model code. FSDP2 then shards the compiled blocks. Returns the block count."""
    from ftlab.policies.layers import find_parts

    parts = find_parts(model)
    if parts.block_class is None:
        raise ConfigError("model.compile: no list of transformer blocks was found in this model to compile")
    blocks = [m for m in model.modules() if isinstance(m, parts.block_class)]
    for block in blocks:
        block.compile()
    return len(blocks)
