"""The command line: LightningCLI (fit / validate / test / predict, YAML configs, dotted overrides,
`--print_config`, `--help` from the docstrings), plus ftlab's run directory conventions."""

from __future__ import annotations

import os
import sys

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI

from ftlab.callbacks import RunOutputs
from ftlab.checkpoints import AtomicCheckpoint, RngState, TrainingPosition
from ftlab.data import TextDataModule
from ftlab.errors import ConfigError
from ftlab.faults import StopLocalRanksOnError
from ftlab.module import FineTuneModule
from ftlab.slurm.preemption import Preemption, find_preemption, in_slurm_job, restart_count
from ftlab.strategies import (
    check_combination,
    check_resume,
    resolve_strategy,
    set_collective_timeout,
    split_cpu_threads,
)
from ftlab.tracking import RunConfig, TrainingMetrics, resolve_wandb_run


def _checkpoint_dir(run_dir: str | None) -> str:
    return os.path.join(run_dir or "runs/default", "checkpoints")


class FtlabCLI(LightningCLI):
    """LightningCLI with the run directory (`trainer.default_root_dir`) holding everything a run writes:
    `config.yaml`, `checkpoints/`, `export/`, `summary.json`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(AtomicCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.add_lightning_class_args(RunOutputs, "outputs")
        parser.link_arguments("model.name_or_path", "data.init_args.tokenizer")
        parser.link_arguments("model.trust_remote_code", "data.init_args.trust_remote_code")
        parser.link_arguments("model.gguf_file", "data.init_args.gguf_file")
        parser.add_argument("--collective_timeout", type=int, default=1800,
                            help="Seconds a rank waits in a collective (all-reduce, barrier) before the job ends "
                                 "with an error naming the rank, instead of hanging when another rank hung or died.")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, evaluate the final model on the test split (when there is one).")

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = cfg["trainer"]
        run_dir = trainer.get("default_root_dir") or "runs/default"
        if self.subcommand == "fit" and restart_count() > 0 and cfg.get("ckpt_path") is None:
            # a requeued Slurm job (preempted, or its node failed) continues from its last checkpoint
            cfg["ckpt_path"] = "last"
            print(f"ftlab: Slurm restart {restart_count()}: resuming from {_checkpoint_dir(run_dir)}/last.ckpt",
                  file=sys.stderr)
        resuming = cfg.get("ckpt_path") is not None
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(logger, "class_path", "").endswith("WandbLogger"):
                logger.init_args = type(logger.init_args)(**resolve_wandb_run(run_dir, vars(logger.init_args), resuming))
                extra = dict(getattr(logger, "dict_kwargs", None) or {})
                extra.setdefault("group", _config_name(cfg) or os.path.basename(run_dir.rstrip("/")))
                logger.dict_kwargs = extra

    def instantiate_trainer(self, **kwargs):
        callbacks = [TrainingMetrics(), RngState(), TrainingPosition(), StopLocalRanksOnError()]
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        trainer_cfg["strategy"] = resolve_strategy(trainer_cfg.get("strategy", "auto"))
        if in_slurm_job():
            callbacks.append(Preemption())
            if not trainer_cfg.get("plugins"):  # our Preemption callback handles the requeue signal instead
                kwargs.setdefault("plugins", [SLURMEnvironment(auto_requeue=False)])
        # Rich's progress bar on a terminal; Lightning's plain bar in logs, where rich redraws pile up.
        if sys.stdout.isatty() and trainer_cfg.get("enable_progress_bar") is not False:
            callbacks.append(RichProgressBar())
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": callbacks}
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as err:
            # the Trainer checks its own arguments (devices, accelerator, precision...): user errors
            raise ConfigError(f"trainer: {' '.join(str(err).split())}") from err

    def before_fit(self) -> None:
        self.model.task.check_data_type(self.datamodule)  # before the data is read
        check_combination(self.trainer.strategy, self.model)
        cfg = self.config[self.subcommand]
        set_collective_timeout(self.trainer.strategy, cfg.get("collective_timeout"))
        check_resume(cfg.get("ckpt_path"), _checkpoint_dir(self.trainer.default_root_dir), self.trainer.strategy,
                     self.trainer.world_size)
        split_cpu_threads(self.trainer)

    def after_fit(self) -> None:
        preemption = find_preemption(self.trainer)
        if preemption is not None and preemption.preempted:
            if self.trainer.is_global_zero:
                preemption.requeue()
            return
        cfg = self.config.get(self.subcommand, self.config)
        if cfg.get("test_after_fit") and "test" in getattr(self.datamodule, "splits", {}):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        if self.trainer.is_global_zero:
            _print_summary(self.trainer.default_root_dir)


def _config_name(cfg) -> str | None:
    """Stem of the first --config file: the default W&B group, so that policy variants of one task line up."""
    files = cfg.get("config") or []
    first = files[0] if files else None
    path = getattr(first, "relative", None) or (str(first) if first else None)
    return os.path.splitext(os.path.basename(path))[0] if path else None


def _print_summary(run_dir: str) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        summary = json.load(f)
    table = Table(title=f"ftlab run {run_dir}", show_header=False)
    for key in ("task", "policy", "peft_method", "trainable_params", "total_params", "steps", "epochs",
                "wall_time_s", "train_samples_per_s", "peak_memory_mb"):
        if key in summary:
            value = summary[key]
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    for key in sorted(k for k in summary if k.startswith(("val/", "test/"))):
        table.add_row(key, f"{summary[key]:.4f}")
    table.add_row("outputs", f"{run_dir}/ (summary.json, config.yaml, checkpoints/, export/)")
    Console().print(table)


_CLI_KWARGS = dict(
    model_class=FineTuneModule,
    datamodule_class=TextDataModule,
    subclass_mode_data=True,
    seed_everything_default=0,
    save_config_callback=RunConfig,
    save_config_kwargs={"overwrite": True, "config_filename": "config.yaml", "save_to_log_dir": False},
    # our batch samplers shard by rank themselves (deterministic, resumable mid-epoch)
    trainer_defaults={"default_root_dir": "runs/default", "use_distributed_sampler": False},
    auto_configure_optimizers=False,
    # parse errors raise (and __main__ prints them as one line) instead of printing usage and exiting
    parser_kwargs={"exit_on_error": False, "prog": "python -m ftlab"},
)


def run_cli(args: list[str] | None = None) -> FtlabCLI:
    return FtlabCLI(**_CLI_KWARGS, args=args)


class _CheckOnly(FtlabCLI):
    """Parses a `fit` command line and builds its model and data modules (cheap: no weights, no data read)
    to run every config check that needs no Trainer. `slurm submit` uses it on a login node, which may
    have no GPU for the Trainer the config asks for."""

    def before_instantiate_classes(self) -> None:
        pass  # W&B run ids and Slurm auto-resume belong to the job, not to its check

    def instantiate_trainer(self, **kwargs):
        return None

    def _run_subcommand(self, subcommand: str) -> None:  # LightningCLI's hook point for running: check instead
        cfg = self.config[subcommand]
        self.model.task.check_data_type(self.datamodule)
        check_combination(resolve_strategy(cfg["trainer"].get("strategy", "auto")), self.model)


def check_fit_config(args: list[str]) -> tuple[dict, str]:
    """Checks a fit command line (`--config X.yaml --trainer.max_epochs 3 ...`) without loading anything
    expensive. Returns the trainer settings and the whole config as YAML (to freeze it for a later job)."""
    cli = parse_fit_config(args)
    cfg = cli.config["fit"]
    trainer = cfg["trainer"].as_dict() if hasattr(cfg["trainer"], "as_dict") else dict(cfg["trainer"])
    return trainer, cli._parser("fit").dump(cfg, skip_none=False)


def parse_fit_config(args: list[str]) -> _CheckOnly:
    """A fit command line parsed and checked, with its model and data modules built (no weights, no data)."""
    import logging
    import warnings

    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)  # the check seeds nothing that matters; no "Seed set" line
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # called from a command
            cli = _CheckOnly(**{**_CLI_KWARGS, "save_config_callback": None}, args=["fit", *args])
    finally:
        seed_log.setLevel(level)
    return cli
