"""Batch samplers: length-grouped (little padding) and plain random, deterministic from (seed, epoch)
and sharded across ranks by the sampler itself.

Why our own: Lightning's injected DistributedSampler shuffles indices again and would undo length
grouping, and transformers' LengthGroupedSampler draws from a generator whose position is not
restorable; here the order is a pure function of (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ftlab.errors import ConfigError


def lengths_of(ds) -> np.ndarray:
    """A split's `length` column as an array, read in one go (a datasets Column iterates row by row: seconds
    per million rows on every rank)."""
    return ds.select_columns(["length"]).with_format("numpy")[:]["length"]


def check_eval_rows(split: str, n: int, world: int) -> None:
    """Refuse an evaluation split with fewer rows than ranks (0 < n < world): each rank needs at least one row."""
    if 0 < n < world:
        raise ConfigError(f"data: {split} split of {n} row(s) cannot be shared by {world} ranks (each needs at "
                          f"least one row, or sharded strategies hang); give it at least {world} rows or run it on "
                          "fewer devices")


def check_train_rows(n: int, batch_size: int, world: int) -> None:
    """Refuse a training split that makes fewer batches than there are ranks: each rank trains on batches of its
    own, and every rank runs as many as the others, so the run would train nothing and end as if it had."""
    if 0 < n and math.ceil(n / batch_size) < world:
        raise ConfigError(f"data: the training split of {n} row(s) makes {math.ceil(n / batch_size)} batch(es) of "
                          f"data.batch_size={batch_size}, fewer than the {world} ranks (each trains on batches of its "
                          f"own): nothing would train; set data.batch_size <= {max(1, n // world)} or run on fewer "
                          "devices")


class GroupedBatchSampler(Sampler[list[int]]):
    """Yields lists of indices (one batch each) for this rank.

    Training: shuffle, cut into mega-batches of `group_factor` batches, sort each by length, shuffle the
    resulting batches; every rank gets the same number of batches (drop the tail that does not divide).
    Evaluation (`shuffle=False`): sort everything by length; every row exactly once (no padding rows,
    so metrics are exact), cut into a number of batches divisible by the ranks so that every rank runs
    the same number of forward passes (under FSDP/ZeRO-3 each one is a collective: an extra batch on one
    rank would hang the others).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        group_by_length: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        group_factor: int = 50,
    ):
        # a copy: lengths may be a read-only view of a memory-mapped Arrow column (torch warns on those)
        self.lengths = torch.as_tensor(np.array(lengths, dtype=np.int64))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.group_factor = group_factor
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, global batches of it already trained on)
        # the epoch being iterated: global batches trained before it started, the global batch it ends at, and
        # Lightning's count of this rank's batches at its start (a resumed count continues from the checkpoint's)
        self._start = self._end = self._offset = 0

    def resume(self, epoch: int, global_batches_done: int) -> None:
        """Skip the first `global_batches_done` batches of `epoch`'s global order (a run resumed mid-epoch,
        by any number of ranks: the position counts the batches of all ranks together)."""
        self._resume = (epoch, global_batches_done)
        # the epoch too: a DataLoader with worker processes takes its first batches as Lightning creates the
        # iterator, before Lightning sets the epoch; at the old epoch they would be the old epoch's batches
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch."""
        self.epoch = epoch

    @property
    def sampler(self) -> GroupedBatchSampler:
        # Lightning calls set_epoch on `loader.sampler` and `loader.batch_sampler.sampler`, never on the
        # batch sampler itself: without this every epoch would replay the first epoch's order.
        return self

    def global_batches(self) -> list[list[int]]:
        """The epoch's batches for all ranks together, in training order: a function of (seed, epoch) and
        the per-device batch size only, so the order is the same at every world size. Training: rank r of
        W takes batches r, r + W, ... of it; a step of W ranks x A accumulated batches takes W x A of them."""
        n = len(self.lengths)
        if not self.shuffle:
            order = torch.argsort(self.lengths, descending=True, stable=True) if self.group_by_length else torch.arange(n)
            return [chunk.tolist() for chunk in torch.tensor_split(order, self._eval_batches()) if len(chunk)]  # n = 0: none
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(n, generator=g)
        if self.group_by_length:
            mega = self.batch_size * self.group_factor
            chunks = []
            for i in range(0, n, mega):
                chunk = order[i : i + mega]
                chunks.append(chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)])
            order = torch.cat(chunks)
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if self.group_by_length:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        return batches

    def _eval_batches(self) -> int:
        """Evaluation batches for all ranks: a multiple of the ranks, none empty. Where the batch size would
        ask for more batches than there are rows (a split of 3 rows in batches of 1 on 2 ranks), fewer,
        slightly larger batches: an empty batch on one rank would leave it out of the others' collectives."""
        n, w = len(self.lengths), self.num_replicas
        check_eval_rows("an evaluation", n, w)
        wanted = math.ceil(math.ceil(n / self.batch_size) / w) * w
        return wanted if wanted <= n else n // w * w

    @staticmethod
    def local_count(global_batches_done: int, num_replicas: int) -> int:
        """Lightning's per-rank batch count that corresponds to a global position (what a resumed run's
        loop counters are set to, so that validation and accumulation keep their places in the epoch)."""
        return global_batches_done // num_replicas

    def global_done(self, local_batches: int) -> int:
        """Global batches of the current epoch trained once Lightning counts `local_batches` for this rank."""
        return self._start + (local_batches - self._offset) * self.num_replicas

    def finished(self, local_batches: int) -> bool:
        """Whether the current epoch has no batch left at this world size."""
        return self.global_done(local_batches) >= self._end

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        if not self.shuffle:
            yield from batches[self.rank :: self.num_replicas]
            return
        self._start = self._offset = 0
        # Kept until the resumed epoch itself iterates: Lightning restores the position, creates an
        # iterator (still at the old epoch), and only then sets the epoch.
        if self._resume is not None and self._resume[0] == self.epoch:
            self._start = min(self._resume[1], len(batches))
            self._offset = self.local_count(self._start, self.num_replicas)
            self._resume = None
        rest = batches[self._start :]
        usable = len(rest) - len(rest) % self.num_replicas  # every rank runs the same number of steps
        self._end = self._start + usable
        yield from rest[self.rank : usable : self.num_replicas]

    def __len__(self) -> int:
        # the whole epoch at this world size (a resumed epoch ends early, when its batches run out)
        n_batches = math.ceil(len(self.lengths) / self.batch_size)
        if self.shuffle:
            return n_batches // self.num_replicas
        return self._eval_batches() // self.num_replicas
