"""Variants: a name and the `ftlab fit` overrides that make it. The built-in ones carry a learning rate
typical for their policy (AdamW: a head alone takes a large one, every weight a small one)."""

from __future__ import annotations

import re

import yaml

from ftlab.errors import ConfigError, did_you_mean

_FREEZE = ["--model.policy=Freeze", "--model.optim.lr=3e-3"]
_FULL = ["--model.policy=Full", "--model.optim.lr=5e-5"]


def _adapter(method: str, r: int | None = 8, lr: str = "2e-3") -> list[str]:
    args = ["--model.policy=Adapter", f"--model.policy.method={method}", f"--model.optim.lr={lr}"]
    return args + ([f"--model.policy.r={r}"] if r else [])


BUILTIN: dict[str, list[str]] = {
    "freeze": _FREEZE,
    "freeze-head": _FREEZE,
    "freeze-top2": ["--model.policy=Freeze", "--model.policy.top_k_layers=2", "--model.optim.lr=1e-3"],
    "lora": _adapter("lora"),
    "lora-r8": _adapter("lora"),
    "lora-r16": _adapter("lora", 16),
    "dora-r8": _adapter("dora"),
    "ia3": _adapter("ia3", None, "5e-3"),
    "full": _FULL,
}


def load_variants(names: str | None, path: str | None) -> dict[str, list[str]]:
    """The variants to run, in order: `--variants a,b,c` from the built-ins or the file (file wins), or
    every variant of the file. A file maps names to lists of fit overrides:

        freeze-head: [--model.policy=Freeze, --model.optim.lr=3e-3]
        lora-r8:     [--model.policy=Adapter, --model.policy.r=8, --model.optim.lr=2e-3]
    """
    known = dict(BUILTIN)
    from_file: dict[str, list[str]] = {}
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as err:
            raise ConfigError(f"--variants-file {path!r}: {err.strerror}") from None
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            raise ConfigError(f"--variants-file {path!r}: give a mapping of variant name -> list of fit overrides")
        from_file = {str(k): [str(a) for a in v] for k, v in raw.items()}
        known.update(from_file)
    chosen = [n.strip() for n in names.split(",") if n.strip()] if names else list(from_file)
    if not chosen:
        raise ConfigError("give --variants (e.g. freeze,lora,full) or a --variants-file")
    for name in chosen:
        if name not in known:
            raise ConfigError(f"--variants: unknown variant {name!r}; {did_you_mean(name, sorted(known))}, or define it "
                              "in a --variants-file")
        if not re.fullmatch(r"[\w.+-]+", name):
            raise ConfigError(f"variant name {name!r}: use letters, digits, '.', '-', '+' or '_' (it names a folder)")
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"--variants {names!r} names a variant twice")
    return {name: known[name] for name in chosen}
