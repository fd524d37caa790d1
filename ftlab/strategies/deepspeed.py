"""DeepSpeed ZeRO (stages 1-3, optional offload) through Lightning's DeepSpeedStrategy, on GPUs as Lightning
runs it and on CPU with gloo: everything ftlab knows about it, from the named presets to gathering the
model back."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
import time

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ftlab.console import WorkProgress
from ftlab.errors import ConfigError

_DEEPSPEED_NAMES = {
    "deepspeed_stage_1": {"stage": 1},
    "deepspeed_stage_2": {"stage": 2},
    "deepspeed_stage_2_offload": {"stage": 2, "offload_optimizer": True},
    "deepspeed_stage_3": {"stage": 3},
    "deepspeed_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
}


class DeepSpeed(DeepSpeedStrategy):
    """DeepSpeed ZeRO (stages 1-3, optional offload), on GPUs as Lightning runs it and on CPU with gloo.

    Takes every option of Lightning's DeepSpeedStrategy (`stage`, `offload_optimizer`, bucket sizes, a
    user's own ds_config JSON as `config`...).
    """

    def __init__(self, *args, model_sized_buffers: bool = False, **kwargs) -> None:
        """
        Args:
            model_sized_buffers: Size ZeRO's communication buckets by the model (hidden^2 elements), as the
                named presets `deepspeed_stage_*` do, instead of Lightning's fixed 2e8 elements (an 800 MB
                fp32 buffer on every rank, whatever the model); it replaces the reduce and ZeRO-3
                prefetch bucket sizes given.
        """
        super().__init__(*args, **kwargs)
        self.model_sized_buffers = model_sized_buffers

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def size_buffers(self, config) -> None:
        """The named presets size ZeRO's communication buffers by the model as the Hugging Face Trainer's `auto`
        values do: gradient reduce bucket hidden^2 elements, ZeRO-3 prefetch bucket 0.9 hidden^2. Lightning's
        fixed 2e8-element reduce bucket is an 800 MB fp32 buffer on every rank whatever the model. Without
        model_sized_buffers (ftlab.strategies.DeepSpeed's default), the options given and a user's own
        ds_config are kept. Called before the model is built (zero.Init reads the config)."""
        hidden = getattr(config.get_text_config(), "hidden_size", None)
        if not self.model_sized_buffers or not isinstance(hidden, int):
            return
        zero = self.config.setdefault("zero_optimization", {})
        zero["reduce_bucket_size"] = hidden * hidden
        if zero.get("stage") == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed takes the device index as the rank's device (`device_rank`); a CPU device has none,
        # and Lightning passes None, which deepspeed.initialize rejects. `cpu:<local rank>` is a valid
        # torch device that places tensors on the CPU as usual.
        device = super().root_device
        return torch.device("cpu", self.local_rank) if device.type == "cpu" else device

    def setup_environment(self) -> None:
        if self._on_cpu():
            DDPStrategy.setup_environment(self)  # Lightning's DeepSpeed refuses anything but CUDA here
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        # as Lightning's, minus the CUDA device-index check that CPU devices cannot pass
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        check_op_build_lock()
        self._init_deepspeed_distributed()

    @contextlib.contextmanager
    def model_sharded_context(self):
        """ZeRO-3: while the model is built, transformers' own DeepSpeed integration is on (an HfDeepSpeedConfig
        alive): from_pretrained then creates every parameter partitioned (zero.Init) and loads the pretrained
        tensors module by module into the partitions, so no rank holds the whole model. Without it, Lightning's
        bare zero.Init would leave from_pretrained's weights in empty placeholders. ZeRO-1/2: whole weights."""
        if not self.zero_stage_3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        self._init_config_if_needed()
        hf_config = HfDeepSpeedConfig(self.config)  # noqa: F841 - transformers holds a weak reference to it
        try:
            yield
        finally:
            del hf_config  # later from_pretrained calls (an export) load whole models again

    def _init_config_if_needed(self) -> None:
        first = not self._config_initialized
        super()._init_config_if_needed()
        if first and self.config.get("zero_optimization", {}).get("offload_optimizer"):
            # ftlab builds its own (fused) AdamW; DeepSpeed would otherwise refuse a client optimizer
            # with offload ("ZeRO-Offload with a client provided optimizer").
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)
        if first and str(self.precision_plugin.precision).endswith("-mixed"):
            # DeepSpeed's mixed precision: bf16/fp16 module, fp32 master weights and optimizer state in its
            # optimizer; gradients are reduced in the module's dtype unless told otherwise. fp32, as FSDP.
            self.config.setdefault("communication_data_type", "fp32")

    def init_deepspeed(self) -> None:
        if self.zero_stage_3 and not self._on_cpu():
            # DeepSpeed moves no part of a model built partitioned (zero.Init) to the device: the module's other
            # state (metric states, adapters and buffers made after the build) would stay on the host
            self.model_to_device()
        _cast_unpartitioned(self.model, self.config)  # training and inference engines alike
        super().init_deepspeed()

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """Checkpoints leave out the frozen weights a rebuild reproduces (checkpoints.leave_frozen_out: the module
        state the engine saves goes through the module's hook). ZeRO-2/3 also write every frozen weight's
        fragments beside it, or, told to exclude frozen parameters, none and drop them all from the module
        state: excluded only when every frozen weight is left out anyway (else those kept, a new head's
        untrained original or a base PiSSA rewrote, would be missing at the load)."""
        module = self.lightning_module
        frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
        left_out = getattr(module, "left_out_of_checkpoints", set)()
        self.exclude_frozen_parameters = bool(frozen) and frozen <= left_out
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @property
    def handles_gradient_accumulation(self) -> bool:
        # Lightning places the optimizer steps, as under every other strategy: every accumulate_grad_batches
        # batches and at the epoch's last batch; DeepSpeed is told each boundary (training_step). Left to
        # DeepSpeed, its micro-step count ran across epochs while Lightning counted steps within each: with 5
        # batches an epoch and accumulation 2, 2 epochs took 5 DeepSpeed updates, Lightning counted 4 steps
        # (global_step, schedule, max_steps) and DDP took 6.
        return False

    def training_step(self, *args, **kwargs):
        engine = self.deepspeed_engine
        # a ds_config with managed_gradient_accumulation false makes each engine.step() the boundary already
        managed = getattr(engine, "managed_gradient_accumulation", lambda: True)()
        if self.lightning_module.automatic_optimization and managed:
            # before the forward, as DeepSpeed asks: whether this batch's backward ends an accumulation
            engine.set_gradient_accumulation_boundary(not self.lightning_module.trainer.fit_loop._should_accumulate())
        return super().training_step(*args, **kwargs)

    @contextlib.contextmanager
    def block_backward_sync(self):
        # Lightning's accumulation batches: DeepSpeed defers its reduction by the boundary set above. Lightning
        # would enter the engine's no_sync (it matches Lightning's DDP protocol), which ZeRO-2/3 refuse.
        yield None

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        # Lightning's automatic optimization already divides the loss by accumulate_grad_batches; DeepSpeed's
        # engine divided it again, so that k accumulated batches trained on 1/k of the gradient: not the
        # global batch's mean, unlike one rank per batch (Adam nearly hides it, not eps or gradient clipping)
        if self.lightning_module.automatic_optimization:
            kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def resume_universal(self) -> None:
        """Load the checkpoint resumed through DeepSpeed's universal checkpoint (any world size): ZeRO's
        own format is partitioned for the world size that wrote it. Called before the engine is built,
        which reads the switch from its config."""
        self.config.setdefault("checkpoint", {})["load_universal"] = True

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        if self.zero_stage_3 and not self.load_full_weights and self.lightning_module.trainer.state.fn != "fit":
            return load_for_evaluation(self, str(checkpoint_path))
        if not self.config.get("checkpoint", {}).get("load_universal") or self.load_full_weights:
            return super().load_checkpoint(checkpoint_path, weights_only)
        universal = convert_to_universal(self, str(checkpoint_path))
        state = super().load_checkpoint(universal, weights_only)
        if self.lightning_module.trainer.state.fn == "fit":  # the optimizer state was loaded
            _own_steps(self.deepspeed_engine.optimizer)
            if self.zero_stage_3:
                _group_settings(self.deepspeed_engine.optimizer, universal)
        rank_zero_info(f"ftlab: resumed {checkpoint_path} ({saved_world_size(str(checkpoint_path))} ranks) on "
                       f"{self.world_size} through its universal checkpoint {universal}")
        return state


