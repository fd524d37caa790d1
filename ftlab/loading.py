"""Loading pretrained models and tokenizers: hub ids, folders, named offline models and GGUF files.

GGUF: transformers dequantizes a GGUF file into a regular model on every load (25 s for a 135M model on
a laptop CPU, 13 s more for its tokenizer). The dequantized copy is cached once as a plain
`from_pretrained` folder (`$FTLAB_CACHE/gguf/`), which reloads in under a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ftlab.data.sources import model_location
from ftlab.errors import ConfigError


def _cache_root() -> str:
    return os.path.join(os.environ.get("FTLAB_CACHE", os.path.expanduser("~/.cache/ftlab")), "gguf")


def _gguf_folder(path: str, gguf_file: str, kwargs: dict) -> str:
    """A plain folder holding the dequantized model and tokenizer of a local GGUF file (made once)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    file = os.path.join(path, gguf_file)
    st = os.stat(file)
    key = hashlib.sha256(f"{Path(file).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = os.path.join(_cache_root(), key)
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(_cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=_cache_root(), prefix=".tmp-")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, **kwargs)
        except ValueError:  # an encoder or other non-decoder architecture
            model = AutoModel.from_pretrained(path, gguf_file=gguf_file, **kwargs)
        # the weights are dequantized now; saving them must not claim a quantization
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not os.path.exists(folder):
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_pretrained(name_or_path: str, gguf_file: str | None = None, **kwargs) -> str:
    """The folder or hub id that `from_pretrained` should read for `name_or_path` (GGUF: the cached
    dequantized folder; a hub GGUF repository is downloaded by transformers first)."""
    path, extra = model_location(name_or_path, gguf_file)
    if not extra:
        return path
    if not os.path.isdir(path):
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(path, extra["gguf_file"], revision=kwargs.get("revision"))
        path = os.path.dirname(file)
    if not os.path.isfile(os.path.join(path, extra["gguf_file"])):
        raise ConfigError(f"model.gguf_file={extra['gguf_file']!r}: no such file in {path}")
    return _gguf_folder(path, extra["gguf_file"], {k: v for k, v in kwargs.items() if k == "trust_remote_code"})


def load_model(auto_class, name_or_path: str, gguf_file: str | None = None, **kwargs):
    return auto_class.from_pretrained(resolve_pretrained(name_or_path, gguf_file, **kwargs), **kwargs)


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_pretrained(name_or_path, gguf_file, **kwargs), **kwargs)


def load_config(name_or_path: str, gguf_file: str | None = None, **kwargs):
    """The model config only (cheap: for a GGUF file, its metadata, without dequantizing the weights)."""
    from transformers import AutoConfig

    path, extra = model_location(name_or_path, gguf_file)
    return AutoConfig.from_pretrained(path, **extra, **kwargs)
