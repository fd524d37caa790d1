"""Per-device memory of a training run: parameters, gradients and optimizer state from the policy-applied
model's shapes and the strategy's sharding rules; activations from a probe.

Sharding rules (per rank of W), as each strategy lays tensors out:
- DDP: everything replicated.
- FSDP2 (`fully_shard`): every parameter split on dim 0 into ceil(d0 / W)-row chunks; gradients and AdamW
  state follow the parameter shards.
- ZeRO-1/2: parameters replicated; the optimizer's fp32 state (and, at stage 2, gradients) of each
  parameter group flattened, padded to a multiple of 2W (DeepSpeed's alignment) and split evenly.
- ZeRO-3: each parameter split into ceil(numel / W) elements; gradients and state follow.

Activations: what autograd saves for backward depends on the architecture, the attention kernel and the
policy (a frozen block below every trainable weight saves nothing). Rather than a per-architecture
formula, a probe runs the real architecture with 1 and then 2 blocks (random weights, batch 1, the
configured length, the policy applied) and records the saved tensors; everything saved scales with the
batch, so the total is (base + blocks x per-block) x batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32


@dataclass
class TensorBytes:
    """Per-rank bytes of one kind of state, and its element count."""

    numel: int
    bytes: int


@dataclass
class MemoryEstimate:
    strategy: str
    world_size: int
    params: TensorBytes
    grads: TensorBytes
    optimizer: TensorBytes
    activations_bytes: int
    total_params: int
    trainable_params: int

    @property
    def total_bytes(self) -> int:
        return self.params.bytes + self.grads.bytes + self.optimizer.bytes + self.activations_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _fsdp_local(numel: int, shape: torch.Size, world: int, rank: int) -> int:
    if not shape:
        return numel if rank == 0 else 0
    rows = shape[0]
    chunk = math.ceil(rows / world)
    return max(0, min(chunk, rows - rank * chunk)) * (numel // rows if rows else 0)


def state_per_rank(model: nn.Module, group_sizes: list[int], strategy: str, world: int, rank: int = 0,
                   param_bytes: int = 4, grad_bytes: int | None = None) -> tuple[TensorBytes, TensorBytes, TensorBytes]:
    """(parameters, gradients, optimizer state) held by `rank` (rank 0 holds the most). `group_sizes`:
    elements of each optimizer parameter group (ZeRO-1/2 pad each group's flat buffer on its own)."""
    grad_bytes = grad_bytes or param_bytes
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    total = sum(p.numel() for _, p in named)
    train = sum(p.numel() for _, p in trainable)
    if strategy == "fsdp":
        params = sum(_fsdp_local(p.numel(), p.shape, world, rank) for _, p in named)
        grads = sum(_fsdp_local(p.numel(), p.shape, world, rank) for _, p in trainable)
        opt = ADAM_STATES * grads
    elif strategy == "deepspeed_stage_3":
        params = sum(math.ceil(p.numel() / world) for _, p in named)
        grads = sum(math.ceil(p.numel() / world) for _, p in trainable)
        opt = ADAM_STATES * grads
    elif strategy in ("deepspeed_stage_1", "deepspeed_stage_2"):
        partition = sum(math.ceil(g / (2 * world)) * 2 for g in group_sizes)
        params, opt = total, ADAM_STATES * partition
        grads = partition if strategy == "deepspeed_stage_2" else train
    else:  # ddp, single device
        params, grads, opt = total, train, ADAM_STATES * train
    return (TensorBytes(params, params * param_bytes), TensorBytes(grads, grads * grad_bytes),
            TensorBytes(opt, opt * 4))


# ---- activations
def saved_activation_bytes(model: nn.Module, fn) -> tuple[int, object]:
    """Bytes of the tensors autograd saves for backward while `fn()` runs, and of the tensors fn returns
    (each storage once, the parameters not at all); and fn's result (which keeps them alive)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.device.type != "meta":
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    # the outputs live until the step ends too: an LM's logits (batch x length x vocab) are as large as
    # several blocks' activations
    values = out.values() if hasattr(out, "values") else [out]
    for t in values:
        if isinstance(t, torch.Tensor):
            pack(t)
    return sum(seen.values()), out


def probe_batch(task, config, batch_size: int, seq_len: int, target_len: int) -> dict:
    """A synthetic batch of the task's shape (token ids drawn at random)."""
    vocab = max(int(getattr(config, "vocab_size", 0) or 1000), 8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab - 1, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    name = getattr(getattr(task, "student", None), "name", task.name)
    if name == "sequence-classification":
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long)
    elif name == "token-classification":
        batch["labels"] = torch.zeros_like(ids)
    elif name == "seq2seq":
        batch["labels"] = torch.randint(5, vocab - 1, (batch_size, target_len), generator=g)
    elif getattr(task, "objective", None) == "mlm":
        batch["labels"] = torch.where(torch.rand(ids.shape, generator=g) < task.mlm_probability, ids, -100)
    else:
        batch["labels"] = ids.clone()
    return batch


def with_blocks(config, n: int):
    """A copy of a model config with n transformer blocks (encoder and decoder, for seq2seq)."""
    config = config.__class__.from_dict(config.to_dict())
    for key in ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, n)
    return config


def count_blocks(config) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 1


def _probe_policy(policy, blocks: int):
    """The run's policy for a probe of `blocks` blocks: a Freeze that trains top blocks trains them all
    (the blocks below the lowest trainable one save nothing and are not counted)."""
    from ftlab.policies import Freeze

    policy = copy.copy(policy)
    if isinstance(policy, Freeze) and (policy.top_k_layers or policy.unfreeze_every):
        policy.top_k_layers = policy._unfrozen = blocks
    return policy


def blocks_with_activations(policy, n_blocks: int) -> int:
    """Blocks that keep activations for backward: every block at or above the lowest trainable one (the
    most, for gradual unfreezing)."""
    from ftlab.policies import Freeze

    if not isinstance(policy, Freeze) or policy.trainable:
        return n_blocks
    if policy.unfreeze_every:
        return n_blocks if policy.unfreeze_max_layers is None else min(n_blocks, policy.unfreeze_max_layers)
    return policy.top_k_layers


def activation_bytes(module, config, batch_size: int, seq_len: int, target_len: int,
                     dtype: torch.dtype = torch.float32) -> int:
    """Activations a training step keeps for backward, per device: probes with 1 and 2 blocks give the
    cost outside the blocks and per block (batch 1), scaled to the run's blocks and batch."""
    # a distillation teacher runs without gradients: it keeps nothing for backward; the student's task runs
    task = getattr(module.task, "student", module.task)
    measured = []
    for blocks in (1, 2):
        torch.manual_seed(0)
        model = task.auto_class.from_config(with_blocks(config, blocks), dtype=dtype)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = 0
        model = _probe_policy(module.policy, blocks).apply(model.train(), task)
        batch = probe_batch(task, config, 1, seq_len, target_len)  # (masked-LM labels included)
        nbytes, _ = saved_activation_bytes(model, lambda m=model, b=batch: task.forward(m, b))
        measured.append(nbytes)
    per_block = max(measured[1] - measured[0], 0)
    outside = max(measured[0] - per_block, 0)
    trained = blocks_with_activations(module.policy, count_blocks(config))
    return batch_size * (outside + trained * per_block)