# ---- on CPU: the build lock of DeepSpeed's communication op

# a lock no process holds, older than this, was left by a killed build (not one just released or just taken)
STALE_LOCK_S = 30


def _held_open(path: str) -> bool | None:
    """Whether a process on this machine holds `path` open (torch's builder keeps its lock file open while it
    builds); None where /proc cannot tell."""
    if not os.path.isdir("/proc"):
        return None
    target, unsure = os.path.realpath(path), False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except PermissionError:
            unsure = True
            continue
        except OSError:  # ended meanwhile
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
    return None if unsure else False


def stale_build_lock(min_age_s: float = STALE_LOCK_S) -> str | None:
    """The lock file of DeepSpeed's CPU communication op that a killed build left behind, if there is one."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:  # not a CPU accelerator: nothing is built at start-up
        return None
    lock = os.path.join(_get_build_directory(builder.name, verbose=False), "lock")  # where torch's JIT puts it
    with contextlib.suppress(OSError):
        if time.time() - os.path.getmtime(lock) > min_age_s and _held_open(lock) is False:
            time.sleep(0.5)  # a builder closes the file a moment before removing it
            if os.path.exists(lock):
                return lock
    return None


def check_op_build_lock() -> None:
    """On CPU, DeepSpeed's communication setup JIT-builds its shared-memory op, under torch's lock file, in every
    process (a no-op build once built). A process killed meanwhile (Ctrl-C, a job's time limit) leaves the file
    behind, and every later DeepSpeed run waits on it forever without a word: refuse in one line instead."""
    lock = stale_build_lock()
    if lock is not None:
        raise ConfigError(f"{lock} was left by an interrupted build of DeepSpeed's CPU communication op (no "
                          "process holds it); every DeepSpeed run would wait on it: delete it and run again")


# ---- loading under ZeRO-3: each rank fills its own partitions from the checkpoint files

def _cast_unpartitioned(model: nn.Module, config: dict) -> None:
    """ZeRO-3 in bf16/fp16: parameters created after the partitioned build (peft's adapters, which peft keeps in
    fp32) take the module's dtype, as zero.Init gave every other one. DeepSpeed casts only a model with no
    partitioned parameter; with both dtypes its optimizer stops on one flat buffer per group (`defragment`)."""
    dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else \
        torch.float16 if config.get("fp16", {}).get("enabled") else None
    params = list(model.parameters())
    if dtype is None or not any(hasattr(p, "ds_id") for p in params):
        return
    for param in params:
        if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)  # the same Parameter: the optimizer built already still holds it


def _cannot_fill(strategy) -> str | None:
    """Why ZeRO-3's partitions cannot be filled from the checkpoint files here (None: they can): layouts other
    than one flat partition per rank of its data-parallel group, or partitions that do not stay in memory."""
    zero = strategy.config.get("zero_optimization", {})
    if (zero.get("offload_param") or {}).get("device") == "nvme":
        return "parameters offloaded to NVMe"
    if (zero.get("zero_hpz_partition_size") or 1) > 1:
        return "zero_hpz_partition_size (secondary partitions)"
    if zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights"):
        return "quantized partitions"
    if (zero.get("mics_shard_size") or -1) > 0:
        return "MiCS sharding"
    return None


def _fill_partition(param: nn.Parameter, weights, key: str) -> None:
    """Copy into a ZeRO-3 parameter's partition (`ds_tensor`) its flat range of the checkpoint tensor `key`:
    rank r of the parameter's group holds elements [r * p, (r + 1) * p) of the flattened tensor (p: the
    partition size, the numel rounded up to a multiple of the group's size), reading only the rows they span."""
    import torch.distributed as dist

    size = param.ds_tensor.ds_numel
    start = min(size * dist.get_rank(group=param.ds_process_group), param.ds_numel)
    stop = min(start + size, param.ds_numel)
    if stop == start:
        return
    shape = tuple(param.ds_shape)
    row = 1
    for d in shape[1:]:
        row *= d
    first = start // row
    value = weights.read(key, first, -(-stop // row)) if shape else weights.read(key)
    param.ds_tensor.narrow(0, 0, stop - start).copy_(value.reshape(-1)[start - first * row: stop - first * row])


def load_partitioned(strategy, build, name_or_path: str, gguf_file: str | None, revision: str | None,
                     may_lack=None) -> nn.Module | None:
    """ZeRO-3: the model `build()` makes from its config, created partitioned as from_pretrained creates it
    (transformers' init contexts: zero.Init, no weight initialisation), then each rank copies its own
    partition of every pretrained tensor from the memory-mapped safetensors files, reading only the rows its
    flat range spans: the pretrained values go through no collective, and no rank reads the whole checkpoint.
    (transformers' own ZeRO-3 path has rank 0 map every checkpoint file into one state dict, which it holds
    to the end of loading, and gather, fill and broadcast module by module.)

    What the checkpoint lacks (`may_lack(model, name)` says what may be: a new task head) and the buffers it
    does not hold are initialised as from_pretrained initialises them, from the same random state: the same
    values as a whole load. Returns None, on every rank alike, where this cannot be done (weights not in
    safetensors or not floating point, names or shapes other than the model's, partition layouts other than
    plain ZeRO-3): the caller then loads through from_pretrained."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations import deepspeed as hf_deepspeed
    from transformers.modeling_utils import set_zero3_state

    from ftlab.loading import adopt_generation_config

    # the model's structure on the meta device (set_zero3_state: transformers adds no zero.Init of its own)
    with torch.device("meta"), set_zero3_state():
        skeleton = build()
    reason, keys, weights = _fill_plan(strategy, skeleton, name_or_path, gguf_file, revision, may_lack)
    # every rank takes the same path (node-local caches could differ): the two paths' collectives differ
    if not strategy.reduce_boolean_decision(reason is None, all=True):
        rank_zero_info(f"ftlab: deepspeed_stage_3: rank 0 reads the whole of {name_or_path} while the partitions "
                       f"fill ({reason or 'another rank cannot read its partitions'})")
        return None
    del skeleton
    # newer transformers keep RoPE's torch.arange out of zero.Init's dtype cast; older ones have no such guard
    # (nor does their own from_pretrained): the same build as theirs
    keep_arange_dtype = getattr(hf_deepspeed, "prevent_arange_dtype_change", contextlib.nullcontext)
    with no_init_weights(), keep_arange_dtype(), \
            deepspeed.zero.Init(config_dict_or_path=hf_deepspeed.deepspeed_config()), set_zero3_state():
        model = build()  # each parameter partitioned as it is created; nothing initialised
    model.tie_weights()  # from_pretrained ties after loading (a shared Parameter: no data moves)
    loaded = 0
    params = dict(model.named_parameters())
    progress = WorkProgress("deepspeed_stage_3: each rank loading its partitions", len(params), "tensors",
                            "in rank 0's partitions")
    with torch.no_grad():
        for name, param in params.items():
            if keys[name] is not None:
                _fill_partition(param, weights, keys[name])
                param._is_hf_initialized = True  # transformers initialises only what is not marked
                loaded += 1
                weights.release()  # the pages read stay mapped (as the rank's own memory) while the file is open
            progress.advance(1, param.ds_tensor.numel() * param.ds_tensor.element_size())
        for name, buffer in model.named_buffers():
            if keys.get(name) is not None:  # not partitioned: every rank reads it whole
                buffer.copy_(weights.read(keys[name]))
                buffer._is_hf_initialized = True
                weights.release()
    todo = {id(t): t for t in model.state_dict(keep_vars=True).values() if not getattr(t, "_is_hf_initialized", False)}
    params = [t for t in todo.values() if hasattr(t, "ds_id")]
    # as from_pretrained's ZeRO-3 path: every rank runs the initialisation (and draws alike), rank 0's values stay
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=bool(params)):
        model.initialize_weights()
    adopt_generation_config(model, weights.folder)
    rank_zero_info(f"ftlab: deepspeed_stage_3: each rank read only its partitions of the pretrained weights of "
                   f"{name_or_path} ({loaded} tensors; {len(todo)} initialised)")
    return model


def _fill_plan(strategy, skeleton: nn.Module, name_or_path: str, gguf_file: str | None, revision: str | None,
               may_lack) -> tuple[str | None, dict[str, str | None], object]:
    """(why the partitions cannot be filled from the checkpoint files or None, the checkpoint key of each
    parameter and buffer, the weights)."""
    from ftlab.loading import PretrainedWeights

    reason = _cannot_fill(strategy)
    if reason:
        return reason, {}, None
    weights = PretrainedWeights.find(name_or_path, gguf_file, revision, getattr(skeleton, "base_model_prefix", ""))
    if weights is None:
        return "its weights are not in safetensors files", {}, None
    if getattr(skeleton.config, "quantization_config", None):
        return "a quantized checkpoint", {}, None
    keys = {}
    for name, t in [*skeleton.named_parameters(), *skeleton.named_buffers()]:
        keys[name] = key = weights.key(name)
        if key is None and isinstance(t, nn.Parameter) and not (may_lack and may_lack(skeleton, name)):
            return f"the checkpoint names its weights otherwise, e.g. it has no {name}", {}, None
        if key is not None and (weights.shape(key) != tuple(t.shape) or not weights.floating(key)):
            return f"{key} is stored as {weights.dtype(key)} {list(weights.shape(key))}, not as the model's", {}, None
    weights.release()
    return None, keys, weights


# ---- resuming a ZeRO checkpoint at another world size: DeepSpeed's universal checkpoint

UNIVERSAL = ".universal"  # <ckpt>.universal/: the conversion of <ckpt>, beside it
_SOURCE = "ftlab_source.json"  # in it: the source files it was converted from (size, mtime), to spot a stale one


def saved_world_size(path: str) -> int:
    """The ranks that wrote a ZeRO checkpoint folder: one optimizer-state file each at every stage (ZeRO-1/2
    write one model-state file in all)."""
    return len(glob.glob(os.path.join(path, "checkpoint", "*_optim_states.pt")))


def saved_stage3(path: str) -> bool:
    # ZeRO-3 writes one model-state file per rank, named after its partition; ZeRO-1/2 one, `mp_rank_00_...`
    return bool(glob.glob(os.path.join(path, "checkpoint", "*zero_pp_rank_*_model_states.pt")))


def check_universal_resume(strategy, ckpt_path: str, path: str, saved: int, world_size: int, fix: str) -> None:
    """A ZeRO checkpoint of `saved` ranks resumed on `world_size`: refuse what the universal checkpoint of
    this DeepSpeed cannot do, else switch the strategy to load through it. Before anything loads."""
    where = f"ckpt_path={ckpt_path!r} was written by {saved} DeepSpeed ranks, this run has {world_size}"
    if not isinstance(strategy, DeepSpeed):
        raise ConfigError(f"{where}: only ftlab's DeepSpeed strategy (--trainer.strategy deepspeed_stage_* or "
                          f"ftlab.strategies.DeepSpeed) resumes it at another world size; use {saved} devices, {fix}")
    zero = strategy.config.get("zero_optimization", {})  # the stage family matches: check_resume
    nvme = [k for k in ("offload_optimizer", "offload_param") if (zero.get(k) or {}).get("device") == "nvme"]
    if nvme:
        raise ConfigError(f"{where}; DeepSpeed does not load a universal checkpoint with {nvme[0]} on NVMe: "
                          f"resume on {saved} devices, or with offload to cpu or none, {fix}")
    strategy.resume_universal()


def _source_files(path: str) -> dict:
    folder = os.path.join(path, "checkpoint")
    return {name: [os.stat(os.path.join(folder, name)).st_size, os.stat(os.path.join(folder, name)).st_mtime_ns]
            for name in sorted(os.listdir(folder))}


def _converted(path: str, out: str) -> bool:
    """Whether `out` is a whole conversion of the checkpoint now at `path` (not of one it replaced)."""
    try:
        with open(os.path.join(out, _SOURCE)) as f:
            return json.load(f) == _source_files(path)
    except (OSError, ValueError):
        return False


def convert_to_universal(strategy, path: str) -> str:
    """The universal checkpoint of the ZeRO checkpoint at `path` (`<path>.universal`), converted by global rank 0
    while the others wait at a barrier, or reused when a whole conversion of this checkpoint is already there.
    Collective: every rank calls it."""
    path = os.path.normpath(path)
    out = path + UNIVERSAL
    error = None
    if strategy.is_global_zero and not _converted(path, out):
        try:
            _convert(path, out)
        except Exception as err:  # the others learn of it below, rather than wait for a peer that is gone
            error = err
    # a barrier as long as the conversion: --collective_timeout must cover it (default 30 minutes)
    failed = strategy.broadcast(None if error is None else str(error))
    if error is not None:
        raise error
    if failed is not None:
        raise ConfigError(f"rank 0 could not convert {path} into a universal checkpoint: {failed}")
    if not _converted(path, out):
        raise ConfigError(f"rank {strategy.global_rank} cannot read {out}, which rank 0 converted {path} into: "
                          "put the checkpoints on a file system every node reads (trainer.default_root_dir)")
    return out


def _convert(path: str, out: str) -> None:
    """DeepSpeed's ds_to_universal, in this process: into `<out>.partial` first, moved into place whole (a crash
    leaves no half conversion that looks usable; AtomicCheckpoint clears `.partial` leftovers)."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # a conversion of a checkpoint since replaced at `path`
    rank_zero_info(f"ftlab: converting the DeepSpeed checkpoint {path} ({saved_world_size(path)} ranks) into a "
                   f"universal checkpoint {out}, to resume it at another world size")
    # no worker processes: this rank may hold CUDA and NCCL state that forking must not copy; Lightning's
    # folder holds the files in `checkpoint/`, DeepSpeed writes `latest_universal` beside it. Lightning does
    # not record DeepSpeed's universal-checkpoint info (only tensor-parallel patterns, which ZeRO has none of)
    args = Namespace(input_folder=os.path.join(path, "checkpoint"), output_folder=os.path.join(partial, "checkpoint"),
                     num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                     inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines are a log, not the run's output
            ds_to_universal.main(args)
    except KeyError as err:
        if err.args and err.args[0] in ("exp_avg", "exp_avg_sq"):
            raise ConfigError(f"{path}: DeepSpeed converts only Adam-type optimizer state (exp_avg, exp_avg_sq) to a "
                              "universal checkpoint, this one has none; resume at the world size that wrote it") from None
        raise
    with open(os.path.join(partial, _SOURCE), "w") as f:
        json.dump(_source_files(path), f)
    os.replace(partial, out)


class _Tensors:
    """The `read` of PretrainedWeights (whole, or rows [start, stop)) over tensors in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        t = self.tensors[key]
        return t if start is None else t[start:stop]


def load_for_evaluation(strategy, path: str) -> dict:
    """A ZeRO-3 checkpoint loaded to evaluate (validate, test, predict), at any world size. DeepSpeed's own load
    without the optimizer fails on the engine Lightning builds to evaluate (DeepSpeedZeRoOffload has no
    _restore_from_bit16_weights), and would gather every parameter at once. Instead: the checkpoint's universal
    conversion (one fp32 file per parameter, made once and reused, as a resume at another world size makes it),
    from which each rank fills its partition of every trained parameter, one parameter at a time; the frozen ones
    the checkpoint leaves out came from the pretrained files as the model was built. Returns Lightning's part
    of the checkpoint (callbacks, data position, ftlab's own keys). Collective: every rank calls it."""
    universal = convert_to_universal(strategy, path)
    zero = os.path.join(universal, "checkpoint", "zero")
    module = strategy.lightning_module
    missing = []
    with torch.no_grad():
        for name, param in module.named_parameters():
            file = os.path.join(zero, name, "fp32.pt")
            value = torch.load(file, map_location="cpu", weights_only=True, mmap=True) if os.path.isfile(file) else None
            value = value.get("param") if isinstance(value, dict) else value
            if value is None or value.numel() != param.ds_numel:  # frozen: an empty placeholder, or no file at all
                if param.requires_grad:
                    missing.append(name)
                continue
            _fill_partition(param, _Tensors({name: value.reshape(tuple(param.ds_shape))}), name)
    if missing:
        raise ConfigError(f"{path} holds no trained values of {missing[:3]} ({len(missing)} trained tensors): was it "
                          "written by this run's config (model, policy)?")
    files = sorted(glob.glob(os.path.join(path, "checkpoint", "*model_states.pt")))
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    rank_zero_info(f"ftlab: loaded the trained weights of {path} ({saved_world_size(path)} ranks) into this run's "
                   f"partitions on {strategy.world_size} rank(s), from its universal checkpoint {universal}")
    return {k: v for k, v in state.items() if k not in ("module", "optimizer")}


def _own_steps(optimizer) -> None:
    """Fix up Adam's `step` after DeepSpeed's universal load. ZeRO-3 puts one and the same tensor into every
    partition's state, so each optimizer step counted it once per partition (2 per step with decay and
    no-decay groups: wrong bias correction); and it is read from disk to the CPU, where torch's fused and
    capturable AdamW need it on the parameter's device."""
    inner = getattr(optimizer, "optimizer", optimizer)
    on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
    seen = set()
    for param, state in inner.state.items():
        step = state.get("step")
        if not torch.is_tensor(step):
            continue
        device = param.device if on_device and torch.is_tensor(param) else step.device
        if id(step) in seen or step.device != device:
            state["step"] = step.detach().to(device=device, dtype=torch.float32, copy=True)
        seen.add(id(state["step"]))


def _group_settings(optimizer, universal: str) -> None:
    """ZeRO-3's universal load gives every parameter group the first group's settings (lr, weight_decay...):
    ftlab's no-decay group (biases, norms) decayed after such a resume. Each group's own, from the checkpoint."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    # weights only, with the plain-data classes DeepSpeed pickles beside the settings: a checkpoint cannot run code
    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum]):
        saved = torch.load(os.path.join(universal, "checkpoint", "zero", "optimizer_state.pt"), map_location="cpu",
                           mmap=True, weights_only=True)["param_groups"]  # mmap: only the settings are read
    inner = getattr(optimizer, "optimizer", optimizer)
    for group, settings in zip(inner.param_groups, saved):
        group.update({k: v for k, v in settings.items() if k != "params"})


def keep_used_conversions(model: nn.Module) -> None:
    """transformers' ZeRO-3 load path records every key conversion of the architecture on the model, where its
    normal path records only those that matched the checkpoint; saving reverts what is recorded, so a BERT
    loaded under ZeRO-3 was exported with legacy `LayerNorm.gamma` names. Keep the ones that were used."""
    for m in model.modules():
        conversions = getattr(m, "_weight_conversions", None)
        if conversions:
            m._weight_conversions = [c for c in conversions if not hasattr(c, "was_used") or c.was_used()]


def _full_master(param: nn.Parameter) -> torch.Tensor | None:
    """The fp32 master copy of a trained parameter whose module copy is of lower precision (bf16/16-mixed:
    DeepSpeed trains a bf16/fp16 module and keeps fp32 master weights in its optimizer), whole; None where there
    is none (fp32 parameters, frozen ones, an engine without a ZeRO optimizer). Collective where it returns a
    tensor: the same on every rank, which all call it for the same parameters in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    if param.dtype == torch.float32 or not param.requires_grad:
        return None
    if hasattr(param, "ds_id") and getattr(param, "_z3_optimizer", None) is None:  # ZeRO-3 without its optimizer
        return None
    return safe_get_full_fp32_param(param)


def iter_full_state(trainer, model: nn.Module, blocks=None):
    """The model's full tensors, one block (default: one module's own parameters and buffers) at a time, in
    state-dict order: yields (block, {state-dict name: full tensor in host memory}) on rank 0 and (block, None)
    elsewhere. Trained parameters come from the optimizer's fp32 master weights where the module holds a
    bf16/fp16 copy (mixed precision): the export must not round them to the module's dtype. ZeRO-3: collective,
    each block's other parameters gathered with GatheredParameters (never the whole model at once), so every
    rank iterates to the end, in lockstep. ZeRO-1/2: each rank holds the whole module, rank 0 copies its own;
    the masters are partitioned at every stage, so each is gathered (collective) there too."""
    import deepspeed

    from ftlab.export import state_blocks

    rank0 = trainer.is_global_zero
    stage3 = bool(trainer.strategy.zero_stage_3)
    for block in state_blocks(model) if blocks is None else blocks:
        tensors = block.tensors()
        masters = {}  # the same names on every rank: what is left to gather must be too
        with torch.no_grad():
            for name, t in tensors.items():
                master = _full_master(t) if name not in block.buffers else None
                if master is not None:
                    masters[name] = master.to("cpu", copy=True) if rank0 else None
        params = [t for name, t in tensors.items() if name not in block.buffers and name not in masters]
        with torch.no_grad(), deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=stage3 and bool(params)):
            state = {name: masters[name] if name in masters else t.detach().to("cpu", copy=True)
                     for name, t in tensors.items()} if rank0 else None
        yield block, state
