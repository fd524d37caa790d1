"""The strategy layer: the one place that knows about devices, processes and sharding.

Strategy names follow Lightning's registry. Where ftlab gives a name its own meaning, it says so here:

- `fsdp` is PyTorch FSDP2 (`fully_shard`, per-parameter DTensor sharding, as in torchtune/torchtitan)
  through Lightning's `ModelParallelStrategy`: every transformer block is one shard unit, so are the input
  embeddings and an untied LM head, then the root; each rank loads only its shards (fsdp.load_sharded).
  FSDP2 runs on CPU (gloo) as well as GPU, so a laptop can debug a sharded config. Options:
  `--trainer.strategy ftlab.strategies.FSDP --trainer.strategy.sharding grad-op`.
- `deepspeed_stage_1`, `_2`, `_2_offload`, `_3`, `_3_offload` are Lightning's DeepSpeed ZeRO settings
  through `DeepSpeed`, a subclass that also runs on CPU (gloo); under ZeRO-3 the model is built partitioned
  by transformers' own DeepSpeed integration. On GPUs it behaves as Lightning's.
- `ddp` and every other name are Lightning's own.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ftlab import quantization
from ftlab.errors import ConfigError, did_you_mean
from ftlab.loading import load_model
from ftlab.strategies import ddp, deepspeed, fsdp
from ftlab.strategies.deepspeed import _DEEPSPEED_NAMES, DeepSpeed
from ftlab.strategies.fsdp import FSDP

__all__ = ["FSDP", "DeepSpeed", "check_combination", "check_resume", "checkpoint_kind", "evaluation_inference_mode",
           "follow_trainable_change", "grads_dtype", "precision_report", "resolve_strategy", "set_collective_timeout",
           "build_sharded", "settle_for_reading", "shard_model", "sharding_stats", "split_cpu_threads"]


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


def check_combination(strategy, module, training: bool = True) -> None:
    """Strategy x policy (x module option) combinations that cannot work, refused before anything loads; those
    of the optimizer and the training loop only when `training` (validate/test/predict use neither)."""
    if training:
        _check_training_combination(strategy, module)
    if isinstance(strategy, DeepSpeedStrategy) and module.compile_blocks:
        raise ConfigError("model.compile=true under DeepSpeed: ftlab compiles blocks under ddp and fsdp only (DeepSpeed "
                          "compiles through its own engine); use strategy ddp or fsdp, or compile: false")
    quantization.check_combination(module, strategy)


def _check_training_combination(strategy, module) -> None:
    policy = module.policy
    if isinstance(strategy, DeepSpeedStrategy) and module.skip_nonfinite_steps:
        raise ConfigError(f"model.skip_nonfinite_steps={module.skip_nonfinite_steps}: DeepSpeed cannot skip a step "
                          "(its engine always runs backward and step); use 0 with DeepSpeed, or strategy ddp/fsdp")
    if isinstance(strategy, DeepSpeedStrategy) and policy.changes_trainable_set:
        raise ConfigError("gradual unfreezing (policy.unfreeze_every) cannot run under DeepSpeed ZeRO, which fixes "
                          "its optimizer partitions at start; use strategy ddp or fsdp, or unfreeze_every: 0")
    optim = module.optim.name
    if isinstance(strategy, DeepSpeedStrategy) and optim in ("adamw_8bit", "adafactor"):
        why = ("ZeRO's checkpoint conversion (universal checkpoints, another world size) reads Adam's exp_avg and "
               "exp_avg_sq, which bitsandbytes' 8-bit state lacks") if optim == "adamw_8bit" else (
               "ZeRO flattens the parameters into 1-D partitions, where Adafactor cannot factor its second moment")
        raise ConfigError(f"model.optim.name={optim} under DeepSpeed: {why}; use adamw or sgd with DeepSpeed, or "
                          "strategy ddp")
    if isinstance(strategy, ModelParallelStrategy) and optim in ("adamw_8bit", "adafactor"):
        why = ("bitsandbytes' 8-bit kernels take plain tensors, not FSDP2's sharded DTensors" if optim == "adamw_8bit"
               else "transformers' Adafactor makes its factored state as plain full-shape tensors, which cannot "
                    "update FSDP2's sharded DTensors")
        raise ConfigError(f"model.optim.name={optim} under FSDP: {why}; use adamw or sgd with fsdp, or strategy ddp")


def evaluation_inference_mode(strategy, requested: bool) -> bool:
    """`trainer.inference_mode` as ftlab runs it: false under FSDP whatever the config says (as Lightning does for
    its own FSDP1 strategy). Lightning evaluates `validate`, `test` (the test after fit too) and `predict` under
    inference mode on NCCL (under no_grad on gloo, so CPU runs never show this; fit's own validation always
    under no_grad); FSDP2 on one rank cannot run a first forward under inference mode ("Inference tensors do
    not track version counter": `ftlab validate` of an fsdp config on one GPU). Older run configs hold
    `inference_mode: true` (Lightning's default, dumped whole): they keep running, with one line saying so."""
    if requested and isinstance(strategy, ModelParallelStrategy):
        rank_zero_info("ftlab: fsdp evaluates under no_grad (trainer.inference_mode=true is not used: FSDP2 cannot "
                       "gather parameters for a first forward under inference mode)")
        return False
    return bool(requested)


def checkpoint_kind(path: str) -> str:
    """`file` (Lightning: single device, DDP, FSDP full), `dcp` (FSDP sharded) or `deepspeed` (ZeRO)."""
    if os.path.isfile(path):
        return "file"
    if os.path.exists(os.path.join(path, ".metadata")):
        return "dcp"
    if os.path.isdir(os.path.join(path, "checkpoint")):
        return "deepspeed"
    raise ConfigError(f"ckpt_path={path!r} is not a checkpoint (file, FSDP folder or DeepSpeed folder)")


def check_resume(ckpt_path: str | None, checkpoint_dir: str, strategy, world_size: int, fitting: bool = True) -> None:
    """Refuse, before anything loads, a checkpoint the chosen strategy cannot resume from (`fitting`) or load
    to evaluate."""
    if ckpt_path in (None, "best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
        return
    path = os.path.join(checkpoint_dir, "last.ckpt") if ckpt_path == "last" else str(ckpt_path)
    if ckpt_path == "last" and not os.path.exists(path):
        return  # Lightning starts from scratch (and says so) when there is no last checkpoint yet
    if not os.path.exists(path):
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist; give a checkpoint file or folder, or 'last'")
    kind = checkpoint_kind(path)
    resume = "resume" if fitting else "load"
    fix = ("or export it (`python -m ftlab export --run ... --ckpt ...`) and "
           + ("fine-tune from the export" if fitting else "evaluate the export"))
    if kind == "dcp" and not isinstance(strategy, ModelParallelStrategy):
        raise ConfigError(f"ckpt_path={ckpt_path!r} is a sharded FSDP checkpoint: {resume} it with --trainer.strategy fsdp "
                          f"(any world size), {fix}; FSDP with state_dict_type: full writes checkpoints any strategy reads")
    if kind == "deepspeed":
        if not isinstance(strategy, DeepSpeedStrategy):
            raise ConfigError(f"ckpt_path={ckpt_path!r} is a DeepSpeed ZeRO checkpoint: {resume} it with the same "
                              f"deepspeed_stage_* strategy, {fix}")
        saved, stage3 = deepspeed.saved_world_size(path), deepspeed.saved_stage3(path)
        stage = strategy.config.get("zero_optimization", {}).get("stage", 0)
        if stage3 != (stage == 3):  # the other family's files: DeepSpeed finds none of its own (a bare assert)
            raise ConfigError(f"ckpt_path={ckpt_path!r} was written under ZeRO-{'3' if stage3 else '1/2'}, this run is "
                              f"ZeRO-{stage}: {resume} it with the stage it was written with, {fix}")
        if fitting and saved != world_size:  # ZeRO's own format is partitioned for its world size: load it as universal
            deepspeed.check_universal_resume(strategy, ckpt_path, path, saved, world_size, fix)
    if kind == "file" and isinstance(strategy, DeepSpeedStrategy) and not strategy.load_full_weights:
        raise ConfigError(f"ckpt_path={ckpt_path!r} is a single-file checkpoint, which DeepSpeed does not {resume}; "
                          f"{resume} it with ddp or fsdp, {fix}")


def resolve_strategy(strategy):
    """Strategy names whose meaning ftlab sets (see the module docstring) -> strategy objects; anything
    else goes to Lightning unchanged."""
    if isinstance(strategy, str) and "." in strategy:  # a class path given as a plain string, no options
        import importlib

        module, _, name = strategy.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)()
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"trainer.strategy={strategy!r}: no such strategy class ({err})") from None
    if isinstance(strategy, str):
        from lightning.pytorch.strategies import StrategyRegistry

        known = {"auto", "model_parallel", *StrategyRegistry.available_strategies()}
        if strategy not in known:
            raise ConfigError(f"trainer.strategy={strategy!r} is not a strategy; {did_you_mean(strategy, sorted(known))} "
                              "(or a class path such as ftlab.strategies.FSDP)")
    if isinstance(strategy, str) and strategy.startswith(("ddp_fork", "ddp_notebook")) and torch.cuda.is_available():
        # peft imports bitsandbytes, which initialises CUDA at import: a rank forked after that cannot use CUDA
        raise ConfigError(f"trainer.strategy={strategy}: forked ranks cannot use CUDA once ftlab's libraries have "
                          "initialised it (bitsandbytes does at import); use strategy ddp (or ddp_spawn)")
    if strategy == "fsdp":
        return FSDP()
    if isinstance(strategy, str) and strategy in _DEEPSPEED_NAMES:
        return DeepSpeed(**_DEEPSPEED_NAMES[strategy], model_sized_buffers=True)
    return strategy


def class_form(name: str) -> list[str] | None:
    """The command-line arguments that give a strategy named by `name` as its class, which takes options
    (a name takes none): fsdp -> ftlab.strategies.FSDP; deepspeed_stage_3 -> DeepSpeed with stage 3."""
    if name == "fsdp":
        return ["--trainer.strategy=ftlab.strategies.FSDP"]
    if name in _DEEPSPEED_NAMES:
        return ["--trainer.strategy=ftlab.strategies.DeepSpeed",
                *(f"--trainer.strategy.{k}={str(v).lower()}" for k, v in _DEEPSPEED_NAMES[name].items()),
                "--trainer.strategy.model_sized_buffers=true"]
    if name == "ddp":
        return ["--trainer.strategy=lightning.pytorch.strategies.DDPStrategy"]
    return None


def follow_trainable_change(strategy) -> None:
    """Called after parameters started training mid-run (gradual unfreezing): DDP must wrap the model again
    (see ddp.rewrap_after_trainable_change), FSDP2 settle its units' gradient dtypes again (see
    FSDP.follow_trainable_change); DeepSpeed is refused up front (check_combination)."""
    ddp.rewrap_after_trainable_change(strategy)
    if isinstance(strategy, FSDP):
        strategy.follow_trainable_change()


def settle_for_reading(strategy) -> None:
    """At the run's end, before its counts and its export read the model: FSDP's grad-op leaves units gathered
    after a last validation (see FSDP.reshard_model); the other strategies hold nothing transient."""
    if isinstance(strategy, FSDP):
        strategy.reshard_model()


def build_sharded(strategy, module, data) -> nn.Module:
    """The module's model, built, the policy applied and sharded as the strategy shards it. FSDP loads each
    rank's shards, ZeRO-3 each rank's partitions, straight from the checkpoint files; the others load the
    whole pretrained model on each rank."""
    quantization.check_combination(module, strategy)  # every subcommand (fit checks it up front too)
    if isinstance(strategy, FSDP) and module.quantization is not None:
        # bitsandbytes quantizes as the weights load: no weightless model to fill shard by shard
        rank_zero_info("ftlab: fsdp: every rank loads the whole pretrained model before sharding it (quantized)")
    elif isinstance(strategy, FSDP):
        model = fsdp.load_sharded(strategy, module, data)
        if model is not None:
            return model
    elif isinstance(strategy, DeepSpeed) and strategy.zero_stage_3 and module.quantization is None:
        from ftlab.policies.layers import find_parts

        # a new task head is all the checkpoint may lack (as fsdp.load_sharded)
        model = deepspeed.load_partitioned(strategy, lambda: module.model_from_config(data), module.name_or_path,
                                           module.gguf_file, module.revision,
                                           may_lack=lambda model, name: find_parts(model).is_head(name))
        if model is not None:
            return module.finish_model(model, data)
    model = module.build_model(data)
    if isinstance(strategy, DeepSpeedStrategy):
        deepspeed.keep_used_conversions(model)
    return shard_model(strategy, model)


def build_frozen(strategy, auto_class, path: str, gguf_file: str | None, dtype: torch.dtype,
                 revision: str | None = None, **options) -> nn.Module:
    """A frozen pretrained model beside the trained one (a distillation teacher, a preference reference: at
    `revision`, the trained model's), placed as the strategy places the student: FSDP shards it (each rank
    reading its own rows), ZeRO-3 partitions it (it loads inside the strategy's partitioned init, and
    deepspeed.initialize takes it with the LightningModule), DDP and ZeRO-1/2 replicate it. `options` are
    from_pretrained's model options the trained model has too (`attn_implementation`, `trust_remote_code`)."""
    if isinstance(strategy, FSDP):
        return fsdp.load_frozen(strategy, auto_class, path, gguf_file, dtype, revision, **options)
    extra = {"revision": revision} if revision else {}
    if isinstance(strategy, DeepSpeed) and strategy.zero_stage_3:
        from ftlab.loading import load_config

        trust = {k: v for k, v in options.items() if k == "trust_remote_code"}
        config = load_config(path, gguf_file, **extra, **trust)
        model = deepspeed.load_partitioned(strategy, lambda: auto_class.from_config(config, dtype=dtype, **options),
                                           path, gguf_file, revision)
        if model is not None:
            return model.eval().requires_grad_(False)
    return load_model(auto_class, path, gguf_file, dtype=dtype, **extra, **options).eval().requires_grad_(False)


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
    """Per-rank element counts of parameters and optimizer state, the optimizer state's bytes (every state tensor,
    8-bit ones included), and, where ranks hold replicas of the model, whether the replicas are still equal
    (collective: every rank calls it)."""
    params = sum(_local_numel(p) for p in model.parameters())
    state = state_bytes = 0
    for optimizer in trainer.optimizers:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
        for per_param in optimizer.state.values():
            state += sum(_local_numel(v) for v in per_param.values() if torch.is_tensor(v) and v.dim() > 0)
            state_bytes += sum(_local_numel(v) * v.element_size() for v in per_param.values() if torch.is_tensor(v))
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
                       torch.tensor(state, dtype=torch.float64, device=device), fingerprint,
                       torch.tensor(state_bytes, dtype=torch.float64, device=device)])
    rows = trainer.strategy.all_gather(row).view(-1, 4).tolist()  # as is without a process group
    stats = {"param_numel_per_rank": [int(r[0]) for r in rows], "optimizer_state_numel_per_rank": [int(r[1]) for r in rows],
             "optimizer_state_bytes_per_rank": [int(r[3]) for r in rows]}
    if replicated and len(rows) > 1:
        stats["replicas_in_sync"] = len({r[2] for r in rows}) == 1
        if not stats["replicas_in_sync"]:
            rank_zero_warn("ftlab: the ranks' copies of the model differ at the end of training: some gradients were "
                           "not averaged across ranks (please report this with your config)")
    return stats


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _dtypes_name(tensors) -> str | None:
    """The dtype of every tensor, or each of them joined by "+" where they differ (a trained head left in bf16
    beside fp32 LoRA matrices: one tensor alone would not show it)."""
    return "+".join(sorted({_dtype_name(t) for t in tensors})) or None


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
    return _dtypes_name(grads)


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
        "params": _dtypes_name(trainable),
        "master_params": _dtypes_name(stepped),
        "grads": grads,
        "optimizer_state": _dtype_name(state[0]) if state else None,
        "reduce": reduce_dtype(trainer.strategy, model) if torch.distributed.is_initialized() else None,
    }
    return {k: v for k, v in report.items() if v is not None}
