"""Knowledge distillation (Hinton et al., 2015): a smaller student learns from a trained teacher's
softened outputs as well as from the labels.

loss = alpha * task loss + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The teacher is frozen and stays in eval mode. Each strategy places it as it places the student (see
`ftlab.strategies.build_frozen`): replicated under DDP and ZeRO-1/2, sharded under FSDP, partitioned
under ZeRO-3.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ftlab.errors import ConfigError
from ftlab.loading import download_pretrained, load_config, load_tokenizer
from ftlab.tasks import chunked_loss
from ftlab.tasks.base import Task
from ftlab.tasks.classification import SequenceClassification


class FrozenTeacher(nn.Module):
    """The teacher model, without gradients and always in eval mode (`Trainer` calls `.train()` on the
    whole LightningModule at each epoch; dropout in the teacher would blur its targets)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        # no KV cache (a model in eval mode makes one): with it transformers skips its packed-sequence check,
        # and the teacher's packed examples would attend to each other (as CausalLM.forward explains)
        self._inputs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, **inputs) -> torch.Tensor:
        return self.model(**{**self._inputs, **inputs}).logits


def teacher_supports(auto_class, config, kernel: str) -> bool:
    """Whether the model class `auto_class` builds for `config` has the attention kernel `kernel`."""
    from transformers.models.auto.auto_factory import _get_model_class

    flag = {"flash_attention_2": "_supports_flash_attn", "flash_attention_3": "_supports_flash_attn",
            "sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}.get(kernel)
    try:
        cls = _get_model_class(config, auto_class._model_mapping)
    except (KeyError, ValueError):
        return True  # not known here: from_config says
    return flag is None or bool(getattr(cls, flag, False))


def teacher_folder(teacher: str) -> str:
    """An ftlab run dir -> its exported model (`export/`, or `export/merged/` after an adapter run)."""
    for sub in ("export/merged", "export"):
        if os.path.isfile(os.path.join(teacher, sub, "config.json")):
            return os.path.join(teacher, sub)
    return teacher


class Distillation(Task):
    """Train the student (the run's model) on its task, guided by a frozen teacher's outputs.

    The student learns from the teacher's output distribution; works for sequence classification and
    causal LM students."""

    name = "distillation"

    def __init__(self, teacher: str, student: Task | None = None, alpha: float = 0.5, temperature: float = 2.0,
                 teacher_gguf_file: str | None = None) -> None:
        """
        Args:
            teacher: The trained teacher: an ftlab run dir (its `export/` is used), a model folder or a hub id.
            student: The student's own task (SequenceClassification by default, or CausalLM).
            alpha: Weight of the task loss on the labels; 1 - alpha goes to matching the teacher.
            temperature: Softmax temperature T of both distributions (higher: softer targets).
            teacher_gguf_file: A GGUF file of the teacher, when it is one.
        """
        if not 0 <= alpha <= 1:
            raise ConfigError(f"model.task.alpha={alpha} must be in [0, 1]")
        if temperature <= 0:
            raise ConfigError(f"model.task.temperature={temperature} must be positive (e.g. 2.0)")
        self.student = student or SequenceClassification()
        if self.student.name not in ("sequence-classification", "causal-lm"):
            raise ConfigError(f"model.task.student={type(self.student).__name__}: distillation supports "
                              "SequenceClassification and CausalLM students")
        self.teacher = teacher
        self.alpha, self.temperature = alpha, temperature
        self.teacher_gguf_file = teacher_gguf_file
        self._teacher: FrozenTeacher | None = None
        self.chunked: chunked_loss.ChunkedLoss | None = None

    def set_loss_chunk_size(self, size: int) -> None:
        if self.student.name != "causal-lm":
            raise ConfigError(f"model.loss_chunk_size={size}: a {self.student.name} student has no loss over a "
                              "vocabulary to chunk; leave it 0 (it applies to CausalLM students)")
        self.chunked = chunked_loss.ChunkedLoss(size)

    def resolve(self, config) -> None:
        self.student.resolve(config)
        if self.chunked is not None:
            chunked_loss.check_model(config, self.chunked.size)

    # the student's task decides the model class, metrics and ranking
    auto_class = property(lambda self: self.student.auto_class)
    peft_task_type = property(lambda self: self.student.peft_task_type)
    main_metric = property(lambda self: self.student.main_metric)
    higher_is_better = property(lambda self: self.student.higher_is_better)
    data_class = property(lambda self: self.student.data_class)

    def _teacher_path(self) -> str:
        path = teacher_folder(os.path.expanduser(self.teacher))
        if path.startswith((".", "/", "~")) and not os.path.exists(path):
            raise ConfigError(f"model.task.teacher={self.teacher!r}: no such folder (working directory {os.getcwd()})")
        return path

    def check_data(self, data) -> None:
        """The teacher must speak the student's language: the same labels, or the same vocabulary (cheap:
        configs and tokenizers only, before any weights load)."""
        self.student.check_data(data)
        path = self._teacher_path()
        config = load_config(path, self.teacher_gguf_file)
        if self.student.name == "sequence-classification":
            names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []
            if names != list(data.label_names):
                raise ConfigError(f"model.task.teacher={self.teacher!r} predicts labels {names}, the student's data "
                                  f"has {list(data.label_names)}; distil from a teacher trained on these labels")
            return
        teacher_vocab = load_tokenizer(path, self.teacher_gguf_file, option="model.task.teacher").get_vocab()
        student_vocab = data.tokenizer.get_vocab()
        if teacher_vocab != student_vocab:
            differ = len(set(teacher_vocab.items()) ^ set(student_vocab.items()))
            raise ConfigError(f"model.task.teacher={self.teacher!r}: its vocabulary ({len(teacher_vocab)} tokens) differs "
                              f"from the student's ({len(student_vocab)} tokens; {differ} entries differ); token-level "
                              "distillation needs one tokenizer: pick a teacher of the student's model family")

    def model_kwargs(self, data) -> dict:
        return self.student.model_kwargs(data)

    def prepare_data(self) -> None:
        """Once per node, before any rank loads: a teacher given as a hub id downloads into the shared cache."""
        download_pretrained(self._teacher_path(), self.teacher_gguf_file)

    def setup(self, module, data) -> None:
        from ftlab.strategies import build_frozen

        options = module.frozen_options(same_model=False)
        kernel = options.get("attn_implementation")
        if kernel and not teacher_supports(self.auto_class, load_config(self._teacher_path(), self.teacher_gguf_file),
                                           kernel):
            # the student's kernel, which the teacher's class lacks: transformers' default for it (packed rows
            # stay apart under sdpa and eager too)
            rank_zero_warn(f"ftlab: the teacher's model class has no {kernel} attention; it runs its default")
            options.pop("attn_implementation")
        teacher = build_frozen(module.trainer.strategy, self.auto_class, self._teacher_path(), self.teacher_gguf_file,
                               module.frozen_dtype(), **options)
        module.teacher = self._teacher = FrozenTeacher(teacher)

    def metrics(self):
        return self.student.metrics()

    def loss_weight(self, batch: dict) -> int:
        return self.student.loss_weight(batch)

    def update_metrics(self, metrics, outputs: Any, batch: dict) -> None:
        self.student.update_metrics(metrics, outputs, batch)

    def predict(self, outputs: Any, batch: dict, data) -> list[dict]:
        return self.student.predict(outputs, batch, data)

    def writes_predictions(self) -> bool:
        return self.student.writes_predictions()

    def frozen_model(self, module) -> tuple[str, str | None, str | None]:
        return self._teacher_path(), self.teacher_gguf_file, None

    def validation_end(self, module) -> None:
        self.student.validation_end(module)

    def forward(self, model: nn.Module, batch: dict) -> Any:
        if self.chunked is not None:  # both models' logits a chunk at a time, never whole
            from transformers.modeling_outputs import CausalLMOutputWithPast

            inputs = {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}
            ce, kl = self.chunked.distillation(model, self._teacher.model, inputs, batch["labels"], self.temperature)
            outputs = CausalLMOutputWithPast(loss=ce)
            outputs["kl"] = kl
            return outputs
        outputs = self.student.forward(model, batch)
        outputs["teacher_logits"] = self._teacher(**{k: v for k, v in batch.items() if k != "labels"})
        return outputs

    def loss(self, outputs: Any, batch: dict) -> torch.Tensor:
        task_loss = self.student.loss(outputs, batch)
        t = self.temperature
        if self.chunked is not None:
            return self.alpha * task_loss + (1 - self.alpha) * t * t * outputs["kl"]
        student, teacher = outputs.logits, outputs["teacher_logits"]
        if self.student.name == "causal-lm":  # tokens that predict a label (the shift of causal LMs)
            keep = batch["labels"][:, 1:] != -100
            student, teacher = student[:, :-1][keep], teacher[:, :-1][keep]
        kl = F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                      log_target=True, reduction="batchmean")
        return self.alpha * task_loss + (1 - self.alpha) * t * t * kl
