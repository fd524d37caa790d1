"""The run header: a few lines on stdout, before the first step, saying what is about to run."""

from __future__ import annotations

import math
import sys

import lightning as L

from ftlab import console


def _trainable_line(pl_module) -> str:
    described = pl_module.policy.describe()
    name = described.get("policy", pl_module.policy.name)
    details = []
    if described.get("peft_method"):
        details.append(described["peft_method"] + (f" r={described['peft_r']}" if described.get("peft_r") else ""))
    if described.get("top_k_layers"):
        details.append(f"top {described['top_k_layers']} blocks")
    label = f"{name} ({', '.join(details)})" if details else name
    share = 100 * pl_module.trainable_params / max(pl_module.total_params, 1)
    return f"{label}: {pl_module.trainable_params:,} of {pl_module.total_params:,} parameters train ({share:.2f}%)"


def _model_line(pl_module, stage: str) -> str:
    model = pl_module.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    line = f"{pl_module.name_or_path} ({type(base).__name__}, task {pl_module.task.name})"
    head = console.facts.get("head")
    if head and stage == "fit":
        line += f"\n{'':11}new {head['names']}: {head['why']}"
    elif head:
        source = ("trained weights come from --ckpt_path" if pl_module.trainer.ckpt_path
                  else "randomly initialised: no --ckpt_path")
        line += f"\n{'':11}{head['names']}: not in the pretrained model ({source})"
    return line


def _data_line(datamodule) -> str | None:
    splits = getattr(datamodule, "splits", None) or {}
    if not splits:
        return None
    order = {"train": 0, "validation": 1, "val": 1, "test": 2}
    rows = " / ".join(f"{len(ds):,} {name}" for name, ds in sorted(splits.items(), key=lambda kv: order.get(kv[0], 3)))
    if "data_tokenised" in console.facts:
        origin = f"tokenised now, cached in {console.facts['data_tokenised']['path']}"
    elif "data_cache" in console.facts:
        origin = f"from the tokenisation cache {console.facts['data_cache']['path']}"
    else:
        origin = f"cache {getattr(datamodule, 'cache_path', '?')}"
    batch = getattr(datamodule, "batch_size", None)
    return f"{rows} rows, {origin}" + (f"; batch {batch} per device" if batch else "")


def _device_line(trainer) -> str:
    device = trainer.strategy.root_device
    kind = device.type
    if kind == "cuda":
        import torch

        kind = f"cuda ({torch.cuda.get_device_name(device)})"
    count = trainer.num_devices * trainer.num_nodes
    where = f"{count} x {kind}" + (f" on {trainer.num_nodes} nodes" if trainer.num_nodes > 1 else "")
    strategy = type(trainer.strategy).__name__
    if strategy != "SingleDeviceStrategy":
        where += f", {strategy}"
    return f"{where}; precision {trainer.precision}"


def _steps_line(trainer) -> str | None:
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        return "until stopped (no max_epochs or max_steps)"
    line = f"{int(steps):,} optimizer steps"
    if trainer.max_steps and trainer.max_steps > 0:
        line += f" (max_steps {trainer.max_steps})"
    elif trainer.max_epochs is not None and trainer.max_epochs > 0:
        line += f" ({trainer.max_epochs} epoch{'s' if trainer.max_epochs != 1 else ''})"
    if trainer.accumulate_grad_batches > 1:
        line += f", {trainer.accumulate_grad_batches} batches each"
    return line


def header_lines(trainer, pl_module, stage: str) -> list[str]:
    rows = [("model", _model_line(pl_module, stage)), ("policy", _trainable_line(pl_module)),
            ("data", _data_line(trainer.datamodule)), ("device", _device_line(trainer))]
    if stage == "fit":
        rows.append(("steps", _steps_line(trainer)))
    lines = [f"ftlab {stage}: run directory {trainer.default_root_dir}"]
    lines += [f"  {key:<8} {value}" for key, value in rows if value]
    return lines


class RunHeader(L.Callback):
    """Prints the header once per process, on rank 0, as the first stage (fit, validate, test, predict)
    starts: run directory, model and new head, policy and trainable share, data rows (from the cache or
    tokenised now), device and precision, and for fit the steps to run."""

    def __init__(self, stream=None):
        self.stream = stream
        self._done = False

    def _print(self, trainer, pl_module, stage: str) -> None:
        if self._done or not trainer.is_global_zero or trainer.sanity_checking:
            return
        self._done = True
        out = self.stream or sys.stdout
        print("\n".join(header_lines(trainer, pl_module, stage)), file=out, flush=True)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._print(trainer, pl_module, "fit")

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._print(trainer, pl_module, "validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._print(trainer, pl_module, "test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._print(trainer, pl_module, "predict")
