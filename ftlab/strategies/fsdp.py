"""FSDP2 (`fully_shard`, per-parameter DTensor sharding, as in torchtune/torchtitan) through Lightning's
`ModelParallelStrategy`: everything ftlab knows about it, from sharding the model to gathering it back."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ftlab.errors import ConfigError
from ftlab.policies.layers import find_parts


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


def full_state_dict(trainer, model: nn.Module) -> dict | None:
    """The whole model's state dict on rank 0 (None elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if trainer.is_global_zero else None
