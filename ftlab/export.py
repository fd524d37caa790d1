"""Export a trained model in the standard Hugging Face format (safetensors shards + config + tokenizer),
streamed: the model is gathered one block (a module's own tensors) at a time and at most one shard is held
in memory, so a model that fits only sharded across ranks exports too (no full state dict, no second model).

Full/freeze runs: `export/` is a `from_pretrained` folder. Adapter runs: `export/adapter/` (peft's
`save_pretrained` of the adapter weights, loadable with `PeftModel.from_pretrained`) and `export/merged/`
(the adapter merged into the base weights layer by layer, as `merge_and_unload` merges: a plain
transformers model).

Where the tensors come from is a `Gather`: blocks in, (block, its full tensors on the writing rank's host)
out. `trainer_gather` picks the strategy's (FSDP2 and ZeRO-3: collective, every rank iterates in lockstep;
DDP, ZeRO-1/2, one device: rank 0's own copy), `DcpReader` reads an FSDP sharded checkpoint (only the
model's entries) and `local_gather` a model in memory.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ftlab.checkpoints import recover_path, replace_path
from ftlab.console import WorkProgress
from ftlab.errors import ConfigError
from ftlab.quantization import dequantize_gathered, is_quantized_layer, merge_dequantized

if TYPE_CHECKING:
    from peft import PeftModel

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str, option: str = "max_shard_size") -> int:
    """Bytes, from an int or a size as transformers takes it: "5GB", "500MB", "20KB" (decimal), "1GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        n = int(m.group(1)) * _UNITS[(m.group(2) or "").upper()] if m else 0
    if n <= 0:
        raise ConfigError(f"{option}={size!r} is not a size; give bytes (e.g. 500000000) or a size like '5GB' or '500MB'")
    return n


# ---- writing


class ShardWriter:
    """Writes tensors as they come into safetensors shards of at most `max_shard_size` bytes (a larger tensor
    gets a shard of its own, as in transformers), holding one shard in memory. How many shards there will be
    is known only at the end, so shards are written under temporary names and `close` gives them
    transformers' names: `model.safetensors` when one shard holds everything, else
    `model-0000i-of-0000N.safetensors` and `model.safetensors.index.json`."""

    def __init__(self, folder: str, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE):
        """
        Args:
            folder: Where the files go (an existing, empty folder).
            max_shard_size: Bytes per shard at most: an int or a size like "5GB", "500MB".
        """
        self.folder = folder
        self.limit = parse_size(max_shard_size)
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file, its tensor names)
        self._names: set[str] = set()
        self.total_size = 0
        self.total_parameters = 0

    def add(self, name: str, tensor: torch.Tensor, parameter: bool = True) -> None:
        """Queue one tensor (buffers: `parameter=False`, left out of the index's `total_parameters`)."""
        if name in self._names:
            raise ValueError(f"export: tensor {name!r} given twice")
        size = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_bytes + size > self.limit:
            self._flush()
        self._names.add(name)
        self._shard[name] = tensor.contiguous()
        self._shard_bytes += size
        self.total_size += size
        self.total_parameters += tensor.numel() if parameter else 0

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.folder, f".shard-{len(self._written) + 1:05d}.safetensors.tmp")
        save_file(self._shard, path, metadata={"format": "pt"})
        self._written.append((path, list(self._shard)))
        self._shard, self._shard_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the shards, write the index; returns the file names."""
        if self._shard or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            os.replace(self._written[0][0], os.path.join(self.folder, "model.safetensors"))
            return ["model.safetensors"]
        weight_map = {}
        for i, (path, names) in enumerate(self._written, 1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, os.path.join(self.folder, final))
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                 "weight_map": weight_map}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")  # as save_pretrained writes it
        return [*dict.fromkeys(weight_map.values()), "model.safetensors.index.json"]


def write_safetensors(items: Iterable[tuple[str, torch.Tensor]], folder: str,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Write (name, tensor) pairs as they come into `folder` as (sharded) safetensors; see ShardWriter."""
    writer = ShardWriter(folder, max_shard_size)
    for name, tensor in items:
        writer.add(name, tensor)
    return writer.close()


