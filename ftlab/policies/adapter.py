"""Parameter-efficient fine-tuning through peft: LoRA, DoRA, IA3, prefix and prompt tuning (and any
other peft method by name)."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from torch import nn

from ftlab.errors import ConfigError, did_you_mean
from ftlab.policies.base import Policy
from ftlab.policies.layers import find_parts

if TYPE_CHECKING:
    from peft import PeftType

# Friendly names -> (peft type, fixed config values). Any other peft type works by its own name. peft is
# imported once an adapter policy is made: other runs never pay for it (and the bitsandbytes it imports).
_ALIASES = {
    "lora": ("LORA", {}),
    "dora": ("LORA", {"use_dora": True}),
    "ia3": ("IA3", {}),
    "prefix": ("PREFIX_TUNING", {}),
    "prompt": ("PROMPT_TUNING", {}),
}


def _peft_type(method: str) -> tuple[PeftType, dict]:
    from peft import PeftType

    key = method.lower().replace("-", "_")
    if key in _ALIASES:
        name, fixed = _ALIASES[key]
        return PeftType[name], fixed
    if key.upper() in PeftType.__members__:
        return PeftType[key.upper()], {}
    choices = list(_ALIASES) + [m.lower() for m in PeftType.__members__]
    raise ConfigError(f"policy.method={method!r} is not a peft method; {did_you_mean(method, choices)}")


def _default_targets(peft_type: PeftType, model_type: str):
    """peft's own per-architecture table; `all-linear` where it has no entry (LoRA-like methods)."""
    from peft.utils import constants

    table = getattr(constants, f"TRANSFORMERS_MODELS_TO_{peft_type.value}_TARGET_MODULES_MAPPING", None)
    if table and model_type in table:
        return None  # peft resolves it itself
    return "all-linear"


def _target_matches(target: str, module_names: list[str]) -> bool:
    """The rule peft applies to a list entry: the module name equals it or ends with `.target`."""
    return any(n == target or n.endswith("." + target) for n in module_names)


