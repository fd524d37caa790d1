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


def _atomic_dir(final: str):
    """Write into a temp dir beside `final`, then swap it in: a crash leaves the old export intact."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}.tmp-")


def _swap_in(tmp: str, final: str) -> None:
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _save(model: nn.Module, tokenizer, final: str) -> None:
    tmp = _atomic_dir(final)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _swap_in(tmp, final)
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
