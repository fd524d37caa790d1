"""Loading pretrained models and tokenizers: hub ids, folders, named offline models and GGUF files.

GGUF: transformers dequantizes a GGUF file into a regular model on every load (25 s for a 135M model on
a laptop CPU, 13 s more for its tokenizer). The dequantized copy is cached once as a plain
`from_pretrained` folder (`$FTLAB_CACHE/gguf/`), which reloads in under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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


# What from_pretrained reads besides the weights: model, generation and tokenizer configs and the weight
# index (*.json), tokenizer vocabularies (sentencepiece *.model, WordPiece/BPE *.txt, *.tiktoken), chat templates
_SIDE_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def cached_snapshot(repo_id: str, revision: str | None = None) -> str | None:
    """The folder of a hub repository in this machine's hub cache (what prepare_data fetched), or None where it
    is not there. A snapshot holding only what from_pretrained reads counts: snapshot_download(local_files_only)
    refuses it once it has cached the repository's file list (IncompleteSnapshotError: no README, no other
    formats), which made every hub model look absent to the sharded loaders."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError

    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except IncompleteSnapshotError as err:
        return err.snapshot_path
    except (OSError, ValueError):  # not cached; not a repository id
        return None


def download_pretrained(name_or_path: str, gguf_file: str | None = None, revision: str | None = None,
                        trust_remote_code: bool = False) -> None:
    """Fetch into the Hugging Face cache the files `from_pretrained` reads for a hub id: configs, tokenizer and
    the weights (safetensors; PyTorch's *.bin only where a repository has no safetensors). One rank per node
    calls it before the others load (FineTuneModule.prepare_data), so a node downloads multi-GB weights once.
    A local folder or named offline model has nothing to fetch; a GGUF source is fetched and dequantized.

    Args:
        name_or_path: As `model.name_or_path`.
        gguf_file: As `model.gguf_file`.
        revision: Hub revision (branch, tag or commit).
        trust_remote_code: Fetch the repository's model code (*.py) too.
    """
    path, extra = model_location(name_or_path, gguf_file)
    if extra:  # the GGUF file downloads (hub) and dequantizes into ftlab's cache, where every rank finds it
        resolve_pretrained(name_or_path, gguf_file, revision=revision, trust_remote_code=trust_remote_code)
        return
    if os.path.isdir(os.path.expanduser(path)):
        return
    from huggingface_hub import snapshot_download
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    from ftlab import __version__

    def fetch(patterns: list[str]) -> str:
        # top-level files only: subfolders hold other formats (onnx/, openvino/) or other checkpoints
        return snapshot_download(path, revision=revision, allow_patterns=patterns, ignore_patterns=["*/*"],
                                 library_name="ftlab", library_version=__version__)

    try:
        folder = fetch([*_SIDE_FILES, *(["*.py"] if trust_remote_code else []), SAFE_WEIGHTS_NAME])
        if os.path.exists(os.path.join(folder, SAFE_WEIGHTS_NAME)):
            return
        for index in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):  # sharded: the shards its index names
            if os.path.exists(os.path.join(folder, index)):
                with open(os.path.join(folder, index)) as f:
                    fetch(sorted(set(json.load(f)["weight_map"].values())))
                return
        fetch([WEIGHTS_NAME])
    except OSError as err:  # huggingface_hub's HTTP and cache errors are OSErrors
        raise ConfigError(f"model.name_or_path={name_or_path!r}: the model files could not be downloaded "
                          f"({str(err).splitlines()[0][:200]}); check the hub id, model.revision and the network, "
                          "or give a local folder") from None


def apply_config_overrides(config, overrides: dict, where: str = "") -> None:
    """`model.config_overrides` set on a model config, or one line naming the fields it lacks."""
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise ConfigError(f"model.config_overrides: {unknown} are not fields of the {config.model_type} config"
                          f"{where}; e.g. {', '.join(sorted(config.to_dict())[:8])}, ...")
    for key, value in overrides.items():
        setattr(config, key, value)


def load_model(auto_class, name_or_path: str, gguf_file: str | None = None, **kwargs):
    """`auto_class.from_pretrained`. A task head the checkpoint lacks (a classifier on a plain encoder) is
    expected: transformers' LOAD REPORT of it ("classifier MISSING") is replaced by one ftlab line naming
    the new head; any other load issue keeps transformers' report."""
    import logging

    from ftlab import console

    reports: list[logging.LogRecord] = []

    class _Hold(logging.Filter):
        def filter(self, record):
            if "LOAD REPORT" in str(record.msg):
                reports.append(record)
                return False
            return True

    hold = _Hold()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(hold)
    try:
        with console.still_running(f"loading {name_or_path}"):
            model, info = auto_class.from_pretrained(resolve_pretrained(name_or_path, gguf_file, **kwargs),
                                                     output_loading_info=True, **kwargs)
    finally:
        logger.removeFilter(hold)
    head = new_head(model, info)
    if head:
        console.note("head", head)  # the run header says it, once
    for record in reports if (not head or console.is_verbose()) else []:
        logger.handle(record)  # not only a new head: transformers' own report says what
    return model


