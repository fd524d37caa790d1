"""FSDP2 (`fully_shard`, per-parameter DTensor sharding, as in torchtune/torchtitan) through Lightning's
`ModelParallelStrategy`: everything ftlab knows about it, from sharding the model to gathering it back."""

from __future__ import annotations

import atexit
import os
from typing import Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ftlab.console import WorkProgress
from ftlab.errors import ConfigError
from ftlab.policies.layers import find_parts

OFFLOAD_BACKEND = "cuda:nccl,cpu:gloo"


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
            activation_checkpointing: Recompute each block's activations in backward (less memory); the
                same as `model.activation_checkpointing`, which works under every strategy.
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
        if self._process_group_backend == OFFLOAD_BACKEND:
            # Lightning tears down only a plain "nccl" group at exit (NCCL warns of one left undestroyed)
            atexit.register(_destroy_process_group)

    @property
    def offloads(self) -> bool:
        """cpu_offload in effect: on an accelerator (CPU ranks hold their parameters in host memory anyway)."""
        return self.cpu_offload and self.root_device.type != "cpu"

    def _get_process_group_backend(self) -> str:
        backend = super()._get_process_group_backend()
        # Offloaded shards and their gradients live on the host: the gradient norm (clipping, the logged norm)
        # all-reduces host tensors, which NCCL refuses ("No backend type associated with device type cpu").
        # gloo takes the host's collectives, NCCL the device's (as torchtitan and torchtune do for offload).
        return OFFLOAD_BACKEND if self.offloads and backend == "nccl" else backend

    def reshard_model(self) -> None:
        """Every unit back to its shards (local, no collective). grad-op leaves a unit gathered after a forward
        that no backward follows (a validation at the end of training) until the next backward, which at the
        end of a fit never comes: the end-of-run counts and the export read the model here."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def follow_trainable_change(self) -> None:
        """After parameters started training mid-run (gradual unfreezing). FSDP2 re-reads `requires_grad` at
        every unshard, but settles a unit's gradient dtypes (the one its trained parameters are stored in, the
        one it reduces in) once, at its first forward, from the parameters training then: a unit wholly frozen
        then keeps none. Under bf16-mixed its newly trained fp32 shards then got bf16 gradients, reduced in
        bf16 and never cast back, and the first backward failed ("assign a gradient with dtype BFloat16 to a
        tensor with grad_dtype Float"). torch has no public call for this; its lazy init's own step (meant to
        run again when parameters change) is used here."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
            if group is not None:
                group._init_mp_dtypes()

    def model_to_device(self) -> None:
        if not self.offloads:
            return super().model_to_device()
        from torch.distributed.tensor import DTensor

        # FSDP keeps offloaded shards on the host and copies each to the device as it gathers it; the whole
        # module's .to(device) put them on the device, and FSDP refused them at the first forward. The rest
        # (metric states, buffers, what FSDP does not manage) moves as usual.
        self.model._apply(lambda t: t if isinstance(t, DTensor) else t.to(self.root_device))
        self.lightning_module._device = self.root_device  # what .to() records (module.device)

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

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """Gradual unfreezing: the parameters unfrozen when the checkpoint was written train again first (FSDP's
        loads restore the optimizer state of training parameters only: those unfrozen since were left at none).
        Checkpoints leave frozen weights out (checkpoints.leave_frozen_out). A sharded one loads as it is (the
        model's state dict names what to read, and frozen weights are not among its names); a full file
        Lightning loads parameter by parameter, failing strict on the first one absent: its names are checked
        here instead (every trained weight there, nothing unknown), then it loads leniently."""
        path = self.broadcast(str(checkpoint_path))
        module = self.lightning_module
        # Lightning's metadata file beside the shards, or the full file (memory-mapped: no tensor is read)
        meta = torch.load(os.path.join(path, "meta.pt") if os.path.isdir(path) else path, map_location="cpu",
                          mmap=True, weights_only=True)
        if module.trainer.state.fn == "fit" and hasattr(module, "restore_trainable_set"):
            module.restore_trainable_set(meta)
        if not os.path.isfile(path) or not module.strict_loading:
            return super().load_checkpoint(checkpoint_path, weights_only)
        saved, expected = set(meta["state_dict"]), set(module.state_dict())
        known = {n for n, _ in module.named_parameters(remove_duplicate=False)} | expected
        missing, unexpected = sorted(expected - saved), sorted(saved - known)
        if missing or unexpected:
            raise ConfigError(f"ckpt_path={checkpoint_path}: the checkpoint does not match this run's model: missing "
                              f"trained weights {missing[:3]}, unexpected {unexpected[:3]}; was it written by this config?")
        module.strict_loading = False
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            module.strict_loading = True

    def shard_module(self, model: nn.Module, frozen: bool = False) -> nn.Module:
        """Apply fully_shard to each transformer block, then to the root (called from configure_model).
        `frozen`: a model that only runs forward, without gradients (a distillation teacher): resharded after
        every forward whatever `sharding` says (grad-op leaves reshards to a backward it never has: the
        whole model would stay gathered on every device), and not checkpointed (nothing to recompute)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        parts = find_parts(model)
        if parts.block_class is None:
            raise ConfigError("fsdp: no list of transformer blocks was found in this model to shard by; "
                              "use strategy ddp or deepspeed_stage_2")
        if self.activation_checkpointing and not frozen:  # the same as model.activation_checkpointing, which works everywhere
            from ftlab.compute import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        offload = self.offloads
        if self.cpu_offload and not offload:
            # the same config must run on a laptop: on CPU ranks the parameters already live in host
            # memory (and torch's offload policy needs an accelerator)
            rank_zero_info("ftlab: fsdp cpu_offload has no effect on CPU ranks; ignored")
        kwargs = {
            "mesh": self._mesh(),
            "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
            "mp_policy": self.mixed_precision_policy(),
        }
        # `full` leaves it to torch: every unit resharded after forward except the root, whose parameters
        # backward needs at once (a tied embedding lives there). Passing True turns that exception off (torch
        # 2.13: the root gathered again in backward, 0.93x a plain FSDP2 loop on a tied-embedding Llama).
        # A frozen model has no backward to reshard it: every unit, the root included, reshards after forward.
        if frozen or self.sharding == "grad-op":
            kwargs["reshard_after_forward"] = frozen
        for module in model.modules():
            if isinstance(module, parts.block_class):
                fully_shard(module, **kwargs)
        # a chunked loss calls the head once per chunk: as a unit of its own it would be gathered (and, in
        # backward, again) in each call; in the root it is gathered once for all chunks (tasks/chunked_loss.py)
        chunked = getattr(self.lightning_module, "loss_chunk_size", 0) > 0
        for module in _embedding_units(model, keep_head_in_root=chunked):
            fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        return model


def _embedding_units(model: nn.Module, keep_head_in_root: bool = False) -> list[nn.Module]:
    """The input embeddings and the LM head as shard units of their own: left in the root unit they stay
    gathered through forward and backward (2.1B parameters of a 70B Llama). Tied ones share a weight that
    two units cannot both own: they stay in the root; so does the head where `keep_head_in_root`."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    inputs = get_in() if get_in else None
    outputs = get_out() if get_out else None
    if inputs is not None and outputs is not None and any(a is b for a in inputs.parameters()
                                                          for b in outputs.parameters()):
        return []
    units = [m for m in (inputs, outputs if not keep_head_in_root else None) if isinstance(m, nn.Module)]
    # nor a weight another module holds too (T5's encoder and decoder embed_tokens share `shared`'s): the
    # unit's sharded parameter would replace it in the unit only, and the others would keep a copy of their own
    return [m for m in units if not _held_elsewhere(model, m)]


