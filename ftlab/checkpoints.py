"""Checkpoints: what they must hold beyond Lightning's own for a resumed run to continue exactly, and
saving them so that a crash never damages the last good one."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shlex
import shutil
from weakref import proxy

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ftlab.errors import ConfigError


class RngState(L.Callback):
    """Saves and restores the random number generators (dropout masks, sampling), per rank.

    Lightning checkpoints hold model, optimizer, scheduler and loop state, but not the RNGs: after a
    resume, dropout would draw different masks and the run would drift from the uninterrupted one.
    Each rank's state is kept (ranks draw differently once their data differs; a GPU rank's CUDA
    generator is its own device's): the states are gathered into the checkpoint, and each rank takes back
    its own. A rank that did not exist when the checkpoint was written (a resume on more ranks) takes
    rank 0's. The state is put back at the first training batch after the restore, so that nothing run
    in between (sanity-check validation, model setup) shifts it.
    """

    def __init__(self):
        self._pending: dict | None = None

    @staticmethod
    def _local_state() -> dict:
        # plain tensors, lists and numbers only: checkpoints load with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "python": [version, list(internal), gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only
        return state

    def state_dict(self) -> dict:
        # called on every rank while a checkpoint is assembled (sharded saves need every rank there)
        state = self._local_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)  # via the device under NCCL alone, via gloo where there is one
            return {"per_rank": states}
        return {"per_rank": [state]}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            state, self._pending = self._pending, None
            per_rank = state.get("per_rank", [state])  # older checkpoints: one state, rank 0's
            self._restore(per_rank[trainer.global_rank] if trainer.global_rank < len(per_rank) else per_rank[0])

    @staticmethod
    def _restore(state: dict) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if isinstance(state.get("cuda"), torch.Tensor) and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])  # the current device's


class TrainingPosition(L.Callback):
    """Keeps Lightning's loop counters in a checkpoint true to where training stands in the data, and refuses
    a resume that would train nothing.

    Why: the position within an epoch is the data module's (global batches of the epoch's order, the same
    at any world size). Lightning's own counters disagree with it in two cases. (1) A run that stops at
    `max_steps` mid-epoch saves its last checkpoint after Lightning has marked the epoch finished, so a
    resume with a larger `max_steps` skipped the rest of the epoch (and with `max_epochs: 1` trained
    nothing and exited 0). (2) Lightning counts batches per rank: resumed at another world size, its
    count is translated to the new one, so that validation and accumulation keep their places.
    A resume at max_steps / max_epochs is refused (Lightning would skip the fit and exit 0).
    """

    @staticmethod
    def _position(trainer, checkpoint: dict) -> dict | None:
        data = trainer.datamodule
        return checkpoint.get(type(data).__qualname__) if data is not None else None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        position = self._position(trainer, checkpoint)
        if not position or position.get("epoch_finished", True):
            return
        loops = checkpoint["loops"]["fit_loop"]
        for progress in loops["epoch_progress"].values():  # 'total' and 'current'
            if progress["processed"] >= progress["started"]:  # marked finished: back to "mid-epoch"
                progress["processed"] = progress["completed"] = progress["started"] - 1
        loops["epoch_loop.batch_progress"]["is_last_batch"] = False
        checkpoint["epoch"] = position["epoch"]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        from ftlab.data.samplers import GroupedBatchSampler

        if trainer.state.fn == "fit":
            self._check_something_to_train(trainer, checkpoint)
        position = self._position(trainer, checkpoint)
        if not position or position.get("world_size", trainer.world_size) == trainer.world_size:
            return
        if "fit_loop" not in checkpoint.get("loops", {}):
            return
        batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        count = GroupedBatchSampler.local_count(position["global_batches_done"], trainer.world_size)
        shift = count - batches["current"]["processed"]
        for key in ("ready", "started", "processed", "completed"):
            batches["current"][key] += shift
            batches["total"][key] += shift

    @staticmethod
    def _check_something_to_train(trainer, checkpoint: dict) -> None:
        """Lightning skips a fit whose checkpoint is already at max_steps / max_epochs and exits as if it
        had trained: say so instead."""
        loops = checkpoint.get("loops", {}).get("fit_loop")
        if not loops:  # a weights-only checkpoint: Lightning starts the loops from the beginning
            return
        step = checkpoint.get("global_step", 0)
        epochs = loops["epoch_progress"]["current"]["processed"]
        if trainer.max_steps not in (None, -1) and step >= trainer.max_steps:
            limit = f"trainer.max_steps={trainer.max_steps}"
        elif trainer.max_epochs not in (None, -1) and epochs >= trainer.max_epochs:
            limit = f"trainer.max_epochs={trainer.max_epochs}"
        else:
            return
        raise ConfigError(f"nothing to train: the checkpoint resumed is at step {step} after {epochs} finished "
                          f"epoch(s), already at {limit}; raise it to train on, or start a new run without --ckpt_path"
                          + _unwritten_export(trainer, step))


def _unwritten_export(trainer, step: int) -> str:
    """Where the run's export of `step` was never written (the run stopped while exporting), the command that
    writes it. The fit's summary.json names the export once it is written, with the steps it holds."""
    from ftlab.callbacks import RunOutputs

    outputs = next((cb for cb in trainer.callbacks if isinstance(cb, RunOutputs) and cb.export), None)
    if outputs is None:
        return ""
    try:
        with open(os.path.join(trainer.default_root_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        summary = {}
    if summary.get("export") and summary.get("steps") == step:
        return ""
    merge = "" if outputs.merge_adapter else " --no-merge-adapter"
    return (f" (its Hugging Face export was not written: python -m ftlab export --run "
            f"{shlex.quote(trainer.default_root_dir)}{merge})")


def leave_frozen_out(module: torch.nn.Module) -> None:
    """`module`'s state dict (and so every checkpoint, under every strategy) leaves out the parameters its
    `left_out_of_checkpoints()` names, and a state dict that lacks them loads without complaint, strict or not.

    Why: a frozen weight the pretrained files hold never changes, so the pretrained model the run is rebuilt
    from at a resume (or an export) already holds it. A LoRA run's base model, a distillation teacher and a
    preference run's reference copy were written into every checkpoint (140 GB for a 70B base in bf16), as
    peft-aware trainers do not. What the module names must be the same at the save and at the load (the
    sharded loads read what the state dict names): FineTuneModule.left_out_of_checkpoints. The hooks are
    module-level functions: a module is pickled whole by spawned ranks (ddp_spawn)."""
    module._register_state_dict_hook(_drop_left_out)
    module._register_load_state_dict_pre_hook(_note_prefix, with_module=True)
    module.register_load_state_dict_post_hook(_forgive_left_out)


def _drop_left_out(root, state_dict, prefix, local_metadata) -> None:
    for name in root.left_out_of_checkpoints():
        state_dict.pop(prefix + name, None)


def _note_prefix(root, state_dict, prefix, *args) -> None:
    root._ftlab_load_prefix = prefix  # where the module's names sit in the state dict being loaded


def _forgive_left_out(root, incompatible_keys) -> None:
    prefix = getattr(root, "_ftlab_load_prefix", "")
    left_out = {prefix + n for n in root.left_out_of_checkpoints()}
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in left_out]


def pretrained_held(model: torch.nn.Module, name_or_path: str, gguf_file: str | None, revision: str | None) -> set[int]:
    """ids of `model`'s parameters that the pretrained safetensors files hold (by any of their names: a tied
    head is held through its embedding); empty where the files cannot be read as safetensors."""
    from ftlab.loading import PretrainedWeights

    weights = PretrainedWeights.find(name_or_path, gguf_file, revision, getattr(model, "base_model_prefix", ""))
    if weights is None:
        return set()
    return {id(p) for n, p in model.named_parameters(remove_duplicate=False) if weights.key(n) is not None}


def base_files(name_or_path: str, gguf_file: str | None = None, revision: str | None = None) -> dict:
    """What the frozen weights a checkpoint leaves out are rebuilt from: the weight files `from_pretrained` reads
    for the base model (a GGUF source: the GGUF file), each by its content where the hub cache names it (a
    snapshot's files link to blobs named by their sha256) and by its size elsewhere, and the hub commit. Taken
    when the model is built; written into every checkpoint, compared at the resume (base_mismatch)."""
    from huggingface_hub import hf_hub_download

    from ftlab.data.sources import model_location
    from ftlab.loading import cached_snapshot

    path, extra = model_location(name_or_path, gguf_file)
    if extra:
        names = [extra["gguf_file"]]
        try:
            folder = path if os.path.isdir(path) else os.path.dirname(
                hf_hub_download(path, names[0], revision=revision, local_files_only=True))
        except OSError:  # not in this machine's hub cache
            return {}
    else:
        folder = path if os.path.isdir(path) else cached_snapshot(path, revision)
        if folder is None:
            return {}
        names = _weight_files(folder)
    files = {}
    for name in names:
        full = os.path.join(folder, name)
        if os.path.exists(full):
            real = os.path.realpath(full)
            blob = os.path.islink(full) and os.path.basename(os.path.dirname(real)) == "blobs"
            files[name] = os.path.basename(real) if blob else os.path.getsize(full)
    found = {"files": files}
    if os.path.basename(os.path.dirname(folder)) == "snapshots":
        found["commit"] = os.path.basename(folder)
    return found


def _weight_files(folder: str) -> list[str]:
    """The weight files from_pretrained reads in `folder`: safetensors (sharded: the index's), else PyTorch's."""
    import json

    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                return sorted(set(json.load(f)["weight_map"].values()))
        if os.path.exists(os.path.join(folder, single)):
            return [single]
    return []


def recorded_base(path: str) -> dict | None:
    """The base files a checkpoint (a Lightning file, an FSDP sharded folder, a DeepSpeed folder) records
    (FineTuneModule.on_save_checkpoint), read without loading its tensors; None where it records none."""
    import glob

    if os.path.isdir(path):
        meta = os.path.join(path, "meta.pt")  # Lightning's, beside FSDP's shards
        path = meta if os.path.exists(meta) else next(iter(sorted(glob.glob(os.path.join(path, "checkpoint",
                                                                                        "*model_states.pt")))), "")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - not a checkpoint, or one of pickled objects a weights-only load refuses
        return None
    return state.get("ftlab_base") if isinstance(state, dict) else None


def base_mismatch(saved: dict | None, now: dict, name_or_path: str, action: str = "resume") -> str | None:
    """Why a resume (or an export: `action`) must not go on over this base model (None: it may): the frozen
    weights the checkpoint leaves out would silently come from other weights (a hub repository updated while
    the job was queued, a local folder replaced)."""
    if not saved or not now or saved.get("files") == now.get("files"):
        return None
    fix = (f"{action} with --model.revision {saved['commit']}" if saved.get("commit") else
           f"{action} with the base model the run started from")
    return (f"model.name_or_path={name_or_path!r}: its weight files are not those the checkpoint was written against "
            f"({_short(saved.get('files'))} then, {_short(now.get('files'))} now), and the checkpoint leaves the "
            f"frozen weights out; {fix}")


def _short(files: dict | None) -> str:
    return ", ".join(f"{n}: {str(v)[:12]}" for n, v in (files or {}).items()) or "none found"


def checkpoint_bytes(pl_module) -> int:
    """About the size of one checkpoint: fp32 trained weights and AdamW's two moments (frozen weights are
    left out: leave_frozen_out)."""
    trainable = getattr(pl_module, "trainable_params", 0) or sum(p.numel() for p in pl_module.parameters())
    return 12 * trainable


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def replace_path(new: str, final: str) -> None:
    """Put `new` (a file or folder) at `final`. Files: one atomic rename. Folders: the old one moves
    to `final.old` first and is deleted last; `recover_path` undoes a crash between the two renames."""
    if os.path.isdir(final) and not os.path.islink(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)


def recover_path(final: str) -> None:
    """After a crash in `replace_path`: the previous folder is at `final.old`; put it back. Every rank may
    call it at once: one rename wins, the others find nothing left to do."""
    old = final + ".old"
    if os.path.exists(old) and not os.path.exists(final):
        try:
            os.replace(old, final)
        except FileNotFoundError:
            pass


def run_checkpoint(trainer) -> AtomicCheckpoint | None:
    """The run's own checkpoint callback (`--checkpoint.*`); the user may add other ModelCheckpoints, which
    Lightning's `trainer.checkpoint_callback` may return instead."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, AtomicCheckpoint)), None)


class AtomicCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (same options), with every save atomic: written to `<path>.partial`,
    then swapped in when every rank has finished writing. A crash while saving leaves the previous
    checkpoint intact, and a half-written one is never picked up as `last`.

    Why: Lightning writes single files through a temp file that it *moves* into place (a copy when the
    temp dir is another file system, as it often is on clusters), and it writes FSDP/DeepSpeed folders
    in place over the previous checkpoint, which may be the only one.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for name in os.listdir(self.dirpath):
                path = os.path.join(self.dirpath, name)
                if name.endswith(".old"):
                    recover_path(path[: -len(".old")])
                elif name.endswith(".partial"):  # left by a crash while writing: never resumable
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def on_fit_start(self, trainer, pl_module) -> None:
        """Refuse to start when the disk cannot hold two checkpoints (an atomic save keeps the previous one
        until the new one is whole), rather than failing hours later at the first save."""
        need = checkpoint_bytes(pl_module)
        os.makedirs(self.dirpath, exist_ok=True)
        free = shutil.disk_usage(self.dirpath).free
        if free < 2 * need:
            raise ConfigError(f"{self.dirpath}: {_gb(free)} free, but a checkpoint of this run takes about {_gb(need)} "
                              f"and a save needs room for two; free space or set trainer.default_root_dir elsewhere")

    # ---- when: `last` at every validation and epoch end, and only where an optimizer step just ended
    _step_seen = -1
    _mid_window = False
    _validation_save_due = False

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_seen, self._mid_window = trainer.global_step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Mid-accumulation, the gradients gathered so far are in no checkpoint: a save there would resume the
        # window from its middle and never train its first batches. Saves wait for the step's end.
        self._mid_window = trainer.global_step == self._step_seen
        self._step_seen = trainer.global_step
        if self._mid_window:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._validation_save_due:
            self._validation_save_due = False
            self._save_after_validation(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._mid_window and not trainer.sanity_checking:  # validation inside a window: save at its end
            self._validation_save_due = True
            return
        self._save_after_validation(trainer, pl_module)

    def _save_after_validation(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_on_schedule(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._mid_window and self._last_checkpoint_saved:
            return  # the epoch stopped inside a window (max_time, early stopping): `last` stays at its start
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_on_schedule(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._mid_window and self._last_checkpoint_saved:
            return  # stopped inside a window (should_stop): `last` stays at the step before it
        super().on_train_end(trainer, pl_module)
        self._save_last_on_schedule(trainer)  # the steps after the last validation

    def _save_last_on_schedule(self, trainer) -> None:
        """Lightning 2.6 saves `last` at validation and epoch ends only when a top-k checkpoint was saved at
        the same step: with ftlab's save_top_k 0, never before training ended, so a killed job or a failed
        node lost everything. Here `last` follows each of them (once a step)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    _saving_last = False

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        self._saving_last = True
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self._saving_last = False

    def save_last_now(self, trainer) -> str:
        """Save `last` now, whatever the schedule says (a preempted job's final save); returns its path."""
        filepath = self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
        self.last_model_path = filepath  # part of the saved state, as in Lightning's own last save
        self._saving_last = True
        try:
            self._save_checkpoint(trainer, filepath)
        finally:
            self._saving_last = False
        return filepath

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # the body of Lightning's own _save_checkpoint, writing to a partial path first
        partial = filepath + ".partial"
        if trainer.is_global_zero and os.path.exists(partial):
            shutil.rmtree(partial) if os.path.isdir(partial) else os.remove(partial)
        trainer.strategy.barrier("ftlab_checkpoint_start")
        # `last` is what a resume and a requeued job start from: always whole (optimizer, loops), whatever
        # save_weights_only asks of the other checkpoints
        weights_only = self.save_weights_only and not self._saving_last
        try:
            trainer.save_checkpoint(partial, weights_only)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.rmtree(partial, ignore_errors=True) if os.path.isdir(partial) else _remove(partial)
            previous = self.last_model_path if os.path.exists(self.last_model_path or "") else "none"
            raise ConfigError(f"no space left on the device of {self.dirpath} while saving {os.path.basename(filepath)} "
                              f"({err.strerror}); the previous checkpoint is intact ({previous}). Free space, then "
                              "resume with --ckpt_path last") from None
        trainer.strategy.barrier("ftlab_checkpoint_written")
        if trainer.is_global_zero:
            replace_path(partial, filepath)
            # a universal conversion of the checkpoint just replaced (a resume at another world size): stale now
            shutil.rmtree(filepath + ".universal", ignore_errors=True)
        trainer.strategy.barrier("ftlab_checkpoint_in_place")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


LAST_NAME = re.compile(r"^last(-v\d+)?\.ckpt$")


def last_checkpoint(checkpoint_dir: str, recover: bool = False) -> str | None:
    """The run's last checkpoint, chosen as Lightning chooses it for `--ckpt_path last`: the newest
    `last*.ckpt` (file or sharded folder) in the checkpoint folder. ftlab writes one `last.ckpt` per run;
    folders of older versions may also hold `last-v1.ckpt`..., written by later runs into the same folder.
    With `recover` (a run about to resume; never while another may be saving), a `last` folder a crash left
    moved aside (`replace_path`) is put back first: Lightning looks for `last` before the checkpoint
    callback's setup would put it back, and would start over."""
    try:
        for name in os.listdir(checkpoint_dir) if recover else []:
            if name.endswith(".old") and LAST_NAME.match(name[: -len(".old")]):
                recover_path(os.path.join(checkpoint_dir, name[: -len(".old")]))
        names = [n for n in os.listdir(checkpoint_dir) if LAST_NAME.match(n)]
    except OSError:
        return None
    paths = [os.path.join(checkpoint_dir, n) for n in names]
    return max(paths, key=os.path.getmtime) if paths else None


def previous_run(run_dir: str) -> list[str]:
    """What in `run_dir` a fit left there (checkpoints, the export, a fit's summary): empty when no run has
    trained in it. The files `slurm submit` writes before its job starts, a `validate` run's summary and a
    config.yaml of a run that stopped before training do not count."""
    import json

    found = []
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpt_dir) and [n for n in os.listdir(ckpt_dir) if not n.endswith(".partial")]:
        found.append("checkpoints/")
    if os.path.isdir(os.path.join(run_dir, "export")):
        found.append("export/")
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            if "steps" in json.load(f):
                found.append("summary.json")
    except (OSError, ValueError):
        pass
    return found


def check_fresh_run_dir(run_dir: str) -> None:
    """A fit without --ckpt_path starts a new run: refuse a run directory where another run trained (its
    summary, checkpoints and export would mix with this one's)."""
    found = previous_run(run_dir)
    if not found:
        return
    base, n = run_dir.rstrip("/"), 2
    while os.path.exists(f"{base}-{n}"):
        n += 1
    resume = "resume it with --ckpt_path last, or " if "checkpoints/" in found else ""
    raise ConfigError(f"trainer.default_root_dir={run_dir!r} already holds a run ({', '.join(found)}): {resume}start "
                      f"a new run in a new folder, e.g. --trainer.default_root_dir {base}-{n} (or delete {base} first)")