class Adapter(Policy):
    """Parameter-efficient fine-tuning with peft: the backbone stays frozen, small adapters train.

    The task head trains too (peft's `modules_to_save`)."""

    name = "adapter"

    def __init__(
        self,
        method: str = "lora",
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.05,
        target_modules: list[str] | str | None = None,
        num_virtual_tokens: int = 20,
        train_head: bool = True,
        options: dict | None = None,
    ):
        """
        Args:
            method: lora, dora, ia3, prefix, prompt, or the name of any other peft method (loha, lokr, vera...).
            r: Rank of the LoRA/DoRA update (and of methods with a rank).
            alpha: LoRA scaling numerator (the update is scaled by alpha / r).
            dropout: Dropout on the adapter input (LoRA/DoRA).
            target_modules: Module names (suffixes, e.g. `[query, value]`), a regex string, or `all-linear`.
                Default: peft's table for the architecture, else every linear layer.
            num_virtual_tokens: Virtual tokens for prefix and prompt tuning.
            train_head: Keep the task head (e.g. `classifier`) trainable and saved with the adapter.
            options: Further fields of the peft config class (e.g. `{init_lora_weights: pissa}`).
        """
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        self.peft_type, self._fixed = _peft_type(method)
        if r <= 0:
            raise ConfigError(f"policy.r={r} must be a positive integer (e.g. 8)")
        if not 0 <= dropout < 1:
            raise ConfigError(f"policy.dropout={dropout} must be in [0, 1)")
        if num_virtual_tokens <= 0:
            raise ConfigError(f"policy.num_virtual_tokens={num_virtual_tokens} must be positive")
        self.method = method.lower()
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = target_modules
        self.num_virtual_tokens = num_virtual_tokens
        self.train_head = train_head
        self.options = dict(options or {})
        self._config_class = PEFT_TYPE_TO_CONFIG_MAPPING[self.peft_type]
        fields = {f.name for f in dataclasses.fields(self._config_class)}
        unknown = sorted(set(self.options) - fields)
        if unknown:
            raise ConfigError(
                f"policy.options: {unknown} are not fields of peft's {self._config_class.__name__}; "
                f"{did_you_mean(unknown[0], sorted(fields))}"
            )

    def _head_modules(self, model: nn.Module) -> list[str]:
        parts = find_parts(model)
        return sorted({name.split(".", 1)[0] for name, _ in model.named_parameters() if parts.is_head(name)})

    def peft_config(self, model: nn.Module, task):
        fields = {f.name for f in dataclasses.fields(self._config_class)}
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        targets = self.target_modules
        if targets is None and "target_modules" in fields:
            targets = _default_targets(self.peft_type, model_type)
        wanted = {
            "task_type": task.peft_task_type,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "num_virtual_tokens": self.num_virtual_tokens,
            "modules_to_save": self._head_modules(model) if self.train_head else None,
            **self._fixed,
            **self.options,
        }
        kwargs = {k: v for k, v in wanted.items() if k in fields and v is not None}
        try:
            return self._config_class(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"policy: peft rejected the {self.method} options {kwargs}: {err}") from None

    def validate(self, model: nn.Module, task) -> None:
        if isinstance(self.target_modules, list):
            names = [n for n, _ in model.named_modules()]
            leaf_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            for target in self.target_modules:
                if not _target_matches(target, names):
                    raise ConfigError(
                        f"policy.target_modules: {target!r} matches no module of this "
                        f"{type(model).__name__}; {did_you_mean(target, leaf_names)}"
                    )
        elif isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                pattern = re.compile(self.target_modules)
            except re.error as err:
                raise ConfigError(f"policy.target_modules: {self.target_modules!r} is not a valid regex ({err})") from None
            if not any(pattern.fullmatch(n) for n, _ in model.named_modules()):
                raise ConfigError(f"policy.target_modules: regex {self.target_modules!r} matches no module name "
                                  "(peft needs a full match of the dotted name)")

    def apply(self, model: nn.Module, task) -> nn.Module:
        from peft import get_peft_model

        try:
            return get_peft_model(model, self.peft_config(model, task))
        except ValueError as err:  # peft's own checks (e.g. targets of a type it cannot adapt)
            raise ConfigError(f"policy: peft could not apply {self.method}: {err}") from None

    @property
    def changes_frozen_weights(self) -> bool:
        # PiSSA, OLoRA, CorDA, LoftQ...: the adapter starts as a part of the base weight, which peft subtracts
        # from the (frozen) base (peft/tuners/lora/layer.py); only the plain inits leave the base as loaded
        return self.method == "lora" and self.options.get("init_lora_weights", True) not in (True, False, "gaussian")

    def meta_init_blocker(self) -> str | None:
        init = self.options.get("init_lora_weights", True)
        if self.method != "lora" or self.options.get("use_dora"):
            return f"peft method {self.method}: only LoRA adapters are initialised before the weights load"
        if init not in (True, False, "gaussian"):
            return f"init_lora_weights={init!r} computes the adapter from the loaded weights"
        return None

    def initial_values(self, model: nn.Module, names: list[str]) -> dict:
        """LoRA matrices initialised by peft itself, on a host copy of each adapted layer's adapter part. The
        matrices are made as peft makes them (nn.Linear, whose construction draws from the RNG too), layer by
        layer in peft's order: from the same RNG state, the values peft gives a model loaded whole."""
        import copy

        from peft.tuners.lora import LoraLayer

        wanted, values = set(names), {}
        for prefix, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            twin = copy.deepcopy(layer)  # its base layer stays on the meta device: nothing is allocated for it
            for adapter in twin.lora_A:
                a, b = twin.lora_A[adapter], twin.lora_B[adapter]
                twin.lora_A[adapter] = nn.Linear(a.in_features, a.out_features, bias=False, dtype=a.weight.dtype)
                twin.lora_B[adapter] = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None,
                                                 dtype=b.weight.dtype)
                twin.reset_lora_parameters(adapter, self.options.get("init_lora_weights", True))
            for name, p in twin.named_parameters():
                if f"{prefix}.{name}" in wanted:
                    values[f"{prefix}.{name}"] = p.detach()
        return values

    def copied_params(self, names: list[str]) -> dict[str, str]:
        # peft trains a copy of each module to save (the task head) and keeps the original beside it
        pattern = re.compile(r"\.modules_to_save\.[^.]+\.")
        return {n: pattern.sub(".original_module.", n) for n in names if pattern.search(n)}

    def describe(self) -> dict:
        out = {"policy": self.name, "peft_method": self.method}
        if "r" in {f.name for f in dataclasses.fields(self._config_class)}:
            out["peft_r"] = self.r
        return out
