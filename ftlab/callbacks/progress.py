"""Training progress in every log: a progress bar on a terminal, plain lines elsewhere (Slurm logs, nohup,
CI), where a bar's redraws would pile up or, with rich, show nothing until the end.

The plain line, every `every_n_seconds` (and/or `every_n_steps`), and at the first and last step:

    step 120/305 | loss 0.412 | lr 1.8e-3 | 94 samples/s | ETA 1m52s

and one line per validation. Only rank 0 prints. Nothing here adds a collective or a device sync per step:
samples are counted from batch shapes, the learning rate is the optimizer's Python float, and the loss
already logged (`train/loss`) is read (one `.item()`) only when a line is printed. samples/s is rank 0's
rate times the world size (ranks run in lockstep).
"""

from __future__ import annotations

import math
import re
import sys
import time

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


def format_lr(lr: float) -> str:
    """1.8e-3, not 1.8e-03."""
    if lr == 0:
        return "0"
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), f"{lr:.1e}")


def format_duration(seconds: float) -> str:
    """45s, 1m52s, 2h03m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _lr(trainer) -> float | None:
    if not trainer.optimizers:
        return None
    return max(group["lr"] for group in trainer.optimizers[0].param_groups)  # layer decay: the top group


def _rows(batch) -> int:
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    return int(ids.shape[0]) if ids is not None else 0  # a shape, never a device read


class _Rate:
    """Samples and seconds of training (validation time left out), counted on this rank."""

    def __init__(self):
        self.start: float | None = None
        self.samples = 0
        self.paused = 0.0  # seconds spent validating since start
        self._pause_start: float | None = None
        self.mark = (0.0, 0)  # (train seconds, samples) at the last report

    def batch(self, batch) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        self.samples += _rows(batch)

    def pause(self) -> None:
        if self.start is not None:  # the sanity check before the first batch is not training time either
            self._pause_start = time.perf_counter()

    def resume(self) -> None:
        if self._pause_start is not None:
            self.paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def train_seconds(self) -> float:
        return 0.0 if self.start is None else time.perf_counter() - self.start - self.paused

    def per_second(self, world_size: int, since_mark: bool = True) -> float | None:
        seconds, samples = self.train_seconds(), self.samples
        if since_mark and seconds - self.mark[0] > 0.5:
            seconds, samples = seconds - self.mark[0], samples - self.mark[1]
        return samples * world_size / seconds if seconds > 0 else None

    def set_mark(self) -> None:
        self.mark = (self.train_seconds(), self.samples)


class TerminalProgress(RichProgressBar):
    """Lightning's rich bar (steps, elapsed, ETA) with the loss, learning rate and samples/s."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rate = _Rate()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._rate.batch(batch)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._rate.pause()
        super().on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._rate.resume()

    def get_metrics(self, trainer, pl_module) -> dict:
        items = dict(super().get_metrics(trainer, pl_module))
        items.pop("v_num", None)
        if "train/loss" in items:
            items["loss"] = items.pop("train/loss")
        if trainer.training:
            lr = _lr(trainer)
            if lr is not None:
                items["lr"] = format_lr(lr)
            rate = self._rate.per_second(trainer.world_size, since_mark=False)
            if rate is not None:
                items["samples/s"] = f"{rate:.0f}"
        return items


class PlainProgress(ProgressBar):
    """One plain line every `every_n_seconds` (and/or `every_n_steps`) of training, and one per validation."""

    def __init__(self, every_n_seconds: float = 30.0, every_n_steps: int = 0, stream=None):
        super().__init__()
        self.every_n_seconds = every_n_seconds
        self.every_n_steps = every_n_steps
        self.stream = stream
        self._enabled = True
        self._rate = _Rate()
        self._last_print = 0.0
        self._last_step = -1
        self._start_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args, **kwargs) -> None:
        kwargs.setdefault("file", self.stream or sys.stdout)
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step = trainer.global_step
        self._last_step = trainer.global_step
        self._last_print = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._rate.batch(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero or not self._enabled:
            return  # accumulating, or not rank 0
        total = trainer.estimated_stepping_batches
        now = time.perf_counter()
        due = (step == self._start_step + 1 or (math.isfinite(total) and step >= total)
               or (self.every_n_steps and step % self.every_n_steps == 0)
               or (self.every_n_seconds and now - self._last_print >= self.every_n_seconds))
        self._last_step = step
        if due:
            self._last_print = now
            self.print(self.step_line(trainer))
            self._rate.set_mark()

    def step_line(self, trainer) -> str:
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        parts = [f"step {step}/{int(total)}" if math.isfinite(total) else f"step {step}"]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")  # the one device read, at print time only
        lr = _lr(trainer)
        if lr is not None:
            parts.append(f"lr {format_lr(lr)}")
        rate = self._rate.per_second(trainer.world_size)
        if rate is not None:
            parts.append(f"{rate:.0f} samples/s" if rate >= 10 else f"{rate:.2g} samples/s")
        done = step - self._start_step
        if math.isfinite(total) and done > 0:
            parts.append(f"ETA {format_duration(self._rate.train_seconds() / done * (total - step))}")
        return " | ".join(parts)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._rate.pause()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._rate.resume()
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero or not self._enabled:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        total = trainer.estimated_stepping_batches
        where = f"{trainer.global_step}/{int(total)}" if math.isfinite(total) else str(trainer.global_step)
        values = " | ".join(f"{k[4:]} {float(v):.4g}" for k, v in sorted(metrics.items()))
        self.print(f"validation at step {where}" + (f" | {values}" if values else ""))


def progress_bar(every_n_seconds: float = 30.0, every_n_steps: int = 0, stream=None) -> ProgressBar:
    """The bar for where stdout goes: rich on a terminal, plain lines in a log."""
    out = stream or sys.stdout
    if out.isatty():
        return TerminalProgress()
    return PlainProgress(every_n_seconds=every_n_seconds, every_n_steps=every_n_steps, stream=stream)
