"""Token losses over a vocabulary without the full logits (`model.loss_chunk_size`).

The model runs up to its last hidden state (its own forward, asked for the hidden states and for the logits of
one position only); the LM head then scores the labelled positions a chunk at a time: head -> fp32 log-softmax
-> per-token values. Each chunk runs under non-reentrant activation checkpointing, so that autograd keeps
only the chunk's hidden states, and backward recomputes its logits: at any time one chunk's logits exist,
never batch x length x vocabulary. Positions without a label (-100) get no logits at all.

Sharded strategies: the head is called as a module, so that ZeRO-3 (and LoRA on the head) work through their
own hooks. Under FSDP2 the head is in the root unit when the loss is chunked (`fsdp.shard_module`; tied heads
always are): gathered once with the root's `unshard()` for all chunks, resharded by FSDP's post-backward, or
by `Head.release` after a loss without gradients (a teacher's stays gathered until its next forward reshards
it: backward recomputes its chunks). Where chunk calls are collectives (ZeRO-3), every rank runs as many
chunks (the most any rank needs; empty ones where it has fewer), and every step as many as the most any
step has needed: ZeRO-3 prefetches only while each step calls the modules in the order of the one before.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ftlab.errors import ConfigError


def configure(task, size: int, policy=None) -> None:
    """Give `model.loss_chunk_size` to the task (0: off), or refuse, in one line, what it cannot apply to."""
    if size < 0:
        raise ConfigError(f"model.loss_chunk_size={size} must be >= 0 (0: off; e.g. 1024 tokens a chunk)")
    if size == 0:
        return
    setter = getattr(task, "set_loss_chunk_size", None)
    if setter is None:
        raise ConfigError(f"model.loss_chunk_size={size}: task {task.name} computes no token-level loss over a "
                          "vocabulary (causal LM, distillation of causal LMs, preference do); leave it 0")
    peft_type = getattr(policy, "peft_type", None)
    if peft_type is not None:
        from peft.config import PromptLearningConfig
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        if issubclass(PEFT_TYPE_TO_CONFIG_MAPPING[peft_type], PromptLearningConfig):  # (some configs cannot be built bare)
            raise ConfigError(f"model.loss_chunk_size={size} with policy method {policy.method}: prompt-learning "
                              "adapters add virtual tokens the chunked loss does not align labels to; use LoRA or "
                              "loss_chunk_size: 0")
    setter(size)


def check_model(config, size: int) -> None:
    """Refuse (before any weights load) a causal LM whose forward cannot hand back its last hidden state with
    the logits of one position only (transformers' `logits_to_keep`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return  # remote code: checked on the first batch
    if "logits_to_keep" not in inspect.signature(cls.forward).parameters:
        raise ConfigError(f"model.loss_chunk_size={size}: {cls.__name__} cannot skip computing its full logits "
                          "(no logits_to_keep argument); use loss_chunk_size: 0 with this model")


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _fsdp_root(model: nn.Module, head: nn.Module) -> nn.Module | None:
    """The FSDP2 root unit that owns the head's weights, where the head is not a shard unit of its own."""
    return model if _is_fsdp(model) and not _is_fsdp(head) else None


class Head:
    """A causal LM's head as a function of its last hidden state: the output embeddings called as a module,
    then the logit transform some models apply (Gemma's soft-capping, Cohere's scale, Granite's divisor), in
    fp32. An FSDP root-owned head is gathered once here for all chunks: with gradients FSDP's post-backward
    reshards it; without (evaluation) `release` does; a distillation teacher's stays gathered until its next
    forward reshards it (backward recomputes its chunks)."""

    def __init__(self, model: nn.Module):
        self.module = model.get_output_embeddings()
        if not isinstance(self.module, nn.Module):
            raise ConfigError(f"model.loss_chunk_size: {type(model).__name__} has no separate LM head (output "
                              "embeddings) to score chunks with; use loss_chunk_size: 0")
        config = model.config.get_text_config()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)  # Cohere
        self.divisor = getattr(config, "logits_scaling", None)  # Granite
        self.root = _fsdp_root(model, self.module)
        self.grad = torch.is_grad_enabled()
        # each call a collective (its own FSDP unit, or ZeRO-3's partitioned weights): ranks must call equally often
        self.collective = self.root is None and (_is_fsdp(self.module) or any(
            hasattr(p, "ds_id") for p in self.module.parameters()))
        if self.root is not None:
            self.root.unshard()  # one gather for every chunk (per chunk, a K-fold all-gather of the head)

    def release(self) -> None:
        """Reshard a gathered root where no backward will (evaluation, a loss without gradients)."""
        if self.root is not None and not self.grad:
            self.root.reshard()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        return logits.float()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._logits(hidden)


