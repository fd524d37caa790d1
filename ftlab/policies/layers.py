"""Finding the parts of a Hugging Face model that policies talk about: blocks, embeddings, head.

Found from the module tree, not from per-architecture tables, so BERT (`encoder.layer`), Llama
(`model.layers`), GPT-2 (`transformer.h`) and most other models work without model-specific code.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelParts:
    """Parameter-name prefixes of a model's parts (names as in `model.named_parameters()`)."""

    blocks: tuple[str, ...]
    """One prefix per transformer block, bottom (closest to the input) first."""
    block_class: type | None
    """The class of the transformer block (used e.g. as the FSDP wrap unit)."""
    base_prefix: str
    """Prefix of the backbone (`model.base_model`); parameters outside it are the task head."""
    below_blocks: frozenset[str] = frozenset()
    """Backbone parameters registered before the first block (the embeddings)."""

    def is_head(self, name: str) -> bool:
        return not (self.base_prefix and name.startswith(self.base_prefix + "."))

    def block_index(self, name: str) -> int | None:
        for i, prefix in enumerate(self.blocks):
            if name.startswith(prefix + "."):
                return i
        return None

    def depth(self, name: str) -> int:
        """Position from the input: 0 = embeddings, 1..L = blocks, L+1 = everything above (norms, head)."""
        i = self.block_index(name)
        if i is not None:
            return i + 1
        if self.is_head(name):
            return len(self.blocks) + 1
        # backbone parameters outside the blocks: below them if they come before the first block
        # in registration order (embeddings), above them otherwise (final norm, pooler)
        return 0 if name in self.below_blocks else len(self.blocks) + 1


def find_parts(model: nn.Module) -> ModelParts:
    """Locate the transformer blocks: the longest `nn.ModuleList` of same-class modules."""
    best_name, best_list = "", None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(m) for m in module}
            if len(classes) == 1 and (best_list is None or len(module) > len(best_list)):
                best_name, best_list = name, module
    blocks = tuple(f"{best_name}.{i}" for i in range(len(best_list))) if best_list is not None else ()
    block_class = type(best_list[0]) if best_list is not None else None
    base = getattr(model, "base_model", model)
    base_prefix = ""
    if base is not model:
        base_prefix = next((n for n, m in model.named_modules() if m is base), "")
    below: list[str] = []
    if blocks:
        for name, _ in model.named_parameters():
            if name.startswith(blocks[0] + "."):
                break
            below.append(name)
    parts = ModelParts(blocks=blocks, block_class=block_class, base_prefix=base_prefix)
    return ModelParts(
        blocks=blocks,
        block_class=block_class,
        base_prefix=base_prefix,
        below_blocks=frozenset(n for n in below if not parts.is_head(n)),
    )