def new_head(model, info: dict) -> dict | None:
    """{names, why} when the only weights the checkpoint lacked are a task head outside the pretrained
    backbone (as for every classifier on a plain encoder), else None."""
    missing = sorted(info.get("missing_keys") or [])
    if not missing or info.get("mismatched_keys") or info.get("error_msgs"):
        return None
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and any(k.startswith(prefix + ".") for k in missing):
        return None  # the backbone itself lacks weights: a real problem, keep transformers' report
    modules = sorted({re.sub(r"\.(weight|bias)$", "", k) for k in missing})
    names = ", ".join(modules) + (" (head)" if len(modules) > 1 else " head")
    return {"names": names, "why": "randomly initialised, as expected: the pretrained checkpoint has no head "
                                   "for this task; it trains now"}


_TOKENIZER_FILE = re.compile(r"^(tokenizer.*|vocab.*|merges\.txt|.*\.model|spiece.*|sentencepiece.*|special_tokens_map\.json)$")


def check_tokenizer_files(folder: str, option: str) -> None:
    """Refuse a local model folder without tokenizer files: transformers then builds a tokenizer of a few special
    tokens from the config alone, every word becomes [UNK], and a run trains on nothing and exits 0."""
    if os.path.isdir(folder) and not any(_TOKENIZER_FILE.match(n) for n in os.listdir(folder)):
        raise ConfigError(f"{option}={folder!r} holds no tokenizer files (tokenizer.json, tokenizer_config.json, "
                          "vocab.*, *.model): save the tokenizer beside the weights "
                          f"(AutoTokenizer.from_pretrained(BASE).save_pretrained({folder!r}))")


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, option: str = "data.tokenizer", **kwargs):
    from transformers import AutoTokenizer

    folder = resolve_pretrained(name_or_path, gguf_file, **kwargs)
    if not gguf_file:  # a GGUF file holds its tokenizer
        check_tokenizer_files(folder, option)
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def load_config(name_or_path: str, gguf_file: str | None = None, **kwargs):
    """The model config only (cheap: for a GGUF file, its metadata, without dequantizing the weights)."""
    from transformers import AutoConfig

    path, extra = model_location(name_or_path, gguf_file)
    return AutoConfig.from_pretrained(path, **extra, **kwargs)


def adopt_generation_config(model, folder: str) -> None:
    """A model built from its config (for sharded loading) gets the checkpoint's generation_config.json, as
    from_pretrained's does: its end-of-turn tokens and sampling defaults go into the export."""
    if not os.path.isfile(os.path.join(folder, "generation_config.json")) or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(folder)


class PretrainedWeights:
    """The tensors of a pretrained model's safetensors files, read one at a time and by dim-0 rows: files are
    memory-mapped, so a rank that keeps a shard of a tensor reads only that shard's rows.

    Names: the checkpoint may be saved with or without the task model's backbone prefix (a `BertModel`
    saved bare, loaded into `BertForSequenceClassification` whose names start with `bert.`), as
    `from_pretrained` allows; `key()` maps a model name to the checkpoint's."""

    def __init__(self, folder: str, prefix: str = ""):
        from safetensors import safe_open

        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            single = os.path.join(folder, "model.safetensors")
            with safe_open(single, "pt") as f:
                files = {k: single for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        self.files = files
        self.folder = folder
        self.prefix = prefix + "." if prefix else ""
        self._open: dict = {}

    @classmethod
    def find(cls, name_or_path: str, gguf_file: str | None, revision: str | None, prefix: str) -> PretrainedWeights | None:
        """The weights `from_pretrained` would read for `name_or_path`, if they are safetensors (a GGUF source's
        cached dequantized folder is); None for other formats."""
        folder = resolve_pretrained(name_or_path, gguf_file, revision=revision)
        if not os.path.isdir(folder):  # a hub id: prepare_data has fetched it into the hub cache
            folder = cached_snapshot(folder, revision)
            if folder is None:
                return None
        if not any(os.path.exists(os.path.join(folder, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
            return None
        return cls(folder, prefix)

    def key(self, name: str) -> str | None:
        """The checkpoint's name for the model's parameter `name`, or None if the checkpoint lacks it."""
        for key in (name, name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else None,
                    self.prefix + name if self.prefix else None):
            if key and key in self.files:
                return key
        return None

    def _slice(self, key: str):
        from safetensors import safe_open

        path = self.files[key]
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        return self._open[path].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of a tensor (from the file's header: nothing is read)."""
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The stored dtype of a tensor, as safetensors names it (F32, BF16, F8_E4M3...)."""
        return self._slice(key).get_dtype()

    def floating(self, key: str) -> bool:
        """Stored as plain floats (not quantized values, which need their scales to mean anything)."""
        return self.dtype(key) in ("F64", "F32", "F16", "BF16")

    def read(self, key: str, start: int = 0, stop: int | None = None):
        """Rows [start, stop) of a tensor (the whole tensor by default), as stored."""
        sliced = self._slice(key)
        shape = sliced.get_shape()
        if not shape:  # a scalar
            return self._open[self.files[key]].get_tensor(key)
        return sliced[start: shape[0] if stop is None else stop]

    def release(self) -> None:
        """Close the files read so far. The pages read stay mapped, and count as the process's own memory, as
        long as a file is open: a rank that keeps its shards would hold them twice. The next read reopens."""
        self._open.clear()
