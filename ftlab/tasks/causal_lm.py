"""Causal language modelling: supervised fine-tuning (SFT) on chat data, and continued pretraining of
decoders on raw text. Metric: perplexity of the trained tokens; greedy answers to held-out prompts are
logged at each validation."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from lightning.pytorch.loggers import WandbLogger
from torch.distributed.fsdp import FSDPModule
from torchmetrics import MetricCollection
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from ftlab.errors import ConfigError
from ftlab.metrics import Perplexity
from ftlab.tasks import chunked_loss
from ftlab.tasks.base import Task


def predicted_tokens(batch: dict) -> int:
    """Tokens a causal LM is scored on: labels that are not -100, after the one-position shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


class CausalLM(Task):
    """Next-token prediction on the labelled tokens (the assistant's, in chat SFT)."""

    name = "causal-lm"
    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"
    main_metric = "perplexity"
    higher_is_better = False
    data_class = "LanguageModelingData"
    chunked: chunked_loss.ChunkedLoss | None = None
    """The loss without full logits (`model.loss_chunk_size`), or None: the model's own loss."""

    def __init__(self, max_new_tokens: int = 48) -> None:
        """
        Args:
            max_new_tokens: Length limit of the sample generations logged at validation.
        """
        if max_new_tokens <= 0:
            raise ConfigError(f"model.task.max_new_tokens={max_new_tokens} must be positive")
        self.max_new_tokens = max_new_tokens

    def set_loss_chunk_size(self, size: int) -> None:
        self.chunked = chunked_loss.ChunkedLoss(size)

    def resolve(self, config) -> None:
        if self.chunked is not None:
            chunked_loss.check_model(config, self.chunked.size)

    def forward(self, model, batch: dict) -> Any:
        # No KV cache: with one, transformers skips its packed-sequence check and packed examples would
        # attend to each other (it builds the block-diagonal mask from position_ids only without a cache).
        if self.chunked is None or "labels" not in batch:
            return model(**batch, use_cache=False)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return CausalLMOutputWithPast(loss=self.chunked.nll(model, {**inputs, "use_cache": False}, batch["labels"]))

    def metrics(self) -> MetricCollection:
        return MetricCollection({"perplexity": Perplexity()})

    def loss_weight(self, batch: dict) -> int:
        return predicted_tokens(batch)

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        metrics["perplexity"].update(outputs.loss, predicted_tokens(batch))

    # ---- sample generations
    def validation_end(self, module) -> None:
        data = module.trainer.datamodule
        samples = getattr(data, "samples", [])
        if not samples or module.trainer.sanity_checking:
            return
        tok = data.tokenizer
        model = module.model
        rows = []
        was_training = model.training
        model.eval()
        # peft's generate runs the inner model, past the FSDP2 root's pre-forward: the root's own weights (the
        # final norm...) must be gathered here, since the chunked loss leaves the root resharded after evaluation
        root = model if isinstance(model, FSDPModule) else None
        if root is not None:
            root.unshard()
        try:
            for sample in samples:
                prompt = data.render(sample["messages"], generation_prompt=True)
                ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(module.device)
                with torch.no_grad():
                    # every rank generates (sharded weights need all of them); synced_gpus keeps ranks in step
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id,
                                         synced_gpus=module.trainer.world_size > 1)
                answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
                rows.append({"step": module.global_step, "prompt": sample["messages"][-1]["content"],
                             "reference": sample["reference"], "generated": answer})
        finally:
            model.train(was_training)
            if root is not None:
                root.reshard()
        if module.trainer.is_global_zero:
            with open(os.path.join(module.trainer.default_root_dir, "samples.jsonl"), "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            for logger in module.trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_text("val/samples", columns=list(rows[0]), data=[list(r.values()) for r in rows],
                                    step=module.global_step)
