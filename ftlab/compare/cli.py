"""`python -m ftlab compare`: transfer learning vs adapters vs full fine-tuning on the user's own task."""

from __future__ import annotations

import argparse
import math
import os
import sys

from ftlab.compare.report import collect, to_wandb, write
from ftlab.compare.runner import plan, run_all
from ftlab.compare.slurm import add_options as add_slurm_options
from ftlab.compare.slurm import check as slurm_check
from ftlab.compare.slurm import job_from as slurm_job
from ftlab.compare.slurm import submit as slurm_submit
from ftlab.compare.tune import DEFAULT_GRID, LrSearch, base_lr, parse_grid
from ftlab.compare.variants import BUILTIN, load_variants
from ftlab.errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ftlab compare", allow_abbrev=False,
        description="Run one task under several variants (policy + options) and seeds, on the same data split "
                    "and budget, and report quality against cost. Other arguments go to every `ftlab fit`.",
        epilog=f"built-in variants: {', '.join(BUILTIN)}")
    p.add_argument("--config", action="append", required=True, help="fit config file (repeatable, as for fit)")
    p.add_argument("--variants", help="comma-separated variant names, e.g. freeze,lora,full")
    p.add_argument("--variants-file", help="YAML: variant name -> list of fit overrides (adds or redefines variants)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant (0, 1, ...); default 1")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=int, help="train every variant for exactly this many optimizer steps")
    budget.add_argument("--budget-minutes", type=float, help="train every variant for this many minutes")
    p.add_argument("--val-checks-per-epoch", type=int,
                   help="validations per epoch (points on the validation curves); default: the config's")
    p.add_argument("--name", help="report name: runs/compare-NAME (default: the first config's name)")
    p.add_argument("--runs-dir", default="runs", help="parent of the comparison's folder (default runs)")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs already finished")
    p.add_argument("--train-rows", help="data-efficiency curve: run every variant at each training-set size, e.g. "
                                        "100,300,1000,all or 0.1,0.3,all (nested random subsets of the train split, "
                                        "drawn with data.split_seed; validation and test sets unchanged)")
    p.add_argument("--tune", choices=["lr"], help="lr: search each variant's learning rate (successive halving over "
                                                  "--lr-grid, on validation) and run its seeds at the chosen one")
    p.add_argument("--lr-grid", default=DEFAULT_GRID,
                   help=f"multipliers of each variant's configured rate (default {DEFAULT_GRID}); "
                        "'=1e-4,3e-4,1e-3' gives absolute rates")
    p.add_argument("--tune-steps", type=int,
                   help="optimizer steps of the first halving rung (each later rung doubles them); default: a quarter "
                        "of --budget-steps, else 50")
    add_slurm_options(p)
    return p


def parse_sizes(text: str | None) -> list[str] | None:
    """`--train-rows 100,300,all` -> labels, smallest first ("all" last): counts, fractions in (0, 1), all."""
    if text is None:
        return None
    sizes: list[tuple[float, str]] = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        if item == "all":
            sizes.append((math.inf, "all"))
            continue
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--train-rows {text!r}: {item!r} is not a row count, a fraction in (0, 1) or all") from None
        if 0 < value < 1:
            sizes.append((value, f"{value:g}"))
        elif value >= 1 and value.is_integer():
            sizes.append((value, str(int(value))))
        else:
            raise ConfigError(f"--train-rows {text!r}: {item!r}: give a positive row count, a fraction in (0, 1) or all")
    labels = [label for _, label in sizes]
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError(f"--train-rows {text!r}: give each size once, e.g. 100,300,1000,all")
    fractions, counts = [v for v, _ in sizes if v < 1], [v for v, _ in sizes if 1 <= v < math.inf]
    if fractions and counts:
        raise ConfigError(f"--train-rows {text!r}: give row counts or fractions, not both (their order is unknown "
                          "before the data is read)")
    return [label for _, label in sorted(sizes)]