def _held_elsewhere(model: nn.Module, unit: nn.Module) -> bool:
    """Whether a module outside `unit` holds one of `unit`'s parameters itself."""
    inside = {id(m) for m in unit.modules()}
    own = {id(p) for p in unit.parameters()}
    return any(id(p) in own for m in model.modules() if id(m) not in inside for p in m._parameters.values()
               if p is not None)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """The dim-0 rows of the full tensor that this rank's shard of `t` holds."""
    if not hasattr(t, "to_local") or t.dim() == 0:
        return 0, t.shape[0] if t.dim() else 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0], offset[0] + shape[0]


def _materialize_on_host(model: nn.Module, names: list[str]) -> None:
    """Give the named meta parameters and buffers real (uninitialised) host storage."""
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        new = torch.empty_like(old, device="cpu")
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(attr, new, persistent=attr not in owner._non_persistent_buffers_set)


def load_sharded(strategy: FSDP, module, data) -> nn.Module | None:
    """The model with the policy applied, sharded, each rank holding only its shards from the start: built
    on the meta device, sharded, then each rank reads its own rows of every pretrained tensor from the
    memory-mapped safetensors files. No rank ever holds the whole model.

    What the checkpoint lacks (a new task head, non-persistent buffers such as rotary frequencies) is
    initialised on the host by transformers' own initialisation, and what the policy creates (LoRA
    matrices) by the policy's, the same values on every rank. Returns None where this cannot be done
    (no safetensors, checkpoint names that transformers would convert, a policy whose new weights are
    computed from the loaded ones): the caller then loads whole weights on each rank, as other strategies do.
    """
    from ftlab.loading import PretrainedWeights, adopt_generation_config
    from ftlab.policies.layers import find_parts

    def whole(reason: str) -> None:
        rank_zero_info(f"ftlab: fsdp: every rank loads the whole pretrained model before sharding it ({reason})")

    blocker = module.policy.meta_init_blocker()
    if blocker:
        return whole(blocker)
    model = module.empty_model(data)
    weights = PretrainedWeights.find(module.name_or_path, module.gguf_file, module.revision,
                                     getattr(model, "base_model_prefix", ""))
    if weights is None:
        return whole("its weights are not in safetensors files")
    if getattr(model.config, "quantization_config", None):
        return whole("a quantized checkpoint")
    parts = find_parts(model)
    source = {n: weights.key(n) for n, _ in model.named_parameters()}
    lacking = [n for n, key in source.items() if key is None]
    if any(not parts.is_head(n) for n in lacking):
        return whole(f"the checkpoint names its weights otherwise, e.g. it has no {next(n for n in lacking if not parts.is_head(n))}")
    unfit = next((key for key in source.values() if key is not None and not weights.floating(key)), None)
    if unfit:  # quantized values need their scales (transformers' quantizers apply them)
        return whole(f"{unfit} is stored as {weights.dtype(unfit)}")
    buffers = {n: weights.key(n) for n, _ in model.named_buffers()}
    # Initialised from the global RNG (seeded alike on every rank), drawing what from_pretrained and the
    # policy would draw, in their order: the same values as when every rank loads the whole model.
    _materialize_on_host(model, lacking + [n for n, key in buffers.items() if key is None])
    for name, p in model.named_parameters():
        if source[name] is not None:
            p._is_hf_initialized = True  # transformers initialises only what is not marked
    model.initialize_weights()
    pretrained_ids = {id(p): source[n] for n, p in model.named_parameters() if source[n] is not None}
    rng = torch.get_rng_state()
    model = module.finish_model(model, data)  # the policy, on the meta model (peft draws values it then drops)
    after = torch.get_rng_state()
    created = [n for n, p in model.named_parameters() if p.is_meta and id(p) not in pretrained_ids]
    copies = module.policy.copied_params(created)
    torch.set_rng_state(rng)  # the policy's draws again, kept this time
    initial = module.policy.initial_values(model, [n for n in created if n not in copies])
    torch.set_rng_state(after)
    unknown = sorted(set(created) - set(initial) - set(copies))
    if unknown:
        raise RuntimeError(f"ftlab: fsdp: the policy created parameters it gives no initial values for: {unknown[:5]}")
    from_checkpoint = {n: pretrained_ids[id(p)] for n, p in model.named_parameters() if id(p) in pretrained_ids}
    from_checkpoint.update({n: key for n, key in buffers.items() if key is not None})

    _shard_and_fill(strategy, model, weights, from_checkpoint, initial, copies)
    adopt_generation_config(model, weights.folder)
    rank_zero_info(f"ftlab: fsdp: each rank read only its shards of the pretrained weights ({len(from_checkpoint)} "
                   f"tensors; {len(lacking) + len(created)} new ones initialised)")
    return model


