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

import contextlib
import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ftlab.optim import MATRIX_MIN_8BIT_SIZE

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
    activations_bytes: int  # kept for backward at the end of the forward
    total_params: int
    trainable_params: int
    activation_peak_bytes: int = 0  # the step's activation peak (forward and backward), beyond the gradients
    # a frozen model beside the trained one (a distillation teacher, a preference reference copy), per rank
    frozen: TensorBytes = field(default_factory=lambda: TensorBytes(0, 0))

    @property
    def total_bytes(self) -> int:
        """The step's peak: the state plus the activations at their peak."""
        return self.params.bytes + self.grads.bytes + self.optimizer.bytes + self.frozen.bytes + max(
            self.activations_bytes, self.activation_peak_bytes)

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _fsdp_local(numel: int, shape: torch.Size, world: int, rank: int) -> int:
    if not shape:
        return numel if rank == 0 else 0
    rows = shape[0]
    chunk = math.ceil(rows / world)
    return max(0, min(chunk, rows - rank * chunk)) * (numel // rows if rows else 0)


def adamw_8bit_state_bytes(numel: int, matrix: bool) -> int:
    """ftlab's AdamW8bit state of one tensor: two uint8 moments with an fp32 scale per 256-element block;
    matrices under 256 elements and 1-D tensors under 4,096 keep two fp32 moments (ftlab.optim.AdamW8bit)."""
    if numel < (MATRIX_MIN_8BIT_SIZE if matrix else 4096):
        return ADAM_STATES * 4 * numel
    return ADAM_STATES * (numel + 4 * math.ceil(numel / 256))


def quantized_weight_bytes(numel: int, bits: int, double_quant: bool, out_features: int) -> int:
    """Bytes of one bitsandbytes weight of `numel` values and its quantization state. 4-bit: two values a
    byte, one scale per 64-value block (fp32; double quantization: uint8, with an fp32 scale per 256 of them),
    the lookup tables (16 + 256 fp32). 8-bit (LLM.int8): a byte a value and an fp32 scale per row."""
    if bits == 8:
        return numel + 4 * out_features
    blocks = math.ceil(numel / 64)
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales + 4 * 16


def state_per_rank(model: nn.Module, group_sizes: list[int], strategy: str, world: int, rank: int = 0,
                   param_bytes: int = 4, grad_bytes: int | None = None, optimizer: str = "adamw",
                   weight_bytes: dict[int, int] | None = None) -> tuple[TensorBytes, TensorBytes, TensorBytes]:
    """(parameters, gradients, optimizer state) held by `rank` (rank 0 holds the most). `group_sizes`:
    elements of each optimizer parameter group (ZeRO-1/2 pad each group's flat buffer on its own).
    `optimizer`: adamw (two fp32 moments an element) or adamw_8bit (`adamw_8bit_state_bytes` per tensor).
    `weight_bytes`: id(parameter) -> its whole bytes, for parameters not stored at `param_bytes` an element
    (QLoRA's quantized weights); a rank holds its share of them."""
    grad_bytes = grad_bytes or param_bytes
    weight_bytes = weight_bytes or {}
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    train = sum(p.numel() for _, p in trainable)
    if strategy == "fsdp":
        local = {id(p): _fsdp_local(p.numel(), p.shape, world, rank) for _, p in named}
    elif strategy == "deepspeed_stage_3":
        local = {id(p): math.ceil(p.numel() / world) for _, p in named}
    else:  # replicated parameters
        local = {id(p): p.numel() for _, p in named}
    params = sum(local.values())
    param_total = sum(weight_bytes[id(p)] * local[id(p)] // max(p.numel(), 1) if id(p) in weight_bytes
                      else local[id(p)] * param_bytes for _, p in named)
    if strategy in ("deepspeed_stage_1", "deepspeed_stage_2"):
        # one flat fp32 partition per group
        partitions = [math.ceil(g / (2 * world)) * 2 for g in group_sizes]
        grads = sum(partitions) if strategy == "deepspeed_stage_2" else train
        states = partitions
    elif strategy in ("fsdp", "deepspeed_stage_3"):
        states = [local[id(p)] for _, p in trainable]
        grads = sum(states)
    else:  # ddp, single device
        states = [p.numel() for _, p in trainable]
        grads = train
    opt = ADAM_STATES * sum(states)
    if optimizer == "adamw_8bit":  # a run refuses it under ZeRO, whose flat partitions are 1-D
        matrices = [p.ndim >= 2 for _, p in trainable] if len(states) == len(trainable) else [False] * len(states)
        opt_bytes = sum(adamw_8bit_state_bytes(n, m) for n, m in zip(states, matrices))
    else:
        opt_bytes = opt * 4
    return (TensorBytes(params, param_total), TensorBytes(grads, grads * grad_bytes), TensorBytes(opt, opt_bytes))


# ---- activations
def _storage_id(t: torch.Tensor) -> int:
    """One storage, whatever the view, for real and fake (shape-only) tensors alike."""
    return t.untyped_storage()._cdata


def saved_activation_bytes(model: nn.Module, fn) -> tuple[int, object]:
    """Bytes of the tensors autograd saves for backward while `fn()` runs, and of the tensors fn returns
    (each storage once, the parameters not at all); and fn's result (which keeps them alive)."""
    params = {_storage_id(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = _storage_id(t)
        if key not in params:
            seen.setdefault(key, t.untyped_storage().nbytes())
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


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors that ops make while it is on and that are still alive, after each op, and their
    peak: a step's memory as its device allocator would see it (each storage once; `exclude`: storages that
    existed before, such as the parameters, which views of them must not count again)."""

    def __init__(self, exclude: set[int], params: list[torch.Tensor] = ()):
        super().__init__()
        self.exclude = exclude
        self.params = list(params)  # their gradients, once made, are the gradients' memory: not counted here
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = _storage_id(t)
                if key not in self.exclude and key not in self.live:
                    self.live[key] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        grads = {_storage_id(p.grad) for p in self.params if p.grad is not None}
        self.peak = max(self.peak, sum(n for k, (_, n) in self.live.items() if k not in grads))
        return out


@dataclass
class Activations:
    """Activation bytes of a training step: what it keeps for backward at the end of the forward (saved
    tensors and outputs), and its peak over forward and backward beyond the gradients (the loss's backward,
    blocks recomputed under activation checkpointing, chunks of a chunked loss)."""

    kept: int
    peak: int


def step_activations(model: nn.Module, task, batch: dict) -> Activations:
    """One training step's forward, loss and backward on `model`, measured (the outputs dropped before
    backward, as a training step returns only its loss)."""
    before = {_storage_id(t) for t in (*model.parameters(), *model.buffers())}
    live = LiveBytes(before, [p for p in model.parameters() if p.requires_grad])
    with live:
        kept, outputs = saved_activation_bytes(model, lambda: task.forward(model, batch))
        loss = task.loss(outputs, batch)
        del outputs
        loss.backward()
    return Activations(kept, max(live.peak, kept))


def probe_batch(task, config, batch_size: int, seq_len: int, target_len: int, layout: str = "padded") -> dict:
    """A synthetic batch of the task's shape (token ids drawn at random), laid out as the run's batches are,
    since that decides the attention path (`batch_layout`): `padded` rows end in one padding token (a mask is
    materialised, and grouped KV heads are repeated for SDPA); `packed` rows hold two examples each
    (position_ids, no attention mask: transformers builds a block-diagonal mask); `full` rows have neither
    (no mask: SDPA's causal kernel with grouped heads as they are; on fake tensors transformers cannot see
    that the positions are not packed and takes the masked path)."""
    vocab = max(int(getattr(config, "vocab_size", 0) or 1000), 8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab - 1, (batch_size, seq_len), generator=g)
    name = getattr(getattr(task, "student", None), "name", task.name)
    if layout == "packed":
        half = seq_len // 2
        positions = torch.cat([torch.arange(half), torch.arange(seq_len - half)]).expand(batch_size, -1)
        batch = {"input_ids": ids, "position_ids": positions.contiguous()}
    elif layout == "padded":
        mask = torch.ones_like(ids)
        mask[:, -1] = 0 if seq_len > 1 else 1
        batch = {"input_ids": ids, "attention_mask": mask}
    else:
        batch = {"input_ids": ids}
    if name == "sequence-classification":
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long)
    elif name == "token-classification":
        batch["labels"] = torch.zeros_like(ids)
    elif name == "seq2seq":
        batch["labels"] = torch.randint(5, vocab - 1, (batch_size, target_len), generator=g)
    elif getattr(task, "objective", None) == "mlm":
        batch["labels"] = torch.where(torch.rand(ids.shape, generator=g) < task.mlm_probability, ids, -100)
    else:  # causal LM; preference pairs (chosen rows, then rejected rows): padding and each example's first
        labels = ids.clone()  # token unlabelled, as the data module labels them
        if layout != "full":
            labels[:, seq_len // 2 if layout == "packed" else -1] = -100
        batch["labels"] = labels
    return batch


def batch_layout(module, batch_size: int, packed: bool) -> str:
    """The probe batch layout (see probe_batch) of a run: flash attention never materialises a mask (packed
    rows go through its variable-length kernel), nor does SDPA for a batch of one unpacked row. A preference
    pair is two rows of their own lengths: padded, even one pair a batch."""
    if getattr(module, "attn_implementation", None) == "flash_attention_2":
        return "full"
    if rows_per_example(getattr(module.task, "student", module.task)) > 1:
        return "padded"
    return "packed" if packed else "padded" if batch_size > 1 else "full"


def rows_per_example(task) -> int:
    """Sequences a batch holds per example: 2 for preference pairs (chosen and rejected), else 1."""
    return 2 if task.name == "preference" else 1


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


def checkpoints_activations(module) -> bool:
    """Whether blocks recompute their activations in backward: `model.activation_checkpointing`, or QLoRA's
    k-bit preparation (`model.quantization.gradient_checkpointing`)."""
    quant = getattr(module, "quantization", None)
    return bool(module.activation_checkpointing or (quant is not None and quant.gradient_checkpointing))


from ftlab.tasks.preference_losses import NEEDS_REFERENCE  # noqa: E402 - the probes' preference reference


def _probe(module, task, config, blocks: int, seq_len: int, target_len: int, dtype: torch.dtype,
           fake: bool, rows: int = 1, layout: str = "padded") -> Activations:
    """A training step of the architecture cut to `blocks` blocks, on `rows` examples, the policy applied,
    random weights in `dtype`; `fake`: on shape-only tensors (no memory, no compute: any model size)."""
    from ftlab.compute import enable_activation_checkpointing

    batch = probe_batch(task, config, rows * rows_per_example(task), seq_len, target_len, layout)  # (MLM labels too)
    # the run's kernel where it runs here (flash attention needs CUDA: SDPA without a mask stands for it)
    kernel = getattr(module, "attn_implementation", None)
    kernel = kernel if kernel in ("eager", "sdpa") else None
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        torch.manual_seed(0)
        model = task.auto_class.from_config(with_blocks(config, blocks), dtype=dtype,
                                            **({"attn_implementation": kernel} if kernel else {}))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = 0
    # outside fake mode: peft moves the adapter it makes to its base layer's dtype, which a fake parameter
    # cannot do in place; the adapter's (small, real) weights become fake after
    model = _probe_policy(module.policy, blocks).apply(model.train(), task)
    if fake:
        for owner in model.modules():
            for name, p in owner._parameters.items():
                if p is not None and not isinstance(p, FakeTensor):
                    owner._parameters[name] = nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
    if checkpoints_activations(module):
        enable_activation_checkpointing(model)
    if task.name == "preference" and task.reference is None and task.loss_name in NEEDS_REFERENCE:
        task = copy.copy(task)  # the run's reference is made with the run's model: on the probe, the probe
        task.reference = _ProbeReference()
    with mode:
        return step_activations(model, task, batch)


class _ProbeReference:
    """A preference step's reference pass on a probe: the model itself without gradients (its adapter off where
    it has one; a frozen copy's forward costs the same), whose activations are a transient, never kept."""

    @torch.no_grad()
    def pair_logps(self, model: nn.Module, batch: dict):
        from ftlab.tasks.preference_losses import sequence_logps
        from ftlab.tasks.preference_reference import as_pairs, model_inputs

        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            logits = model(**model_inputs(batch)).logits
        return as_pairs(*sequence_logps(logits, batch["labels"]))


# Probes run on real tensors up to this many (probe parameters x tokens): a few seconds of CPU. Larger ones run
# on fake tensors, which take the attention path of real ones for padded and packed batches (see probe_batch).
REAL_PROBE_BUDGET = 5e10


def activation_memory(module, config, batch_size: int, seq_len: int, target_len: int,
                      dtype: torch.dtype = torch.float32, packed: bool = False) -> Activations:
    """Activations of a training step, per device: probes with 1 and 2 blocks give the cost outside the
    blocks and per block (batch 1), scaled to the run's blocks and batch. Probes too large to run here
    run on fake tensors (shapes only), unless the model's code reads tensor values (a chunked loss picks its
    labelled positions). `packed`: the data packs several examples into each row (see batch_layout)."""
    # a distillation teacher runs without gradients: it keeps nothing for backward; the student's task runs
    task = getattr(module.task, "student", module.task)
    with torch.device("meta"):
        size = sum(p.numel() for p in task.auto_class.from_config(with_blocks(config, 2)).parameters())
    fake = size * seq_len * 2 * rows_per_example(task) > REAL_PROBE_BUDGET
    layout = batch_layout(module, batch_size, packed)
    measured = []
    # (blocks, examples): the cost per block, per example outside the blocks, and fixed (a chunked loss holds
    # one chunk's logits at a time, however long the batch)
    for blocks, rows in ((1, 1), (2, 1), (1, 2)):
        try:
            measured.append(_probe(module, task, config, blocks, seq_len, target_len, dtype, fake=fake, rows=rows,
                                   layout=layout))
        except Exception:  # noqa: BLE001 - data-dependent code cannot run on shapes alone: run it
            if not fake:
                raise
            measured.append(_probe(module, task, config, blocks, seq_len, target_len, dtype, fake=False, rows=rows,
                                   layout=layout))
    trained = blocks_with_activations(module.policy, count_blocks(config))

    def scale(one: int, two: int, pair: int) -> int:
        per_block = max(two - one, 0)
        outside = max(pair - one - per_block, 0)
        fixed = max(one - outside - per_block, 0)
        return fixed + batch_size * (outside + trained * per_block)

    return Activations(*(scale(*(getattr(m, part) for m in measured)) for part in ("kept", "peak")))


def activation_bytes(module, config, batch_size: int, seq_len: int, target_len: int,
                     dtype: torch.dtype = torch.float32, packed: bool = False) -> int:
    """Activations a training step keeps for backward, per device (see `activation_memory`)."""
    return activation_memory(module, config, batch_size, seq_len, target_len, dtype, packed).kept


# ---- host (CPU RAM) memory per node: loading, offloaded state, export
#
# Per node: the node's ranks together (node 0: ranks 0 .. devices-1; rank 0 writes the export). The
# assumptions, from the code paths each strategy takes (GPU ranks: training state lives on the device).
# Safetensors files are memory-mapped: a tensor stored in the dtype it loads in stays a view of the mapped file
# (page cache, one copy per node whatever the ranks, clean and reclaimable) until it moves to its device;
# one stored in another dtype (a bf16 checkpoint loaded in fp32) is copied into private memory.
# - DDP, ZeRO-1/2, and FSDP where it falls back to a whole load (fsdp.load_sharded): every rank calls
#   from_pretrained: private copies of the converted tensors and of the new ones (a head), the checkpoint mapped.
# - FSDP sharded loading: each rank maps its dim-0 rows of each tensor and copies them to its device (one
#   tensor's rows converted at a time), or with cpu_offload into its shards in host memory; what the
#   checkpoint lacks and what the policy creates (LoRA matrices) are initialised whole on the host, on
#   every rank.
# - ZeRO-3 (strategies.deepspeed.load_partitioned): each rank maps the rows its flat partition of each tensor
#   spans and copies them into its partition (one tensor at a time); a new head is initialised on the device.
#   Where that loader falls back (names the checkpoint does not hold): transformers 5 maps the whole
#   checkpoint on rank 0 (`load_state_dict`) and fills the partitions module by module.
# - Offload (ZeRO offload_optimizer / FSDP cpu_offload) keeps state in host RAM for the whole run: ZeRO, the
#   fp32 master weights, fp32 gradients and AdamW state of each rank's partition (16 bytes an element), plus
#   the parameter partitions with offload_parameters; FSDP2, each rank's parameter, gradient and AdamW shards.
# - Export (export.py, every strategy): rank 0 gathers one block (a module's own tensors; a peft layer whole,
#   held x3 while merged) to host and adds it to a shard of at most max_shard_size (a larger tensor alone),
#   plus the offloaded state still resident.

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class Checkpoint:
    """The pretrained safetensors weights as their headers describe them (no weights read)."""

    folder: str | None  # None: not at hand (a hub id not downloaded yet, a GGUF file not converted yet)
    tensors: dict[str, tuple[tuple[int, ...], int, str]]  # checkpoint name -> (shape, bytes per element, dtype)

    @property
    def found(self) -> bool:
        return self.folder is not None and bool(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * size for shape, size, _ in self.tensors.values())


def read_checkpoint(name_or_path: str, gguf_file: str | None = None, revision: str | None = None) -> Checkpoint:
    """The headers of the safetensors files from_pretrained would read (a local folder, or a hub id already in
    the cache); folder None where they are not at hand, tensors empty where the folder has no safetensors."""
    if gguf_file:  # the dequantized folder is made on first load: not here
        return Checkpoint(None, {})
    folder = name_or_path
    if not os.path.isdir(folder):
        from ftlab.loading import cached_snapshot

        folder = cached_snapshot(name_or_path, revision)
        if folder is None:  # not in the cache, offline, not a hub id: unknown
            return Checkpoint(None, {})
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return Checkpoint(folder, {})
    from safetensors import safe_open

    tensors = {}
    for file in files:
        with safe_open(os.path.join(folder, file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                s = f.get_slice(key)
                tensors[key] = (tuple(s.get_shape()), DTYPE_BYTES.get(s.get_dtype(), 4), s.get_dtype())
    return Checkpoint(folder, tensors)


def checkpoint_key(name: str, keys, prefix: str) -> str | None:
    """The checkpoint's name for a model parameter, with or without the backbone prefix (as
    PretrainedWeights.key maps it)."""
    prefix = prefix + "." if prefix else ""
    for key in (name, name[len(prefix):] if prefix and name.startswith(prefix) else None, prefix + name if prefix else None):
        if key and key in keys:
            return key
    return None


@dataclass
class HostMemory:
    """Peak host (CPU RAM) bytes per node (node 0: rank 0 writes the export), and how each was counted."""

    devices_per_node: int
    load_dtype: str
    load_bytes: int  # private + mapped
    load_private_bytes: int  # copies the ranks make
    load_mapped_bytes: int  # checkpoint pages mapped (page cache: shared by the node's ranks, reclaimable)
    load: str
    offload_bytes: int
    offload: str | None
    export_bytes: int
    export: str
    max_shard_size: int

    @property
    def peak_bytes(self) -> int:
        return max(self.load_bytes, self.offload_bytes, self.export_bytes)

    def as_dict(self) -> dict:
        return {**asdict(self), "peak_bytes": self.peak_bytes}


def size_text(n: int) -> str:
    """Bytes as export.parse_size reads them back: 5GB, 500MB, 20KiB, or a plain number."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("GiB", 2**30), ("MiB", 2**20),
                        ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n:,} bytes"


def _rows_bytes(shape: tuple[int, ...], size: int, world: int, rank: int) -> int:
    """Bytes of the dim-0 rows `rank` reads of a tensor (FSDP2 chunks: ceil(d0 / world) rows)."""
    if not shape:
        return size
    return _fsdp_local(math.prod(shape), torch.Size(shape), world, rank) * size


def _flat_bytes(shape: tuple[int, ...], size: int, world: int) -> int:
    """Bytes of the rows a rank reads of a tensor for its ZeRO-3 partition: ceil(numel / world) elements, plus
    the partial rows at both ends."""
    numel = math.prod(shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return min(numel, -(-numel // world) + 2 * row) * size


def export_peak(blocks: list[tuple[list[int], bool]], max_shard_size: int) -> int:
    """Rank 0's peak host bytes while export.ShardWriter streams `blocks`: the shard being filled (the tensors
    written go into it as they are, no copy) plus the block just gathered; a merged peft layer is held three
    times (gathered, its replica, the merge's delta) while it merges. A tensor larger than the limit gets a
    shard of its own."""
    peak = shard = 0
    for sizes, whole in blocks:
        peak = max(peak, shard + sum(sizes) * (3 if whole else 1))
        for size in sizes:
            if shard and shard + size > max_shard_size:
                shard = 0  # written to disk
            shard += size
    return peak


def host_memory(*, strategy: str, world: int, devices: int, ranks: list, total_params: int, load_size: int,
                load_dtype: str, checkpoint: Checkpoint, base_names: dict[str, int], base_prefix: str,
                new_numel: int, whole_reason: str | None, offload_optimizer: bool, offload_params: bool,
                fsdp_offload: bool, max_shard_size: int, export_blocks: list[tuple[list[int], bool]]) -> HostMemory:
    """Host bytes per node of a run laid out as `strategy` lays it out (see the notes above).

    Args:
        ranks: state_per_rank of every rank (parameters, gradients, optimizer state).
        load_size: bytes per element of the load dtype; checkpoint: the pretrained files' headers.
        base_names: the model's parameter names before the policy -> elements (what the checkpoint holds).
        new_numel: elements initialised whole on each rank under sharded FSDP loading (absent from the
            checkpoint, or created by the policy).
        whole_reason: why FSDP falls back to a whole load on each rank (ZeRO-3: to transformers' loading on
            rank 0), or None.
        export_blocks: the export's gathering steps in order: (bytes of each tensor written, whether it is a
            peft layer merged whole); empty without an export.
    """
    local = ranks[:devices]
    stored = SAFETENSORS_DTYPES.get(load_dtype)
    # what the model reads from the checkpoint: (shape, stored bytes per element, converted on load)
    shapes = []
    for name, numel in base_names.items():
        key = checkpoint_key(name, checkpoint.tensors, base_prefix) if checkpoint.found else None
        if key:
            shape, size, dtype = checkpoint.tensors[key]
            shapes.append((shape, size, dtype != stored))
        elif not checkpoint.found:  # not at hand: assume converted (hub checkpoints are mostly bf16; ftlab loads fp32)
            shapes.append(((numel,), load_size, True))
    mapped_total = checkpoint.nbytes if checkpoint.found else sum(math.prod(s) * size for s, size, _ in shapes)
    converted = sum(math.prod(s) for s, _, c in shapes if c) * load_size
    new_bytes = new_numel * load_size
    how = f"stored in {load_dtype}: not copied" if not converted else f"{load_dtype} copies" + \
        ("" if converted >= sum(math.prod(s) for s, _, _ in shapes) * load_size else " of the tensors stored otherwise")
    if strategy == "fsdp" and whole_reason is None:
        per_rank = [new_bytes + max((_rows_bytes(sh, load_size, world, r) for sh, _, c in shapes if c), default=0)
                    for r in range(devices)]
        private, mapped = sum(per_rank), mapped_total * devices // world
        load = "each rank maps its rows of each tensor and copies them to its device, one at a time"
        if fsdp_offload:  # the shards are filled where they live: pinned host memory
            private += sum(p.bytes for p, _, _ in local)
            load = "each rank maps its rows of each tensor and copies them into its host shards (cpu_offload)"
    elif strategy == "deepspeed_stage_3":
        if whole_reason is None:  # each rank its flat range of each tensor: the rows it spans
            private = devices * max((_flat_bytes(sh, load_size, world) for sh, _, c in shapes if c), default=0)
            mapped = mapped_total * devices // world
            load = "each rank maps the rows its partition of each tensor spans, into its partition, one at a time"
        else:
            private = max((math.prod(sh) * load_size for sh, _, c in shapes if c), default=0)
            mapped = mapped_total
            load = f"rank 0 maps the whole checkpoint, the ranks fill their partitions module by module ({whole_reason})"
        if offload_params:
            private += sum(p.numel for p, _, _ in local) * load_size
            load += "; parameter partitions on the host"
    else:
        private, mapped = devices * (converted + new_bytes), mapped_total
        load = f"every rank loads the whole model ({how})"
        if strategy == "fsdp":
            load += f"; fsdp loads whole: {whole_reason}"
    load_bytes = private + mapped
    offload_bytes, offload = 0, None
    if fsdp_offload:
        offload_bytes = sum(p.bytes + g.bytes + o.bytes for p, g, o in local)
        # the parameter shards are pinned: CUDA's host allocator may round each up to a power of two (not counted)
        offload = "FSDP cpu_offload: each rank's parameter, gradient and AdamW shards (pinned ones may round up)"
    elif offload_optimizer and strategy.startswith("deepspeed"):
        # fp32 master weights and fp32 gradients of the partition AdamW steps on, beside its two states
        offload_bytes = sum(o.bytes + 2 * (o.numel // ADAM_STATES) * 4 for _, _, o in local)
        offload = "ZeRO offload: fp32 master weights, gradients and AdamW state of each rank's partition"
        if offload_params and strategy == "deepspeed_stage_3":
            offload_bytes += sum(p.bytes for p, _, _ in local)
            offload += ", parameter partitions"
    export_bytes = export_peak(export_blocks, max_shard_size) + offload_bytes
    merges_adapter = any(whole for _, whole in export_blocks)
    export = f"rank 0: a shard of at most {size_text(max_shard_size)} + one gathered block" + \
        (" (x3 merging a LoRA layer)" if merges_adapter else "") + (" + the offloaded state" if offload_bytes else "")
    if not export_blocks:
        export = "no export (outputs.export false)" + (": the offloaded state" if offload_bytes else "")
    return HostMemory(devices, load_dtype, load_bytes, private, mapped, load, offload_bytes, offload, export_bytes,
                      export, max_shard_size)
