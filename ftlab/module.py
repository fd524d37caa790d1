"""The LightningModule: builds a Hugging Face model in `configure_model`, applies the policy, and runs
the task's loss and metrics. It knows tasks and policies only through their interfaces."""

from __future__ import annotations

import os
import warnings

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ftlab.checkpoints import base_files, base_mismatch, leave_frozen_out, pretrained_held
from ftlab.compute import check_attention, check_packed_rows, compile_blocks, enable_activation_checkpointing
from ftlab.data.sources import model_location
from ftlab.errors import ConfigError, TrainingDiverged
from ftlab.loading import apply_config_overrides, download_pretrained, load_config, load_model
from ftlab.metrics import Mean
from ftlab.optim import Optim
from ftlab.policies import Full, Policy
from ftlab.quantization import Quantization, quantized_numels
from ftlab.strategies import DeepSpeed, build_sharded, follow_trainable_change
from ftlab.tasks import SequenceClassification, Task, chunked_loss

# Lightning notes that the module's batch hook is used although a datamodule is passed: that is the intent
# (the task, not the data, decides e.g. masked-LM masking).
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer`")


def summarize_trainable(model: torch.nn.Module) -> tuple[int, int, list[str]]:
    """(trainable, total, trainable module names with block indices folded: `layer.{0-5}.query`)."""
    import re

    trainable = total = 0
    modules: dict[str, set[int]] = {}
    packed = quantized_numels(model)  # QLoRA: a 4-bit weight's tensor holds its values packed, 2 or more an element
    for name, p in model.named_parameters():
        n = packed.get(id(p)) or getattr(p, "ds_numel", p.numel())  # a ZeRO-3 parameter's own numel is its partition's
        total += n
        if p.requires_grad:
            trainable += n
            module = name.rsplit(".", 1)[0]
            m = re.search(r"\.(\d+)\.", module)
            key = module[: m.start()] + ".{}." + module[m.end():] if m else module
            modules.setdefault(key, set())
            if m:
                modules[key].add(int(m.group(1)))
    names = []
    for key, idx in modules.items():
        if idx:
            lo, hi = min(idx), max(idx)
            span = str(lo) if lo == hi else f"{lo}-{hi}" if len(idx) == hi - lo + 1 else ",".join(map(str, sorted(idx)))
            key = key.replace("{}", "{" + span + "}")
        names.append(key)
    return trainable, total, names


def keeps_fp32_masters(precision: str, deepspeed: bool) -> bool:
    """Whether ftlab itself keeps what trains in fp32 and frozen weights in the load dtype
    (FineTuneModule._settle_weight_dtypes; `ftlab estimate` counts by the same rule): under a `*-mixed`
    precision, except under DeepSpeed, which converts the module and keeps fp32 master partitions itself."""
    return precision.endswith("-mixed") and not deepspeed


def check_positions(config, data) -> None:
    """Rows longer than the model's learned positions fail in the embedding (after the model loaded): refused
    here, from the tokenised rows' lengths. The tokenizer's model_max_length is the usable length where
    positions are offset (RoBERTa: 514, 512)."""
    import pyarrow.compute as pc

    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return
    usable = getattr(getattr(data, "tokenizer", None), "model_max_length", None)
    limit = min(positions, usable) if isinstance(usable, int) and usable < positions else positions
    longest = max((pc.max(ds.data.column("length")).as_py() or 0 for ds in (getattr(data, "splits", None) or {}).values()
                   if "length" in ds.column_names), default=0)
    if longest > limit:
        raise ConfigError(f"data.max_length={getattr(data, 'max_length', None)} makes rows of up to {longest} tokens, "
                          f"longer than the {limit} positions the model has (max_position_embeddings {positions}); "
                          f"use data.max_length {limit} or less")


class FineTuneModule(L.LightningModule):
    """A pretrained Hugging Face model, a task and a policy."""

    def __init__(
        self,
        name_or_path: str,
        task: Task | None = None,
        policy: Policy | None = None,
        optim: Optim | None = None,
        quantization: Quantization | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        dtype: str | None = None,
        skip_nonfinite_steps: int = 0,
        gguf_file: str | None = None,
        config_overrides: dict | None = None,
        attn_implementation: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        loss_chunk_size: int = 0,
    ):
        """
        Args:
            name_or_path: Hugging Face hub id, local folder (e.g. an earlier run's `export/`), `pkg://` path,
                or a named offline model (`all-MiniLM-L6-v2`).
            task: What the model learns (default: SequenceClassification).
            policy: What trains: Freeze (transfer learning), Adapter (peft), Full (default).
            optim: Optimizer (adamw, adamw_8bit, adafactor, sgd) and learning-rate schedule.
            quantization: Load the base quantized by bitsandbytes (4-bit NF4/FP4 or 8-bit) and train an
                adapter on top (QLoRA): policy Adapter only; not under DeepSpeed, and 4-bit only under FSDP.
            trust_remote_code: Run model code shipped in the model repository. Off by default: it executes
                arbitrary Python; turn on only for repositories you trust.
            revision: Hub revision (branch, tag or commit) to load.
            dtype: Weight dtype to load (e.g. bfloat16). Default: float32, or the dtype of a `*-true`
                `trainer.precision` (bf16-true loads bfloat16). Never the checkpoint's own dtype: a bf16
                checkpoint under `bf16-mixed` keeps fp32 master weights and optimizer state.
            skip_nonfinite_steps: Optimizer steps with a NaN or infinite loss (in any micro-batch, on any
                rank) that may be skipped whole (no update, on every rank) over the run before it stops; 0
                stops at the first. A stop names the step and batch and keeps the last good checkpoint.
            gguf_file: A GGUF file inside `name_or_path` (a folder or hub repository) to load, dequantized
                into a regular model. A `name_or_path` ending in `.gguf` sets it by itself.
            config_overrides: Model config fields to change at load, e.g. `{num_hidden_layers: 3}`: a
                3-layer model initialised from the first 3 pretrained layers (a distillation student).
            attn_implementation: Attention kernel: `sdpa` (transformers' default where the model has it),
                `eager`, `flash_attention_2` (CUDA, flash-attn installed; with packed rows, batches of one
                row only) or `flex_attention`. Packed rows keep their per-example masking with each.
            activation_checkpointing: Recompute each block's activations in backward instead of keeping
                them (much less activation memory, ~1/3 more compute); any strategy and policy.
            compile: `torch.compile` each transformer block (faster steps after a one-off compile, on GPU
                most of all; not under DeepSpeed).
            loss_chunk_size: Compute a causal LM's token loss (SFT, causal-LM distillation, preference log-probs)
                from its last hidden state and LM head, this many labelled tokens at a time, each chunk
                recomputed in backward: the batch x length x vocabulary logits never exist (0: off, the
                model's own loss). E.g. 1024.
        """
        super().__init__()
        path, _ = model_location(name_or_path, gguf_file)
        if path.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"model.name_or_path={name_or_path!r}: no such folder (working directory "
                              f"{os.getcwd()}); give an existing model folder or a hub id like org/name")
        self.save_hyperparameters(ignore=["task", "policy", "optim", "quantization"])
        self.name_or_path = name_or_path
        self.task = task or SequenceClassification()
        self.policy = policy or Full()
        self.optim = optim or Optim()
        self.quantization = quantization
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self.load_dtype = dtype
        self.gguf_file = gguf_file
        self.config_overrides = dict(config_overrides or {})
        check_attention(attn_implementation)  # the device is checked in setup, once the trainer knows it
        self.attn_implementation = attn_implementation
        self.activation_checkpointing = activation_checkpointing
        self.compile_blocks = compile
        chunked_loss.configure(self.task, loss_chunk_size, self.policy)
        self.task.check_policy(self.policy)
        self.loss_chunk_size = loss_chunk_size
        if skip_nonfinite_steps < 0:
            raise ConfigError(f"model.skip_nonfinite_steps={skip_nonfinite_steps} must be >= 0")
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.skipped_steps = 0  # over the whole run: checkpoints carry it, so a resume does not renew the allowance
        self._skip_update = False
        # the run's trainer.precision where there is no Trainer to ask (`ftlab export` sets it from the run)
        self.run_precision = "32-true"
        if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"model.dtype={dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
        if trust_remote_code:
            rank_zero_warn(f"ftlab: trust_remote_code is ON: code from {name_or_path!r} will run on this machine")
        self.model: torch.nn.Module | None = None
        self.metrics = torch.nn.ModuleDict()
        self.val_loss, self.test_loss = Mean(), Mean()
        self.ckpt_given: bool | None = None  # set by the CLI: whether --ckpt_path was given (None: not known)
        self.trainable_params = self.total_params = 0
        self._base_files: dict = {}  # checkpoints.base_files of the base the model was built from
        self._pretrained_names: set[str] = set()  # the model's parameters the pretrained files hold (finish_model)
        leave_frozen_out(self)  # checkpoints hold what trains; frozen weights come back from the pretrained model

    # ---- building
    def _load_kwargs(self, data) -> dict:
        kwargs = {"trust_remote_code": self.trust_remote_code, **self.config_overrides, **self.task.model_kwargs(data)}
        if self.revision:
            kwargs["revision"] = self.revision
        kwargs["dtype"] = self.weight_dtype()
        if self.quantization is not None:
            kwargs["quantization_config"] = self.quantization.module_config(self)
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    def weight_dtype(self) -> torch.dtype:
        """The dtype the weights load in: `model.dtype` if set, else what `trainer.precision` trains in
        (transformers would otherwise pick the checkpoint's own: bf16 weights with no fp32 master copy)."""
        if self.load_dtype:
            return getattr(torch, self.load_dtype)
        trainer = getattr(self, "_trainer", None)
        precision = str(trainer.precision) if trainer is not None else self.run_precision
        return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)

    def _settle_weight_dtypes(self, model: torch.nn.Module) -> None:
        """Under a mixed precision, what trains (now, or later by gradual unfreezing) is stored in fp32: the
        master copy AdamW updates (a bf16 weight loses updates under ~1/256 of itself; fp16 gradients GradScaler
        refuses). Frozen weights stay in the dtype they load in (`model.dtype`: no fp32 copy of what never
        changes), peft's k-bit preparation's upcast of every non-quantized weight included. peft makes its
        adapter matrices fp32 itself, but not the trained copy of a head (`modules_to_save`), nor does the Freeze
        policy its trained blocks. DeepSpeed keeps fp32 master partitions of its own (and converts the module)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not keeps_fp32_masters(str(trainer.precision), isinstance(trainer.strategy,
                                                                                         DeepSpeedStrategy)):
            return
        frozen, quantized = self.weight_dtype(), quantized_numels(model)
        for name, p in model.named_parameters():
            if id(p) in quantized or not p.is_floating_point():
                continue
            dtype = torch.float32 if p.requires_grad or self.policy.will_train(name) else frozen
            if p.dtype != dtype:
                p.data = p.data.to(dtype)

    def frozen_dtype(self) -> torch.dtype:
        """The dtype of a frozen model beside this one (a distillation teacher, a preference reference): never
        updated, it needs no fp32 master copy: the compute dtype of a mixed precision, else `weight_dtype`."""
        trainer = getattr(self, "_trainer", None)
        precision = str(trainer.precision) if trainer is not None else self.run_precision
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision, self.weight_dtype())

    def frozen_options(self, same_model: bool) -> dict:
        """from_pretrained's options for a frozen model beside this one: the attention kernel this one runs;
        and, for a copy of this very model (a preference reference), `trust_remote_code`, which the user
        granted to this model's repository only (a teacher's is another one)."""
        options = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        if same_model and self.trust_remote_code:
            options["trust_remote_code"] = True
        return options

    def model_config(self, data):
        """The model's config (cheap: no weights); the task settles its config-dependent choices on it."""
        config_kwargs = {k: v for k, v in self._load_kwargs(data).items() if k in ("trust_remote_code", "revision")}
        try:
            config = load_config(self.name_or_path, self.gguf_file, **config_kwargs)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.name_or_path={self.name_or_path!r}: no model config could be loaded "
                              f"({str(err).splitlines()[0][:200]}); give a hub id or a folder with config.json") from None
        apply_config_overrides(config, self.config_overrides)
        self.task.resolve(config)
        return config

    def skeleton(self, data) -> torch.nn.Module:
        """The model's structure with no weights (meta device): enough to check the policy for free."""
        config = self.model_config(data)
        with torch.device("meta"):
            try:
                return self.task.auto_class.from_config(config, trust_remote_code=self.trust_remote_code)
            except ValueError as err:
                raise ConfigError(f"model.name_or_path={self.name_or_path!r}: a {config.model_type} model has no "
                                  f"{self.task.auto_class.__name__} head for task {self.task.name!r} ({err})") from None

    def build_model(self, data) -> torch.nn.Module:
        """The pretrained model with the policy applied (not sharded)."""
        self.model_config(data)
        model = load_model(self.task.auto_class, self.name_or_path, self.gguf_file, **self._load_kwargs(data))
        return self.finish_model(model, data)

    def empty_model(self, data) -> torch.nn.Module:
        """The model as `build_model` loads it, before the policy, but on the meta device (no weights), in the
        dtype it trains in: for strategies that give each rank its own shard of the weights."""
        with torch.device("meta"):
            return self.model_from_config(data)

    def model_from_config(self, data) -> torch.nn.Module:
        """The model as `build_model` loads it, before the policy, with the weights its architecture initialises
        (or none: under a meta device, or ZeRO-3's partitioned init)."""
        config = self.model_config(data)
        kwargs = self._load_kwargs(data)
        for key, value in kwargs.items():  # what from_pretrained would set on the config (num_labels...)
            if key not in ("trust_remote_code", "revision", "dtype", "attn_implementation"):
                setattr(config, key, value)
        extra = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        return self.task.auto_class.from_config(config, dtype=kwargs["dtype"], trust_remote_code=self.trust_remote_code,
                                                **extra)

    def finish_model(self, model: torch.nn.Module, data) -> torch.nn.Module:
        """A freshly built model made ready to train: padding id, train mode, the policy applied."""
        held = pretrained_held(model, self.name_or_path, self.gguf_file, self.revision)
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # decoder heads find the last real token by it
        model.train()  # transformers returns models in eval mode (dropout off)
        if self.quantization is not None:  # peft's k-bit preparation, before the adapter goes on
            model = self.quantization.prepare(model)
        model = self.policy.apply(model, self.task)
        self._settle_weight_dtypes(model)
        # by name (sharding swaps the parameter objects): what the pretrained files hold, wrapped by the policy; and
        # what peft keeps of a new head beside its trained copy (modules_to_save), which nothing ftlab exports or
        # runs reads (merging keeps the copy) and a seeded rebuild reproduces anyway
        self._pretrained_names = {n for n, p in model.named_parameters(remove_duplicate=False)
                                  if id(p) in held or ".original_module." in f".{n}"}
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
            rank_zero_info("ftlab: activation checkpointing: each block recomputes its activations in backward")
        if self.compile_blocks:  # after the policy (its layers compile with the block), before sharding
            rank_zero_info(f"ftlab: compiling {compile_blocks(model)} blocks with torch.compile (the first steps compile)")
        return model

    def prepare_data(self) -> None:
        """On local rank 0 of each node while the node's other ranks wait (Lightning): hub files download once
        per node into the Hugging Face cache, where every rank's from_pretrained then finds them."""
        download_pretrained(self.name_or_path, self.gguf_file, self.revision, self.trust_remote_code)
        self.task.prepare_data()

    def setup(self, stage: str) -> None:
        """Checks that need the data and the model's structure only, before configure_model (and outside the
        strategy's sharded-init context, where even a weightless model would be partitioned)."""
        if self.model is not None:
            return
        data = self.trainer.datamodule
        self.task.check_data_type(data)
        self.task.check_data(data)
        check_attention(self.attn_implementation, self.trainer.strategy.root_device.type, str(self.trainer.precision),
                        str(self.weight_dtype()).removeprefix("torch."))
        check_packed_rows(self.attn_implementation, data)
        skeleton = self.skeleton(data)
        self.policy.validate(skeleton, self.task)
        check_positions(skeleton.config, data)
        given = self.ckpt_given if self.ckpt_given is not None else self.trainer.ckpt_path is not None
        if stage != "fit" and not given:
            self._check_untrained_head(skeleton, stage)
        if isinstance(self.trainer.strategy, DeepSpeed):  # before its partitioned init reads the config
            self.trainer.strategy.size_buffers(skeleton.config)

    def _check_untrained_head(self, skeleton: torch.nn.Module, stage: str) -> None:
        """Evaluating without --ckpt_path runs the pretrained model; where it has no weights for this task's head,
        the head is random. Predictions of it are refused; a validation or test (a chance-level baseline) says so."""
        from ftlab.loading import PretrainedWeights
        from ftlab.policies.layers import find_parts

        weights = PretrainedWeights.find(self.name_or_path, self.gguf_file, self.revision,
                                         getattr(skeleton, "base_model_prefix", ""))
        if weights is None:
            return
        parts = find_parts(skeleton)
        head = sorted({n.rsplit(".", 1)[0] for n, _ in skeleton.named_parameters()
                       if parts.is_head(n) and weights.key(n) is None})
        if not head:
            return
        what = (f"model.name_or_path={self.name_or_path!r} has no weights for the {', '.join(head)} head of task "
                f"{self.task.name!r}, and no --ckpt_path was given")
        if stage == "predict":
            raise ConfigError(f"{what}: its predictions would be random; give the trained run's checkpoint "
                              "(--ckpt_path runs/NAME/checkpoints/last.ckpt) or its export as model.name_or_path")
        rank_zero_warn(f"ftlab: {what}: the head is random (scores at chance level); give --ckpt_path to evaluate "
                       "a trained run")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        data = self.trainer.datamodule
        self.model = build_sharded(self.trainer.strategy, self, data)
        self._base_files = base_files(self.name_or_path, self.gguf_file, self.revision)  # what it was built from
        self._check_ranks_agree_on_the_base()
        self.task.setup(self, data)
        for split in ("val", "test"):
            self.metrics[f"{split}_"] = self.task.metrics()  # trailing _: ModuleDict keys may not shadow methods
        self.trainable_params, self.total_params, names = summarize_trainable(self.model)
        share = 100 * self.trainable_params / max(self.total_params, 1)
        rank_zero_info(
            f"ftlab: policy {self.policy.name}: training {self.trainable_params:,} of {self.total_params:,} "
            f"parameters ({share:.2f}%) in: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
        )

    # ---- steps
    def forward(self, batch: dict):
        return self.task.forward(self.model, batch)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # on the host, before the batch moves to the device (masking draws from CPU generators)
        return self.task.transform_batch(batch, training=self.trainer.training)

    def training_step(self, batch: dict, batch_idx: int):
        # forward, not self(...): under DeepSpeed this module is the engine's root, already entered for this
        # step; entering it again re-ran ZeRO-3's start-of-forward hook mid-step, which reset its module trace
        # every step (no prefetch, every parameter gathered again in backward: 0.86x a plain ZeRO-3 loop)
        outputs = self.forward(batch)
        loss = self.task.loss(outputs, batch)
        bad = not bool(torch.isfinite(loss.detach()).item())
        # every rank skips or stops together, or the collectives desync (Lightning makes the vote's tensor on
        # the rank's device, as NCCL needs)
        bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            # its backward still runs, on every rank: DDP's and FSDP's gradient reductions stay in step (Lightning
            # refuses a None step on more than one rank), and on_before_optimizer_step drops the whole window's
            # gradients, those of the accumulated micro-batches before it included
            self._nonfinite(loss, batch_idx)
            return loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        for name, value in self.task.step_metrics(outputs).items():
            self.log(f"train/{name}", value, batch_size=batch["input_ids"].shape[0])
        return loss

    def _nonfinite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """A NaN/inf loss: skip the optimizer step it belongs to (every micro-batch of an accumulation window: a
        step on the others alone is not the step the config asked for) or, past the allowance, stop with the
        step, batch and the last good checkpoint named."""
        if self._skip_update:  # another micro-batch of this window: the step is skipped already
            return
        self._skip_update = True
        self.skipped_steps += 1
        where = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.skipped_steps > self.skip_nonfinite_steps:
            from ftlab.checkpoints import run_checkpoint

            ckpt = getattr(run_checkpoint(self.trainer), "last_model_path", "") or "none saved yet"
            raise TrainingDiverged(
                f"non-finite training loss ({loss.item()}) at {where}; last good checkpoint: {ckpt}. Lower "
                f"model.optim.lr, check that batch's data, or allow skips with model.skip_nonfinite_steps "
                f"(now {self.skip_nonfinite_steps})")
        rank_zero_warn(f"ftlab: non-finite loss at {where}: step skipped "
                       f"({self.skipped_steps} of {self.skip_nonfinite_steps} allowed)")
        self.log("train/skipped_steps", float(self.skipped_steps), rank_zero_only=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        """A window with a non-finite loss updates nothing: its gradients (reduced across ranks by now) are
        dropped before clipping and the step, which then skips every parameter (no gradient), on every rank
        alike (the vote in training_step). Lightning still counts the step, as it does a GradScaler skip."""
        if not self._skip_update:
            return
        self._skip_update = False
        if self._grad_scaler() is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # 16-mixed with a fused AdamW: the GradScaler checks its gradients inside the step, after this hook,
            # and with none at all records no check (its update() then fails): leave them non-finite, it skips
            for p in (p for g in optimizer.param_groups for p in g["params"] if p.grad is not None):
                p.grad.fill_(float("nan"))
            return
        optimizer.zero_grad(set_to_none=True)

    def _eval_step(self, batch: dict, split: str):
        outputs = self.forward(batch)  # as in training_step
        self.task.update_metrics(self.metrics[f"{split}_"], outputs, batch)
        weight = self.task.loss_weight(batch)
        if weight:  # a batch with nothing labelled has a NaN loss and nothing to add
            (self.val_loss if split == "val" else self.test_loss).update(self.task.loss(outputs, batch), weight=weight)

    def validation_step(self, batch: dict, batch_idx: int):
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int):
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int):
        return self.task.predict(self.forward(batch), batch, self.trainer.datamodule)

    def _log_metrics(self, split: str) -> None:
        # torchmetrics sync across ranks once per epoch (no per-step collectives)
        metrics = self.metrics[f"{split}_"]
        # sync_dist: values are already global (torchmetrics synced them); this only silences Lightning's hint
        self.log_dict({f"{split}/{k}": v for k, v in metrics.compute().items()}, prog_bar=split == "val", sync_dist=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), sync_dist=True)
        self.val_loss.reset()
        self._log_metrics("val")
        # in the steps' precision (autocast under *-mixed): a hook runs outside it, and a model holding a bf16
        # frozen base beside fp32 trained weights (model.dtype) computes only under autocast
        with self.trainer.precision_plugin.forward_context():
            self.task.validation_end(self)

    def on_fit_start(self) -> None:
        self.task.before_loop(self)

    # ---- checkpoints: they leave frozen weights out (checkpoints.leave_frozen_out), rebuilt from this base
    def frozen_pretrained(self, model: torch.nn.Module) -> set[str]:
        """Names of `model`'s parameters that a rebuild reproduces from the pretrained files: frozen, never to
        train in this run (gradual unfreezing), held by those files (not a new head, random at each build; peft's
        untrained original of a trained head aside), and left as loaded by the policy. The same at a save and at
        the resume."""
        if self.policy.changes_frozen_weights:
            return set()
        return {n for n, p in model.named_parameters(remove_duplicate=False)
                if not p.requires_grad and n in self._pretrained_names and not self.policy.will_train(n)}

    def left_out_of_checkpoints(self) -> set[str]:
        """This module's parameters that checkpoints leave out: the model's `frozen_pretrained`, and every
        frozen parameter beside it (a distillation teacher, a preference reference: rebuilt from their files)."""
        inner = {f"model.{n}" for n in self.frozen_pretrained(self.model)} if self.model is not None else set()
        return inner | {n for n, p in self.named_parameters(remove_duplicate=False)
                        if not p.requires_grad and not n.startswith("model.")}

    def _check_ranks_agree_on_the_base(self) -> None:
        """Every rank built from the same base files, and leaves the same frozen weights out of checkpoints: ranks
        read node-local caches (a hub branch fetched on two nodes at different times), and sharded saves and
        loads plan what each rank writes and reads by names every rank must share."""
        import json

        strategy = self.trainer.strategy
        mine = json.dumps([self._base_files, sorted(self._pretrained_names)], sort_keys=True)
        if not strategy.reduce_boolean_decision(strategy.broadcast(mine) == mine, all=True):
            raise ConfigError(f"model.name_or_path={self.name_or_path!r}: the ranks found different weight files "
                              "(node-local caches of different commits?); give model.revision a commit, or one shared "
                              "cache (HF_HUB_CACHE)")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ftlab_base"] = self._base_files  # taken when the model was built (configure_model)
        checkpoint["ftlab_skipped_steps"] = self.skipped_steps
        if self.policy.changes_trainable_set:  # for restore_trainable_set
            checkpoint["ftlab_trainable"] = [n for n, p in self.model.named_parameters() if p.requires_grad]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Take back the run's own state (skipped steps; when fitting, what gradual unfreezing had unfrozen), and
        refuse, on every rank alike (ranks read node-local caches), a base model other than the one the
        checkpoint's left-out frozen weights came from, or a checkpoint of another model (`_other_model`)."""
        self.skipped_steps = checkpoint.get("ftlab_skipped_steps", 0)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # a mid-epoch resume: Lightning skips on_train_epoch_start, where gradual unfreezing unfreezes, for the
            # epoch it resumes in; what had been unfrozen when the checkpoint was written trains again here
            self.restore_trainable_set(checkpoint)
        why = (base_mismatch(checkpoint.get("ftlab_base"), self._base_files, self.name_or_path)
               if self.left_out_of_checkpoints() else None) or self._other_model(checkpoint.get("state_dict"))
        if self._trainer is None:  # load_from_checkpoint: one process, no ranks to agree with
            if why:
                raise ConfigError(why)
            return
        if not self.trainer.strategy.reduce_boolean_decision(why is None, all=True):
            raise ConfigError(why or f"model.name_or_path={self.name_or_path!r}: another rank found other weight files "
                                     "than those the checkpoint was written against (its error says which)")

    def _other_model(self, saved: dict | None) -> str | None:
        """Why a checkpoint's weights (a file: single device, DDP, FSDP full) are not this run's model's, or None:
        another policy, task or model (torch's strict load would print every key, as a traceback)."""
        if not isinstance(saved, dict) or not saved or self.model is None:
            return None
        own = {n for n, _ in self.named_parameters(remove_duplicate=False)}
        own |= {n for n, _ in self.named_buffers(remove_duplicate=False)}
        trained = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        unexpected, missing = sorted(set(saved) - own), sorted(trained - set(saved))
        if not unexpected and not missing:
            return None
        return (f"the checkpoint's weights are not this run's model's (missing {len(missing)} trained tensors, e.g. "
                f"{missing[:2]}; {len(unexpected)} others, e.g. {unexpected[:2]}): was it written with another config "
                "(model, policy, task)? Run it with that run's config: --config <run>/config.yaml")

    def on_validation_start(self) -> None:
        self.task.before_loop(self)

    def on_test_start(self) -> None:
        self.task.before_loop(self)

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss.compute(), sync_dist=True)
        self.test_loss.reset()
        self._log_metrics("test")

    def restore_trainable_set(self, checkpoint: dict) -> None:
        """Before `checkpoint` loads: what gradual unfreezing had unfrozen when it was written trains again (FSDP's
        loads restore the optimizer state of training parameters only)."""
        names = set(checkpoint.get("ftlab_trainable") or ())
        changed = [n for n, p in self.model.named_parameters() if n in names and not p.requires_grad]
        for name in changed:
            self.model.get_parameter(name).requires_grad_(True)
        if changed:
            rank_zero_info(f"ftlab: {len(changed)} parameter tensors train again, as when the checkpoint was written")

    def on_train_epoch_start(self) -> None:
        changed = self.policy.on_epoch_start(self.model, self.current_epoch)
        if changed:
            follow_trainable_change(self.trainer.strategy)
            rank_zero_info(f"ftlab: epoch {self.current_epoch}: unfroze {len(changed)} more parameter tensors")

    # ---- optimizer
    def _grad_scaler(self):
        """The fp16 loss scaler of `16-mixed`, if any (bf16 needs none)."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_optimizers(self):
        groups = self.policy.param_groups(self.model, self.optim.lr, self.optim.weight_decay)
        scaled = self._grad_scaler() is not None
        if scaled and self.optim.fused and self.trainer.gradient_clip_val:
            raise ConfigError("model.optim.fused=true with trainer.precision=16-mixed and gradient_clip_val: a fused "
                              "AdamW unscales fp16 gradients inside its step, after clipping would run; leave "
                              "optim.fused unset (ftlab then uses the foreach kernel under 16-mixed)")
        # Under 16-mixed Lightning unscales the gradients before clipping and the gradient-norm log only for
        # optimizers that do not unscale inside their step, as the fused AdamW does: use the foreach one there.
        optimizer, scheduler = self.optim.build(groups, int(self.trainer.estimated_stepping_batches),
                                                allow_fused=not scaled)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning does, except that bf16-mixed may clip a fused AdamW's gradients: Lightning's
        mixed-precision plugin refuses that for both 16-mixed and bf16-mixed, though only fp16's loss scaler
        (which a fused AdamW undoes inside its step) makes clipping first wrong."""
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision

        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