def _atomic_dir(final: str):
    """Write into a temp dir beside `final`, then swap it in: a crash leaves the old export intact. What an
    earlier crash left is dealt with first: its temp dirs removed (an export's worth of disk each), a folder
    it moved aside put back. The temp dir gets the permissions a plain mkdir gives (mkdtemp's are owner-only:
    others on a shared cluster could not read the export)."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(final)}.tmp-"
    for name in os.listdir(parent):
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    recover_path(final)
    tmp = tempfile.mkdtemp(dir=parent, prefix=prefix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _write_folder(final: str, fill: Callable[[str], None], tokenizer) -> None:
    """`fill(tmp)` writes the folder's files; the tokenizer joins them; the folder appears at once."""
    tmp = _atomic_dir(final)
    try:
        fill(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_path(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- blocks: what is gathered together (structure only: the same on every rank)


@dataclass(frozen=True)
class Block:
    """One gathering step: a module's own parameters and persistent buffers, or (`whole`) its subtree's."""

    prefix: str  # the module's state-dict prefix ("" for the root, else ending in ".")
    module: nn.Module
    entries: tuple[tuple[str, nn.Module, str, bool], ...]  # (state-dict name, owning module, attribute, is a buffer)
    whole: bool = False

    @property
    def names(self) -> list[str]:
        return [e[0] for e in self.entries]

    @property
    def buffers(self) -> set[str]:
        return {e[0] for e in self.entries if e[3]}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The model's tensors, looked up now (FSDP2 swaps sharded and gathered parameters in and out)."""
        return {name: (owner._buffers if is_buffer else owner._parameters)[attr]
                for name, owner, attr, is_buffer in self.entries}


def _own_entries(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str, bool]]:
    """A module's own state-dict entries, in state-dict order (parameters, then persistent buffers)."""
    for attr, p in module._parameters.items():
        if p is not None:
            yield prefix + attr, module, attr, False
    for attr, b in module._buffers.items():
        if b is not None and attr not in module._non_persistent_buffers_set:
            yield prefix + attr, module, attr, True


def _subtree_entries(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str, bool]]:
    """As `module.state_dict()` lists them, without running its hooks (FSDP2, DeepSpeed)."""
    yield from _own_entries(module, prefix)
    for name, child in module._modules.items():
        if child is not None:
            yield from _subtree_entries(child, f"{prefix}{name}.")


def state_blocks(model: nn.Module, *, prefix: str = "", keep: Callable[[str], bool] | None = None,
                 whole: Callable[[nn.Module], bool] | None = None) -> list[Block]:
    """`model`'s state dict cut into blocks, in state-dict order.

    Args:
        model: The module to walk.
        prefix: Put before every name (the walked module's own prefix in a larger model).
        keep: Which state-dict names (prefix included) to take; default all.
        whole: Modules whose subtree is one block (peft layers, merged at export); default none.
    """
    blocks = []

    def visit(module: nn.Module, path: str) -> None:
        unit = whole is not None and whole(module)
        entries = _subtree_entries(module, path) if unit else _own_entries(module, path)
        entries = tuple(e for e in entries if keep is None or keep(e[0]))
        if entries:
            blocks.append(Block(path, module, entries, unit))
        if not unit:
            for name, child in module._modules.items():
                if child is not None:
                    visit(child, f"{path}{name}.")

    visit(model, prefix)
    return blocks


# ---- gathering: blocks -> (block, {name: full tensor in host memory} on the writing rank, None elsewhere)

Gather = Callable[[list[Block]], Iterator[tuple[Block, "dict[str, torch.Tensor] | None"]]]


def local_gather(blocks: list[Block], writer: bool = True):
    """A model this process holds whole (one device, DDP, a model loaded for `ftlab export`): no collective;
    copies, so that nothing written aliases the live model."""
    for block in blocks:
        yield block, ({n: t.detach().to("cpu", copy=True) for n, t in block.tensors().items()} if writer else None)


