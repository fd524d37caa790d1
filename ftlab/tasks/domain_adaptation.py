"""Domain-adaptive (continued) pretraining on unlabelled in-domain text: masked-LM for encoders,
causal-LM for decoders. The exported model is the starting point of a later fine-tuning run
(`model.name_or_path: runs/NAME/export`)."""

from __future__ import annotations

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
        self._masker = None
        self._eval_masker = None

    def resolve(self, config) -> None:
        if self.objective == "auto":
            self.objective = "mlm" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "clm"
        if self.objective == "mlm" and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise ConfigError(f"model.task.objective=mlm: a {config.model_type} model has no masked-LM head; "
                              "use objective: clm (or auto)")

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
        if self.objective == "mlm":
            from transformers import DataCollatorForLanguageModeling

            if data.tokenizer.mask_token is None:
                raise ConfigError(f"model.task.objective=mlm: tokenizer {data.tokenizer_name!r} has no mask token")
            self._masker = DataCollatorForLanguageModeling(data.tokenizer, mlm_probability=self.mlm_probability)
            self._special = torch.tensor(sorted(data.tokenizer.all_special_ids))
        return {}

    def transform_batch(self, batch: dict, training: bool) -> dict:
        if self.objective != "mlm":
            return batch
        # Dynamic masking, drawn anew each epoch (RoBERTa). Training draws from the global RNG (checkpointed:
        # a resumed run masks as the uninterrupted one would); evaluation from a fixed seed, so that
        # every validation scores the same masks.
        if not training and self._eval_masker is None:
            from transformers import DataCollatorForLanguageModeling

            self._eval_masker = DataCollatorForLanguageModeling(self._masker.tokenizer,
                                                                mlm_probability=self.mlm_probability, seed=0)
            self._eval_masker.create_rng()
        masker = self._masker if training else self._eval_masker
        batch = {k: v for k, v in batch.items() if k not in ("labels", "position_ids")}
        if "attention_mask" not in batch:  # packed rows: only the collator's padding at the end is masked out
            batch["attention_mask"] = (batch["input_ids"] != self._masker.tokenizer.pad_token_id).long()
        special = torch.isin(batch["input_ids"], self._special)
        batch["input_ids"], batch["labels"] = masker.torch_mask_tokens(batch["input_ids"].clone(), special)
        return batch

    def forward(self, model, batch: dict) -> Any:
        return model(**batch) if self.objective == "mlm" else super().forward(model, batch)

    def metrics(self) -> MetricCollection:
        return MetricCollection({"perplexity": Perplexity()})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        tokens = int((batch["labels"] != -100).sum()) if self.objective == "mlm" else predicted_tokens(batch)
        metrics["perplexity"].update(outputs.loss, tokens)

    def validation_end(self, module) -> None:
        self._eval_masker = None  # the next validation masks the same tokens again
