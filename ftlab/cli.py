"""The command line: LightningCLI (fit / validate / test / predict, YAML configs, dotted overrides,
`--print_config`, `--help` from the docstrings), plus ftlab's run directory conventions."""

from __future__ import annotations

import glob
import os
import sys

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from ftlab import console
from ftlab.callbacks import RunOutputs
from ftlab.callbacks.header import RunHeader
from ftlab.callbacks.progress import progress_bar
from ftlab.checkpoints import AtomicCheckpoint, RngState, TrainingPosition, check_fresh_run_dir, last_checkpoint
from ftlab.data import TextDataModule
from ftlab.errors import ConfigError
from ftlab.faults import StopLocalRanksOnError
from ftlab.module import FineTuneModule
from ftlab.slurm.preemption import Preemption, find_preemption, in_slurm_job, restart_count
from ftlab.strategies import (
    check_combination,
    check_resume,
    evaluation_inference_mode,
    resolve_strategy,
    set_collective_timeout,
    split_cpu_threads,
)
from ftlab.tracking import RunConfig, TrainingMetrics, resolve_wandb_run


def _checkpoint_dir(run_dir: str | None) -> str:
    return os.path.join(run_dir or "runs/default", "checkpoints")


def resume_changes(run_dir: str, cfg) -> list[str]:
    """What a resume changes of the run's optimizer and data settings (its config.yaml), a line each: the
    checkpoint's optimizer and schedule go on (a new lr, warmup or schedule is not used), and the position the
    resumed epoch goes on from counts the rows of the data the run started with."""
    import yaml

    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            before = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return []
    import json

    # as YAML holds them (tuples are lists there)
    now = json.loads(json.dumps(cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg), default=str))
    lines = []
    parts = (("model.optim", (before.get("model") or {}).get("optim"), (now.get("model") or {}).get("optim"),
              "the checkpoint's optimizer and schedule go on; the new value is not used"),
             ("data", (before.get("data") or {}).get("init_args"), (now.get("data") or {}).get("init_args"),
              "the resumed epoch goes on from a position counted in the run's earlier data"))
    rows = {"source", "sources", "max_train_rows", "val_size", "test_size", "split_seed", "keep_rows", "deduplicate",
            "packing", "max_length"}  # what decides the rows (batch_size mid-epoch is refused on its own)
    for prefix, old, new, effect in parts:
        old, new = (part.get("init_args", part) if isinstance(part, dict) else part for part in (old, new))
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        for key in sorted(set(old) & set(new)):
            if old[key] != new[key] and (prefix != "data" or key in rows):
                lines.append(f"ftlab: resuming with {prefix}.{key}={new[key]!r}, the run had {old[key]!r}: {effect}")
    return lines


def _absolute(value):
    """A path relative to the working directory that names something there (a file, a folder, a glob's
    matches), made absolute; anything else (a hub id, a named source, pkg://, an inline template) as it is."""
    if not isinstance(value, str) or not value or "{" in value or "://" in value:
        return value
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return path
    found = glob.glob(path) if any(c in path for c in "*?[") else os.path.exists(path)
    return os.path.abspath(path) if found else value


def _absolute_paths(cfg) -> None:
    """Local paths given relative to the working directory (the model, its GGUF file, a teacher, the data files,
    a chat template) made absolute in the config, and so in the run's config.yaml: `ftlab export --run`,
    `generate`, a resume and a Slurm requeue read them from wherever they start."""
    model = cfg.get("model")
    if model is not None:
        for key in ("name_or_path", "gguf_file"):
            if key in model:
                model[key] = _absolute(model[key])
        task = getattr(model.get("task"), "init_args", None)
        if task is not None and "teacher" in task:
            task.teacher = _absolute(task.teacher)
    args = getattr(cfg.get("data"), "init_args", None)
    if args is None:
        return
    for key in ("source", "predict_source", "tokenizer", "chat_template"):
        value = args.get(key)
        if isinstance(value, dict):
            args[key] = {split: _absolute(v) for split, v in value.items()}
        elif value is not None:
            args[key] = _absolute(value)
    for spec in args.get("sources") or []:
        if isinstance(spec, dict) and "source" in spec:
            spec["source"] = _absolute(spec["source"])


