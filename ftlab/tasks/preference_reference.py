"""Where a preference loss gets the reference model's log-probs, with as few copies of the model as possible:

- `AdapterOff`: under the Adapter policy the reference is the trained model with its adapter switched off
  (peft's `disable_adapter()`): the frozen base weights are the starting model, so no second copy exists.
- `FrozenCopy`: under Full/Freeze a frozen copy of the starting model, placed as the strategy places the
  trained one (`ftlab.strategies.build_frozen`: sharded under FSDP, partitioned under ZeRO-3).
- `Precomputed`: the reference log-probs of every pair of every split, computed once before the first
  loop and stored beside the tokenised data; no reference model is held while training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ftlab.errors import ConfigError
from ftlab.tasks.preference_losses import PairLogps, sequence_logps


def model_inputs(batch: dict) -> dict:
    """The fields a causal LM takes from a preference batch (pair_index and the labels stay out)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}


def as_pairs(sums: torch.Tensor, counts: torch.Tensor) -> PairLogps:
    """Rows of a preference batch are the chosen responses, then the rejected ones, pair by pair."""
    n = sums.shape[0] // 2
    return PairLogps(sums[:n], sums[n:], counts[:n], counts[n:])


def label_counts(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum(-1)


def model_pair_logps(model: nn.Module, batch: dict, chunked=None) -> PairLogps:
    """The summed log-probs of each response of a batch's pairs under `model`; with a `ChunkedLoss`
    (`model.loss_chunk_size`) chunk by chunk, never holding the full logits (as the trained model's)."""
    if chunked is None:
        return as_pairs(*sequence_logps(model(**model_inputs(batch)).logits, batch["labels"]))
    return as_pairs(*chunked.sequence_logps(model, model_inputs(batch), batch["labels"]))


class Reference:
    """The reference log-probs of a batch's pairs. `chunked`: the task's `ChunkedLoss`, if its loss is chunked."""

    chunked = None

    def pair_logps(self, model: nn.Module, batch: dict) -> PairLogps:
        raise NotImplementedError

    def before_loop(self, module) -> None:
        """Called on every rank before each fit/validate/test loop (collective where it computes)."""


class AdapterOff(Reference):
    """The trained model itself with its adapter disabled: the frozen base weights, the starting model."""

    def __init__(self, chunked=None):
        self.chunked = chunked

    @torch.no_grad()
    def pair_logps(self, model: nn.Module, batch: dict) -> PairLogps:
        with model.disable_adapter():
            return model_pair_logps(model, batch, self.chunked)


class FrozenCopy(Reference):
    """A frozen copy of the starting model (a `FrozenTeacher`, which stays in eval mode and without grads)."""

    def __init__(self, frozen: nn.Module, chunked=None):
        self.frozen = frozen
        self.chunked = chunked

    @torch.no_grad()
    def pair_logps(self, model: nn.Module, batch: dict) -> PairLogps:
        # the frozen model itself (FrozenTeacher hands back only its logits; model_inputs turn its cache off too)
        return model_pair_logps(self.frozen.model, batch, self.chunked)


class Precomputed(Reference):
    """Reference log-probs looked up by each pair's `pair_index` in a table computed once, before training, by
    `source` (AdapterOff), or by the trained model itself while it is still the starting model (source None)."""

    def __init__(self, source: Reference | None = None, chunked=None):
        self.source = source
        self.chunked = chunked
        self.table: torch.Tensor | None = None  # [pairs of all splits, 2]: chosen, rejected

    def pair_logps(self, model: nn.Module, batch: dict) -> PairLogps:
        values = self.table[batch["pair_index"]].to(torch.float32)
        counts = label_counts(batch)
        n = values.shape[0]
        return PairLogps(values[:, 0], values[:, 1], counts[:n], counts[n:])

    @staticmethod
    def cache_file(module) -> str:
        """Beside the tokenised data (whose cache key covers data, tokenizer and options), keyed by what the
        log-probs depend on besides: the starting model (its weights, their quantization, an adapter init that
        moves part of them) and the precision it runs in."""
        policy = module.policy
        key = {"model": module.name_or_path, "gguf": module.gguf_file, "revision": module.revision,
               "overrides": module.config_overrides, "dtype": str(module.weight_dtype()),
               "precision": str(module.trainer.precision),
               "quantization": None if module.quantization is None else vars(module.quantization),
               "adapter_init": (policy.options.get("init_lora_weights")
                                if getattr(policy, "changes_frozen_weights", False) else None)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return os.path.join(module.trainer.datamodule.cache_path, f"reference-logps-{digest}.pt")

    def before_loop(self, module) -> None:
        if self.table is not None:
            return
        trainer = module.trainer
        path = self.cache_file(module)
        # every rank must take the same branch: the computing one runs collectives (sharded forwards)
        if trainer.strategy.reduce_boolean_decision(os.path.exists(path), all=True):
            self.table = torch.load(path, map_location="cpu", weights_only=True).to(module.device)
            rank_zero_info(f"ftlab: reference log-probs of {len(self.table):,} pairs from {path}")
            return
        if self.source is None and (module.global_step > 0 or trainer.ckpt_path):
            raise ConfigError(f"model.task.precompute_reference: the reference log-probs ({path}) are gone and the "
                              "model has trained since; they come from the starting model: rerun fit from the start")
        table = compute_table(module, self.source, self.chunked)
        if trainer.local_rank == 0:  # each node's: with node-local caches, a resumed run on any node finds it
            tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"  # (on a shared cache: the same table, renamed)
            torch.save(table, tmp)
            os.replace(tmp, path)
        self.table = table.to(module.device)
        rank_zero_info(f"ftlab: reference log-probs of {len(table):,} pairs computed once, stored in {path}")


def rank_batches(lengths, batch_size: int, world_size: int, rank: int) -> list[tuple[list[int], bool]]:
    """This rank's evaluation batches of a split as (row indices, scored), padded with unscored repeats of row 0
    up to the busiest rank's count: under FSDP and ZeRO-3 every forward is a collective, so a rank with fewer
    batches (a split with fewer rows than ranks leaves some with none) would hang or desync the others."""
    from ftlab.data.samplers import GroupedBatchSampler

    if 0 < len(lengths) < world_size:  # one row each for the first ranks (the evaluation sampler refuses this)
        mine, busiest = ([([rank], True)] if rank < len(lengths) else []), 1
    else:
        sampler = GroupedBatchSampler(lengths, batch_size, shuffle=False, num_replicas=world_size, rank=rank)
        mine = [(indices, True) for indices in sampler]
        busiest = math.ceil(len(sampler.global_batches()) / world_size)  # batches are dealt round-robin
    return mine + [([0], False)] * (busiest - len(mine))


def compute_table(module, source: Reference | None, chunked=None) -> torch.Tensor:
    """Reference log-probs of every pair of the prepared splits (collective): each rank scores its share of
    the rows in evaluation batches, then the ranks gather all of them."""
    from torch.utils.data import DataLoader

    from ftlab.data.samplers import lengths_of

    trainer, data, model = module.trainer, module.trainer.datamodule, module.model
    device = module.device
    rows = []
    was_training = model.training
    model.eval()
    try:
        for ds in data.splits.values():
            batches = rank_batches(lengths_of(ds), data.eval_batch_size, trainer.world_size, trainer.global_rank)
            loader = DataLoader(ds.remove_columns("length"), batch_sampler=[b for b, _ in batches],
                                collate_fn=data.collator())
            for batch, (_, scored) in zip(loader, batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    if source is not None:
                        logps = source.pair_logps(model, batch)
                    else:
                        logps = model_pair_logps(model, batch, chunked)
                if scored:
                    rows.append(torch.stack([batch["pair_index"].double(), logps.chosen.double(),
                                             logps.rejected.double()], 1))
    finally:
        model.train(was_training)
    local = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64, device=device)
    # ranks may hold different row counts: pad to the longest (index -1) so that all_gather sees one shape
    counts = trainer.strategy.all_gather(torch.tensor([len(local)], device=device)).reshape(-1)
    padded = torch.full((int(counts.max()), 3), -1.0, dtype=torch.float64, device=device)
    padded[: len(local)] = local
    everything = trainer.strategy.all_gather(padded).reshape(-1, 3).cpu()
    everything = everything[everything[:, 0] >= 0]
    table = torch.full((data.pair_rows, 2), float("nan"), dtype=torch.float64)
    table[everything[:, 0].long()] = everything[:, 1:]
    return table
