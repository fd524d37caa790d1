"""Sequence-to-sequence generation with encoder-decoder models: teacher-forced loss for training, greedy
generation scored with ROUGE-L and BLEU (torchmetrics) for evaluation."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from transformers import AutoModelForSeq2SeqLM

from ftlab.errors import ConfigError
from ftlab.metrics import BLEU, RougeL
from ftlab.tasks.base import Task


class Seq2Seq(Task):
    """Text to text (T5, BART): the decoder learns the target; evaluation generates and scores it."""

    name = "seq2seq"
    auto_class = AutoModelForSeq2SeqLM
    peft_task_type = "SEQ_2_SEQ_LM"
    main_metric = "rougeL_fmeasure"
    data_class = "Seq2SeqData"

    def __init__(self, num_beams: int = 1) -> None:
        """
        Args:
            num_beams: Beams for the evaluation generations (1 = greedy).
        """
        if num_beams <= 0:
            raise ConfigError(f"model.task.num_beams={num_beams} must be positive")
        self.num_beams = num_beams
        self.tokenizer = None
        self.max_new_tokens = 64

    def model_kwargs(self, data) -> dict:
        self.tokenizer = data.tokenizer
        self.max_new_tokens = data.max_target_length
        return {}

    def metrics(self) -> MetricCollection:
        # RougeL, not torchmetrics' ROUGEScore: its per-sentence states hang the sync on an uneven split
        return MetricCollection({"rouge": RougeL(), "bleu": BLEU()},
                                compute_groups=False)

    def forward(self, model, batch: dict) -> Any:
        outputs = model(**batch)
        if not model.training:  # evaluation also generates, to score the text itself
            sharded = torch.distributed.is_available() and torch.distributed.is_initialized()
            outputs["generated"] = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), do_sample=False,
                num_beams=self.num_beams, max_new_tokens=self.max_new_tokens, synced_gpus=sharded)
        return outputs

    def loss_weight(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())  # target tokens

    def _texts(self, ids: torch.Tensor) -> list[str]:
        ids = ids.masked_fill(ids == -100, self.tokenizer.pad_token_id)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        preds, refs = self._texts(outputs["generated"]), self._texts(batch["labels"])
        metrics["rouge"].update(preds, refs)
        metrics["bleu"].update(preds, [[r] for r in refs])

    def predict(self, outputs: Any, batch: dict, data) -> list[dict]:
        return [{"generated": p, "target": r} for p, r in zip(self._texts(outputs["generated"]), self._texts(batch["labels"]))]
