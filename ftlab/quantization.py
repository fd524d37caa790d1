"""QLoRA: the pretrained base loaded quantized by bitsandbytes (4-bit NF4/FP4 or 8-bit LLM.int8), prepared by
peft's k-bit preparation, with an adapter (LoRA, DoRA...) training on top.

The quantized base is frozen and is a function of the pretrained weights: checkpoints leave it out (they hold
the adapter, the head and the optimizer) and a resume or `ftlab export` quantizes the pretrained weights again.
Exports dequantize it: `export/merged/` is a full-precision model that plain transformers loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ftlab.errors import ConfigError


@dataclass
class Quantization:
    """Load the pretrained weights quantized (bitsandbytes) and train an adapter on top (QLoRA)."""

    bits: Literal[4, 8] = 4
    """4: 4-bit blocks of `type` (QLoRA); 8: LLM.int8 weights."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (normal float, QLoRA's) or fp4."""
    double_quant: bool = True
    """4-bit: quantize the block scales too (~0.4 bit per weight saved)."""
    compute_dtype: str | None = None
    """Dtype the 4-bit layers compute in (dequantized on the fly). Default: bfloat16 under bf16-mixed/-true,
    float16 under 16-mixed/-true, else the dtype the weights load in (float32)."""
    gradient_checkpointing: bool = True
    """peft's k-bit preparation turns on transformers' gradient checkpointing (non-reentrant); false keeps
    every activation (faster, more memory)."""

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"model.quantization.bits={self.bits}: give 4 (NF4/FP4, QLoRA) or 8 (LLM.int8)")
        if self.type not in ("nf4", "fp4"):
            raise ConfigError(f"model.quantization.type={self.type!r}: give nf4 or fp4")
        if self.compute_dtype is not None and not isinstance(getattr(torch, self.compute_dtype, None), torch.dtype):
            raise ConfigError(f"model.quantization.compute_dtype={self.compute_dtype!r} is not a torch dtype; use "
                              "float32, bfloat16 or float16")

    def hf_config(self, weight_dtype: torch.dtype, precision: str = "32-true", storage: torch.dtype | None = None):
        """transformers' BitsAndBytesConfig for `from_pretrained`. `storage`: the dtype the packed 4-bit weights are
        stored in (default uint8); FSDP2 needs the dtype it gathers the other parameters in (see `storage_dtype`)."""
        from transformers import BitsAndBytesConfig

        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:  # pragma: no cover - a dependency of ftlab
            raise ConfigError(f"model.quantization needs bitsandbytes ({err}); pip install bitsandbytes") from None
        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        if self.compute_dtype:
            compute = getattr(torch, self.compute_dtype)
        elif precision.startswith("bf16"):
            compute = torch.bfloat16
        elif precision.startswith("16"):
            compute = torch.float16
        else:
            compute = weight_dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.type,
                                  bnb_4bit_use_double_quant=self.double_quant, bnb_4bit_compute_dtype=compute,
                                  bnb_4bit_quant_storage=storage or torch.uint8)

    def module_config(self, module):
        """hf_config for a FineTuneModule, from its weight dtype, its trainer's precision and strategy."""
        trainer = getattr(module, "_trainer", None)
        precision = str(trainer.precision) if trainer is not None else "32-true"
        strategy = trainer.strategy if trainer is not None else None
        return self.hf_config(module.weight_dtype(), precision, storage_dtype(strategy, module.weight_dtype()))

    def prepare(self, model: nn.Module) -> nn.Module:
        """peft's k-bit preparation (everything frozen, norms and other non-quantized weights in fp32, gradient
        checkpointing non-reentrant); the quantized base kept out of checkpoints."""
        import warnings

        from peft import prepare_model_for_kbit_training

        # LLM.int8 on fp32 inputs says so at every layer's every call
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        for module in model.modules():
            if is_quantized_layer(module):
                _keep_out_of_checkpoints(module)
                # bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel on the first
                # no-grad eval forward (validation): a layout training then runs on, and one that fails on
                # layers narrower than a quantization block; keep the one layout
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
        return model


