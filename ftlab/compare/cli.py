"""`python -m ftlab compare`: transfer learning vs adapters vs full fine-tuning on the user's own task."""

from __future__ import annotations

import argparse
import os
import sys

from ftlab.compare.report import collect, write
from ftlab.compare.runner import plan, run_all
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
    return p


def main(argv: list[str]) -> int:
    args, extra = parser().parse_known_args(argv)
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: give at least 1")
    if args.budget_steps is not None and args.budget_steps < 1:
        raise ConfigError(f"--budget-steps {args.budget_steps}: give at least 1")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        raise ConfigError(f"--budget-minutes {args.budget_minutes}: give a positive number")
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
    runs = plan(args.config, variants, list(range(args.seeds)), root, budget, extra)
    _check(runs, name)
    if not args.report_only:
        failed = run_all(runs)
    else:
        failed = [r for r in runs if not r.finished()]
    files = write(collect(runs), root, f"ftlab compare: {name}")
    print(f"report: {os.path.join(root, files['md'])} (also {files['html']}, {files['json']} and plots there)")
    if failed:
        print(f"{len(failed)} run(s) did not finish; run the same command again to run only those", file=sys.stderr)
        return 1
    return 0


def _check(runs, name: str) -> None:
    """Every variant's config, checked before the first (long) run starts; W&B runs get one group."""
    from ftlab.cli import check_fit_config

    for run in runs:
        if run.seed != runs[0].seed:
            continue
        try:
            trainer, _ = check_fit_config(run.args)
        except ConfigError as err:
            raise ConfigError(f"variant {run.variant!r}: {err}") from None
        logger = trainer.get("logger")
        loggers = logger if isinstance(logger, list) else [logger]
        if any("Wandb" in str(getattr(lg, "class_path", "") or (lg or {}).get("class_path", "")) for lg in loggers
               if lg not in (None, False, True)):
            group = f"--trainer.logger.dict_kwargs.group=compare-{name}"
            for r in runs:
                if r.variant == run.variant and group not in r.args:
                    r.args.insert(len(r.args) - 2, group)
