"""What a run leaves in its run directory: `summary.json` and the Hugging Face export."""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from ftlab.data.collate import batch_counts
from ftlab.errors import ConfigError
from ftlab.export import DEFAULT_MAX_SHARD_SIZE, export_streamed, parse_size, trainer_gather
from ftlab.slurm.preemption import was_preempted
from ftlab.strategies import grads_dtype, precision_report, settle_for_reading, sharding_stats
from ftlab.tracking import log_export_artifact


def peak_memory_mb() -> float:
    """Peak device memory: CUDA's allocator peak when on GPU, else this process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _scalar(v):
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


class RunOutputs(L.Callback):
    """Writes `summary.json` (updated after fit, validate and test) and exports the model after fit.

    Its counters (training tokens, wall time) are saved in checkpoints, so a resumed run's summary covers
    the whole run.
    """

    def __init__(self, export: bool = True, merge_adapter: bool = True,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, wandb_artifact: bool = False):
        """
        Args:
            export: Save the final model in Hugging Face format to `<run dir>/export` after fit.
            merge_adapter: For adapter runs, also save the adapter merged into the base weights.
            max_shard_size: Largest safetensors file of the export, in bytes or as "5GB", "500MB": rank 0
                holds one such shard in memory while the model streams into it.
            wandb_artifact: Also log the export as a W&B model artifact of the run (with a WandbLogger): it
                uploads the whole export, so it is off unless asked.
        """
        self.export = export
        self.wandb_artifact = wandb_artifact
        self.merge_adapter = merge_adapter
        parse_size(max_shard_size, "outputs.max_shard_size")  # refused at startup, not after the fit
        self.max_shard_size = max_shard_size
        self.train_tokens = 0  # this rank's, since this process started
        self.train_samples = 0
        self._restored = (0, 0)  # all ranks' (tokens, samples) before the checkpoint this run resumed from
        self._finished = False  # this fit's summary written
        self._trainer = None
        self.wall_time_s = 0.0
        self.val_time_s = 0.0  # of wall_time_s, the validations' (left out of the training rates)
        self._val_start: float | None = None
        self._fit_start: float | None = None
        self._start_step = 0
        self._report_tries = 0
        self.best: tuple[float, int] | None = None  # (best validation main metric, its step)
        self.val_history: list[dict] = []  # each validation of the fit: step, wall time, metrics
        self.dtypes: dict[str, str] = {}  # what the run trains in, read off the first optimizer step
        self._grads_dtype: str | None = None

    @staticmethod
    def run_dir(trainer: L.Trainer) -> str:
        return trainer.default_root_dir

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        root = self.run_dir(trainer)
        try:
            os.makedirs(root, exist_ok=True)
            probe = os.path.join(root, f".write-test-{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as err:
            raise ConfigError(f"trainer.default_root_dir={root!r} is not writable ({err.strerror}); "
                              "choose a run directory you can write to") from None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._finished = False
        # summary.json describes one run: a new run (no checkpoint resumed) starts it afresh, dropping what an
        # earlier `validate` in this folder wrote
        path = os.path.join(self.run_dir(trainer), "summary.json")
        if trainer.ckpt_path is None and trainer.is_global_zero and os.path.exists(path):
            os.remove(path)

    def on_train_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()
        self._start_step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.dtypes and self._grads_dtype is None:
            self._grads_dtype = grads_dtype(trainer, optimizer) or "none"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        samples, tokens = batch_counts(batch)
        self.train_samples += samples
        self.train_tokens += tokens
        # the first optimizer step has run (DeepSpeed counts its accumulation in steps that do not step)
        if not self.dtypes and self._grads_dtype is not None and trainer.global_step > self._start_step:
            report = precision_report(trainer, pl_module.model, trainer.optimizers[0], self._grads_dtype)
            self._report_tries += 1
            if "optimizer_state" not in report and self._report_tries < 3:
                # a skipped step (a non-finite loss: ftlab's skip, or the fp16 GradScaler's) made no optimizer
                return  # state yet: read the next step's
            self.dtypes = report
            pure = " (bf16-true: no fp32 copy of the weights)" if self.dtypes.get("master_params") == "bfloat16" else ""
            rank_zero_info(f"ftlab: {trainer.precision} trains in: " + ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in self.dtypes.items()) + pure)

    def _elapsed(self) -> float:
        return self.wall_time_s + (time.perf_counter() - self._fit_start if self._fit_start else 0.0)

    def state_dict(self) -> dict:
        # called on every rank while a checkpoint is assembled: the counts saved are the global ones, so that
        # a resume at any world size goes on from them (rank 0's file alone is kept)
        tokens, samples = self._global_counts(self._trainer) if self._trainer is not None else (0, 0)
        return {"train_tokens": tokens, "train_samples": samples, "wall_time_s": self._elapsed(),
                "val_time_s": self.val_time_s,
                "best": self.best, "val_history": self.val_history}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = (state_dict.get("train_tokens", 0), state_dict.get("train_samples", 0))
        self.train_tokens = self.train_samples = 0
        self.wall_time_s = state_dict.get("wall_time_s", 0.0)
        self.val_time_s = state_dict.get("val_time_s", 0.0)
        self.best = tuple(state_dict["best"]) if state_dict.get("best") else None
        self.val_history = list(state_dict.get("val_history", []))

    def _global_counts(self, trainer) -> tuple[int, int]:
        """Tokens and samples trained by all ranks, the resumed checkpoint's included (collective)."""
        # on the rank's device: NCCL has no CPU tensors (gloo takes both)
        counts = torch.tensor([self.train_tokens, self.train_samples], dtype=torch.long, device=trainer.strategy.root_device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")  # a no-op without a process group
        return int(counts[0]) + self._restored[0], int(counts[1]) + self._restored[1]

    def _write(self, trainer, pl_module, extra: dict) -> None:
        path = os.path.join(self.run_dir(trainer), "summary.json")
        summary = {}
        if os.path.exists(path):
            with open(path) as f:
                summary = json.load(f)
        # what describes the run is the fit's: a later `ftlab test` on other devices does not rewrite it
        fitting = trainer.state.fn == "fit" or self._finished  # the fit, or the test right after it
        run = (
            {
                "task": pl_module.task.name,
                "main_metric": pl_module.task.main_metric,  # what ranks runs (compare reads it)
                "higher_is_better": pl_module.task.higher_is_better,
                **pl_module.policy.describe(),
                "model": pl_module.name_or_path,
                "trainable_params": pl_module.trainable_params,
                "total_params": pl_module.total_params,
                "world_size": trainer.world_size,
                "num_nodes": trainer.num_nodes,
                "strategy": type(trainer.strategy).__name__,
                "precision": str(trainer.precision),
                "peak_memory_mb": round(max(summary.get("peak_memory_mb", 0), peak_memory_mb()), 1),
                **extra,
            }
        )
        if fitting or "steps" not in summary:
            summary.update(run)
        else:
            summary.update({k: v for k, v in run.items() if k not in summary})
        if (not fitting and "steps" in summary and trainer.ckpt_path is None
                and pl_module.name_or_path == summary.get("model")):
            rank_zero_info("ftlab: not written to summary.json: no --ckpt_path, so the pretrained model was evaluated, "
                           "not this run's")
        else:
            for key, value in trainer.callback_metrics.items():
                if key.startswith(("val/", "test/")):
                    summary[key] = _scalar(value)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
        for logger in trainer.loggers:  # the same numbers as the W&B run's summary
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})

    def on_train_end(self, trainer, pl_module) -> None:
        # here, not in on_fit_end: Lightning's teardown, before on_fit_end, moves the module and the optimizers
        # to the host, and the export's collectives (ZeRO's master gathers) would then hand NCCL CPU tensors
        self._finish(trainer, pl_module, export=self.export)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self._finished:  # a skipped loop (max_steps 0) has no on_train_end: the summary still says so
            self._finish(trainer, pl_module, export=False)
            if self.export:
                rank_zero_info("ftlab: the training loop did not run (trainer.max_steps, max_epochs or "
                               "limit_train_batches is 0, or the training split has no batch): nothing was trained, "
                               "and no export was written")

    def _finish(self, trainer, pl_module, export: bool) -> None:
        """The run's summary.json (with its counts, collective) and its export (collective when sharded)."""
        self._finished = True
        if was_preempted(trainer):  # stopped to requeue: the run is not finished, nothing to export yet
            return
        settle_for_reading(trainer.strategy)
        tokens, samples = self._global_counts(trainer)
        wall = self._elapsed()
        training = wall - self.val_time_s
        stats = sharding_stats(trainer, pl_module.model)
        folders = self._export(trainer, pl_module) if export else None
        if trainer.is_global_zero:
            extra = {
                "steps": trainer.global_step,
                "epochs": trainer.current_epoch,
                "train_tokens": tokens,
                "train_samples": samples,
                # rows of the train split (after data.max_train_rows; packed rows for packed LM data)
                "train_rows": len(getattr(trainer.datamodule, "splits", {}).get("train") or []) or None,
                "wall_time_s": round(wall, 2),
                "val_time_s": round(self.val_time_s, 2),
                # the training's own rate: validation time left out (it grows with val_check_interval)
                "train_samples_per_s": round(samples / training, 2) if training > 0 else None,
                "train_tokens_per_s": round(tokens / training, 1) if training > 0 else None,
                "dtypes": self.dtypes,
                **stats,
            }
            mix = (getattr(trainer.datamodule, "meta", None) or {}).get("sources")
            if mix:  # several data.sources: each one's rows per split and share of the training rows
                extra["data_sources"] = mix
            if self.best:
                extra[f"best/val/{pl_module.task.main_metric}"], extra["best/step"] = self.best
            extra["val_history"] = self.val_history
            if folders:
                extra["export"] = folders
                rank_zero_info(f"ftlab: exported {', '.join(f'{k}: {v}' for k, v in folders.items())}")
            self._write(trainer, pl_module, extra)
            if folders and self.wandb_artifact:
                for name in log_export_artifact(trainer, folders, {**extra, "task": pl_module.task.name}):
                    rank_zero_info(f"ftlab: logged the export as W&B artifact {name}")

    def _export(self, trainer, pl_module) -> dict[str, str] | None:
        """Stream the model into `<run dir>/export`, a block at a time (gathered where it is sharded: every
        rank calls this; rank 0 writes). Returns {kind: folder} on rank 0."""
        model = pl_module.model
        return export_streamed(model, trainer_gather(trainer, model), os.path.join(self.run_dir(trainer), "export"),
                               tokenizer=getattr(trainer.datamodule, "tokenizer", None),
                               merge_adapter=self.merge_adapter, max_shard_size=self.max_shard_size,
                               dtype=pl_module.weight_dtype(), writer=trainer.is_global_zero,
                               base_model=pl_module.name_or_path)

    def on_validation_start(self, trainer, pl_module) -> None:
        # the sanity check runs before the fit's clock starts (on_train_start)
        fitting = trainer.state.fn == "fit" and self._fit_start is not None and not trainer.sanity_checking
        self._val_start = time.perf_counter() if fitting else None

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_start is not None:
            self.val_time_s += time.perf_counter() - self._val_start
            self._val_start = None
        key = f"val/{pl_module.task.main_metric}"
        value = trainer.callback_metrics.get(key)
        if trainer.state.fn == "fit" and value is not None and not trainer.sanity_checking:
            value = _scalar(value)
            better = max if pl_module.task.higher_is_better else min
            if self.best is None or better(value, self.best[0]) == value:
                self.best = (value, trainer.global_step)
            point = {"step": trainer.global_step, "wall_time_s": round(self._elapsed(), 2)}
            for name, metric in trainer.callback_metrics.items():
                if name.startswith("val/"):
                    point[name] = _scalar(metric)
            self.val_history.append(point)
        if trainer.state.fn == "validate" and trainer.is_global_zero:
            self._write(trainer, pl_module, {})

    def on_predict_start(self, trainer, pl_module) -> None:
        self._predictions: list[tuple[int, dict]] = []  # (row of the predicted split, prediction)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # the rows of the batch: Lightning's predict loop records each batch's indices
        sampler = getattr(trainer.predict_dataloaders, "batch_sampler", None)
        seen = getattr(sampler, "seen_batch_indices", None)
        rows = seen[batch_idx] if seen and batch_idx < len(seen) else [None] * len(outputs or [])
        self._predictions.extend(zip(rows, outputs or []))

    def on_predict_end(self, trainer, pl_module) -> None:
        """One predictions.jsonl, in the order of the rows predicted on, whatever the number of ranks (rank 0
        gathers the others' predictions and writes it)."""
        mine = self._predictions
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, mine)
            mine = [p for part in parts for p in part]
        if not trainer.is_global_zero:
            return
        if all(row is not None for row, _ in mine):
            mine = sorted(mine, key=lambda item: item[0])
        path = os.path.join(self.run_dir(trainer), "predictions.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(p) + "\n" for _, p in mine)
        os.replace(path + ".tmp", path)
        data = trainer.datamodule
        what = "data.predict_source" if getattr(data, "predict_source", None) is not None else "the test split"
        rank_zero_info(f"ftlab: wrote {len(mine)} predictions on {what} to {path}")

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._write(trainer, pl_module, {})
