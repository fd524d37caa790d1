"""What a task is: which AutoModel class, how a batch becomes a loss, which metrics.

New tasks (token classification, causal LM, ...) subclass `Task`; the LightningModule only talks to
this interface, so a user's own task plugs in by `class_path` without editing ftlab.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import MetricCollection

from ftlab.errors import ConfigError


class Task(ABC):
    """A fine-tuning task."""

    name: ClassVar[str] = "task"
    auto_class: ClassVar[Any]
    """The transformers `AutoModelFor...` class that builds the model."""
    peft_task_type: ClassVar[str]
    """peft's TaskType for this task (tells peft which head to keep)."""
    main_metric: ClassVar[str]
    """The metric that ranks runs (without the `val/` prefix)."""
    higher_is_better: ClassVar[bool] = True
    data_class: ClassVar[str] = "TextClassificationData"
    """The `ftlab.data` module this task reads (or a subclass of it)."""

    def model_kwargs(self, data) -> dict:
        """Extra `from_pretrained` / `from_config` kwargs that depend on the data (e.g. `num_labels`)."""
        return {}

    def check_data_type(self, data) -> None:
        """Refuse a data module of the wrong kind (cheap: called before any data is read)."""
        import ftlab.data

        if not isinstance(data, getattr(ftlab.data, self.data_class)):
            raise ConfigError(f"task {self.name} reads data: class_path: ftlab.data.{self.data_class}, "
                              f"got {type(data).__name__}; set data: {self.data_class} (with its columns)")

    def check_data(self, data) -> None:  # noqa: B027 - optional hook
        """Refuse data this task cannot use, once it is read (raise ConfigError): before the model loads."""

    @abstractmethod
    def metrics(self) -> MetricCollection:
        """Fresh metric objects (one collection per split)."""

    def forward(self, model: nn.Module, batch: dict) -> Any:
        """Run the model on a batch; the default passes every batch field, labels included."""
        return model(**batch)

    def loss(self, outputs: Any, batch: dict) -> torch.Tensor:
        return outputs.loss

    def loss_weight(self, batch: dict) -> int:
        """What the batch's loss is a mean over (its rows; token-level tasks: their labelled tokens): the
        evaluation loss weighs each batch by it, to be the split's own mean whatever the batching and the
        number of ranks."""
        return batch["input_ids"].shape[0]

    @abstractmethod
    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        """Feed a batch's outputs to the metrics."""

    def predict(self, outputs: Any, batch: dict, data) -> list[dict]:
        """Per-example predictions for `ftlab predict`."""
        return []

    def frozen_model(self, module) -> tuple[str, str | None, str | None] | None:
        """The frozen pretrained model this task loads beside the trained one, as (path or hub id, GGUF file,
        revision), if any: `ftlab estimate` counts its memory."""
        return None

    def writes_predictions(self) -> bool:
        """Whether `ftlab predict` has per-row predictions to write (the task defines `predict`)."""
        return type(self).predict is not Task.predict

    def prepare_data(self) -> None:  # noqa: B027 - optional hook
        """Once per node before any rank builds the model: fetch what the task loads besides it (a teacher)."""

    def setup(self, module, data) -> None:  # noqa: B027 - optional hook
        """Called once the model is built and sharded (e.g. distillation attaches its teacher)."""

    def transform_batch(self, batch: dict, training: bool) -> dict:
        """Change a batch before it reaches the model (e.g. masked-LM masking); default: as is."""
        return batch

    def before_loop(self, module) -> None:  # noqa: B027 - optional hook
        """On every rank before each fit, validation and test loop, the model placed on its devices (e.g.
        preference tuning's reference log-probs, computed once)."""

    def step_metrics(self, outputs: Any) -> dict[str, torch.Tensor]:
        """Per-step training values logged beside `train/loss` (as `train/<name>`); default none."""
        return {}

    def validation_end(self, module) -> None:  # noqa: B027 - optional hook
        """Extra work after each validation (e.g. logging sample generations)."""

    def check_policy(self, policy) -> None:  # noqa: B027 - optional hook
        """Refuse (ConfigError) a policy this task cannot train with, before anything loads."""

    def resolve(self, config) -> None:  # noqa: B027 - optional hook
        """Settle choices that depend on the model's config (called before the model is built)."""