def last_hidden(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own forward, keeping its last hidden state (after the final norm) and the logits of the
    last position only: (hidden [B, T, H], logits [B, 1, V])."""
    # -1: transformers keeps the last hidden state only (True would hold every layer's, which a forward without
    # gradients, e.g. a teacher's, frees as it goes); older or remote model code reads it as True
    out = model(**inputs, output_hidden_states=-1, logits_to_keep=1)
    hidden = out.hidden_states[-1]
    if hidden.shape[:2] != inputs["input_ids"].shape:
        raise ConfigError(f"model.loss_chunk_size: the model's hidden states ({tuple(hidden.shape[:2])}) do not align "
                          f"with its input ({tuple(inputs['input_ids'].shape)}); use loss_chunk_size: 0")
    return hidden, out.logits


def check_head(head: Head, hidden: torch.Tensor, own_logits: torch.Tensor) -> None:
    """Once per model: the head reproduces the model's own logits (a model that transforms its logits in a way
    `Head` does not know would train on a different loss)."""
    with torch.no_grad():
        ours = head(hidden[:, -1:])
    if not torch.allclose(ours, own_logits.float(), rtol=1e-3, atol=1e-3):
        diff = (ours - own_logits.float()).abs().max().item()
        raise ConfigError(f"model.loss_chunk_size: this model's logits are not its LM head's output (max difference "
                          f"{diff:.3g}: a logit transform ftlab does not reproduce); use loss_chunk_size: 0")


def labelled(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions that predict a label, after the causal shift (as transformers' causal-LM loss): their
    hidden states [N, H], their target tokens [N] and their rows [N]."""
    keep = labels[:, 1:] != -100
    return hidden[:, :-1][keep], labels[:, 1:][keep], keep.nonzero()[:, 0]


def _chunk_count(n: int, size: int, device: torch.device, sharded: bool) -> int:
    count = max(1, -(-n // size))
    if sharded and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # a ZeRO-3 head gathers its weights in every call: each rank must make as many calls
        t = torch.tensor([count], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        count = int(t.item())
    return count


def per_token(fn: Callable[..., tuple[torch.Tensor, ...]], size: int, count: int,
              *tensors: torch.Tensor) -> list[torch.Tensor]:
    """`fn` on `size` rows of `tensors` at a time, in `count` chunks (the last ones empty where the rows run
    out), each checkpointed (backward recomputes its logits); the per-token outputs concatenated."""
    outs = []
    for i in range(count):
        part = [t[i * size:(i + 1) * size] for t in tensors]
        outs.append(checkpoint(fn, *part, use_reentrant=False) if torch.is_grad_enabled() else fn(*part))
    return [torch.cat(o) for o in zip(*outs)]


class ChunkedLoss:
    """The chunked loss of one task: `model.loss_chunk_size` tokens a chunk."""

    def __init__(self, size: int):
        self.size = size
        self._checked: set[int] = set()
        # the most chunks a call has made where each chunk is a collective: training calls apart from those
        # without gradients (the sanity check, validation's larger batches), which need not pad training's
        self._most = {True: 0, False: 0}

    def _per_token(self, fn: Callable[..., tuple[torch.Tensor, ...]], collective: bool,
                   *tensors: torch.Tensor) -> list[torch.Tensor]:
        """`per_token` in as many chunks as the rows need; where each chunk call is a collective (a ZeRO-3
        head), as many as the most any call of its kind (with gradients or without) has needed so far, on every
        rank. ZeRO-3 prefetches parameters in the order modules ran in the previous step and drops that record at
        a step whose order differs (one more or one fewer head call): with the labelled-token count varying from
        batch to batch, most steps then ran with no prefetching and gathered the head again for every chunk.
        Empty chunks cost a call of the head."""
        count = _chunk_count(tensors[0].shape[0], self.size, tensors[0].device, collective)
        if collective:
            grad = torch.is_grad_enabled()
            count = self._most[grad] = max(self._most[grad], count)
        return per_token(fn, self.size, count, *tensors)

    def head(self, model: nn.Module, inputs: dict) -> tuple[Head, torch.Tensor]:
        """(the model's head, its last hidden state); the head is checked against the model's own logits once."""
        hidden, own = last_hidden(model, inputs)
        head = Head(model)
        if id(model) not in self._checked:
            check_head(head, hidden, own)
            self._checked.add(id(model))
        return head, hidden

    def nll(self, model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over every labelled token of the batch (transformers' causal-LM loss)."""
        head, hidden = self.head(model, inputs)
        h, targets, _ = labelled(hidden, labels)

        def chunk(h, t):
            return (F.cross_entropy(head(h), t, reduction="none"),)

        (losses,) = self._per_token(chunk, head.collective, h, targets)
        head.release()
        return losses.sum() / losses.numel()

    def sequence_logps(self, model: nn.Module, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed log-probs of its labelled tokens and their count (`preference_losses.sequence_logps`)."""
        head, hidden = self.head(model, inputs)
        h, targets, rows = labelled(hidden, labels)

        def chunk(h, t):
            logits = head(h)
            return (logits.gather(1, t.unsqueeze(1)).squeeze(1) - logits.logsumexp(-1),)

        (logps,) = self._per_token(chunk, head.collective, h, targets)
        head.release()
        sums = torch.zeros(labels.shape[0], dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
        return sums, (labels[:, 1:] != -100).sum(-1)

    def distillation(self, model: nn.Module, teacher: nn.Module, inputs: dict, labels: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy on the labels, mean KL(teacher || student) at `temperature`) over the labelled
        tokens, the teacher's logits computed chunk by chunk beside the student's."""
        with torch.no_grad():
            teacher_head, teacher_hidden = self.head(teacher, inputs)
        head, hidden = self.head(model, inputs)
        h, targets, _ = labelled(hidden, labels)
        ht, _, _ = labelled(teacher_hidden, labels)

        def chunk(h, ht, t):
            student = head(h)
            with torch.no_grad():
                target = F.log_softmax(teacher_head(ht) / temperature, -1)
            kl = F.kl_div(F.log_softmax(student / temperature, -1), target, log_target=True, reduction="none")
            return F.cross_entropy(student, t, reduction="none"), kl.sum(-1)

        ce, kl = self._per_token(chunk, head.collective or teacher_head.collective, h, ht, targets)
        head.release()
        n = ce.numel()
        return ce.sum() / n, kl.sum() / n
