"""Experiment tracking: the resolved config and run facts for every logger (W&B first of all), per-step
training metrics, and one W&B run per training job, continued across resumes and Slurm requeues."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from time import perf_counter

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.cli import SaveConfigCallback

from ftlab.data.collate import batch_counts
from ftlab.estimate.throughput import ModelFlops

RUN_ID_FILE = "wandb-run-id"


def git_commit() -> str | None:
    """The commit of the ftlab checkout in use, when it is one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_facts(trainer: L.Trainer, pl_module) -> dict:
    """What a dashboard needs next to the config to compare runs."""
    facts = {
        **pl_module.policy.describe(),
        "task": pl_module.task.name,
        "trainable_params": pl_module.trainable_params,
        "total_params": pl_module.total_params,
        "trainable_share": round(pl_module.trainable_params / max(pl_module.total_params, 1), 6),
        "strategy": type(trainer.strategy).__name__,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "precision": str(trainer.precision),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "ftlab_commit": git_commit(),
    }
    return {k: v for k, v in facts.items() if v is not None}


class RunConfig(SaveConfigCallback):
    """Writes the resolved `config.yaml` into the run directory (Lightning's own callback puts it in the
    logger's version folder) and logs the config plus the run facts to every logger."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # the fit's config only: validate/test/predict (a checkpoint, a predict_source) leave the run's as it is
        if trainer.is_global_zero and not self.already_saved and stage == "fit":
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            self.parser.save(self.config, os.path.join(trainer.default_root_dir, self.config_filename),
                             skip_none=False, overwrite=True, multifile=False)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.as_dict()
        config.pop("config", None)  # the list of files given; the content is what matters
        for logger in trainer.loggers:
            logger.log_hyperparams(config)

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams({"run": run_facts(trainer, pl_module)})


class TrainingMetrics(L.Callback):
    """Per optimizer step: learning rate of each parameter group, gradient norm, step time, and global
    samples/s and tokens/s (plus MFU where the device's peak FLOP/s is known)."""

    def __init__(self, window: int = 20, peak_flops: float | None = None):
        """
        Args:
            window: Batches in the rolling window of the throughput and MFU figures.
            peak_flops: Peak FLOP/s of one device for train/mfu, where Lightning's table does not know the
                device (a GPU newer than the installed Lightning; CPUs). Default: Lightning's table (CUDA).
        """
        self.window = window
        self.peak_flops = peak_flops
        self._throughput: Throughput | None = None
        self._flops: ModelFlops | None = None
        self._epoch = 0
        self._t0 = self._last = 0.0
        self._samples = self._tokens = self._batches = 0

    def on_train_start(self, trainer, pl_module) -> None:
        device = trainer.strategy.root_device
        precision = str(trainer.precision)
        dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32
        # peak FLOP/s is known for CUDA devices only (Lightning's table); elsewhere no MFU is logged
        flops = self.peak_flops or (get_available_flops(device, dtype) if device.type == "cuda" else None)
        self._throughput = Throughput(available_flops=flops, world_size=trainer.world_size, window_size=self.window)
        self._count_flops(trainer, pl_module)
        self._t0 = self._last = perf_counter()
        self._samples = self._tokens = self._batches = 0

    def _count_flops(self, trainer, pl_module) -> None:
        # the totals recorded in configure_model, before a strategy sharded the parameters; a policy that
        # unfreezes mid-run is recounted (DeepSpeed, whose ZeRO-3 placeholders would count 0, refuses those)
        changes = getattr(getattr(pl_module, "policy", None), "changes_trainable_set", False)
        self._flops = ModelFlops.of(pl_module.model, pl_module.total_params,
                                    None if changes else pl_module.trainable_params)
        self._epoch = trainer.current_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch != self._epoch:  # gradual unfreezing changes what trains at an epoch start
            self._count_flops(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        every = trainer.log_every_n_steps
        # on the steps whose metrics Lightning writes (its should_update_logs), not a step before them
        if grads and every and (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = perf_counter()
        samples, tokens = batch_counts(batch)
        self._batches += 1
        self._samples += samples
        self._tokens += tokens
        # Throughput takes this rank's FLOPs since the last update (it sums the window itself). They count
        # computed tokens, padding included, as MFU conventionally does: the device did that work. tokens/s
        # counts real tokens only.
        self._throughput.update(time=now - self._t0, batches=self._batches, samples=self._samples,
                                lengths=self._tokens, flops=self._flops.batch(*batch["input_ids"].shape[:2]))
        if trainer.fit_loop._should_accumulate():
            return  # inside an accumulation window: its optimizer step ends at a later batch
        step_time, self._last = now - self._last, now
        # the step index Lightning logs this step's loss and grad norm at (global_step has moved on by one): one
        # row, one x value, for all of the step's metrics
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if not trainer.loggers or trainer.log_every_n_steps == 0 or (step + 1) % trainer.log_every_n_steps:
            return
        metrics = {"train/step_time_s": step_time}
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        norm = engine.get_global_grad_norm() if engine is not None else None
        if norm is not None:  # ZeRO keeps gradients in its partitions (p.grad is None): the engine's global norm
            metrics["train/grad_norm"] = float(norm)
        for i, group in enumerate(trainer.optimizers[0].param_groups):
            metrics["train/lr" if i == 0 else f"train/lr_group{i}"] = group["lr"]
        rates = self._throughput.compute()
        names = {"samples_per_sec": "train/samples_per_s", "items_per_sec": "train/tokens_per_s",
                 "device/samples_per_sec": "train/device/samples_per_s", "device/items_per_sec":
                 "train/device/tokens_per_s", "device/mfu": "train/mfu"}
        metrics.update({new: rates[old] for old, new in names.items() if old in rates})
        elapsed = now - self._t0
        if "train/samples_per_s" not in metrics and elapsed > 0:  # window not full yet: average so far
            metrics["train/samples_per_s"] = self._samples * trainer.world_size / elapsed
            metrics["train/tokens_per_s"] = self._tokens * trainer.world_size / elapsed
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


def log_export_artifact(trainer, folders: dict[str, str], summary: dict) -> list[str]:
    """The export as a W&B model artifact of each W&B logger's run (rank 0, after the export is written):
    versioned in the project's registry, with the run that made it and its final metrics as metadata.
    Returns the artifacts' names."""
    from lightning.pytorch.loggers import WandbLogger

    names = []
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        run = logger.experiment
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.abspath(trainer.default_root_dir))).strip("-.")
        metadata = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
        artifact = wandb.Artifact(f"{base or 'model'}-{run.id}", type="model", metadata=metadata)
        for kind, folder in folders.items():
            artifact.add_dir(folder, name=kind, policy="immutable")  # the export is final: no staged copy of it
        run.log_artifact(artifact)
        names.append(artifact.name)
    return names


def resolve_wandb_run(run_dir: str, logger_args: dict, resuming: bool) -> dict:
    """Settings of a W&B logger from the run directory: files under the run dir, and one run id per
    training job that a resumed job (from a checkpoint, or a requeued Slurm job) continues."""
    args = dict(logger_args)
    if args.get("save_dir") in (None, "."):
        args["save_dir"] = run_dir
    if args.get("id") is None:
        id_file = os.path.join(run_dir, RUN_ID_FILE)
        if resuming and os.path.exists(id_file):
            with open(id_file) as f:
                args["id"] = f.read().strip()
        else:
            args["id"] = secrets.token_hex(4)  # W&B run ids are short lowercase strings
            if rank_zero_only.rank == 0:
                os.makedirs(run_dir, exist_ok=True)
                with open(id_file, "w") as f:
                    f.write(args["id"])
    args.setdefault("resume", "allow")
    return args
