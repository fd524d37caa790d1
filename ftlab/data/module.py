"""Data modules: load a source, check it, split it, tokenise it once into a cache, serve padded batches.

`TextDataModule` holds everything tasks share; a task family's data module (e.g.
`TextClassificationData`) adds its columns and how a row becomes model inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from ftlab.data.collate import PadCollator
from ftlab.data.loaders import ResumableLoader
from ftlab.data.mixing import Sources
from ftlab.data.samplers import GroupedBatchSampler, lengths_of
from ftlab.data.sources import Source
from ftlab.errors import ConfigError

_SPLIT_ALIASES = {"validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
                  "test": "test", "train": "train"}
CACHE_FORMAT = 4  # bump when the cached layout changes (3: first-fit-decreasing packing; 4: Arrow shards)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("FTLAB_CACHE", os.path.expanduser("~/.cache/ftlab")), "data")


def _size(value: int | float, n: int, option: str) -> int:
    if isinstance(value, float) and not value.is_integer() or 0 < value < 1:
        if not 0 < value < 1:
            raise ConfigError(f"{option}={value}: a fraction must be in (0, 1), or give a row count")
        return max(1, round(value * n))
    if value < 0:
        raise ConfigError(f"{option}={value} must be >= 0")
    return int(value)


def label_names_as_written(label_names: list | None, what: str = "label") -> list[str] | None:
    """`data.label_names` as strings. Numbers are kept as written (`[0, 1]`); YAML reads unquoted no/yes, true/false
    and on/off as booleans, whose words are lost by then: refused with the quoted form to write instead."""
    if label_names is None:
        return None
    if any(isinstance(n, bool) for n in label_names):
        shown = ", ".join(f"'{n}'" if not isinstance(n, bool) else "'no'" if n is False else "'yes'" for n in label_names)
        raise ConfigError(f"data.label_names={label_names}: YAML reads unquoted no/yes, false/true and off/on as "
                          f"booleans; quote the {what} names as they are in the data, e.g. label_names: [{shown}]")
    names = [str(n) for n in label_names]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.label_names={label_names} has duplicates; list each {what} once")
    return names


def train_subset(n: int, rows: int | float, seed: int) -> list[int]:
    """The training rows kept by data.max_train_rows: the first `rows` (a count, or a fraction of n) of one
    random order of the n rows drawn with `seed`, in file order. Nested: a smaller subset is inside a larger one
    (the order does not depend on how many are kept), and equal for every training seed and policy."""
    import numpy as np

    keep = min(_size(rows, n, "data.max_train_rows"), n)
    return sorted(np.random.default_rng(seed).permutation(n)[:keep].tolist())


def read_chat_template(value: str | None) -> str | None:
    """`data.chat_template`: a Jinja template, the path of a file holding one (read here), or the name of one
    of the tokenizer's own templates (transformers resolves it: "tool_use"). A path that names no file is a
    mistake: used as the template, every chat would render as the path."""
    if not value:
        return value
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{" not in value and ("/" in value or os.sep in value or os.path.splitext(value)[1]):
        raise ConfigError(f"data.chat_template={value!r} names no file (working directory {os.getcwd()}) and is no "
                          "Jinja template; give the template file's path, the template itself, or a template name "
                          "of the tokenizer")
    return value


class TextDataModule(L.LightningDataModule):
    """Shared data handling: source, filtering, splits, tokenisation cache, batching."""

    def __init__(
        self,
        source: str | dict[str, str] | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_size: int | float = 0.1,
        test_size: int | float = 0.1,
        split_seed: int = 0,
        keep_rows: dict[str, list] | None = None,
        deduplicate: bool = False,
        max_train_rows: int | float | None = None,
        group_by_length: bool = True,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        cache_shared: bool = False,
        trust_remote_code: bool = False,
        tokenizer_revision: str | None = None,
        source_format: str | None = None,
        gguf_file: str | None = None,
        predict_source: str | dict[str, str] | None = None,
        sources: list[dict[str, Any]] | None = None,
        format: str | None = None,
    ):
        """
        Args:
            source: A hub dataset id, a local file (csv, tsv, json, jsonl, parquet; .gz/.bz2/.xz/.zst too) or
                glob, a `pkg://package/path` file inside an installed package, a named offline source
                (`rotten-tomatoes-snippets`), or a mapping split -> file (`{train: a.csv, test: b.csv}`).
                Or give data.sources instead.
            tokenizer: Tokenizer name or path; by default the model's (`model.name_or_path`).
            max_length: Truncate rows to this many tokens.
            batch_size: Training batch size per device.
            eval_batch_size: Validation/test batch size per device (default: 2 x batch_size).
            val_size: Held-out validation rows taken from train when the source has no validation split
                (fraction in (0, 1) or a row count).
            test_size: Held-out test rows taken from train when the source has no test split.
            split_seed: Seed of those splits (fixed separately from the training seed so that runs with
                different seeds are evaluated on the same rows).
            keep_rows: Keep only rows whose column holds one of the listed values, e.g.
                `{category: [fresh, rotten]}`.
            deduplicate: Drop rows whose text repeats an earlier row's (before splitting, so no test row
                is also a training row).
            max_train_rows: Use at most this many training rows (a count, or a fraction in (0, 1)): a random
                subset drawn with split_seed after the held-out splits, nested (the first N rows of one fixed
                random order of the train split, so 100 rows are within 300), the same for every training seed.
            group_by_length: Batch rows of similar length together (little padding, faster); off = random.
            num_workers: DataLoader worker processes.
            num_proc: Processes that filter, render, tokenise and pack the data into the cache (default: every
                core this process may use). The cache is the same, byte for byte, for any number.
            cache_dir: Where tokenised splits are cached (default `$FTLAB_CACHE/data` or
                `~/.cache/ftlab/data`). The cache key covers the data files, tokenizer and options.
            cache_shared: The cache_dir is on a file system every node of a multi-node job sees: only global
                rank 0 prepares, the other nodes wait for its cache (and need no cross-node file lock). Off:
                each node's local rank 0 prepares unless the cache is already there; on a shared file system
                the file lock next to the cache still lets one prepare at a time, the others then read.
            trust_remote_code: Allow the tokenizer's own code from its repository (off: safer).
            tokenizer_revision: Hub revision (branch, tag or commit) of data.tokenizer; by default model.revision.
            source_format: The file format when the extension does not tell it: csv, json, parquet, text,
                conll (`token<TAB>tag` lines) or chatterbot (chatterbot-corpus YAML).
            gguf_file: The tokenizer's GGUF file (set from model.gguf_file).
            predict_source: What `ftlab predict` predicts on: new rows, as a file, glob or hub id like `source`.
                Classification needs the text column(s) only (a label column, if there, shows as
                `true_label`); other tasks read the columns training reads. Default: the test split.
            sources: Several sources in one run (instead of data.source), each `{source, format, columns, weight,
                name, split, streaming, max_rows}`: its own row format and column mapping (`columns: {instruction:
                question}` reads column `question` as `instruction`); `weight` on every source mixes the training
                rows by weight (drawn with split_seed), none concatenates them; `name` is a hub dataset's config,
                `split` the source's split to train on (or `{train: ..., validation: ...}`), `max_rows` the first N
                rows, `streaming: true` reads the first max_rows rows of a hub set without downloading it whole.
            format: The row format of data.source (LanguageModelingData): openai, sharegpt, alpaca,
                prompt_completion or text; by default found from the columns.
        """
        super().__init__()
        if max_length <= 0:
            raise ConfigError(f"data.max_length={max_length} must be a positive number of tokens (e.g. 128)")
        if batch_size <= 0:
            raise ConfigError(f"data.batch_size={batch_size} must be a positive integer (e.g. 32)")
        if eval_batch_size is not None and eval_batch_size <= 0:
            raise ConfigError(f"data.eval_batch_size={eval_batch_size} must be a positive integer")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0")
        if num_proc is not None and num_proc < 1:
            raise ConfigError(f"data.num_proc={num_proc} must be >= 1 (or unset: every core this process may use)")
        if max_train_rows is not None and (max_train_rows <= 0 or isinstance(max_train_rows, float)
                                           and max_train_rows >= 1 and not max_train_rows.is_integer()):
            raise ConfigError(f"data.max_train_rows={max_train_rows} must be a positive row count or a fraction in (0, 1)")
        for option, value in (("data.val_size", val_size), ("data.test_size", test_size)):
            if value < 0 or isinstance(value, float) and value >= 1 and not value.is_integer():
                raise ConfigError(f"{option}={value}: give a fraction in (0, 1) or a row count >= 0")
        self.source = Sources(source, sources, format=format, source_format=source_format, formats=self.row_formats())
        self.predict_source = Source(predict_source, option="data.predict_source", format=source_format) \
            if predict_source else None
        self.gguf_file = gguf_file
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.val_size, self.test_size, self.split_seed = val_size, test_size, split_seed
        self.keep_rows = keep_rows or {}
        self.deduplicate = deduplicate
        self.max_train_rows = max_train_rows
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.cache_root = cache_dir or default_cache_dir()
        self.cache_shared = cache_shared
        self.trust_remote_code = trust_remote_code
        self.tokenizer_revision = tokenizer_revision
        self._tokenizer = None
        self._zero_segment_types: bool | None = None  # see token_outputs
        self._train_sampler: GroupedBatchSampler | None = None
        self._resume_at: tuple[int, int] | None = None
        self.splits: dict = {}
        self.meta: dict = {}

    # ---- what subclasses provide
    def required_columns(self) -> dict[str, str]:
        """Option name -> column name, for every column the rows must have."""
        return {}

    def text_column_for_dedup(self) -> str | None:
        return None

    def prepare_labels(self, raw) -> tuple:
        """Check labels, map them to ids; returns (dataset dict, meta to cache)."""
        return raw, {}

    def encode(self, batch: dict) -> dict:
        """A batch of raw rows (column -> list) to model inputs (input_ids, labels...)."""
        raise NotImplementedError

    def missing_column_hint(self, option: str, columns: list[str]) -> str | None:
        """What to set when a required column is missing (the options that read other layouts)."""
        return None

    def row_formats(self) -> tuple[str, ...]:
        """The row formats (ftlab.data.formats) this data module reads; none: its own columns only."""
        return ()

    def normalise_rows(self, ds, format: str | None, split: str, where: str):
        """One source's split (a `datasets.Dataset`) in `format` -> (the rows `encode` reads, the format read)."""
        return ds, format

    def split_meta(self, splits: dict) -> dict:
        """Meta to cache from the raw splits (e.g. held-out prompts for sample generations)."""
        return {}

    def apply_meta(self, meta: dict) -> None:
        """Take back what prepare_labels put in the cache meta (e.g. label names)."""

    # ---- tokenizer
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.tokenizer_name:
                raise ConfigError("data.tokenizer is not set (it defaults to model.name_or_path); set one of them")
            from ftlab.loading import load_tokenizer

            try:
                # the option as the user gave it: data.tokenizer defaults to (is linked from) model.name_or_path
                revision = {"revision": self.tokenizer_revision} if self.tokenizer_revision else {}
                tok = load_tokenizer(self.tokenizer_name, self.gguf_file, option="model.name_or_path (data.tokenizer)",
                                     trust_remote_code=self.trust_remote_code, **revision)
            except (OSError, ValueError) as err:
                raise ConfigError(f"data.tokenizer={self.tokenizer_name!r}: no tokenizer could be loaded "
                                  f"({str(err).splitlines()[0][:200]}); give a hub id or a folder with tokenizer files") from None
            if tok.pad_token is None:  # decoder tokenizers (GPT-2, Llama) have none: reuse end-of-sequence
                tok.pad_token = tok.eos_token
            template = getattr(self, "chat_template", None)
            if template and "{" in template:  # the run's own template (not a name of the tokenizer's): the exports
                tok.chat_template = template   # save it with the tokenizer, so a server renders chats as training did
            self._tokenizer = tok
        return self._tokenizer

    def token_outputs(self, pair: bool = False) -> dict:
        """Tokenizer kwargs that leave out what carries no information, so it is neither converted nor
        stored: the attention mask (all ones before padding: the collator makes it) and, for single
        segments, token type ids where this tokenizer makes them all zero (the model's default; not every
        tokenizer does: XLNet's mark the last token). Asked only of a tokenizer that makes them: some take no
        such option (transformers' Mistral backend refuses any it does not know)."""
        if self._zero_segment_types is None:
            types = self.tokenizer("a b").get("token_type_ids")
            self._zero_segment_types = isinstance(types, list) and not any(types)
        return {"return_attention_mask": False,
                **({"return_token_type_ids": False} if self._zero_segment_types and not pair else {})}

    # ---- cache
    def _tokenizer_digest(self) -> str:
        """The tokenizer's part of the cache key; computed once (a large vocabulary takes a while to serialise)."""
        if getattr(self, "_tok_digest", None) is None:
            tok = self.tokenizer
            if getattr(tok, "is_fast", False):
                # drop the call-time state (truncation/padding settings the backend keeps after a call)
                state = {k: v for k, v in json.loads(tok.backend_tokenizer.to_str()).items()
                         if k not in ("truncation", "padding")}
                tok_id = json.dumps(state, sort_keys=True)
            else:
                tok_id = repr(sorted(tok.get_vocab().items()))
            # what tokenizer_config.json holds beside the vocabulary, and the rows depend on: its chat
            # template (rendered when data.chat_template is unset), its special tokens, its sides
            extra = {"chat_template": getattr(tok, "chat_template", None),
                     "special_tokens": getattr(tok, "special_tokens_map", None),
                     "sides": [getattr(tok, "truncation_side", None), getattr(tok, "padding_side", None)]}
            tok_id += json.dumps(extra, sort_keys=True, default=str)
            self._tok_digest = hashlib.sha256(tok_id.encode()).hexdigest()[:16]
        return self._tok_digest

    def cache_key(self) -> str:
        parts = {
            "format": CACHE_FORMAT,
            "class": type(self).__qualname__,
            "source": self.source.fingerprint(),
            "tokenizer": self._tokenizer_digest(),
            "options": self.cache_options(),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def cache_options(self) -> dict:
        return {
            "max_length": self.max_length, "val_size": self.val_size, "test_size": self.test_size,
            "split_seed": self.split_seed, "keep_rows": self.keep_rows, "deduplicate": self.deduplicate,
            # a seeded random subset since format 3 took a prefix: the old key would serve the prefix
            "max_train_rows": None if self.max_train_rows is None else f"seeded-subset:{self.max_train_rows!r}",
        }

    @property
    def cache_path(self) -> str:
        return os.path.join(self.cache_root, self.cache_key())

    def prepare_data(self) -> None:
        """Load, check, split, tokenise and cache, unless the cache is there (then nothing is tokenised).
        Lightning calls it on each node's local rank 0; `ftlab prepare` calls it alone. One process prepares
        (a file lock; with cache_shared, global rank 0 only), the others wait for the cache by polling it."""
        from ftlab.data import prepare

        path = self.cache_path
        self.prepared_here = False
        if prepare.is_complete(path):
            rank_zero_info(f"ftlab: tokenised data from cache {path}")
            return
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            may, who = True, " ".join(["python", *sys.argv[:3]])[:80]
        else:
            may = trainer.global_rank == 0 if self.cache_shared else trainer.local_rank == 0
            who = f"rank {trainer.global_rank} of a {trainer.world_size}-process job"
        import datasets

        # ftlab's cache (keyed by the data, tokenizer and options) is the only one. datasets' own map cache
        # keys on a pickle of the mapped function, which misses changes in the methods that function calls:
        # it served rows packed by older code.
        caching = datasets.is_caching_enabled()
        datasets.disable_caching()
        try:
            prepared = prepare.ensure_prepared(self, may, who, self.processes(),
                                               log=lambda line: print(line, file=sys.stderr, flush=True))
        finally:
            if caching:
                datasets.enable_caching()
        self.prepared_here = prepared
        if prepared:
            with open(os.path.join(path, "meta.json")) as f:
                rank_zero_info(f"ftlab: tokenised {json.load(f)['sizes']} rows into {path}")

    def processes(self) -> int:
        """data.num_proc, by default the cores this process may use."""
        from ftlab.data.prepare import available_cores

        return self.num_proc or available_cores()

    def load_and_split(self) -> tuple[dict, dict]:
        """The checked raw splits to encode, and the meta to cache with them."""
        raw = self._load_checked()
        raw, meta = self.prepare_labels(raw)
        splits = self._split(raw)
        splits, mix = self.source.mix(splits, self.split_seed)  # several sources: mixed by weight, reported
        if mix:
            meta["sources"] = mix
        meta.update(self.split_meta(splits))
        for name, ds in splits.items():
            if len(ds) == 0:
                raise ConfigError(f"data: the {name} split is empty; check data.source, keep_rows and split sizes")
        return splits, meta

    @staticmethod
    def _check_kept_values(raw, wanted: dict[str, set[str]]) -> None:
        """A data.keep_rows value that no row holds (a typo: 'poss') is named, not left to empty a class."""
        from ftlab.errors import did_you_mean

        for column, values in wanted.items():
            found, seen = set(), set()
            for ds in raw.values():
                for batch in ds.select_columns([column]).iter(batch_size=10_000):
                    cells = {str(v) for v in batch[column]}
                    found |= cells & values
                    if len(seen) < 1000:
                        seen |= cells
            missing = sorted(values - found)
            if missing:
                raise ConfigError(f"data.keep_rows.{column}: {missing[0]!r} is in no row's {column!r}; "
                                  f"{did_you_mean(missing[0], sorted(seen))}")

    def encode_with_length(self, batch: dict) -> dict:
        """encode, plus each row's token count (batching by length reads it)."""
        out = self.encode(batch)
        out["length"] = [len(x) for x in out["input_ids"]]
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from ftlab.data import prepare

        path = self.cache_path
        if not prepare.is_complete(path):
            if getattr(self, "trainer", None) is None:
                self.prepare_data()  # e.g. the data module used on its own, outside a Trainer
            else:  # a rank whose node's local rank 0 did not prepare (cache_shared): the preparer's cache
                prepare.ensure_prepared(self, False, "", 1, log=lambda line: print(line, file=sys.stderr, flush=True))
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.apply_meta(self.meta)
        self.splits = prepare.load_shards(path, self.meta["shards"])
        trainer = getattr(self, "trainer", None)
        if trainer is not None:  # refused here, before the model loads, not when the loader is first built
            from ftlab.data.samplers import check_eval_rows, check_train_rows

            used = {"fit": getattr(self, "fit_eval_splits", ("validation", "test")), "validate": ("validation",),
                    "test": ("test",)}.get(stage or "", ())
            off = {"validation": trainer.limit_val_batches == 0, "test": trainer.limit_test_batches == 0}
            for split in used:
                if split in self.splits and not off[split]:
                    check_eval_rows(f"the {split}", len(self.splits[split]), trainer.world_size)
            if stage == "fit" and "train" in self.splits and trainer.limit_train_batches != 0:
                check_train_rows(len(self.splits["train"]), self.batch_size, trainer.world_size)

    def _parallel(self, rows: int) -> int | None:
        """num_proc for datasets' filter/map on the raw rows: None (in this process) for small data, where
        starting processes costs more than it saves, or where CUDA is up (no fork after CUDA)."""
        from ftlab.data.prepare import MAP_BATCH, _pool_context

        procs = min(self.processes(), rows // (10 * MAP_BATCH))
        return procs if procs > 1 and _pool_context().get_start_method() == "fork" else None

    # ---- load, filter, split
    def _load_checked(self):
        import datasets

        raw = self.source.load(self.normalise_rows, keep=[*self.required_columns().values(), *self.keep_rows])
        renamed = {}
        for name, ds in raw.items():
            key = _SPLIT_ALIASES.get(name.lower())
            if key is None:
                continue
            renamed[key] = ds
        if "train" not in renamed:
            raise ConfigError(f"data.source has splits {list(raw)}; one must be 'train' (or give a single file)")
        raw = datasets.DatasetDict(renamed)
        for split, ds in raw.items():
            for option, column in {**self.required_columns(), **{f"keep_rows.{c}": c for c in self.keep_rows}}.items():
                if column not in ds.column_names:
                    hint = self.missing_column_hint(option, ds.column_names)
                    raise ConfigError(f"data.{option}: column {column!r} is not in the {split} data; "
                                      f"its columns are {ds.column_names}{'; ' + hint if hint else ''}")
        procs = self._parallel(sum(len(ds) for ds in raw.values()))
        if self.keep_rows:
            wanted = {c: {str(v) for v in vals} for c, vals in self.keep_rows.items()}
            self._check_kept_values(raw, wanted)
            raw = raw.filter(lambda b: [all(str(b[c][i]) in vs for c, vs in wanted.items())
                                        for i in range(len(b[next(iter(wanted))]))],
                             batched=True, num_proc=procs, desc="keep_rows")
        text = self.text_column_for_dedup()
        if text:
            raw = raw.filter(lambda b: [isinstance(t, str) and t.strip() != "" for t in b[text]], batched=True,
                             num_proc=procs, desc="drop empty rows")
        if self.deduplicate and text:
            seen: set[str] = set()

            def first_time(row):
                key = row[text].strip()
                if key in seen:
                    return False
                seen.add(key)
                return True

            # one pass over the splits in order, so a row repeated across splits stays in the first only
            raw = datasets.DatasetDict({k: raw[k].filter(first_time) for k in ("train", "validation", "test") if k in raw})
        return raw

    def _split(self, raw) -> dict:
        """Use the source's own test/validation splits; hold out rows of train where it has none."""
        train = raw["train"]
        out = {}
        for split, size, option in (("test", self.test_size, "data.test_size"),
                                    ("validation", self.val_size, "data.val_size")):
            if split in raw:
                out[split] = raw[split]
            elif size:
                n = _size(size, len(train), option)
                if n >= len(train):
                    raise ConfigError(f"{option}={size} leaves no training rows (train has {len(train)})")
                parts = train.train_test_split(test_size=n, seed=self.split_seed)
                train, out[split] = parts["train"], parts["test"]
        if self.max_train_rows:
            train = train.select(train_subset(len(train), self.max_train_rows, self.split_seed))
        out["train"] = train
        return out

    # ---- loaders
    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.splits:
            raise ConfigError(f"data: there is no {split} split (set data.{'val' if split == 'validation' else split}_size > 0)")
        ds = self.splits[split]
        world, rank = self._rank()
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = GroupedBatchSampler(
            lengths_of(ds), self.batch_size if train else self.eval_batch_size, shuffle=train,
            group_by_length=self.group_by_length, seed=seed, num_replicas=world, rank=rank,
        )
        # An own generator: a DataLoader draws each iterator's base seed from it, and from the global RNG
        # otherwise, which would shift dropout masks between a resumed run and an uninterrupted one.
        kwargs = {"batch_sampler": sampler, "collate_fn": self.collator(), "num_workers": self.num_workers,
                  "persistent_workers": self.num_workers > 0, "generator": torch.Generator().manual_seed(seed)}
        if train:
            self._train_sampler = sampler
            if self._resume_at:
                sampler.resume(*self._resume_at)
            return ResumableLoader(ds.remove_columns("length"), owner=self, **kwargs)
        return DataLoader(ds.remove_columns("length"), **kwargs)

    # ---- training position, checkpointed for exact mid-epoch resume at any world size
    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        sampler = self._train_sampler
        if sampler is None or trainer is None:
            return {}
        # Lightning's count of batches this rank trained this epoch (the sampler has already handed out more:
        # the fetcher prefetches), as a position in the epoch's global order, which every world size shares
        local = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        done = sampler.global_done(local)
        return {"epoch": sampler.epoch, "global_batches_done": done, "epoch_finished": sampler.finished(local),
                "batch_size": self.batch_size, "world_size": trainer.world_size}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        done = state.get("global_batches_done")
        if done is None:  # written before positions were global: a count of one rank's batches
            done = state["batches_done"] * self._rank()[0]
        saved_batch = state.get("batch_size", self.batch_size)
        if saved_batch != self.batch_size and done and not state.get("epoch_finished", False):
            # the epoch's order is made for its batch size (batches of similar lengths, then shuffled): cut
            # into other batches, the rest of the epoch would skip some rows and repeat others
            raise ConfigError(f"data.batch_size={self.batch_size}, but the checkpoint stopped mid-epoch with batch_size "
                              f"{saved_batch}: the rest of its epoch can only be taken in batches of {saved_batch}; "
                              f"resume with data.batch_size={saved_batch} (change it once an epoch has ended), or keep "
                              "the global batch with trainer.accumulate_grad_batches")
        self._resume_at = (state["epoch"], done)
        if self._train_sampler is not None:
            self._train_sampler.resume(*self._resume_at)

    def collator(self):
        return PadCollator(self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        """The rows of data.predict_source, else the test split; predictions come back in the rows' order."""
        if self.predict_source is None:
            return self._loader("test", train=False)
        if "predict" not in self.splits:
            self.splits["predict"] = self._predict_rows()
        return self._loader("predict", train=False)

    # ---- new rows to predict on
    def target_options(self) -> tuple[str, ...]:
        """The options (of required_columns) naming what a prediction needs not: labels, targets."""
        return ()

    def encode_predict(self, batch: dict) -> dict:
        """Rows of data.predict_source to model inputs; by default as training rows (all columns needed)."""
        return self.encode(batch)

    def _predict_rows(self):
        import datasets

        raw = self.predict_source.load()
        ds = datasets.concatenate_datasets(list(raw.values())) if len(raw) > 1 else next(iter(raw.values()))
        ds, _ = self.normalise_rows(ds, None, "predict", "data.predict_source")  # e.g. alpaca rows -> messages
        for option, column in self.required_columns().items():
            if column not in ds.column_names and option not in self.target_options():
                raise ConfigError(f"data.predict_source: column {column!r} (data.{option}) is not in it; its columns are "
                                  f"{ds.column_names}")
        if len(ds) == 0:
            raise ConfigError("data.predict_source has no rows")
        caching = datasets.is_caching_enabled()
        datasets.disable_caching()  # a predict file is read once; nothing to cache next to it
        try:
            enc = ds.map(self.encode_predict, batched=True, remove_columns=ds.column_names, desc="tokenising predict")
            return enc.map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True)
        finally:
            if caching:
                datasets.enable_caching()


class TextClassificationData(TextDataModule):
    """Text (or text pair) classification data: a text column, an optional second text, a label column."""

    def __init__(
        self,
        source: str | dict[str, str] | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        label_names: list[str | int | float | bool] | None = None,
        **kwargs,
    ):
        """
        Args:
            source: See TextDataModule.
            text_column: Column with the text to classify.
            text_pair_column: Optional second text (e.g. the hypothesis of an NLI pair).
            label_column: Column with the label (a name, or an integer id).
            label_names: The labels, in id order. Every row's label must be one of them. Default: the
                dataset's own label names, else the sorted distinct values of the training labels. Quote
                labels such as 'no', 'yes', 'true', 'off': YAML reads them unquoted as booleans.
            **kwargs: The options of TextDataModule (batch_size, max_length, splits, cache...).
        """
        super().__init__(source, **kwargs)
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.given_label_names = label_names_as_written(label_names) or None
        self.label_names = self.given_label_names  # resolved from the data in setup() when not given

    def required_columns(self) -> dict[str, str]:
        cols = {"text_column": self.text_column, "label_column": self.label_column}
        if self.text_pair_column:
            cols["text_pair_column"] = self.text_pair_column
        return cols

    def text_column_for_dedup(self) -> str | None:
        return self.text_column

    def cache_options(self) -> dict:
        return {**super().cache_options(), "columns": [self.text_column, self.text_pair_column, self.label_column],
                "label_names": self.given_label_names}

    def prepare_labels(self, raw):
        import datasets

        feature = raw["train"].features[self.label_column]
        own_names = getattr(feature, "names", None)
        counts: dict[str, Counter] = {}
        for split, ds in raw.items():  # in batches: no list of the whole column
            counts[split] = Counter()
            for batch in ds.select_columns([self.label_column]).iter(batch_size=10_000):
                counts[split].update(own_names[v] if own_names and isinstance(v, int) else v
                                     for v in batch[self.label_column])
        missing = sum(c[None] for c in counts.values())
        if missing:
            raise ConfigError(f"data.label_column={self.label_column!r}: {missing} rows have no label; "
                              "fill them or drop them from the file")
        # found, the labels are the training split's: a label only an evaluation split has is no class the
        # model learns (and, sorted in, it would shift the ids of the others)
        names = self.given_label_names or own_names or sorted(str(v) for v in counts.get("train") or sum(counts.values(), Counter()))
        names = [str(n) for n in names]
        for split, split_counts in counts.items():
            unknown = {str(v): c for v, c in split_counts.items() if str(v) not in names}
            if not unknown:
                continue
            shown = ", ".join(f"{v!r} ({c} rows)" for v, c in sorted(unknown.items())[:5])
            where = "data.label_names" if self.given_label_names or own_names else "the training split's labels"
            raise ConfigError(
                f"data: labels {shown} of the {split} split (column {self.label_column!r}) are not in {where} {names}; "
                f"give every label in data.label_names, or keep only known labels with data.keep_rows: "
                f"{{{self.label_column}: {names}}}"
            )
        if len(names) < 2:
            raise ConfigError(f"data: only one label {names} in column {self.label_column!r}; classification needs two or more")
        label2id = {n: i for i, n in enumerate(names)}
        column = self.label_column

        def to_id(batch):
            return {column: [label2id[str(own_names[v] if own_names and isinstance(v, int) else v)] for v in batch[column]]}

        # explicit features: datasets would otherwise keep the column's old (string) type for the ids
        features = raw["train"].features.copy()
        features[column] = datasets.Value("int64")
        raw = raw.map(to_id, batched=True, features=features, num_proc=self._parallel(sum(map(len, raw.values()))),
                      desc="label ids")
        return raw, {"label_names": names}

    def apply_meta(self, meta: dict) -> None:
        self.label_names = meta["label_names"]

    def encode(self, batch: dict) -> dict:
        pair = batch[self.text_pair_column] if self.text_pair_column else None
        enc = self.tokenizer(batch[self.text_column], pair, truncation=True, max_length=self.max_length,
                             **self.token_outputs(pair is not None))
        enc["labels"] = batch[self.label_column]
        return dict(enc)

    def target_options(self) -> tuple[str, ...]:
        return ("label_column",)

    def encode_predict(self, batch: dict) -> dict:
        """New rows: labels are optional (given, predictions show them as true_label)."""
        pair = batch[self.text_pair_column] if self.text_pair_column else None
        enc = dict(self.tokenizer([str(t) for t in batch[self.text_column]], pair, truncation=True,
                                  max_length=self.max_length, **self.token_outputs(pair is not None)))
        if self.label_column in batch:
            ids = {n: i for i, n in enumerate(self.label_names)}
            unknown = sorted({str(v) for v in batch[self.label_column]} - set(ids))
            if unknown:
                raise ConfigError(f"data.predict_source: labels {unknown[:5]} in column {self.label_column!r} are not "
                                  f"among the run's labels {self.label_names}; drop the column or fix the labels")
            enc["labels"] = [ids[str(v)] for v in batch[self.label_column]]
        return enc