def _shard_and_fill(strategy: FSDP, model: nn.Module, weights, from_checkpoint: dict[str, str],
                    initial: dict[str, torch.Tensor] | None = None, copies: dict[str, str] | None = None,
                    frozen: bool = False) -> None:
    """Shard the meta model, then give each rank's shards their values: tensors already on the host (new
    heads, buffers) are sliced, checkpoint tensors read by rows, policy-created ones taken from `initial`."""
    initial, copies = initial or {}, copies or {}
    strategy.shard_module(model, frozen=frozen)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    on_host = {n: _local(t).detach().clone() for n, t in tensors.items() if not t.is_meta}
    # Offloaded shards live on the host: materialised there (FSDP pins them as it takes them back), they never
    # pass through the device, where the rank's whole share of the model may not fit (torchtitan does the
    # same). Buffers follow to the device in FSDP.model_to_device.
    model.to_empty(device="cpu" if strategy.offloads else strategy.root_device)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    progress = WorkProgress("fsdp: each rank loading its shards", len(tensors), "tensors", "in rank 0's shards")
    with torch.no_grad():
        for name, t in tensors.items():
            local = _local(t)
            start, stop = _rows(t)
            name = copies.get(name, name)  # a copy starts as its original (sharded alike: the same rows)
            if name in on_host:
                value = on_host[name]
            elif name in from_checkpoint:
                value = weights.read(from_checkpoint[name], start, stop)
            elif name in initial:
                value = initial[name][start:stop] if t.dim() else initial[name]
            else:
                raise RuntimeError(f"ftlab: fsdp: {name} was neither loaded nor initialised")
            local.copy_(value)
            if name in from_checkpoint:  # else a rank ends up holding its shards twice (+0.68 GB a rank: 358M, fp32)
                weights.release()
            progress.advance(1, local.numel() * local.element_size())