class FtlabCLI(LightningCLI):
    """LightningCLI with the run directory (`trainer.default_root_dir`) holding everything a run writes:
    `config.yaml`, `checkpoints/`, `export/`, `summary.json`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(AtomicCheckpoint, "checkpoint")
        # one last.ckpt per run: a resumed run overwrites it (Lightning would add last-v1.ckpt, last-v2.ckpt...)
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.enable_version_counter": False})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.add_lightning_class_args(RunOutputs, "outputs")
        parser.link_arguments("model.name_or_path", "data.init_args.tokenizer")
        parser.link_arguments("model.trust_remote_code", "data.init_args.trust_remote_code")
        parser.link_arguments("model.gguf_file", "data.init_args.gguf_file")
        parser.link_arguments("model.revision", "data.init_args.tokenizer_revision")  # the weights' own tokenizer
        parser.add_argument("--collective_timeout", type=int, default=1800,
                            help="Seconds a rank waits in a collective (all-reduce, barrier) before the job ends "
                                 "with an error naming the rank, instead of hanging when another rank hung or died.")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, evaluate the final model on the test split (when there is one).")
        parser.add_argument("--progress.every_n_seconds", type=float, default=30.0,
                            help="Without a terminal (Slurm log, nohup, CI): print a progress line (step, loss, lr, "
                                 "samples/s, ETA) every this many seconds of training; 0: never by time. Also how often loading "
                                 "the model, tokenising (also `ftlab prepare`) and the fit's export print how far "
                                 "they are (rank 0; work done sooner prints none; `ftlab export` has "
                                 "--progress-every-n-seconds).")
        parser.add_argument("--progress.every_n_steps", type=int, default=0,
                            help="Without a terminal: also print a progress line every this many optimizer steps; "
                                 "0: by time only.")
        from ftlab.help import document_fit_parser

        document_fit_parser(parser)

    def _parse_ckpt_path(self) -> None:
        """Lightning's: the checkpoint's saved hyperparameters merged into the config; but a file that is no
        checkpoint refused in one line (it was an unpickling traceback), and the file memory-mapped: Lightning
        reads all of it, optimizer state included, into every rank's memory to take its hyperparameters."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not os.path.isfile(str(ckpt_path)):
            return
        check_ckpt_path(ckpt_path)
        import torch

        hparams = dict(torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
                       .get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = cfg["trainer"]
        run_dir = trainer.get("default_root_dir") or "runs/default"
        if self.subcommand == "fit" and restart_count() > 0:
            # a requeued Slurm job (preempted, or its node failed) continues from its own last checkpoint, also
            # when it was submitted to start from another one (--ckpt_path): that one is behind it now
            last = last_checkpoint(_checkpoint_dir(run_dir), recover=True)
            given = cfg.get("ckpt_path")
            if last or given is None:
                cfg["ckpt_path"] = "last"
            if os.environ.get("SLURM_PROCID", "0") == "0":  # once per job, not once per rank
                print(f"ftlab: Slurm restart {restart_count()}: "
                      + (f"resuming from {last}" if last else f"no checkpoint saved yet: starting again from {given}"
                         if given else "no checkpoint saved yet: starting over"), file=sys.stderr)
        elif cfg.get("ckpt_path") == "last" and last_checkpoint(_checkpoint_dir(run_dir),
                                                                recover=self.subcommand == "fit") is None:
            where = _checkpoint_dir(run_dir)
            if self.subcommand != "fit":  # Lightning would go on with the pretrained model, a new head untrained
                raise ConfigError(f"ckpt_path=last: no checkpoint in {where}; give the run's folder "
                                  "(--trainer.default_root_dir) or a checkpoint file (--ckpt_path PATH)")
            # nothing to resume yet (a first submission of a resubmittable job): a new run, checked as one
            if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
                print(f"ftlab: --ckpt_path last: no checkpoint in {where} yet: starting from the beginning",
                      file=sys.stderr)
            cfg["ckpt_path"] = None
        check_ckpt_path(cfg.get("ckpt_path"))
        _absolute_paths(cfg)
        if self.subcommand == "fit" and cfg.get("ckpt_path") is None:
            check_fresh_run_dir(run_dir)  # before the model loads
        elif self.subcommand == "fit" and os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            for line in resume_changes(run_dir, cfg):
                print(line, file=sys.stderr)
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
        trainer_cfg["inference_mode"] = evaluation_inference_mode(trainer_cfg["strategy"],
                                                                   trainer_cfg.get("inference_mode", False))
        if trainer_cfg.get("devices") is None or str(trainer_cfg["devices"]).lower() in ("null", "none"):
            trainer_cfg["devices"] = "auto"  # `--trainer.devices null`: Lightning's default
        if in_slurm_job():
            if trainer_cfg.get("enable_checkpointing") is not False:  # nothing to resume from otherwise
                callbacks.append(Preemption())
            if not trainer_cfg.get("plugins"):  # our Preemption callback handles the requeue signal instead
                kwargs.setdefault("plugins", [SLURMEnvironment(auto_requeue=False)])
        # a bar on a terminal, plain lines in logs (rich redraws would pile up there, or show nothing until the end)
        given = trainer_cfg.get("callbacks") or []
        own_bar = any(isinstance(c, ProgressBar) for c in (given if isinstance(given, list) else [given]))
        progress = self._get(self.config, "progress") or {}
        every = progress.get("every_n_seconds", 30.0)
        console.set_progress_interval(every, "progress.every_n_seconds")  # loading and export lines too
        if trainer_cfg.get("enable_progress_bar") is not False and not own_bar:
            callbacks.append(progress_bar(every_n_seconds=every,
                                          every_n_steps=progress.get("every_n_steps", 0)))
        callbacks.append(RunHeader())
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": callbacks}
        default_precision(trainer_cfg)
        if trainer_cfg.get("enable_model_summary") is None:
            # Lightning's model-summary table (metric rows, FLOPs 0) only with --verbose: ftlab's header says what
            # trains. Here, not as a parser default: a frozen config (slurm submit) holds null for it
            trainer_cfg["enable_model_summary"] = console.is_verbose()
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as err:
            # the Trainer checks its own arguments (devices, accelerator, precision...): user errors
            raise ConfigError(f"trainer: {' '.join(str(err).split())}") from err
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        if trainer.world_size > 1 and getattr(trainer, "_val_check_time_interval", None) is not None:
            # each rank reads its own clock (Lightning does not agree on it): one rank would validate and save,
            # the others not, and their collectives hang
            raise ConfigError(f"trainer.val_check_interval={trainer_cfg.get('val_check_interval')!r} is a time, which each of the "
                              f"{trainer.world_size} ranks reads on its own clock; give a number of batches or a "
                              "fraction of the epoch on more than one device")
        own = [cb for cb in trainer.callbacks if isinstance(cb, AtomicCheckpoint)]
        if trainer.world_size > 1 and any(cb.save_on_exception for cb in own):
            raise ConfigError("checkpoint.save_on_exception=true on more than one device: an exception on one rank "
                              "would save alone, waiting on the others in the save's collectives; leave it false "
                              "(last.ckpt is saved at every validation and epoch end)")
        if isinstance(trainer.strategy.checkpoint_io, AsyncCheckpointIO):
            raise ConfigError("trainer.plugins AsyncCheckpointIO: ftlab swaps each checkpoint in once every rank has "
                              "written it whole (a crash mid-save keeps the previous one), which a write still running "
                              "in the background defeats; remove the plugin")
        return trainer

    def _instantiate_trainer(self, config, callbacks):
        if config.get("enable_checkpointing") is False:  # honoured: no checkpoint callback (ours included)
            from lightning.pytorch.callbacks import ModelCheckpoint

            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        # the splits this fit evaluates: the data module checks them against the ranks as it sets up
        self.datamodule.fit_eval_splits = ("validation", "test") if self.config[self.subcommand].get(
            "test_after_fit") else ("validation",)
        cfg = self.config[self.subcommand]
        if cfg["trainer"].get("detect_anomaly") and self.model.skip_nonfinite_steps:
            raise ConfigError(f"model.skip_nonfinite_steps={self.model.skip_nonfinite_steps} with trainer.detect_anomaly="
                              "true: anomaly detection stops the run in the backward of the first non-finite loss, "
                              "which a skipped step still runs; use one or the other")
        self._before_any_run()

    def before_validate(self) -> None:
        self._before_any_run()

    def before_test(self) -> None:
        self._before_any_run()

    def before_predict(self) -> None:
        task = self.model.task
        if not task.writes_predictions():  # it wrote an empty predictions.jsonl
            raise ConfigError(f"ftlab predict: the {task.name} task has no per-row predictions to write (they are for "
                              "classification, token classification and seq2seq); try the model with `python -m ftlab "
                              "generate --run DIR`, or score it on the test split with `python -m ftlab test`")
        self._before_any_run()

    def _before_any_run(self) -> None:
        """What every subcommand that runs the Trainer checks and sets before anything loads: the task against
        the data, the strategy against the model, the checkpoint against the strategy and world size (an FSDP
        folder under ddp, a ZeRO folder under another stage), the collective timeout and the ranks' share of
        the CPU cores."""
        self.model.task.check_data_type(self.datamodule)  # before the data is read
        check_combination(self.trainer.strategy, self.model, training=self.subcommand == "fit")
        cfg = self.config[self.subcommand]
        set_collective_timeout(self.trainer.strategy, cfg.get("collective_timeout"))
        ckpt_path = cfg.get("ckpt_path")
        self.model.ckpt_given = ckpt_path is not None  # Lightning sets trainer.ckpt_path after the setup hooks
        if ckpt_path == "last":  # the checkpoint Lightning resumes: the newest last*.ckpt
            ckpt_path = last_checkpoint(_checkpoint_dir(self.trainer.default_root_dir),
                                        recover=self.subcommand == "fit") or "last"
        check_resume(ckpt_path, _checkpoint_dir(self.trainer.default_root_dir), self.trainer.strategy,
                     self.trainer.world_size, fitting=self.subcommand == "fit")
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


def check_ckpt_path(ckpt_path) -> None:
    """A --ckpt_path file or folder that does not exist: one line, for every subcommand, before the model loads."""
    if ckpt_path in (None, "last", "best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
        return
    if not os.path.exists(str(ckpt_path)):
        raise ConfigError(f"ckpt_path={str(ckpt_path)!r} does not exist; give a checkpoint file or folder (e.g. "
                          "runs/NAME/checkpoints/last.ckpt), or 'last'")
    import zipfile

    if os.path.isfile(str(ckpt_path)) and not zipfile.is_zipfile(str(ckpt_path)):  # torch.save writes zip archives
        raise ConfigError(f"ckpt_path={str(ckpt_path)!r} is not a checkpoint (not a torch.save archive: another file, "
                          "or one cut short); give a run's checkpoints/last.ckpt")


def default_precision(trainer_cfg: dict) -> None:
    """On a GPU that computes in bf16 (Ampere and later), train in bf16-mixed unless the config sets a precision:
    about twice as fast as fp32, with fp32 weights and optimizer state. Said in one line."""
    import torch

    if trainer_cfg.get("precision") is not None or str(trainer_cfg.get("accelerator") or "auto") not in ("auto", "gpu", "cuda"):
        return
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        trainer_cfg["precision"] = "bf16-mixed"
        if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("SLURM_PROCID", 0)) == 0:
            print(f"ftlab: precision bf16-mixed (the default on {torch.cuda.get_device_name()}, which computes in "
                  "bf16; fp32 weights and optimizer state): set trainer.precision to choose another", file=sys.stderr)


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
    # what is there: a run that trained nothing (max_steps 0) has no export, one without checkpointing no checkpoints/
    kept = [name + "/" * os.path.isdir(os.path.join(run_dir, name)) for name in
            ("summary.json", "config.yaml", "checkpoints", "export", "predictions.jsonl")
            if os.path.exists(os.path.join(run_dir, name))]
    table.add_row("outputs", f"{run_dir}/ ({', '.join(kept)})")
    Console().print(table)


_CLI_KWARGS = dict(
    model_class=FineTuneModule,
    datamodule_class=TextDataModule,
    subclass_mode_data=True,
    seed_everything_default=0,
    save_config_callback=RunConfig,
    save_config_kwargs={"overwrite": True, "config_filename": "config.yaml", "save_to_log_dir": False},
    # our batch samplers shard by rank themselves (deterministic, resumable mid-epoch)
    trainer_defaults={"default_root_dir": "runs/default", "use_distributed_sampler": False,
                      # validate/test/predict under no_grad, as Lightning runs them on gloo (CPU), where the
                      # tests run: on NCCL it chose inference mode (see evaluation_inference_mode)
                      "inference_mode": False},
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
        progress = self._get(self.config, "progress") or {}  # `ftlab prepare` prints its tokenising lines by it
        console.set_progress_interval(progress.get("every_n_seconds", 30.0), "progress.every_n_seconds")
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
