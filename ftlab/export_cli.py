"""`python -m ftlab export`: any checkpoint of a run -> the Hugging Face format, without a Trainer (so a
sharded GPU run can be exported on a CPU login node)."""

from __future__ import annotations

import argparse
import os
import sys

import yaml
from jsonargparse import ArgumentParser

from ftlab import console
from ftlab.checkpoints import base_files, base_mismatch, last_checkpoint, recorded_base
from ftlab.data import TextDataModule
from ftlab.errors import ConfigError
from ftlab.export import (
    DEFAULT_MAX_SHARD_SIZE,
    DcpReader,
    checkpoint_state,
    export_streamed,
    is_dcp_checkpoint,
    load_into,
    local_gather,
    parse_size,
    state_blocks,
)
from ftlab.module import FineTuneModule


def build_from_run(run_dir: str):
    """The run's model and data modules, instantiated from its config.yaml (no Trainer, no weights)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"--run {run_dir!r}: no config.yaml there; give the run directory of a `ftlab fit`")
    with open(path) as f:
        saved = yaml.safe_load(f)
    # the links FtlabCLI makes from the model to the data (linked values are not written to config.yaml)
    init_args = saved["data"].setdefault("init_args", {})
    init_args.setdefault("tokenizer", saved["model"]["name_or_path"])
    for model_key, data_key in (("trust_remote_code", "trust_remote_code"), ("gguf_file", "gguf_file"),
                                ("revision", "tokenizer_revision")):
        if saved["model"].get(model_key) is not None:
            init_args.setdefault(data_key, saved["model"][model_key])
    init_args.pop("predict_source", None)  # rows a `predict` read: not needed to export, and maybe gone
    parser = ArgumentParser()
    parser.add_class_arguments(FineTuneModule, "model")
    parser.add_subclass_arguments(TextDataModule, "data")
    cfg = parser.parse_object({"model": saved["model"], "data": saved["data"]})
    init = parser.instantiate_classes(cfg)
    # the weights in the dtype the fit loaded and exported them in (bf16-true: bf16, not twice that in fp32)
    init.model.run_precision = str((saved.get("trainer") or {}).get("precision") or "32-true")
    return init.model, init.data


def meta_model_and_pretrained(module: FineTuneModule, data):
    """The run's model without weights (meta device, the policy applied), and where the frozen weights that
    checkpoints leave out (FineTuneModule.frozen_pretrained) are in the pretrained files: (PretrainedWeights,
    {name: (key, the model's dtype)}), with only those that can be read as they are (plain floats)."""
    from ftlab.loading import PretrainedWeights

    model = module.empty_model(data)
    weights = PretrainedWeights.find(module.name_or_path, module.gguf_file, module.revision,
                                     getattr(model, "base_model_prefix", ""))
    keys = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        key = weights.key(n) if weights else None
        if key is not None and weights.floating(key):
            keys.setdefault(id(p), key)
    model = module.finish_model(model, data)  # the policy keeps the base's parameters (peft wraps their modules)
    frozen = module.frozen_pretrained(model)
    located = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if n in frozen and id(p) in keys:
            located[n] = (keys[id(p)], p.dtype)
        elif n in frozen and ".original_module." in f".{n}":  # peft's untrained original of a new head: in no file,
            located[n] = (None, p.dtype, tuple(p.shape))      # written by no export (merging keeps the trained copy)
    return model, (weights, located)


def check_out(out: str | None) -> None:
    """The export replaces its folder whole: refuse a --out folder that holds anything but an export (a home
    or models folder would be deleted)."""
    if out is None or not os.path.isdir(out) or not os.listdir(out):
        return
    if not any(os.path.exists(os.path.join(out, name)) for name in ("config.json", "adapter", "merged")):
        raise ConfigError(f"--out {out!r} holds other files (the export replaces its folder whole); give a new folder, "
                          f"e.g. --out {os.path.join(out.rstrip('/'), 'export')}")


def export_run(run_dir: str, ckpt: str | None = None, merge_adapter: bool = True, out: str | None = None,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """Export a checkpoint of the run in `run_dir`; returns {kind: folder}.

    An FSDP sharded checkpoint: the model is built without weights (meta device) for its structure and names,
    and its tensors stream from the checkpoint a shard's worth at a time, the optimizer's never read (frozen
    weights, which checkpoints leave out, from the pretrained files). Other checkpoints load into the
    pretrained model.
    """
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    check_out(out)
    module, data = build_from_run(run_dir)
    ckpt = ckpt or last_checkpoint(os.path.join(run_dir, "checkpoints")) or os.path.join(run_dir, "checkpoints", "last.ckpt")
    if not os.path.exists(ckpt):
        raise ConfigError(f"--ckpt {ckpt!r} does not exist; give a checkpoint of this run (see {run_dir}/checkpoints)")
    data.setup("fit")  # label names and tokenizer (from the tokenisation cache when it is there)
    module.task.check_data(data)
    model, pretrained = meta_model_and_pretrained(module, data)  # weightless: cheap
    if module.frozen_pretrained(model):  # the checkpoint leaves them out: they must come from the same files
        why = base_mismatch(recorded_base(ckpt), base_files(module.name_or_path, module.gguf_file, module.revision),
                            module.name_or_path, action="export")
        if why:
            raise ConfigError(why)
    if is_dcp_checkpoint(ckpt) and module.quantization is not None:
        raise ConfigError(f"--ckpt {ckpt!r} is an FSDP sharded checkpoint of a quantized (QLoRA) run, which `ftlab export` "
                          "cannot read yet; use the export the fit wrote (<run>/export), or save checkpoints with "
                          "--trainer.strategy=ftlab.strategies.FSDP --trainer.strategy.state_dict_type=full")
    if is_dcp_checkpoint(ckpt):
        gather = DcpReader(ckpt, batch_bytes=shard_bytes, pretrained=pretrained)
        lacking = gather.lacking(state_blocks(model))
        if lacking:  # frozen weights the pretrained files cannot give one by one (not safetensors, not cached here)
            print(f"ftlab: {len(lacking)} frozen weights (e.g. {lacking[0]}) are not in {ckpt} nor readable one by one "
                  f"from {module.name_or_path}: loading the whole pretrained model, the checkpoint's tensors over it",
                  file=sys.stderr)
            model = module.build_model(data)
            load_into(model, gather.saved_model_state())
            gather = local_gather
    else:
        model = module.build_model(data)
        load_into(model, checkpoint_state(ckpt))
        gather = local_gather
    return export_streamed(model, gather, out or os.path.join(run_dir, "export"), tokenizer=data.tokenizer,
                           merge_adapter=merge_adapter, max_shard_size=max_shard_size, dtype=module.weight_dtype(),
                           base_model=module.name_or_path)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m ftlab export",
                                     description="Export a run's checkpoint in Hugging Face format (safetensors).")
    parser.add_argument("--run", required=True, help="the run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--ckpt", help="checkpoint file or sharded folder (default: the run's last checkpoint, as --ckpt_path last "
                             "resolves it: <run>/checkpoints/last.ckpt)")
    parser.add_argument("--merge-adapter", action=argparse.BooleanOptionalAction, default=True,
                        help="adapter runs: also write the adapter merged into the base weights (default: yes)")
    parser.add_argument("--out", help="output folder (default: <run>/export)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help=f"largest safetensors file, e.g. 5GB, 500MB (default: {DEFAULT_MAX_SHARD_SIZE})")
    parser.add_argument("--progress-every-n-seconds", type=float, default=30.0,
                        help="print how far the export is (blocks written, bytes gathered) every this many seconds; "
                             "0: never (default: 30)")
    args = parser.parse_args(argv)
    console.set_progress_interval(args.progress_every_n_seconds, "--progress-every-n-seconds")
    folders = export_run(args.run, args.ckpt, args.merge_adapter, args.out, args.max_shard_size)
    for kind, folder in folders.items():
        print(f"{kind}: {folder}")