def load_frozen(strategy: FSDP, auto_class, path: str, gguf_file: str | None, dtype: torch.dtype,
                revision: str | None = None, **options) -> nn.Module:
    """A frozen pretrained model (a distillation teacher) sharded as the student is, each rank reading only
    its rows of the checkpoint: replicated, a 70B teacher would not fit beside a sharded student. Falls
    back to a whole load on each rank, sharded afterwards, where the weights are not plain safetensors."""
    from ftlab.loading import PretrainedWeights, adopt_generation_config, load_config, load_model

    extra = {"revision": revision} if revision else {}
    trust = {k: v for k, v in options.items() if k == "trust_remote_code"}
    with torch.device("meta"):
        model = auto_class.from_config(load_config(path, gguf_file, **extra, **trust), dtype=dtype, **options)
    weights = PretrainedWeights.find(path, gguf_file, revision, getattr(model, "base_model_prefix", ""))
    source = {n: weights.key(n) for n, _ in model.named_parameters()} if weights else {}
    if weights is None or None in source.values() or not all(map(weights.floating, source.values())) or \
            getattr(model.config, "quantization_config", None):
        rank_zero_info(f"ftlab: fsdp: every rank loads the whole of {path} before sharding it (not plain safetensors)")
        model = load_model(auto_class, path, gguf_file, dtype=dtype, **extra, **options).eval().requires_grad_(False)
        return strategy.shard_module(model, frozen=True)
    buffers = {n: weights.key(n) for n, _ in model.named_buffers()}
    _materialize_on_host(model, [n for n, key in buffers.items() if key is None])
    for p in model.parameters():
        p._is_hf_initialized = True
    model.initialize_weights()  # computes what no checkpoint holds (rotary frequencies)
    model.eval().requires_grad_(False)
    from_checkpoint = {**source, **{n: key for n, key in buffers.items() if key is not None}}
    _shard_and_fill(strategy, model, weights, from_checkpoint, frozen=True)
    adopt_generation_config(model, weights.folder)
    local = sum(_local(p).numel() for p in model.parameters())
    rank_zero_info(f"ftlab: fsdp: {path} sharded, frozen: rank 0 read and holds {local:,} of "
                   f"{sum(p.numel() for p in model.parameters()):,} parameters")
    return model


def iter_full_state(trainer, model: nn.Module, blocks=None):
    """The model's full tensors, one block (default: one module's own parameters and buffers) at a time, in
    state-dict order: yields (block, {state-dict name: full tensor in host memory}) on rank 0 and (block, None)
    elsewhere. Collective (each parameter is all-gathered): every rank iterates to the end, in lockstep. A
    rank holds one gathered parameter at a time on its device; rank 0 holds one block in host memory."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from ftlab.export import state_blocks

    for module in model.modules():
        if isinstance(module, FSDPModule):
            # grad-op leaves parameters gathered after a forward (bf16-mixed: in bf16): export the fp32 shards
            module.reshard()
    rank0 = trainer.is_global_zero
    for block in state_blocks(model) if blocks is None else blocks:
        state = {}
        with torch.no_grad():
            for name, tensor in block.tensors().items():
                fresh = False
                if isinstance(tensor, DTensor):
                    # shards offloaded to the host go to the device first: NCCL gathers device tensors only
                    sharded = tensor.to(tensor.device_mesh.device_type)
                    tensor = sharded.full_tensor()
                    # a gather is new memory: on the host, keep it instead of copying it (rank 0 held an LM head
                    # twice); a mesh that gathers nothing hands back the live shard, which is copied as before
                    fresh = tensor.untyped_storage().data_ptr() != sharded.to_local().untyped_storage().data_ptr()
                if rank0:
                    state[name] = tensor.detach().to("cpu", copy=not fresh)
        yield block, state if rank0 else None
