"""The strategy layer: the one place that knows about devices, processes and sharding.

Strategy names follow Lightning's registry. Where ftlab gives a name its own meaning, it says so here:

- `fsdp` is PyTorch FSDP2 (`fully_shard`, per-parameter DTensor sharding, as in torchtune/torchtitan)
  through Lightning's `ModelParallelStrategy`: every transformer block is one shard unit, then the root.
  FSDP2 runs on CPU (gloo) as well as GPU, so a laptop can debug a sharded config. Options:
  `--trainer.strategy ftlab.strategies.FSDP --trainer.strategy.sharding grad-op`.
- `deepspeed_stage_1`, `_2`, `_2_offload`, `_3`, `_3_offload` are Lightning's DeepSpeed ZeRO settings
  through `DeepSpeed`, a subclass that also runs on CPU (gloo) and loads pretrained weights whole before
  ZeRO-3 partitions them. On GPUs it behaves as Lightning's.
- `ddp` and every other name are Lightning's own.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Literal

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ftlab.errors import ConfigError, did_you_mean
from ftlab.policies.layers import find_parts


def split_cpu_threads(trainer) -> None:
    """Several ranks on one CPU host must share its cores: without a limit each rank starts one thread per
    core and 2 ranks on 2 cores ran ~30x slower. torchrun sets OMP_NUM_THREADS; Lightning's own launcher
    does not, so do it here (before the ranks are launched, so they inherit it). A user's setting wins."""
    if trainer.strategy.root_device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = max(1, trainer.num_devices)
    if local_ranks == 1:
        return
    threads = max(1, (os.cpu_count() or 1) // local_ranks)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    rank_zero_info(f"ftlab: {local_ranks} CPU ranks on this host: {threads} thread(s) each (OMP_NUM_THREADS)")


class FSDP(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2): parameters, gradients and optimizer state split across ranks."""

    def __init__(
        self,
        sharding: Literal["full", "grad-op", "hybrid"] = "full",
        replicate_size: int | None = None,
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        state_dict_type: Literal["sharded", "full"] = "sharded",
    ):
        """
        Args:
            sharding: `full` (ZeRO-3 like: parameters re-sharded after forward), `grad-op` (ZeRO-2 like:
                parameters stay gathered between forward and backward), `hybrid` (shard within groups of
                `replicate_size`... see below, replicate across them).
            replicate_size: For `hybrid`: number of replicas (e.g. the number of nodes); each replica
                shards over world_size / replicate_size ranks.
            activation_checkpointing: Recompute each block's activations in backward (less memory).
            cpu_offload: Keep sharded parameters and optimizer state in CPU memory (GPU runs).
            state_dict_type: Checkpoints as one folder of per-rank shards (`sharded`, fast, resumable at
                the same world size) or one full file gathered on rank 0 (`full`, loadable anywhere).
        """
        if sharding == "hybrid" and not replicate_size:
            raise ConfigError("trainer.strategy.sharding=hybrid needs replicate_size (e.g. the number of nodes)")
        if replicate_size is not None and replicate_size < 1:
            raise ConfigError(f"trainer.strategy.replicate_size={replicate_size} must be >= 1")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=state_dict_type == "sharded")
        self.sharding = sharding
        self.replicate_size = replicate_size
        self.activation_checkpointing = activation_checkpointing
        self.cpu_offload = cpu_offload
        self.state_dict_type = state_dict_type

    def setup_environment(self) -> None:
        # Pure data parallelism over every rank ("auto" in Lightning means one group per node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def _mesh(self):
        if self.sharding != "hybrid":
            return self.device_mesh["data_parallel"]
        from torch.distributed.device_mesh import init_device_mesh

        world = self.world_size
        if world % self.replicate_size:
            raise ConfigError(f"trainer.strategy.replicate_size={self.replicate_size} must divide the world size {world}")
        # An explicit 2-D mesh: FSDP1's HYBRID_SHARD without one silently degraded to no sharding at all.
        return init_device_mesh(self.root_device.type, (self.replicate_size, world // self.replicate_size),
                                mesh_dim_names=("replicate", "shard"))

    def mixed_precision_policy(self):
        """FSDP2's precision from `trainer.precision`. `bf16-mixed`: the sharded parameters (what AdamW
        updates, and its state) stay fp32, the gathered ones are bf16 for forward and backward, gradients are
        reduced in fp32. `*-true`: parameters load in that dtype and everything stays in it."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if str(self.precision_plugin.precision) == "bf16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def shard_module(self, model: nn.Module) -> nn.Module:
        """Apply fully_shard to each transformer block, then to the root (called from configure_model)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        parts = find_parts(model)
        if parts.block_class is None:
            raise ConfigError("fsdp: no list of transformer blocks was found in this model to shard by; "
                              "use strategy ddp or deepspeed_stage_2")
        if self.activation_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", True):
                raise ConfigError("fsdp activation_checkpointing: this model does not support gradient checkpointing")
            base = getattr(model, "get_base_model", lambda: model)()
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        offload = self.cpu_offload and self.root_device.type != "cpu"
        if self.cpu_offload and not offload:
            # the same config must run on a laptop: on CPU ranks the parameters already live in host
            # memory (and torch's offload policy needs an accelerator)
            rank_zero_info("ftlab: fsdp cpu_offload has no effect on CPU ranks; ignored")
        kwargs = {
            "mesh": self._mesh(),
            "reshard_after_forward": self.sharding != "grad-op",
            "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
            "mp_policy": self.mixed_precision_policy(),
        }
        for module in model.modules():
            if isinstance(module, parts.block_class):
                fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        return model


class DeepSpeed(DeepSpeedStrategy):
    """DeepSpeed ZeRO (stages 1-3, optional offload), on GPUs as Lightning runs it and on CPU with gloo.

    Takes every option of Lightning's DeepSpeedStrategy (`stage`, `offload_optimizer`, bucket sizes, a
    user's own ds_config JSON as `config`...).
    """

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

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
        self._init_deepspeed_distributed()

    @contextlib.contextmanager
    def model_sharded_context(self):
        # No deepspeed.zero.Init: transformers' from_pretrained would load the pretrained weights into
        # empty partitioned placeholders. The full weights load on each rank, and ZeRO-3 partitions them
        # in deepspeed.initialize.
        yield

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


def set_collective_timeout(strategy, seconds: int | None) -> None:
    """The process-group timeout of any distributed strategy. Lightning takes it as a constructor argument,
    which strategies it builds from a name (`ddp`, or `auto` on several devices) never get; they all keep
    it in `_timeout` until the process group starts, so set it there."""
    if seconds is None:
        return
    if seconds <= 0:
        raise ConfigError(f"collective_timeout={seconds}: give a positive number of seconds (default 1800)")
    if hasattr(strategy, "_timeout"):
        strategy._timeout = timedelta(seconds=seconds)


def check_combination(strategy, module) -> None:
    """Strategy x policy (x module option) combinations that cannot work, refused before anything loads."""
    policy = module.policy
    if isinstance(strategy, DeepSpeedStrategy) and module.skip_nonfinite_steps:
        raise ConfigError(f"model.skip_nonfinite_steps={module.skip_nonfinite_steps}: DeepSpeed cannot skip a step "
                          "(its engine always runs backward and step); use 0 with DeepSpeed, or strategy ddp/fsdp")
    if isinstance(strategy, DeepSpeedStrategy) and policy.changes_trainable_set:
        raise ConfigError("gradual unfreezing (policy.unfreeze_every) cannot run under DeepSpeed ZeRO, which fixes "
                          "its optimizer partitions at start; use strategy ddp or fsdp, or unfreeze_every: 0")


def checkpoint_kind(path: str) -> str:
    """`file` (Lightning: single device, DDP, FSDP full), `dcp` (FSDP sharded) or `deepspeed` (ZeRO)."""
    if os.path.isfile(path):
        return "file"
    if os.path.exists(os.path.join(path, ".metadata")):
        return "dcp"
    if os.path.isdir(os.path.join(path, "checkpoint")):
        return "deepspeed"
    raise ConfigError(f"ckpt_path={path!r} is not a checkpoint (file, FSDP folder or DeepSpeed folder)")


def check_resume(ckpt_path: str | None, checkpoint_dir: str, strategy, world_size: int) -> None:
    """Refuse, before anything loads, a checkpoint the chosen strategy cannot resume from."""
    if ckpt_path in (None, "best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
        return
    path = os.path.join(checkpoint_dir, "last.ckpt") if ckpt_path == "last" else str(ckpt_path)
    if ckpt_path == "last" and not os.path.exists(path):
        return  # Lightning starts from scratch (and says so) when there is no last checkpoint yet
    if not os.path.exists(path):
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist; give a checkpoint file or folder, or 'last'")
    kind = checkpoint_kind(path)
    fix = "or export it (`python -m ftlab export --run ... --ckpt ...`) and fine-tune from the export"
    if kind == "dcp" and not isinstance(strategy, ModelParallelStrategy):
        raise ConfigError(f"ckpt_path={ckpt_path!r} is a sharded FSDP checkpoint: resume it with --trainer.strategy fsdp "
                          f"(any world size), {fix}; FSDP with state_dict_type: full writes checkpoints any strategy reads")
    if kind == "deepspeed":
        if not isinstance(strategy, DeepSpeedStrategy):
            raise ConfigError(f"ckpt_path={ckpt_path!r} is a DeepSpeed ZeRO checkpoint: resume it with the same "
                              f"deepspeed_stage_* strategy, {fix}")
        # one optimizer-state file per rank at every stage (ZeRO-1/2 write one model-state file in all)
        saved = len([f for f in os.listdir(os.path.join(path, "checkpoint")) if f.endswith("_optim_states.pt")])
        if saved != world_size:
            raise ConfigError(f"ckpt_path={ckpt_path!r} was written by {saved} DeepSpeed ranks, this run has {world_size}; "
                              f"ZeRO checkpoints resume at the same world size only: use {saved} devices, {fix}")
    if kind == "file" and isinstance(strategy, DeepSpeedStrategy) and not strategy.load_full_weights:
        raise ConfigError(f"ckpt_path={ckpt_path!r} is a single-file checkpoint, which DeepSpeed does not resume; "
                          f"resume with ddp or fsdp, {fix}")


_DEEPSPEED_NAMES = {
    "deepspeed_stage_1": {"stage": 1},
    "deepspeed_stage_2": {"stage": 2},
    "deepspeed_stage_2_offload": {"stage": 2, "offload_optimizer": True},
    "deepspeed_stage_3": {"stage": 3},
    "deepspeed_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
}


def resolve_strategy(strategy):
    """Strategy names whose meaning ftlab sets (see the module docstring) -> strategy objects; anything
    else goes to Lightning unchanged."""
    if isinstance(strategy, str):
        from lightning.pytorch.strategies import StrategyRegistry

        known = {"auto", "model_parallel", *StrategyRegistry.available_strategies()}
        if strategy not in known:
            raise ConfigError(f"trainer.strategy={strategy!r} is not a strategy; {did_you_mean(strategy, sorted(known))} "
                              "(or a class path such as ftlab.strategies.FSDP)")
    if strategy == "fsdp":
        return FSDP()
    if isinstance(strategy, str) and strategy in _DEEPSPEED_NAMES:
        return DeepSpeed(**_DEEPSPEED_NAMES[strategy])
    return strategy


def follow_trainable_change(strategy) -> None:
    """Called after parameters started training mid-run (gradual unfreezing). DDP registers its gradient
    all-reduce only for the parameters that required grad when it wrapped the model: newly unfrozen ones
    would train on each rank's own gradients and the replicas drift apart. So DDP wraps the model again.
    FSDP2 re-reads `requires_grad` at every unshard; DeepSpeed is refused up front (check_combination)."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
        return
    old = strategy.model
    old.reducer._remove_autograd_hooks()  # its hooks would still all-reduce into the old buckets
    strategy.model = old.module
    strategy.configure_ddp()


