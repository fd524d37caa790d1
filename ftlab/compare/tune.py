"""`ftlab compare --tune lr`: each variant's learning rate searched on the validation split, by successive
halving over a small log-spaced grid around its configured rate, before its seeds run at the chosen one.

Successive halving (Jamieson & Talwalkar, 2016) with eta = 2, over a plain grid: rung 0 trains every rate
for `steps` optimizer steps; the better half (by the task's main metric at the end of the rung, on
validation) goes on to rung 1 at twice the steps, and so on until one is left. A rate that diverges or
fails scores worst and is pruned at once. Each rung restarts from the pretrained weights (not from the
previous rung's checkpoint): the warmup and decay of the schedule then fit the rung's budget, and a run
of rung r is the same whatever else ran. Everything is seeded (training seed 0, the data split's seed),
so the search is deterministic and a rerun reuses every finished rung run. No new dependency: Optuna's
samplers and pruners earn their keep on large, continuous spaces, not on 4-5 values of one knob.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

from ftlab.compare.runner import Run, size_args
from ftlab.errors import ConfigError

DEFAULT_GRID = "0.1,0.3,1,3,10"  # multipliers of each variant's configured rate: a decade each side


def parse_grid(text: str) -> list[float]:
    """`--lr-grid`: multipliers of the configured rate (`0.3,1,3`) or, with a leading `=`, absolute rates
    (`=1e-4,3e-4,1e-3`)."""
    absolute = text.startswith("=")
    try:
        values = [float(v) for v in text.lstrip("=").split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--lr-grid {text!r}: give comma-separated numbers, e.g. 0.3,1,3,10") from None
    if not values or any(not v > 0 or math.isinf(v) for v in values):
        raise ConfigError(f"--lr-grid {text!r}: give positive numbers, e.g. 0.3,1,3,10")
    if len(set(values)) != len(values):
        raise ConfigError(f"--lr-grid {text!r} lists a value twice")
    return [-v for v in values] if absolute else values  # negative: absolute (decoded in rates())


def rates(base: float, grid: list[float]) -> list[float]:
    """The learning rates tried: the grid's multipliers of `base` (3 significant digits), or its absolute rates."""
    return sorted({-g if g < 0 else float(f"{base * g:.3g}") for g in grid})


class LrSearch:
    """The search for every variant; its state is read from the rung run directories each time (so that a
    rerun, a Slurm job or `--report-only` finds the same state)."""

    def __init__(self, configs: list[str], variants: dict[str, list[str]], extra: list[str], rows: str | None,
                 root: str, base_lrs: dict[str, float], grid: list[float], steps: int):
        self.configs, self.variants, self.extra, self.rows = configs, variants, extra, rows
        self.root, self.base_lrs, self.grid, self.steps = root, base_lrs, grid, steps

    def run(self, variant: str, rung: int, lr: float) -> Run:
        steps = self.steps * 2 ** rung
        run_dir = os.path.join(self.root, variant, "tune", f"rung{rung}-lr{lr:g}")
        # a budget of its own (the comparison's budget is for the seeds' runs): `steps` optimizer steps, one
        # validation at the end (counted in steps across epochs), no test (the choice must not see it), no export
        args = [a for c in self.configs for a in ("--config", c)] + self.variants[variant] + self.extra \
            + size_args(self.rows) + [
                f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1", f"--trainer.val_check_interval={steps}",
                "--trainer.check_val_every_n_epoch=null", "--test_after_fit=false", "--outputs.export=false",
                f"--model.optim.lr={lr:g}", "--seed_everything=0", f"--trainer.default_root_dir={run_dir}"]
        return Run(variant, 0, run_dir, args, self.rows)

    def state(self, variant: str, given_up: Callable[[Run], bool]) -> tuple[list[Run], dict | None]:
        """(the runs the search needs next, None) while it goes on; ([], its result) once it chose. A run
        that did not finish counts as failed where `given_up(run)` (it ran and failed), else it is needed."""
        lrs = rates(self.base_lrs[variant], self.grid)
        result = {"base_lr": self.base_lrs[variant], "grid": lrs, "metric": None, "higher_is_better": True,
                  "rungs": [], "chosen_lr": lrs[0] if len(lrs) == 1 else None}
        rung = 0
        while len(lrs) > 1:
            runs = [self.run(variant, rung, lr) for lr in lrs]
            needed = [r for r in runs if not r.finished() and not given_up(r)]
            if needed:
                return needed, None
            scores, why = {}, {}
            for lr, r in zip(lrs, runs):
                scores[lr], why[lr] = self._score(r, result)
            higher = result["higher_is_better"]
            # best first; a failed rate last; ties: the rate nearer the configured one, then the lower
            base = self.base_lrs[variant]
            order = sorted(lrs, key=lambda lr: (scores[lr] is None,
                                                -(scores[lr] or 0) if higher else (scores[lr] or 0),
                                                abs(math.log(lr / base)), lr))
            kept = order[:max(1, len(lrs) // 2)]
            result["rungs"].append({"steps": self.steps * 2 ** rung, "scores": {f"{lr:g}": scores[lr] for lr in lrs},
                                    "failed": {f"{lr:g}": why[lr] for lr in lrs if why[lr]},
                                    "kept": [f"{lr:g}" for lr in kept], "dirs": [r.run_dir for r in runs]})
            lrs, rung = kept, rung + 1
        result["chosen_lr"] = lrs[0]
        return [], result

    @staticmethod
    def _score(run: Run, result: dict) -> tuple[float | None, str | None]:
        """The run's final validation value of the task's main metric, or None and why."""
        if not os.path.exists(run.summary_path):
            from ftlab.compare.report import failure

            return None, failure(run)
        with open(run.summary_path) as f:
            s = json.load(f)
        metric = s.get("main_metric", "loss")
        result["metric"], result["higher_is_better"] = f"val/{metric}", bool(s.get("higher_is_better", True))
        value = s.get(f"val/{metric}")
        if value is None or math.isnan(value) or math.isinf(value):
            return None, f"no finite val/{metric} after {s.get('steps')} step(s)"
        return value, None

    def results(self, given_up: Callable[[Run], bool]) -> dict[str, tuple[list[Run], dict | None]]:
        return {v: self.state(v, given_up) for v in self.variants}

    def write(self, results: dict[str, dict]) -> None:
        for variant, result in results.items():
            path = os.path.join(self.root, variant, "tune")
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "tune.json"), "w") as f:
                json.dump(result, f, indent=2)


def base_lr(frozen_yaml: str, variant: str) -> float:
    """The learning rate a variant's fit would use: its override, else the config's, else the default."""
    import yaml

    cfg = yaml.safe_load(frozen_yaml)
    model = cfg.get("model") or {}
    optim = (model.get("init_args") or model).get("optim") or {}
    lr = optim.get("lr") if isinstance(optim, dict) else None
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"--tune lr: variant {variant!r} has no learning rate to search around (model.optim.lr)")
    return float(lr)
