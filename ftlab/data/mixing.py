"""The run's sources: `data.source`, or several `data.sources`, each with its own columns and row format,
read into one dataset of the rows the data module reads; their training rows concatenated, or mixed by
weight.

A weighted mix keeps the mixed training set as large as the sources' training rows together (N) and gives
source i round(N x w_i / sum w) of them, drawn with `data.split_seed`: a source with more rows than its
share gives a random subset (without replacement); one with fewer gives every row as often as it fits
whole, plus a random subset of its rows for the rest (upsampled, no row drawn twice more than another).
The mix is applied after the held-out splits are taken, so no upsampled copy of a training row is ever a
validation or test row.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from ftlab.data.sources import Source
from ftlab.errors import ConfigError, did_you_mean

SOURCE_COLUMN = "__source"  # which source a row came from, while the splits are built (dropped after the mix)
ENTRY_KEYS = ("source", "format", "weight", "name", "split", "columns", "streaming", "max_rows")
SPLIT_ALIASES = {"validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
                 "test": "test", "train": "train"}


class SourceEntry:
    """One source: where the rows are, their format and column mapping, and its weight."""

    def __init__(self, spec: dict[str, Any], option: str, source_format: str | None, formats: tuple[str, ...]):
        if not isinstance(spec, dict) or "source" not in spec:
            raise ConfigError(f"{option}={spec!r}: each entry is a mapping with at least `source`, e.g. "
                              "{source: data.jsonl, format: alpaca, weight: 2}")
        for key in spec:
            if key not in ENTRY_KEYS:
                raise ConfigError(f"{option}.{key}: not an option of a source; {did_you_mean(key, ENTRY_KEYS)}")
        self.option = option
        self.format = spec.get("format")
        if self.format is not None and self.format not in formats:
            from ftlab.data.formats import check_name

            check_name(self.format, f"{option}.format")  # unknown: named with the known ones
            raise ConfigError(f"{option}.format={self.format!r}: row formats are read by LanguageModelingData; "
                              "this data module reads its own columns (map them with columns: {NAME: YOURS})")
        self.weight = spec.get("weight")
        if self.weight is not None and (isinstance(self.weight, bool) or not isinstance(self.weight, (int, float))
                                        or not self.weight > 0):
            raise ConfigError(f"{option}.weight={self.weight!r} must be a positive number (a relative share)")
        self.name = spec.get("name")
        split = spec.get("split")
        if split is not None and not isinstance(split, (str, dict)):
            raise ConfigError(f"{option}.split={split!r}: give a split name (train, or a slice: train[:10%]) or a "
                              "mapping {train: ..., validation: ...}")
        self.split = {"train": split} if isinstance(split, str) else split
        if self.split:
            for run_split in self.split:
                if run_split not in ("train", "validation", "test"):
                    raise ConfigError(f"{option}.split: {run_split!r} is not a run split; map train, validation "
                                      "or test to the source's splits")
        self.columns = spec.get("columns") or {}
        if not isinstance(self.columns, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in self.columns.items()):
            raise ConfigError(f"{option}.columns={self.columns!r}: give {{column read: your column}}, e.g. "
                              "{instruction: question, output: answer}")
        self.streaming = bool(spec.get("streaming", False))
        self.max_rows = spec.get("max_rows")
        if self.max_rows is not None and (isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int)
                                          or self.max_rows <= 0):
            raise ConfigError(f"{option}.max_rows={self.max_rows!r} must be a positive row count")
        if self.streaming and self.max_rows is None:
            # a stream has no length: held-out fractions and weights need one, and "too big to download" means
            # a part of it is wanted
            raise ConfigError(f"{option}.streaming: true reads the first max_rows rows of the stream; set "
                              f"{option}.max_rows (e.g. 100000), or drop streaming to read the whole set")
        self.source = Source(spec["source"], option=f"{option}.source", format=source_format)
        self.read_as = self.format  # the format the rows were read in (found from the columns when not given)

    @property
    def label(self) -> str:
        """A short name for reports: the hub id (and config), or the file name."""
        if self.source.hub_id:
            return self.source.hub_id + (f":{self.name}" if self.name else "")
        files = [f for fs in self.source.files.values() for f in fs]
        return os.path.basename(files[0]) + (f" (+{len(files) - 1} files)" if len(files) > 1 else "")

    def identity(self) -> dict:
        return {"data": self.source.fingerprint(), "format": self.format, "weight": self.weight, "name": self.name,
                "split": self.split, "columns": self.columns, "streaming": self.streaming, "max_rows": self.max_rows}

    def load(self):
        """The source's splits under the run's split names, its columns renamed to those the run reads."""
        import datasets

        raw = self.source.load(name=self.name, split=self.split, streaming=self.streaming, max_rows=self.max_rows)
        out = {}
        for split, ds in raw.items():
            key = SPLIT_ALIASES.get(split.lower(), split)
            for target, theirs in self.columns.items():
                if theirs not in ds.column_names:
                    raise ConfigError(f"{self.option}.columns: column {theirs!r} is not in the {split} data; its "
                                      f"columns are {ds.column_names}")
                if target != theirs:
                    ds = ds.remove_columns([target]) if target in ds.column_names else ds
                    ds = ds.rename_column(theirs, target)
            out[key] = ds
        return datasets.DatasetDict(out)


class Sources:
    """`data.source` (one) or `data.sources` (several), checked when the config is read."""

    def __init__(self, source=None, sources: list[dict] | None = None, format: str | None = None,
                 source_format: str | None = None, formats: tuple[str, ...] = ()):
        if source is not None and sources is not None:
            raise ConfigError("data.source and data.sources are both set; give one source as data.source, or list "
                              "every source (that one included) in data.sources")
        if sources is None:
            if source is None:
                raise ConfigError("data.source is not set; give a file, glob, hub id or pkg:// path (or data.sources)")
            sources, option = [{"source": source, "format": format}], "data"
        else:
            if format is not None:
                raise ConfigError(f"data.format={format!r} applies to data.source; give each entry of data.sources "
                                  "its own format")
            if not isinstance(sources, list) or not sources:
                raise ConfigError(f"data.sources={sources!r}: give a list of sources, e.g. [{{source: a.jsonl, "
                                  "weight: 3}, {source: b.jsonl, weight: 1}]")
            option = "data.sources"
        self.entries = [SourceEntry(s, option if option == "data" else f"{option}[{i}]", source_format, formats)
                        for i, s in enumerate(sources)]
        weighted = [e.weight is not None for e in self.entries]
        if any(weighted) and not all(weighted):
            missing = [i for i, w in enumerate(weighted) if not w]
            raise ConfigError(f"data.sources: weight is given on some sources but not on {missing}; give every "
                              "source a weight (a mix), or none (concatenated)")
        self.weighted = all(weighted) and len(self.entries) > 1

    @property
    def formats(self) -> list[str | None]:
        return [e.format for e in self.entries]

    def fingerprint(self) -> str:
        """Changes when any source, its format, columns, split, rows taken or weight change."""
        h = hashlib.sha256(json.dumps([e.identity() for e in self.entries], sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def load(self, normalise: Callable[[Any, str | None, str, str], tuple[Any, str | None]], keep: list[str]):
        """Every source read, normalised by `normalise(split dataset, format, split, where)` (-> rows, the format
        read) into the rows the data module reads, and concatenated per split. Several sources: each row
        carries its source's index (SOURCE_COLUMN), and only the columns in `keep` stay (the sources' other
        columns differ)."""
        import datasets

        parts: dict[str, list] = {}
        for i, entry in enumerate(self.entries):
            for split, ds in entry.load().items():
                where = "data.source" if entry.option == "data" else f"{entry.option} ({entry.label})"
                ds, entry.read_as = normalise(ds, entry.format, split, where)
                if len(self.entries) > 1:
                    ds = _label_names(ds.select_columns([c for c in keep if c in ds.column_names]))
                    ds = ds.add_column(SOURCE_COLUMN, [i] * len(ds))
                parts.setdefault(split, []).append((i, ds))
        return datasets.DatasetDict({split: self._combine(dss, split) for split, dss in parts.items()})

    def _combine(self, parts: list[tuple[int, Any]], split: str):
        """One split's parts, one per source, as one dataset: each cast to the first one's column types (a csv
        and a json file type the same text differently); columns that differ are named."""
        import datasets

        if len(parts) == 1:
            return parts[0][1]
        first_i, first = parts[0]
        aligned = [first]
        for i, ds in parts[1:]:
            label = self.entries[i].label
            if set(ds.column_names) != set(first.column_names):
                raise ConfigError(f"data.sources: {label} has the columns {ds.column_names} in its {split} rows, "
                                  f"{self.entries[first_i].label} {first.column_names}; map them to the same names "
                                  "with columns: {NAME: YOURS}")
            if ds.features != first.features:
                try:
                    ds = ds.cast(first.features)
                except Exception as err:  # noqa: BLE001 - arrow's cast errors come in several types
                    types = {c: (str(first.features[c]), str(ds.features[c])) for c in first.column_names
                             if first.features[c] != ds.features[c]}
                    raise ConfigError(f"data.sources: the {split} rows of {label} do not combine with the first "
                                      f"source's (column types {types}: {str(err).splitlines()[0][:120]}); give "
                                      "the columns the same types in every source") from None
            aligned.append(ds)
        return datasets.concatenate_datasets(aligned)

    def mix(self, splits: dict, seed: int) -> tuple[dict, list[dict] | None]:
        """The training rows mixed by weight (or kept, concatenated), SOURCE_COLUMN dropped; with several
        sources also a report: per source, its rows in each split and its share of the training rows."""
        if len(self.entries) == 1:
            return splits, None
        import numpy as np

        train = splits["train"]
        origin = np.asarray(train.with_format("numpy")[SOURCE_COLUMN])  # an array, not a list of Python ints
        have = [np.flatnonzero(origin == i) for i in range(len(self.entries))]
        if self.weighted:
            total, weights = len(train), np.array([e.weight for e in self.entries], dtype=float)
            rng = np.random.default_rng(seed)
            picked = []
            for i, rows in enumerate(have):
                want = int(round(total * weights[i] / weights.sum()))
                if len(rows) == 0 and want:
                    raise ConfigError(f"data.sources[{i}] ({self.entries[i].label}) has no training rows to give "
                                      f"its weight {self.entries[i].weight}")
                whole, rest = divmod(want, len(rows)) if len(rows) else (0, 0)
                picked.append(np.concatenate([np.tile(rows, whole), rng.permutation(rows)[:rest]]).astype(int))
            order = np.sort(np.concatenate(picked))  # in source order; training shuffles anyway
            splits = {**splits, "train": train.select(order.tolist())}
            taken = [len(p) for p in picked]
        else:
            taken = [len(rows) for rows in have]
        counts = {split: np.bincount(np.asarray(ds.with_format("numpy")[SOURCE_COLUMN]),
                                     minlength=len(self.entries)).tolist()
                  for split, ds in splits.items() if split != "train"}
        report = []
        for i, entry in enumerate(self.entries):
            line = {"source": entry.label, "format": entry.read_as, "weight": entry.weight,
                    "train_rows": taken[i], "available_train_rows": int(len(have[i])),
                    "share": round(taken[i] / max(1, sum(taken)), 4),
                    "sampling": _sampling(taken[i], len(have[i])),
                    **{f"{split}_rows": c[i] for split, c in counts.items()}}
            report.append(line)
        splits = {k: v.remove_columns(SOURCE_COLUMN) for k, v in splits.items()}
        how = f"mixed by weight (seed {seed})" if self.weighted else "concatenated"
        rank_zero_info(f"ftlab: data sources {how}: " + "; ".join(
            f"{r['source']}{' (' + r['format'] + ')' if r['format'] else ''}: {r['train_rows']} train rows "
            f"({100 * r['share']:.1f}%, {r['sampling']})" for r in report))
        return splits, report


def _sampling(taken: int, have: int) -> str:
    if taken == have:
        return "all rows"
    if taken < have:
        return f"a random {taken} of {have} rows, without replacement"
    return f"upsampled x{taken / have:.2f}: every row {taken // have}x, {taken % have} drawn once more"


def _label_names(ds):
    """A source's class-label columns (ids into its own names, as hub datasets store labels and NER tags) as
    the names: another source numbers its names otherwise, and a cast of the ids to the first source's
    labels would keep the numbers and change what they mean."""
    import datasets

    for column, feature in ds.features.items():
        inner = getattr(feature, "feature", None)  # Sequence / List of class labels (token tags)
        names = feature if isinstance(feature, datasets.ClassLabel) else \
            inner if isinstance(inner, datasets.ClassLabel) else None
        if names is None:
            continue
        whole = names is feature  # one label a row, or a list of tags a row
        as_names = (lambda v, n=names: _name(n, v)) if whole else (lambda row, n=names: [_name(n, v) for v in row])
        string = datasets.Value("string")
        ds = ds.map(lambda b, c=column, f=as_names: {c: [f(v) for v in b[c]]}, batched=True,
                    features=datasets.Features({**ds.features, column: string if whole else datasets.Sequence(string)}),
                    desc=f"{column} ids to names")
    return ds


def _name(names, value):
    return None if value is None or value < 0 else names.int2str(value)  # -1: an unlabelled row (hub test splits)