def trainer_gather(trainer, model: nn.Module) -> Gather:
    """The strategy's way of gathering `model` onto rank 0 block by block (collective where it is sharded)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    from ftlab.strategies import deepspeed, fsdp

    if isinstance(trainer.strategy, ModelParallelStrategy):
        return lambda blocks: fsdp.iter_full_state(trainer, model, blocks)
    if isinstance(trainer.strategy, DeepSpeedStrategy):  # ZeRO-3 gathers; ZeRO-1/2 ranks hold the whole model
        return lambda blocks: deepspeed.iter_full_state(trainer, model, blocks)
    return lambda blocks: local_gather(blocks, trainer.is_global_zero)


class DcpReader:
    """A `Gather` reading an FSDP sharded checkpoint (torch.distributed.checkpoint) without a process group:
    only the `state_dict.model.*` entries the blocks name, never the optimizer's, about `batch_bytes` at a
    time (each load reads the checkpoint's metadata: one per block would be slow on big models). Weights
    the checkpoint leaves out (frozen ones: checkpoints.leave_frozen_out) are read from the pretrained files."""

    def __init__(self, path: str, batch_bytes: int = 2**30, storage_reader=None, pretrained=None):
        """
        Args:
            path: The checkpoint folder (holds `.metadata`).
            batch_bytes: Tensor bytes per load, about: what this reader holds in memory at once.
            storage_reader: A torch.distributed.checkpoint StorageReader (default: FileSystemReader(path)).
            pretrained: (loading.PretrainedWeights, {model name: (its key there, the model's dtype)}): where
                the weights the checkpoint does not hold come from (a key of None, a shape after the dtype:
                zeros, for a weight no export writes).
        """
        from torch.distributed.checkpoint import FileSystemReader

        self.path = path
        self.batch_bytes = batch_bytes
        self.storage_reader = storage_reader or FileSystemReader(path)
        self.entries = self.storage_reader.read_metadata().state_dict_metadata
        self.weights, self.frozen = pretrained or (None, {})

    @staticmethod
    def key(name: str) -> str:
        """The checkpoint key of a model state-dict name (Lightning saves the LightningModule's `model.`)."""
        return f"state_dict.model.{name}"

    def _holds(self, name: str) -> bool:
        return hasattr(self.entries.get(self.key(name)), "size")  # a tensor entry (not some other object's)

    def _saved(self, name: str) -> bool:
        if self._holds(name):
            return True
        if name in self.frozen:
            return False
        raise ConfigError(f"--ckpt {self.path!r} has no tensor {self.key(name)!r}; was it written by this run's config?")

    def lacking(self, blocks: list[Block]) -> list[str]:
        """The names of `blocks` that neither the checkpoint nor the pretrained files can give."""
        return [n for block in blocks for n in block.names if not self._holds(n) and n not in self.frozen]

    def saved_model_state(self) -> dict[str, torch.Tensor]:
        """Every model tensor the checkpoint holds, at once, `model.`-prefixed (as checkpoint_state gives them)."""
        names = [k.removeprefix("state_dict.model.") for k in self.entries if k.startswith("state_dict.model.")]
        names = [n for n in names if self._holds(n)]
        blocks = [Block(prefix="", module=None, entries=tuple((n, None, "", False) for n in names))]
        return {f"model.{n}": t for _, state in self._load(blocks) for n, t in state.items()}

    def _nbytes(self, name: str) -> int:
        if not self._saved(name):
            key, dtype, *shape = self.frozen[name]
            return math.prod(self.weights.shape(key) if key else shape[0]) * dtype.itemsize
        entry = self.entries[self.key(name)]
        return entry.size.numel() * entry.properties.dtype.itemsize

    def empty(self, name: str) -> torch.Tensor:
        entry = self.entries[self.key(name)]
        return torch.empty(entry.size, dtype=entry.properties.dtype)

    def _pretrained(self, name: str) -> torch.Tensor:
        key, dtype, *shape = self.frozen[name]
        if key is None:  # a placeholder for a weight no export writes (export_cli.meta_model_and_pretrained)
            return torch.zeros(shape[0], dtype=dtype)
        value = self.weights.read(key).to(dtype, copy=True)
        self.weights.release()
        return value

    def __call__(self, blocks: list[Block]):
        batch, size = [], 0
        for block in blocks:
            batch.append(block)
            size += sum(self._nbytes(n) for n in block.names)
            if size >= self.batch_bytes:
                yield from self._load(batch)
                batch, size = [], 0
        if batch:
            yield from self._load(batch)

    def _load(self, batch: list[Block]):
        import warnings

        import torch.distributed.checkpoint as dcp

        state = {self.key(n): self.empty(n) for block in batch for n in block.names if self._saved(n)}
        if state:
            with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": no process group, on purpose
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, storage_reader=self.storage_reader, no_dist=True)
        for block in batch:
            yield block, {n: state.pop(self.key(n)) if self.key(n) in state else self._pretrained(n)
                          for n in block.names}


def is_dcp_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, ".metadata"))


# ---- names as save_pretrained writes them


def skipped_on_save(model: nn.Module, prefix: str = "") -> set[str]:
    """State-dict names (with `prefix`) that save_pretrained leaves out: `_keys_to_ignore_on_save`, and all but
    one name of a tensor several names share (tied embeddings: safetensors stores no aliases and
    from_pretrained ties them again). Which name stays follows transformers: the names a model declares as
    tied copies (`_tied_weights_keys`) go."""
    patterns = [f"{name}.{key}" if name else key for name, m in model.named_modules()
                for key in (getattr(m, "_tied_weights_keys", None) or ())]
    skip = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    for names in tied_groups(model):
        tied = [n for n in sorted(names) if any(re.search(p, n) for p in patterns)]
        drop = set(tied if len(tied) < len(names) else tied[:-1])
        kept = [n for n in names if n not in drop]
        skip |= drop | set(kept[1:])  # sharing no model declares (transformers refuses it): keep the first
    return {prefix + n for n in skip}


def tied_groups(model: nn.Module) -> list[list[str]]:
    """The state-dict names that share one tensor (tied embeddings), a list per tensor shared."""
    names_of = collections.defaultdict(list)
    for name, owner, attr, is_buffer in _subtree_entries(model):
        names_of[id((owner._buffers if is_buffer else owner._parameters)[attr])].append(name)
    return [names for names in names_of.values() if len(names) > 1]


def _reverter(model: nn.Module) -> Callable[[dict], dict]:
    """transformers 5 loads some architectures in another layout than their checkpoints' (e.g. MoE experts
    fused) and save_pretrained writes the checkpoint layout back. Applied a block at a time: a conversion's
    tensors live in one module."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: state-dict names are checkpoint names
        return lambda state: state
    return lambda state: revert_weight_conversion(model, state) if state else state


def _save_model_files(hf_model: nn.Module, folder: str, dtype: torch.dtype, untie: bool = False) -> None:
    """config.json, generation_config.json and remote code, as save_pretrained writes them. `untie`: the
    weights written hold a tied pair's tensors apart (from_pretrained would tie them again)."""
    config = copy.deepcopy(hf_model.config)
    config.dtype = str(dtype).removeprefix("torch.")
    if untie:
        config.tie_word_embeddings = False
    if hasattr(config, "quantization_config"):  # QLoRA: the export is dequantized
        del config.quantization_config
    config.architectures = [type(hf_model).__name__.removeprefix("FSDP")]  # FSDP2 subclasses the root
    if getattr(hf_model, "_auto_class", None) is not None:
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(hf_model, folder, config=config)
    config.save_pretrained(folder)
    if hf_model.can_generate():
        hf_model.generation_config.save_pretrained(folder)


# ---- peft: the adapter folder, and the adapter merged layer by layer


def is_peft_model(model: nn.Module) -> bool:
    """A peft model. peft (with the bitsandbytes it imports: seconds of every process's start-up) is imported
    by adapter runs only, and a model of a process that never imported it is not one."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _is_peft_unit(module: nn.Module) -> bool:
    """What merge_and_unload replaces: a tuner layer (LoRA & co) or a modules_to_save / trainable-tokens wrapper."""
    return hasattr(module, "unload_and_optionally_merge_module") or hasattr(module, "base_layer")


def _replica(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> nn.Module:
    """A plain copy of `module` holding `tensors` (its gathered state, by name), without the live module's hooks
    (FSDP2, DeepSpeed) and with its own peft bookkeeping: peft merges on it, never on the live, maybe sharded,
    layer."""
    cls = type(module)
    # an FSDP2 unit's class is a subclass made for it, whose __new__ re-runs the original __init__ (without its
    # arguments: peft's wrappers fail); the replica is of the original class, with none of FSDP's behaviour
    orig = cls.__mro__[getattr(cls, "_orig_cls_mro_index", 0)]
    clone = orig.__new__(orig)
    clone.__dict__.update(module.__dict__)
    for key, value in module.__dict__.items():
        if key in ("_parameters", "_buffers", "_modules"):
            continue
        if "hook" in key and isinstance(value, dict):
            clone.__dict__[key] = type(value)()
        elif isinstance(value, (list, dict, set)):
            clone.__dict__[key] = copy.deepcopy(value)  # e.g. merged_adapters, which merge() appends to
    clone._parameters = {n: None if p is None else nn.Parameter(tensors[prefix + n].clone(), requires_grad=False)
                         for n, p in module._parameters.items()}
    clone._buffers = {n: None if b is None else tensors[prefix + n].clone() if prefix + n in tensors
                      else b.detach().to("cpu", copy=True) for n, b in module._buffers.items()}
    clone._modules = {n: None if m is None else _replica(m, tensors, f"{prefix}{n}.") for n, m in module._modules.items()}
    return clone


def _merged_unit(block: Block, state: dict[str, torch.Tensor]) -> nn.Module:
    """A peft unit's gathered tensors merged and unloaded as merge_and_unload does it (same calls, same order)."""
    layer = _replica(block.module, {n[len(block.prefix):]: t for n, t in state.items()})
    if hasattr(layer, "get_base_layer") and is_quantized_layer(layer.get_base_layer()):
        return merge_dequantized(layer)  # QLoRA: into the dequantized weight, not quantized again
    if hasattr(layer, "unload_and_optionally_merge_module"):
        return layer.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
    layer.merge(safe_merge=False, adapter_names=None)
    return layer.get_base_layer()


def _adapter_names(model: PeftModel) -> set[str]:
    """The state-dict names peft's save_pretrained saves from. Asked of peft itself (on stand-in tensors), so
    that the selection is each method's own (LoRA biases, modules_to_save, embeddings it saves...). Prompt
    learning saves the prompt encoder's output: gather the encoder (and the modules_to_save copies)."""
    from peft.utils import get_peft_model_state_dict

    adapter = model.active_adapter
    names = [e[0] for e in _subtree_entries(model)]
    if model.peft_config[adapter].is_prompt_learning:
        return {n for n in names if n.startswith("prompt_encoder.") or f".{adapter}." in f".{n}."}
    stand_ins = {n: torch.empty(0) for n in names}
    picked = {id(t) for t in get_peft_model_state_dict(model, state_dict=stand_ins, adapter_name=adapter).values()}
    return {n for n, t in stand_ins.items() if id(t) in picked}


@contextmanager
def _prompt_encoder_from(model: PeftModel, state: dict[str, torch.Tensor]):
    """Prompt learning: peft computes the saved prompt embeddings by running the prompt encoder, which may be
    sharded; a CPU replica holding the gathered weights runs in its place meanwhile."""
    adapter = model.active_adapter
    if not model.peft_config[adapter].is_prompt_learning:
        yield
        return
    live, prefix = model.prompt_encoder[adapter], f"prompt_encoder.{adapter}."
    model.prompt_encoder[adapter] = _replica(live, {n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)})
    try:
        yield
    finally:
        model.prompt_encoder[adapter] = live


def portable_base_name(name_or_path: str | None) -> str | None:
    """The base model as `adapter_config.json` should name it: the name the user gave (a hub id, a named offline
    model), not the folder it resolved to (inside a virtualenv or a cache); a local folder as an absolute path."""
    if not name_or_path:
        return None
    path = os.path.expanduser(name_or_path)
    return os.path.abspath(path) if os.path.exists(path) else name_or_path


def _rename_base_model(folder: str, resolved: str | None, name: str) -> None:
    """The base model named `name` in a saved adapter's adapter_config.json and model card."""
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = name
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    card = os.path.join(folder, "README.md")
    if resolved and os.path.exists(card):
        with open(card) as f:
            text = f.read()
        with open(card, "w") as f:
            f.write(text.replace(f"base_model: {resolved}", f"base_model: {name}")
                    .replace(f"base_model:adapter:{resolved}", f"base_model:adapter:{name}"))


def _export_adapter(model: PeftModel, gather: Gather, folder: str, tokenizer, writer: bool,
                    base_model: str | None = None) -> None:
    """peft's own save_pretrained, given the adapter's gathered tensors (small) as the state dict."""
    state = {}
    for _, part in gather(state_blocks(model, keep=_adapter_names(model).__contains__)):
        state.update(part or {})
    if writer:
        def fill(tmp: str) -> None:
            with _prompt_encoder_from(model, state):
                model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
            name = portable_base_name(base_model)
            if name:  # after the save: peft reads the base model's config from the name it is given
                _rename_base_model(tmp, model.peft_config[model.active_adapter].base_model_name_or_path, name)

        _write_folder(folder, fill, tokenizer)


# ---- the streamed model folder


def _items(hf_model: nn.Module, gather: Gather, blocks: list[Block], strip: str, progress: WorkProgress | None = None):
    """(name as save_pretrained writes it, tensor, is a parameter) per gathered tensor, on the writing rank;
    the other ranks get nothing but take part in every gather."""
    revert = _reverter(hf_model)
    for block, state in gather(blocks):
        if state is None:
            continue
        if progress is not None:
            progress.advance(1, sum(t.numel() * t.element_size() for t in state.values()))
        state = dequantize_gathered(block.entries, state)  # QLoRA: a quantized base is written in full precision
        if block.whole:  # a peft layer, merged
            merged = _merged_unit(block, state)
            entries = {block.prefix[len(strip):] + name: ((owner._buffers if b else owner._parameters)[attr].detach(), b)
                       for name, owner, attr, b in _subtree_entries(merged)}
        else:
            buffers = block.buffers
            entries = {n[len(strip):]: (t, n in buffers) for n, t in state.items()}
        buffers = {n for n, (_, b) in entries.items() if b}
        for name, tensor in revert({n: t for n, (t, _) in entries.items()}).items():
            yield name, tensor, name not in buffers


def _export_hf(hf_model: nn.Module, gather: Gather, blocks: list[Block], folder: str, *, strip: str = "",
               tokenizer=None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: torch.dtype | None = None,
               writer: bool = True, untie: bool = False, shown: str | None = None) -> None:
    """A from_pretrained folder of `hf_model`, its tensors streamed from `gather` (names: state-dict names less
    `strip`) into shards as they come (`untie`: see _save_model_files; `shown`: the folder the progress names,
    where `folder` is a staging one)."""
    progress = WorkProgress(f"export to {shown or folder}", len(blocks), "blocks", "gathered")
    items = _items(hf_model, gather, blocks, strip, progress)
    if not writer:
        for _ in items:  # every rank takes part in each gather
            pass
        return

    def fill(tmp: str) -> None:
        shards = ShardWriter(tmp, max_shard_size)
        try:
            for name, tensor, parameter in items:
                shards.add(name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor,
                           parameter)
        except OSError:  # e.g. a full disk: the other ranks wait in the next gather; take part in the rest first
            for _ in items:
                pass
            raise
        shards.close()
        _save_model_files(hf_model, tmp, dtype or hf_model.dtype, untie)

    try:
        _write_folder(folder, fill, tokenizer)
    except Exception:
        # (e.g. the temp folder could not be made): the other ranks wait in the next gather; take part in the
        # rest first, so that they end with the export instead of in a collective timeout
        for _ in items:
            pass
        raise


def _export_merged(model: PeftModel, gather: Gather, folder: str, **kwargs) -> None:
    """The adapter merged into the base weights, written under the base model's names (merge_and_unload +
    save_pretrained): each peft layer is gathered whole, merged on the writing rank and written as its base
    layer; the rest streams as it is."""
    model.base_model._check_merge_allowed()  # peft's own refusals, as merge_and_unload makes them
    base = model.get_base_model()
    prefix = next(f"{name}." for name, m in model.named_modules() if m is base)
    skip = skipped_on_save(base, prefix)
    units = tuple(f"{prefix}{name}." for name, m in base.named_modules() if name and _is_peft_unit(m))
    # a tied tensor that a peft layer adapts or trains a copy of (LoRA on a tied LM head or embedding, a
    # masked-LM head in modules_to_save) is no longer one tensor once merged: every name is written, untied
    broken = [names for names in tied_groups(base) if any((prefix + n).startswith(units) for n in names)]
    skip -= {prefix + n for names in broken for n in names}
    blocks = state_blocks(base, prefix=prefix, keep=lambda n: n not in skip, whole=_is_peft_unit)
    _export_hf(base, gather, blocks, folder, strip=prefix, untie=bool(broken), **kwargs)


def export_streamed(model: nn.Module, gather: Gather, out_dir: str, *, tokenizer=None, merge_adapter: bool = True,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: torch.dtype | None = None,
                    writer: bool = True, base_model: str | None = None) -> dict[str, str] | None:
    """Export `model` under `out_dir`, its tensors coming block by block from `gather`. Collective when `gather`
    is: every rank calls it; the `writer` rank writes. Returns {kind: folder} there, None elsewhere.

    Args:
        model: A transformers model, or a peft PeftModel (adapter runs), maybe sharded.
        gather: Where the tensors come from: trainer_gather(...), local_gather, a DcpReader.
        out_dir: The export folder (adapter runs: its adapter/ and merged/ subfolders).
        tokenizer: Saved alongside the weights.
        merge_adapter: Adapter runs: also write the adapter merged into the base weights.
        max_shard_size: Bytes per safetensors shard at most (an int, or "5GB", "500MB"...).
        dtype: Floating tensors are written in this dtype (default: as they are).
        writer: Whether this rank writes (rank 0).
        base_model: Adapter runs: the base model as `model.name_or_path` gave it, recorded in adapter_config.json
            (peft would record the folder it was loaded from).
    """
    parse_size(max_shard_size)  # a bad size fails before any gathering
    options = {"tokenizer": tokenizer, "max_shard_size": max_shard_size, "dtype": dtype, "writer": writer}
    was_training = model.training
    model.eval()
    try:
        if not is_peft_model(model):
            skip = skipped_on_save(model)
            _export_hf(model, gather, state_blocks(model, keep=lambda n: n not in skip), out_dir, **options)
            return {"model": out_dir} if writer else None
        # adapter/ and merged/ are written into one temp folder swapped in whole: never one from this export
        # beside the other from an earlier one (a failed merge; --no-merge-adapter), which generate would serve
        stage, failed = out_dir, None
        if writer:
            try:
                stage = _atomic_dir(out_dir)
            except OSError as err:  # the other ranks gather next: take part as they do, then fail
                failed, writer, options["writer"] = err, False, False
        try:
            folders = {"adapter": os.path.join(out_dir, "adapter")}
            try:
                _export_adapter(model, gather, os.path.join(stage, "adapter"), tokenizer, writer, base_model)
            except Exception as err:  # writing it (its gathers are done): the merged export's gathers come next
                if not writer:
                    raise
                failed, writer, options["writer"] = err, False, False
            if merge_adapter and not model.peft_config[model.active_adapter].is_prompt_learning:
                folders["merged"] = os.path.join(out_dir, "merged")
                _export_merged(model, gather, os.path.join(stage, "merged"), shown=folders["merged"], **options)
            if failed is not None:
                raise failed
            if writer:
                replace_path(stage, out_dir)
        finally:
            if stage != out_dir:
                shutil.rmtree(stage, ignore_errors=True)
        return folders if writer else None
    finally:
        model.train(was_training)


# ---- reading checkpoints (`ftlab export`)


def checkpoint_state(path: str) -> dict:
    """The module's state dict (`model.`-prefixed keys) from a Lightning checkpoint file (single device, DDP,
    FSDP full) or a DeepSpeed ZeRO folder. FSDP sharded folders stream through DcpReader instead."""
    if os.path.isfile(path):
        # memory-mapped: the optimizer state it also holds is never read
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    if os.path.exists(os.path.join(path, "latest")) or os.path.isdir(os.path.join(path, "checkpoint")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(path)
    raise ConfigError(f"--ckpt {path!r} is neither a checkpoint file nor a sharded (FSDP / DeepSpeed) checkpoint folder")


def load_into(model: nn.Module, module_state: dict) -> None:
    """Load a checkpoint's weights into a freshly built model. Weights a checkpoint leaves out must be
    frozen ones (they are the pretrained weights the model was just built with): a converted ZeRO-1
    checkpoint of a LoRA run holds only the trainable tensors."""
    state = {k[len("model."):]: v for k, v in module_state.items() if k.startswith("model.")}
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(result.missing_keys) & trainable)
    if missing or result.unexpected_keys:
        raise ConfigError(f"the checkpoint does not match this run's model: missing trained weights {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}; was it written by this run's config?")