def main(argv: list[str]) -> int:
    args, extra = parser().parse_known_args(argv)
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: give at least 1")
    if args.budget_steps is not None and args.budget_steps < 1:
        raise ConfigError(f"--budget-steps {args.budget_steps}: give at least 1")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        raise ConfigError(f"--budget-minutes {args.budget_minutes}: give a positive number")
    if args.tune_steps is not None and args.tune_steps < 1:
        raise ConfigError(f"--tune-steps {args.tune_steps}: give at least 1")
    grid = parse_grid(args.lr_grid)
    sizes = parse_sizes(args.train_rows)
    variants = load_variants(args.variants, args.variants_file)
    name = args.name or os.path.splitext(os.path.basename(args.config[0]))[0]
    root = os.path.join(args.runs_dir, f"compare-{name}")
    budget = []
    if args.budget_steps:
        budget = [f"--trainer.max_steps={args.budget_steps}", "--trainer.max_epochs=-1"]
    elif args.budget_minutes:
        seconds = round(args.budget_minutes * 60)
        budget = [f"--trainer.max_time=00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}",
                  "--trainer.max_epochs=-1"]
    if args.val_checks_per_epoch:
        budget.append(f"--trainer.val_check_interval={1 / args.val_checks_per_epoch}")
    seeds = list(range(args.seeds))
    runs = plan(args.config, variants, seeds, root, budget, extra, sizes)
    job = slurm_job(args, name) if args.slurm and not args.report_only else None
    checked = _check(runs, name)
    if job is not None:
        slurm_check(job, args, [trainer for trainer, _ in checked.values()])
    results = None
    if args.tune:
        steps = args.tune_steps or (max(1, args.budget_steps // 4) if args.budget_steps else 50)
        search = LrSearch(args.config, variants, extra, sizes[-1] if sizes else None, root,
                          {v: base_lr(frozen, v) for v, (_, frozen) in checked.items()}, grid, steps)
        # the runs that did not finish count as failed: in the report, after the rung they were queued in (Slurm),
        # or once they ran here
        attempted: set[str] = set()
        if args.report_only:
            given_up = lambda run: True  # noqa: E731
        elif args.slurm_continue:
            given_up = lambda run: run._same_plan()  # noqa: E731
        else:
            given_up = lambda run: run.run_dir in attempted  # noqa: E731
        while True:
            states = search.results(given_up)
            needed = [r for pending, _ in states.values() for r in pending]
            if not needed:
                break
            if job is not None:
                rungs = sorted({os.path.basename(r.run_dir).split("-")[0] for r in needed})
                return slurm_submit(job, args, argv, name, root, needed, f"tune {'+'.join(rungs)}", final=False)
            print(f"tuning the learning rate: {len(needed)} run(s) of "
                  f"{', '.join(sorted({os.path.basename(r.run_dir).split('-')[0] for r in needed}))}", flush=True)
            run_all(needed)
            attempted.update(r.run_dir for r in needed)
        results = {v: result for v, (_, result) in states.items()}
        search.write(results)
        for v, result in results.items():
            print(f"{v}: learning rate {result['chosen_lr']:g} (searched {', '.join(f'{x:g}' for x in result['grid'])})",
                  flush=True)
        runs = plan(args.config, variants, seeds, root, budget, extra, sizes,
                    {v: r["chosen_lr"] for v, r in results.items()})
        _wandb_group(runs, name, checked)
    if job is not None:
        return slurm_submit(job, args, argv, name, root, runs, "runs", final=True)
    if not args.report_only:
        run_all(runs)
    # what ran and failed, and what is missing otherwise (a run stopped before its test, one made with other settings)
    failed = [r for r in runs if not r.finished()]
    report = collect(runs)
    if results is not None:
        report["tuning"] = results
    files = write(report, root, f"ftlab compare: {name}")
    print(f"report: {os.path.join(root, files['md'])} (also {files['html']}, {files['json']} and plots there)")
    project = _wandb_project(checked)
    if project:
        to_wandb(report, root, files, project, f"compare-{name}")
        print(f"report: also the W&B run compare-{name}-report (project {project}, group compare-{name})")
    if failed:
        print(f"{len(failed)} run(s) did not finish; run the same command again to run only those", file=sys.stderr)
        return 1
    return 0


def _check(runs, name: str) -> dict[str, tuple[dict, str]]:
    """Every variant's config, checked before the first (long) run starts; W&B runs get one group.
    Returns variant -> (trainer settings, the whole config as YAML)."""
    from ftlab.cli import check_fit_config

    checked = {}
    for run in runs:
        if run.variant in checked:
            continue
        try:
            checked[run.variant] = check_fit_config(run.args)
        except ConfigError as err:
            raise ConfigError(f"variant {run.variant!r}: {err}") from None
    _wandb_group(runs, name, checked)
    return checked


def _wandb_loggers(trainer: dict) -> list:
    logger = trainer.get("logger")
    loggers = logger if isinstance(logger, list) else [logger]
    return [lg for lg in loggers if lg not in (None, False, True)
            and "Wandb" in str(getattr(lg, "class_path", "") or (lg or {}).get("class_path", ""))]


def _wandb_project(checked: dict[str, tuple[dict, str]]) -> str | None:
    """The W&B project the variants log to (the report goes there too), or None without W&B."""
    for trainer, _ in checked.values():
        for lg in _wandb_loggers(trainer):
            args = getattr(lg, "init_args", None) or (lg.get("init_args") if isinstance(lg, dict) else None) or {}
            return (args.get("project") if hasattr(args, "get") else getattr(args, "project", None)) or "lightning_logs"
    return None


def _wandb_group(runs, name: str, checked: dict[str, tuple[dict, str]]) -> None:
    for variant, (trainer, _) in checked.items():
        if _wandb_loggers(trainer):
            group = f"--trainer.logger.dict_kwargs.group=compare-{name}"
            for r in runs:
                if r.variant == variant and group not in r.args:
                    r.args.insert(len(r.args) - 2, group)
