"""Token classification (named-entity recognition, POS tagging): one tag per word."""

from __future__ import annotations

from typing import Any

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModelForTokenClassification

from ftlab.metrics import EntityF1
from ftlab.tasks.base import Task


class TokenClassification(Task):
    """A tag per word from a token-classification head; entity precision/recall/F1 and tag accuracy.

    Entities are scored with seqeval's conlleval semantics (type and exact span must match); tag accuracy
    is word-level."""

    name = "token-classification"
    auto_class = AutoModelForTokenClassification
    peft_task_type = "TOKEN_CLS"
    main_metric = "f1"
    data_class = "TokenClassificationData"

    def __init__(self) -> None:
        self.label_names: list[str] = []

    def model_kwargs(self, data) -> dict:
        self.label_names = list(data.label_names)
        return {"num_labels": len(self.label_names), "id2label": dict(enumerate(self.label_names)),
                "label2id": {n: i for i, n in enumerate(self.label_names)}}

    def metrics(self) -> MetricCollection:
        return MetricCollection({
            "entity": EntityF1(self.label_names),
            "tag_accuracy": MulticlassAccuracy(num_classes=max(len(self.label_names), 2), average="micro",
                                               ignore_index=-100),
        }, compute_groups=False)

    def loss_weight(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())  # the labelled words' first tokens

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        preds = outputs.logits.argmax(-1)
        metrics["entity"].update(preds, batch["labels"])
        metrics["tag_accuracy"].update(preds, batch["labels"])

    def predict(self, outputs: Any, batch: dict, data) -> list[dict]:
        preds = outputs.logits.argmax(-1).tolist()
        out = []
        for row, labels in zip(preds, batch["labels"].tolist()):
            out.append({"tags": [data.label_names[p] for p, t in zip(row, labels) if t != -100]})
        return out