def storage_dtype(strategy, weight_dtype: torch.dtype) -> torch.dtype | None:
    """FSDP2 shards each parameter along dim 0 and gathers all of a unit's parameters in one dtype (its mixed
    precision's `param_dtype`, which it casts them to): the packed 4-bit bytes are stored in that dtype, so that
    the cast is none and the bytes split as any tensor does (torchtune and Axolotl do the same). bitsandbytes
    keeps each layer's block scales on the layer (`quant_state`), whole on every rank. Elsewhere: uint8."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return None
    policy = strategy.mixed_precision_policy() if hasattr(strategy, "mixed_precision_policy") else None
    return getattr(policy, "param_dtype", None) or weight_dtype


def check_combination(module, strategy) -> None:
    """What a quantized base cannot train with, refused before anything loads."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    from ftlab.policies import Adapter

    quant = getattr(module, "quantization", None)
    if quant is None:
        return
    if not isinstance(module.policy, Adapter):
        raise ConfigError(f"model.quantization with policy {module.policy.name}: a quantized base cannot train (its "
                          "weights are frozen integers); use policy Adapter (LoRA/DoRA on top: QLoRA)")
    if isinstance(strategy, DeepSpeedStrategy):
        raise ConfigError("model.quantization under DeepSpeed: not supported (ZeRO-3 partitions every parameter, the "
                          "packed quantized weights included, apart from their quantization state; ZeRO-1/2 with a "
                          "quantized base is untested); use strategy auto (one device), ddp or fsdp")
    if isinstance(strategy, ModelParallelStrategy) and module.quantization.bits == 8:
        raise ConfigError("model.quantization.bits=8 under FSDP: LLM.int8 weights are int8 tensors that FSDP2 would "
                          "cast to its gather dtype; use bits: 4 with fsdp, or strategy auto (one device) or ddp")


def is_quantized_layer(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit / Linear8bitLt."""
    return type(module).__module__.startswith("bitsandbytes.") and isinstance(module, nn.Linear)


def quantized_numels(model: nn.Module) -> dict[int, int]:
    """id(weight) -> how many values it stands for, for each bitsandbytes layer's weight (whose tensor holds them
    packed: two 4-bit values a byte, more per element in a wider storage dtype, and a shard of them under FSDP)."""
    return {id(m.weight): m.in_features * m.out_features for m in model.modules() if is_quantized_layer(m)}


def dequantize_gathered(entries, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Export: the gathered tensors of a block (`entries`: (name, owning module, attribute, is a buffer)), each
    bitsandbytes weight among them replaced by the full-precision weight it stands for, on the host. The
    gathered weight is the packed bytes only (an FSDP2 gather or a host copy drops bitsandbytes' subclass):
    its layer's quantization state says how to read them."""
    for name, owner, attr, _ in entries:
        if attr != "weight" or name not in state or not is_quantized_layer(owner):
            continue
        weight = owner.weight
        packed = state[name]
        import bitsandbytes as bnb

        if isinstance(owner, bnb.nn.Linear4bit):
            import bitsandbytes.functional as F

            qs = getattr(weight, "quant_state", None) or owner.quant_state
            device = qs.absmax.device
            data = packed.to(device).reshape(-1).view(torch.uint8).reshape(-1, 1)  # any storage dtype: its bytes
            state[name] = F.dequantize_4bit(data, qs).to("cpu")
        else:  # LLM.int8: int8 rows and their scales
            scb = getattr(weight, "SCB", None)
            if scb is None:
                scb = owner.state.SCB
            state[name] = (packed.to(scb.device).float() * scb.float().view(-1, 1) / 127).to("cpu")
    return state


def merge_dequantized(layer: nn.Module) -> nn.Module:
    """A peft LoRA/DoRA layer on a bitsandbytes base, whose gathered base weight is already dequantized (see
    export): merged into a plain full-precision nn.Linear (peft's own bnb merge would quantize the sum again)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = layer.get_base_layer()
    plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="cpu",
                      dtype=base.weight.dtype)
    plain.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
    if base.bias is not None:
        plain.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
    layer.base_layer = plain
    LoraLinear.merge(layer, safe_merge=False, adapter_names=None)  # the plain layer's merge, on this one
    return plain


def _keep_out_of_checkpoints(layer: nn.Module) -> None:
    """The layer's quantized weight (and its quantization state) left out of its state dict, and not missed
    when a state dict without it loads: the weight is rebuilt from the pretrained model, never trained."""

    def drop(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix) and
                    (k[len(prefix):] in ("weight", "SCB", "weight_format") or k[len(prefix):].startswith("weight."))]:
            del state_dict[key]

    def note(module, state_dict, prefix, *args):
        module._ftlab_not_loaded = prefix + "weight" if prefix + "weight" not in state_dict else None

    def forgive(module, incompatible_keys):
        key = getattr(module, "_ftlab_not_loaded", None)
        if key in incompatible_keys.missing_keys:
            incompatible_keys.missing_keys.remove(key)

    layer._register_state_dict_hook(drop)
    layer._register_load_state_dict_pre_hook(note, with_module=True)
    layer.register_load_state_dict_post_hook(forgive)
