"""Preference tuning of causal LMs on (prompt, chosen, rejected) pairs: DPO, IPO, hinge (SLiC) against a
reference model, or the reference-free SimPO and ORPO (see `preference_losses`).

Each batch holds the chosen responses then the rejected ones of the same pairs (`PreferenceData`), so one
forward scores both. The reference (`preference_reference`) is the adapter switched off under the Adapter
policy, a frozen copy placed like the trained model under Full/Freeze, or log-probs computed once before
training (`precompute_reference`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection
from transformers import AutoModelForCausalLM

from ftlab.errors import ConfigError, did_you_mean
from ftlab.metrics import Mean
from ftlab.tasks import chunked_loss
from ftlab.tasks.base import Task
from ftlab.tasks.preference_losses import DEFAULT_BETA, LOSSES, NEEDS_REFERENCE, PairLoss
from ftlab.tasks.preference_reference import AdapterOff, FrozenCopy, Precomputed, Reference, model_pair_logps

METRICS = ("reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
           "logps_rejected")


def _uses_adapter(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None))  # a peft model


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (as TRL does by default): with it, the trained model's log-probs and an
    adapter-off reference's would carry independent noise, and a pair's reward would be noise at start."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # Llama-style attention takes a float
            m.attention_dropout = 0.0


class Preference(Task):
    """Learn from preference pairs: raise the chosen response's likelihood over the rejected one's."""

    name = "preference"
    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"
    main_metric = "reward_accuracy"
    higher_is_better = True
    data_class = "PreferenceData"

    def __init__(self, loss: str = "dpo", beta: float | None = None, label_smoothing: float = 0.0,
                 gamma: float = 0.5, precompute_reference: bool = False, disable_dropout: bool = True) -> None:
        """
        Args:
            loss: dpo (sigmoid), ipo, hinge (with a reference model), or the reference-free simpo and orpo.
            beta: Strength of the preference term. Default per loss: 0.1 (dpo, ipo, hinge; ORPO's lambda),
                2.0 (simpo).
            label_smoothing: dpo and simpo: the share of pairs assumed mislabelled (conservative DPO), in [0, 0.5).
            gamma: simpo's target reward margin.
            precompute_reference: Compute the reference log-probs of every pair once before training (stored
                beside the tokenised data) and hold no reference model while training.
            disable_dropout: Turn the model's dropout off (the log-probs of policy and reference then carry no
                dropout noise).
        """
        if loss not in LOSSES:
            raise ConfigError(f"model.task.loss={loss!r} is not a preference loss; {did_you_mean(loss, LOSSES)}")
        beta = DEFAULT_BETA[loss] if beta is None else beta
        if beta <= 0:
            raise ConfigError(f"model.task.beta={beta} must be positive (e.g. {DEFAULT_BETA[loss]})")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"model.task.label_smoothing={label_smoothing} must be in [0, 0.5)")
        if label_smoothing and loss not in ("dpo", "simpo"):
            raise ConfigError(f"model.task.label_smoothing applies to dpo and simpo, not {loss}; leave it 0")
        if precompute_reference and loss not in NEEDS_REFERENCE:
            raise ConfigError(f"model.task.precompute_reference: loss {loss} uses no reference model; leave it false")
        self.loss_name, self.beta, self.label_smoothing, self.gamma = loss, beta, label_smoothing, gamma
        self.precompute_reference = precompute_reference
        self.disable_dropout = disable_dropout
        self.reference: Reference | None = None
        self.chunked: chunked_loss.ChunkedLoss | None = None

    def set_loss_chunk_size(self, size: int) -> None:
        """`model.loss_chunk_size`: the trained model's log-probs without its full logits."""
        self.chunked = chunked_loss.ChunkedLoss(size)

    def resolve(self, config) -> None:
        if self.chunked is not None:
            chunked_loss.check_model(config, self.chunked.size)

    # ---- reference model
    def check_policy(self, policy) -> None:
        if (self.loss_name in NEEDS_REFERENCE and getattr(policy, "changes_frozen_weights", False)
                and not self.precompute_reference):
            raise ConfigError(f"model.task.loss={self.loss_name} with init_lora_weights="
                              f"{policy.options.get('init_lora_weights')!r}: that init moves part of the base weights "
                              "into the adapter, so the adapter switched off is not the starting model the reference "
                              "must be; set model.task.precompute_reference: true (the starting model's log-probs), "
                              "or use the default init")

    def setup(self, module, data) -> None:
        if self.disable_dropout:
            disable_dropout(module.model)
        if self.loss_name not in NEEDS_REFERENCE:
            return
        adapter = _uses_adapter(module.model)
        # PiSSA, OLoRA, LoftQ...: the adapter starts as a part of the base weight, taken out of the frozen base,
        # so the adapter switched off is not the starting model; at step 0 the model itself is
        moved_base = bool(getattr(module.policy, "changes_frozen_weights", False))  # refused unless precomputed
        # the reference pass chunked as the trained model's: its full logits would be the peak the option avoids
        if self.precompute_reference:
            self.reference = Precomputed(AdapterOff(self.chunked) if adapter and not moved_base else None,
                                         self.chunked)
        elif adapter:
            self.reference = AdapterOff(self.chunked)
        else:
            self.reference = self._frozen_copy(module)

    def frozen_model(self, module) -> tuple[str, str | None, str | None] | None:
        """A reference copy of the pretrained model (setup): for a loss with a reference, neither precomputed
        nor the adapter switched off."""
        if self.loss_name in NEEDS_REFERENCE and not self.precompute_reference and module.policy.name != "adapter":
            return module.name_or_path, module.gguf_file, module.revision
        return None

    def _frozen_copy(self, module) -> FrozenCopy:
        from ftlab.strategies import build_frozen
        from ftlab.tasks.distillation import FrozenTeacher

        if module.config_overrides:
            raise ConfigError("model.config_overrides change the trained model but not a frozen reference copy "
                              "loaded from model.name_or_path; set model.task.precompute_reference: true")
        frozen = build_frozen(module.trainer.strategy, self.auto_class, module.name_or_path, module.gguf_file,
                              module.frozen_dtype(), module.revision, **module.frozen_options(same_model=True))
        module.reference = FrozenTeacher(frozen)  # a submodule: moved to the device and placed with the module
        return FrozenCopy(module.reference, self.chunked)

    def before_loop(self, module) -> None:
        if self.reference is not None:
            self.reference.before_loop(module)

    # ---- loss
    def forward(self, model: nn.Module, batch: dict) -> Any:
        if self.chunked is None:
            policy = model_pair_logps(model, batch)
        ref = self.reference.pair_logps(model, batch) if self.reference is not None else None
        if self.chunked is not None:  # after the reference: its forward of the same FSDP root would reshard the head
            policy = model_pair_logps(model, batch, self.chunked)
        result: PairLoss = LOSSES[self.loss_name](policy, ref, beta=self.beta, gamma=self.gamma,
                                                  label_smoothing=self.label_smoothing)
        return {"loss": result.losses.mean(), "pair_losses": result.losses,
                "chosen_rewards": result.chosen_rewards, "rejected_rewards": result.rejected_rewards,
                "logps_chosen": policy.chosen, "logps_rejected": policy.rejected}

    def loss(self, outputs: Any, batch: dict) -> torch.Tensor:
        return outputs["loss"]

    # ---- metrics
    @staticmethod
    def pair_values(outputs: dict) -> dict[str, torch.Tensor]:
        """Per-pair values of the metrics (means of these are logged)."""
        chosen, rejected = outputs["chosen_rewards"].detach(), outputs["rejected_rewards"].detach()
        return {"reward_accuracy": (chosen > rejected).float(), "reward_margin": chosen - rejected,
                "rewards_chosen": chosen, "rewards_rejected": rejected,
                "logps_chosen": outputs["logps_chosen"].detach(), "logps_rejected": outputs["logps_rejected"].detach()}

    def metrics(self) -> MetricCollection:
        return MetricCollection({name: Mean() for name in METRICS}, compute_groups=False)

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict) -> None:
        for name, values in self.pair_values(outputs).items():
            metrics[name].update(values.float())

    def step_metrics(self, outputs: Any) -> dict[str, torch.Tensor]:
        return {name: values.float().mean() for name, values in self.pair_values(outputs).items()}
