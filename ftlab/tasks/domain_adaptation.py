"""Domain-adaptive (continued) pretraining on unlabelled in-domain text: masked-LM for encoders,
causal-LM for decoders. The exported model is the starting point of a later fine-tuning run
(`model.name_or_path: runs/NAME/export`)."""

from __future__ import annotations

import zlib
from typing import Any, Literal

import torch
from torchmetrics import MetricCollection
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ftlab.errors import ConfigError
from ftlab.metrics import Perplexity
from ftlab.tasks.causal_lm import CausalLM, predicted_tokens


class DomainAdaptation(CausalLM):
    """Continue the pretraining objective on in-domain text; perplexity on held-out text."""

    name = "domain-adaptation"
    peft_task_type = None  # peft has no masked-LM task type; the generic PeftModel passes inputs through

    def __init__(self, objective: Literal["auto", "mlm", "clm"] = "auto", mlm_probability: float = 0.15) -> None:
        """
        Args:
            objective: `mlm` (masked-LM, for encoders like BERT), `clm` (next token, for decoders), or
                `auto`: mlm when the architecture has a masked-LM head, else clm.
            mlm_probability: Share of tokens masked (80% [MASK], 10% random, 10% kept, as in BERT).
        """
        super().__init__()
        if not 0 < mlm_probability < 1:
            raise ConfigError(f"model.task.mlm_probability={mlm_probability} must be in (0, 1), e.g. 0.15")
        self.objective = objective
        self.mlm_probability = mlm_probability
        self._tokenizer = None
        self._masker = None
        self._eval_masker = None

    def resolve(self, config) -> None:
        if self.objective == "auto":
            self.objective = "mlm" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "clm"
        if self.objective == "mlm" and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise ConfigError(f"model.task.objective=mlm: a {config.model_type} model has no masked-LM head; "
                              "use objective: clm (or auto)")
        self._check_chunking()
        super().resolve(config)

    def set_loss_chunk_size(self, size: int) -> None:
        super().set_loss_chunk_size(size)
        self._check_chunking()

    def _check_chunking(self) -> None:
        if self.chunked is not None and self.objective == "mlm":
            raise ConfigError(f"model.loss_chunk_size={self.chunked.size}: the chunked loss is for causal LMs; the "
                              "masked-LM objective (mlm, or auto on an encoder) computes its own; leave it 0 or use "
                              "objective: clm with a decoder")

    @property
    def auto_class(self):
        if self.objective == "auto":
            raise RuntimeError("DomainAdaptation.resolve(config) must run before the model is built")
        return AutoModelForMaskedLM if self.objective == "mlm" else AutoModelForCausalLM

    def check_data_type(self, data) -> None:
        super().check_data_type(data)
        if data.mode != "text":
            raise ConfigError(f"task {self.name} trains on plain text: use data: class_path: "
                              "ftlab.data.LanguageModelingData with data.text_column set")

    def model_kwargs(self, data) -> dict:
        self._tokenizer = data.tokenizer
        return {}

    def _make_masker(self, seed: int | None = None):
        from transformers import DataCollatorForLanguageModeling

        if self._tokenizer.mask_token is None:
            raise ConfigError(f"model.task.objective=mlm: tokenizer {self._tokenizer.name_or_path!r} has no mask token")
        masker = DataCollatorForLanguageModeling(self._tokenizer, mlm_probability=self.mlm_probability, seed=seed)
        if seed is not None:
            masker.create_rng()
        return masker

    def transform_batch(self, batch: dict, training: bool) -> dict:
        if self.objective != "mlm":
            return batch
        # Dynamic masking, drawn anew each epoch (RoBERTa). Training draws from the global RNG (checkpointed:
        # a resumed run masks as the uninterrupted one would); evaluation row by row (_mask_rows).
        special_ids = torch.tensor(sorted(self._tokenizer.all_special_ids))
        batch = {k: v for k, v in batch.items() if k not in ("labels", "position_ids")}
        if "attention_mask" not in batch:  # packed rows: only the collator's padding at the end is masked out
            batch["attention_mask"] = (batch["input_ids"] != self._tokenizer.pad_token_id).long()
        special = torch.isin(batch["input_ids"], special_ids)
        if training:
            self._masker = self._masker or self._make_masker()
            batch["input_ids"], batch["labels"] = self._masker.torch_mask_tokens(batch["input_ids"].clone(), special)
        else:
            batch["input_ids"], batch["labels"] = self._mask_rows(batch["input_ids"], special,
                                                                  batch["attention_mask"].bool())
        return batch

    def _mask_rows(self, ids: torch.Tensor, special: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation masks: each row's drawn from a generator seeded by its own tokens (`own`: not padding), so
        that a row is scored on the same masked tokens at every validation, whatever batch it is in, its
        padding and the number of ranks (one seed for the batch made them depend on all three)."""
        masker = self._eval_masker = self._eval_masker or self._make_masker(seed=0)
        inputs, labels = ids.clone(), torch.full_like(ids, -100)
        for i in range(ids.shape[0]):
            pos = own[i].nonzero().squeeze(1)
            row = ids[i, pos]
            masker.generator = torch.Generator().manual_seed(zlib.crc32(row.numpy().tobytes()))
            masked, row_labels = masker.torch_mask_tokens(row[None].clone(), special[i, pos][None])
            inputs[i, pos], labels[i, pos] = masked[0], row_labels[0]
        return inputs, labels

    def forward(self, model, batch: dict) -> Any:
        return model(**batch) if self.objective == "mlm" else super().forward(model, batch)

    def metrics(self) -> MetricCollection:
        return MetricCollection({"perplexity": Perplexity()})

    def loss_weight(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum()) if self.objective == "mlm" else predicted_tokens(batch)

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        metrics["perplexity"].update(outputs.loss, self.loss_weight(batch))

    def validation_end(self, module) -> None:
        """No sample generations (CausalLM's): plain text has no prompts to answer."""
