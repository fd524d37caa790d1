"""train/mfu: FLOPs per step counted from the real model (what trains in it), and MFU through Lightning's own
Throughput from the real TrainingMetrics callback."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from ftlab import tracking
from ftlab.estimate.throughput import ModelFlops
from ftlab.module import FineTuneModule, summarize_trainable
from ftlab.policies import Adapter, Freeze, Full
from ftlab.tasks import SequenceClassification

HIDDEN, BLOCKS = 32, 2  # tests/conftest.py TINY["bert"]


def tiny_classifier(path, policy):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return policy.apply(model.train(), SequenceClassification())


def by_hand(model, seq_len: int, grad_blocks: int, full: bool) -> float:
    """Kaplan et al.: forward 2 per parameter + attention 2 x 2 x blocks x length x hidden; backward twice
    the forward for full training, else the activation gradients of the blocks from the lowest trainable one
    up plus 2 per trainable parameter."""
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    forward = 2 * n + 4 * BLOCKS * seq_len * HIDDEN
    return 3 * forward if full else forward + forward * grad_blocks / BLOCKS + 2 * trainable


@pytest.mark.parametrize("policy, grad_blocks, full", [
    (Full(), BLOCKS, True),
    (Freeze(), 0, False),  # head only: no activation gradient below it
    (Freeze(top_k_layers=1), 1, False),
    (Freeze(trainable=["pooler"]), 0, False),  # above the blocks: no block's activation gradients
    (Freeze(trainable=["embeddings.LayerNorm"]), BLOCKS, False),  # below every block
    (Adapter(r=4), BLOCKS, False),  # LoRA in every block
])
def test_flops_per_token_follow_what_trains(tiny_bert, policy, grad_blocks, full):
    model = tiny_classifier(tiny_bert, policy)
    flops = ModelFlops.of(model)
    assert (flops.blocks, flops.grad_blocks, flops.hidden, flops.full) == (BLOCKS, grad_blocks, HIDDEN, full)
    assert flops.per_token(16) == pytest.approx(by_hand(model, 16, grad_blocks, full))
    assert flops.batch(4, 16) == pytest.approx(4 * 16 * by_hand(model, 16, grad_blocks, full))
    if not full:  # a frozen backbone or adapters cost less than full training's 3 x forward
        assert flops.per_token(16) < ModelFlops.of(tiny_classifier(tiny_bert, Full())).per_token(16)


class Collect(Logger):
    """A logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []

    name, version = "collect", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    @property
    def experiment(self):
        return None


def test_mfu_is_constant_at_constant_step_time_and_flops(tiny_bert, monkeypatch):
    """The real callback, Lightning's real Throughput: equal steps give equal MFU (cumulative FLOPs made it grow
    with every step), equal to the step's FLOPs / (step time x peak). Only the clock is set by the test."""
    module = FineTuneModule(str(tiny_bert), policy=Freeze(top_k_layers=1))
    module.model = tiny_classifier(tiny_bert, module.policy)
    module.trainable_params, module.total_params, _ = summarize_trainable(module.model)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=Collect(), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.optimizers = [torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad])]
    clock = iter(0.25 * i for i in range(100))
    monkeypatch.setattr(tracking, "perf_counter", lambda: next(clock))
    peak, window = 1e12, 4
    metrics = tracking.TrainingMetrics(window=window, peak_flops=peak)
    metrics.on_train_start(trainer, module)
    mask = torch.ones(8, 24, dtype=torch.long)
    mask[:, 20:] = 0  # padding computes too: MFU counts it
    batch = {"input_ids": torch.ones(8, 24, dtype=torch.long), "attention_mask": mask}
    for i in range(12):
        metrics.on_train_batch_start(trainer, module, batch, i)
        metrics.on_train_batch_end(trainer, module, None, batch, i)
    mfu = [row["train/mfu"] for row in trainer.logger.rows if "train/mfu" in row]
    assert len(mfu) == 12 - window + 1  # from the first full window on
    step_flops = 8 * 24 * by_hand(module.model, 24, grad_blocks=1, full=False)
    assert mfu == pytest.approx([step_flops / (0.25 * peak)] * len(mfu), rel=1e-9)
    assert trainer.logger.rows[-1]["train/step_time_s"] == pytest.approx(0.25)