def shard_model(strategy, model: nn.Module) -> nn.Module:
    """Let the strategy shard the freshly built model, if it is a sharding strategy."""
    shard = getattr(strategy, "shard_module", None)
    return shard(model) if shard else model


def _local_numel(t) -> int:
    if hasattr(t, "ds_tensor"):  # ZeRO-3: this rank's partition of the parameter
        return t.ds_tensor.numel()
    return t.to_local().numel() if hasattr(t, "to_local") else t.numel()


def _replicated(model: nn.Module) -> bool:
    """Whether every rank holds every parameter whole (DDP, ZeRO-1/2), so that all copies must be equal."""
    return not any(hasattr(p, "ds_tensor") or hasattr(p, "to_local") for p in model.parameters())


def sharding_stats(trainer, model: nn.Module) -> dict:
    """Per-rank element counts of parameters and optimizer state, and, where ranks hold replicas of the
    model, whether the replicas are still equal (collective: every rank calls it)."""
    params = sum(_local_numel(p) for p in model.parameters())
    state = 0
    for optimizer in trainer.optimizers:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
        for per_param in optimizer.state.values():
            state += sum(_local_numel(v) for v in per_param.values() if torch.is_tensor(v) and v.dim() > 0)
    device = trainer.strategy.root_device  # NCCL: no CPU tensors
    # a fingerprint of this rank's replica: any drift between ranks (a gradient never all-reduced) shows
    fingerprint = torch.zeros((), dtype=torch.float64, device=device)
    replicated = _replicated(model)
    if replicated:
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                for chunk in p.detach().reshape(-1).split(1 << 24):  # bounded temporaries for huge embeddings
                    chunk = chunk.double()
                    fingerprint += (i + 1) * (chunk.sum() + chunk.square().sum())
    row = torch.stack([torch.tensor(params, dtype=torch.float64, device=device),
                       torch.tensor(state, dtype=torch.float64, device=device), fingerprint])
    rows = trainer.strategy.all_gather(row).view(-1, 3).tolist()  # as is without a process group
    stats = {"param_numel_per_rank": [int(r[0]) for r in rows], "optimizer_state_numel_per_rank": [int(r[1]) for r in rows]}
    if replicated and len(rows) > 1:
        stats["replicas_in_sync"] = len({r[2] for r in rows}) == 1
        if not stats["replicas_in_sync"]:
            rank_zero_warn("ftlab: the ranks' copies of the model differ at the end of training: some gradients were "
                           "not averaged across ranks (please report this with your config)")
    return stats


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def reduce_dtype(strategy, model: nn.Module) -> str | None:
    """The dtype gradients are averaged across ranks in."""
    if isinstance(strategy, ModelParallelStrategy):
        mp = strategy.mixed_precision_policy() if isinstance(strategy, FSDP) else None
        if mp is not None and mp.reduce_dtype is not None:
            return _dtype_name(torch.empty(0, dtype=mp.reduce_dtype))
    if isinstance(strategy, DeepSpeedStrategy) and strategy.deepspeed_engine is not None:
        return _dtype_name(torch.empty(0, dtype=strategy.deepspeed_engine.communication_data_type))
    # DDP (and FSDP without a reduce dtype) reduce in the gradients' own dtype, the parameters'
    param = next((p for p in model.parameters() if p.requires_grad), None)
    return _dtype_name(param) if param is not None else None


