"""Plain progress lines read what is already there, and the loss only when a line is printed."""

from __future__ import annotations

import io
from types import SimpleNamespace

import torch

from ftlab.callbacks.progress import PlainProgress, format_duration, format_lr


def test_formats():
    assert format_lr(1.8e-3) == "1.8e-3" and format_lr(2e-5) == "2.0e-5" and format_lr(0) == "0"
    assert format_lr(1.5) == "1.5e0"
    assert [format_duration(s) for s in (4.2, 112, 7380)] == ["4s", "1m52s", "2h03m"]


class _Metrics(dict):
    reads = 0

    def get(self, key, default=None):
        type(self).reads += 1
        return super().get(key, default)


def test_the_loss_is_read_only_when_a_line_is_printed():
    metrics = _Metrics({"train/loss": torch.tensor(0.4123)})
    optimizer = SimpleNamespace(param_groups=[{"lr": 1.8e-3}, {"lr": 9e-4}])
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=10, callback_metrics=metrics,
                              optimizers=[optimizer], world_size=2, is_global_zero=True)
    out = io.StringIO()
    bar = PlainProgress(every_n_seconds=0, every_n_steps=4, stream=out)
    bar.on_train_start(trainer, None)
    batch = {"input_ids": torch.zeros(8, 5, dtype=torch.long)}
    for step in range(1, 11):
        bar.on_train_batch_start(trainer, None, batch, step - 1)
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, None, batch, step - 1)
    lines = out.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["step 1/10", "step 4/10", "step 8/10", "step 10/10"]
    assert lines[1].startswith("step 4/10 | loss 0.4123 | lr 1.8e-3 | ") and "samples/s | ETA " in lines[1]
    assert metrics.reads == len(lines)  # once per printed line, never per step


def test_only_rank_zero_prints():
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=4, callback_metrics={}, optimizers=[],
                              world_size=2, is_global_zero=False)
    out = io.StringIO()
    bar = PlainProgress(every_n_seconds=0, every_n_steps=1, stream=out)
    bar.on_train_start(trainer, None)
    for step in range(1, 5):
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, None, {"input_ids": torch.zeros(2, 3)}, step - 1)
    assert out.getvalue() == ""


def test_the_terminal_bar_shows_loss_lr_and_samples_per_second():
    from ftlab.callbacks.progress import TerminalProgress, progress_bar

    optimizer = SimpleNamespace(param_groups=[{"lr": 2e-3}])
    trainer = SimpleNamespace(loggers=[], progress_bar_metrics={"train/loss": 0.41, "val/accuracy": 0.8},
                              training=True, optimizers=[optimizer], world_size=1)
    bar = TerminalProgress()
    bar.on_train_batch_start(trainer, None, {"input_ids": torch.zeros(8, 4)}, 0)
    items = bar.get_metrics(trainer, None)
    assert items["loss"] == 0.41 and items["lr"] == "2.0e-3" and "v_num" not in items and "train/loss" not in items
    assert "samples/s" in items or bar._rate.train_seconds() == 0
    assert isinstance(progress_bar(stream=io.StringIO()), PlainProgress)  # not a terminal: plain lines
