"""Export a trained model in the standard Hugging Face format (safetensors + config + tokenizer).

Full/freeze runs: `export/` is a `from_pretrained` folder. Adapter runs: `export/adapter/` (peft's
`save_pretrained`, loadable with `PeftModel.from_pretrained`) and `export/merged/` (adapter merged into the
base weights: a plain transformers model).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile

from peft import PeftModel
from torch import nn

from ftlab.checkpoints import replace_path


def _atomic_dir(final: str):
    """Write into a temp dir beside `final`, then swap it in: a crash leaves the old export intact."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}.tmp-")


def _save(model: nn.Module, tokenizer, final: str) -> None:
    tmp = _atomic_dir(final)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_path(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_model(model: nn.Module, tokenizer, out_dir: str, merge_adapter: bool = True) -> dict[str, str]:
    """Save `model` under `out_dir`; returns {kind: folder}."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, PeftModel):
            folders = {"adapter": os.path.join(out_dir, "adapter")}
            _save(model, tokenizer, folders["adapter"])
            if merge_adapter and model.peft_config[model.active_adapter].peft_type.value not in (
                "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"
            ):
                merged = copy.deepcopy(model).merge_and_unload()
                folders["merged"] = os.path.join(out_dir, "merged")
                _save(merged, tokenizer, folders["merged"])
            return folders
        _save(model, tokenizer, out_dir)
        return {"model": out_dir}
    finally:
        model.train(was_training)


def checkpoint_state(path: str) -> dict:
    """The module's state dict (`model.`-prefixed keys) from any checkpoint ftlab writes: a Lightning
    file (single device, DDP, FSDP full), an FSDP sharded folder, or a DeepSpeed ZeRO folder."""
    import torch

    from ftlab.errors import ConfigError

    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    if os.path.exists(os.path.join(path, ".metadata")):  # torch.distributed.checkpoint (FSDP sharded)
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, os.path.join(tmp, "full.pt"))
            return torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=True)["state_dict"]
    if os.path.exists(os.path.join(path, "latest")) or os.path.isdir(os.path.join(path, "checkpoint")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(path)
    raise ConfigError(f"--ckpt {path!r} is neither a checkpoint file nor a sharded (FSDP / DeepSpeed) checkpoint folder")


def load_into(model: nn.Module, module_state: dict) -> None:
    """Load a checkpoint's weights into a freshly built model. Weights a checkpoint leaves out must be
    frozen ones (they are the pretrained weights the model was just built with): a converted ZeRO-1
    checkpoint of a LoRA run holds only the trainable tensors."""
    from ftlab.errors import ConfigError

    state = {k[len("model."):]: v for k, v in module_state.items() if k.startswith("model.")}
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(result.missing_keys) & trainable)
    if missing or result.unexpected_keys:
        raise ConfigError(f"the checkpoint does not match this run's model: missing trained weights {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}; was it written by this run's config?")