def grads_dtype(trainer, optimizer) -> str | None:
    """The dtype of the gradients the optimizer is about to step on (call before the step)."""
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    if engine is not None:  # ZeRO keeps them in its own buffers, in the dtype it accumulates them in
        return _dtype_name(torch.empty(0, dtype=engine.get_data_types()[1]))
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return _dtype_name(grads[0]) if grads else None


def precision_report(trainer, model: nn.Module, optimizer, grads: str | None) -> dict[str, str]:
    """The dtypes a run actually trains in: the model's trainable parameters as stored, the parameters the
    optimizer updates (DeepSpeed: its fp32 master copy), their gradients (`grads`, from `grads_dtype`), the
    optimizer state, and the dtype gradients are reduced in across ranks. Call after an optimizer step."""
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
    # ZeRO-3 hands the torch optimizer its fp32 partitions only during the step
    stepped = [p for g in inner.param_groups for p in g["params"]] or list(
        getattr(optimizer, "fp32_partitioned_groups_flat", []))
    state = [v for per in inner.state.values() for v in per.values() if torch.is_tensor(v) and v.dim() > 0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    report = {
        "params": _dtype_name(trainable[0]) if trainable else None,
        "master_params": _dtype_name(stepped[0]) if stepped else None,
        "grads": grads,
        "optimizer_state": _dtype_name(state[0]) if state else None,
        "reduce": reduce_dtype(trainer.strategy, model) if torch.distributed.is_initialized() else None,
    }
    return {k: v for k, v in report.items() if v is not None}


def full_state_dict(trainer, model: nn.Module) -> dict | None:
    """The whole model's state dict on rank 0 (None elsewhere) when the strategy shards parameters;
    None everywhere when every rank already holds the full model. Collective under sharding."""
    if isinstance(trainer.strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if trainer.is_global_zero else None
    if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if trainer.is_global_zero:
                return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
        return None
    return None
