"""Sequence classification (sentiment, topic, NLI...): one label per text or text pair."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import AutoModelForSequenceClassification

from ftlab.tasks.base import Task


class SequenceClassification(Task):
    """One label per text (or text pair), from a classification head on the model; accuracy and macro-F1."""

    name = "sequence-classification"
    auto_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"
    main_metric = "accuracy"

    def __init__(self) -> None:
        self.num_labels = 0

    def model_kwargs(self, data) -> dict:
        names = list(data.label_names)
        self.num_labels = len(names)
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }

    def metrics(self) -> MetricCollection:
        n = max(self.num_labels, 2)
        return MetricCollection(
            {
                "accuracy": MulticlassAccuracy(num_classes=n, average="micro"),
                "f1_macro": MulticlassF1Score(num_classes=n, average="macro"),
            }
        )

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        metrics.update(outputs.logits.argmax(-1), batch["labels"])

    def predict(self, outputs: Any, batch: dict, data) -> list[dict]:
        probs = torch.softmax(outputs.logits.float(), -1)
        conf, idx = probs.max(-1)
        out = [{"label": data.label_names[i], "score": round(c, 6)} for i, c in zip(idx.tolist(), conf.tolist())]
        if "labels" in batch:
            for row, true in zip(out, batch["labels"].tolist()):
                row["true_label"] = data.label_names[true]
        return out
