"""Running the fits of a comparison one after another, each in its own process and run directory, and
reusing those that already finished with the same settings (so a rerun after a failure or an interrupt
only runs what is missing)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

PLAN_FILE = "compare-run.json"


@dataclass
class Run:
    variant: str
    seed: int
    run_dir: str
    args: list[str] = field(default_factory=list)
    rows: str | None = None  # the training-set size (a --train-rows label), None: the config's

    @property
    def summary_path(self) -> str:
        return os.path.join(self.run_dir, "summary.json")

    def record(self) -> dict:
        """compare-run.json: what this run directory was made for."""
        return {"variant": self.variant, "rows": self.rows, "seed": self.seed, "args": self.args,
                "config_sha256": config_hash(self.args)}

    def _same_plan(self) -> bool:
        """This run directory was made for these very arguments and --config contents (an edited config reads
        the same in the arguments). Its own location is not a setting: a comparison moved as a whole (from
        scratch space to project storage) is still the same one. A record without the hash (older ftlab) is
        not known to be the same: its run is made again."""
        try:
            with open(os.path.join(self.run_dir, PLAN_FILE)) as f:
                made = json.load(f)
            return _settings(made["args"]) == _settings(self.args) and made["config_sha256"] == config_hash(self.args)
        except (OSError, ValueError, KeyError):
            return False

    def finished(self) -> bool:
        """Done before with the same settings: its summary written (when training ends) and, where the fit tests
        after training, the test's metrics in it (a run stopped between the two is not done: it runs again)."""
        if not self._same_plan() or not os.path.exists(self.summary_path):
            return False
        return self.tested() or not self.tests()

    def tested(self) -> bool:
        try:
            with open(self.summary_path) as f:
                return any(k.startswith("test/") for k in json.load(f))
        except (OSError, ValueError):
            return False

    def tests(self) -> bool:
        """Whether the fit tests after training, by the config.yaml it saved: test_after_fit on and a test split
        held out (data.test_size; a source's own test split with test_size 0 is not known here: not waited for)."""
        try:
            with open(os.path.join(self.run_dir, "config.yaml")) as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            return True  # not known: run it again rather than count a run that may not have tested
        data = (cfg.get("data") or {}).get("init_args") or {}
        return bool(cfg.get("test_after_fit", True)) and data.get("test_size", 1) not in (0, None)

    def resumable(self) -> bool:
        return self._same_plan() and os.path.exists(os.path.join(self.run_dir, "checkpoints", "last.ckpt"))


def _settings(args: list[str]) -> list[str]:
    """A run's arguments without its own directory (`plan` always sets it to the run directory)."""
    return [a for a in args if not a.startswith("--trainer.default_root_dir=")]


def config_hash(args: list[str]) -> str:
    """The contents of a run's --config files, in order, as one sha256 (a file it cannot read: its name)."""
    h = hashlib.sha256()
    for i, a in enumerate(args):
        path = args[i + 1] if a == "--config" and i + 1 < len(args) else a[len("--config="):] \
            if a.startswith("--config=") else None
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        except OSError:
            h.update(hashlib.sha256(f"unreadable {path}".encode()).digest())
    return h.hexdigest()


def size_args(rows: str | None) -> list[str]:
    """The fit override for a --train-rows size: a row count, a fraction, or every row ("all")."""
    if rows is None:
        return []
    return ["--data.max_train_rows=null" if rows == "all" else f"--data.max_train_rows={rows}"]


def plan(configs: list[str], variants: dict[str, list[str]], seeds: list[int], root: str,
         budget: list[str], extra: list[str], sizes: list[str] | None = None,
         lrs: dict[str, float] | None = None) -> list[Run]:
    """One run per (variant, size, seed), every one on the same config, data split and budget. Sizes given:
    <root>/<variant>/rows<N>/seed<s>; else <root>/<variant>/seed<s>. `lrs`: a (tuned) learning rate per variant."""
    runs = []
    for name, overrides in variants.items():
        lr = [f"--model.optim.lr={lrs[name]:g}"] if lrs and name in lrs else []
        for rows in sizes or [None]:
            for seed in seeds:
                run_dir = os.path.join(root, name, *([f"rows{rows}"] if rows else []), f"seed{seed}")
                args = [a for c in configs for a in ("--config", c)] + overrides + budget + extra + size_args(rows) \
                    + lr + [f"--seed_everything={seed}", f"--trainer.default_root_dir={run_dir}"]
                runs.append(Run(name, seed, run_dir, args, rows))
    return runs


ARGS_FILE = "fit-args"  # a queued run's fit arguments, NUL-separated (a Slurm array task reads them)


def prepare(run: Run) -> list[str]:
    """Makes the run directory ready for its fit and returns the fit's arguments: an interrupted run with
    the same settings resumes from its last checkpoint, a stale one (other settings) is removed, and so is one
    stopped after training but before its test (a fit resumed at its budget refuses: nothing to train)."""
    args = list(run.args)
    trained = run._same_plan() and os.path.exists(run.summary_path)  # (not finished: not tested)
    if run.resumable() and not trained:
        args.append("--ckpt_path=last")
    else:
        if trained:
            print(f"{label(run)}: {run.run_dir} trained but stopped before its test finished; it is run again",
                  flush=True)
        elif os.path.exists(os.path.join(run.run_dir, PLAN_FILE)) and not run._same_plan():
            # said, not silent: a rerun with other settings (other arguments, a config edited since) replaces it
            print(f"{label(run)}: {run.run_dir} holds a run made with other settings; it is replaced", flush=True)
        shutil.rmtree(run.run_dir, ignore_errors=True)  # a stale or unfinished run
    os.makedirs(run.run_dir, exist_ok=True)
    with open(os.path.join(run.run_dir, PLAN_FILE), "w") as f:
        json.dump(run.record(), f, indent=2)
    return args


def label(run: Run) -> str:
    return f"{run.variant}{f' rows {run.rows}' if run.rows else ''} seed {run.seed}"


def run_all(runs: list[Run], env: dict[str, str] | None = None) -> None:
    """Runs what is not finished (which ones failed: Run.finished). Progress goes to stdout."""
    for i, run in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {label(run)}"
        if run.finished():
            print(f"{tag}: finished before, reused ({run.run_dir})", flush=True)
            continue
        args = prepare(run)
        if args != run.args:
            print(f"{tag}: resuming its last checkpoint", flush=True)
        log = os.path.join(run.run_dir, "fit.log")
        print(f"{tag}: running (log: {log})", flush=True)
        start = time.perf_counter()
        with open(log, "a") as out:
            code = subprocess.run([sys.executable, "-m", "ftlab", "fit", *args], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})}).returncode
        took = time.perf_counter() - start
        if code != 0 or not run.finished():
            print(f"{tag}: FAILED after {took:.0f} s (exit {code}); last lines of {log}:", flush=True)
            with open(log, errors="replace") as f:
                print("".join(f.readlines()[-5:]), end="", flush=True)
        else:
            with open(run.summary_path) as f:
                summary = json.load(f)
            scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(summary.items()) if k.startswith("test/"))
            print(f"{tag}: done in {took:.0f} s{': ' + scores if scores else ''}", flush=True)
