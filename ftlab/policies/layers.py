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
    """One prefix per transformer block, bottom (closest to the input) first; an encoder-decoder's encoder
    blocks, then its decoder blocks."""
    block_class: type | tuple[type, ...] | None
    """The class of the transformer block, or the encoder's and decoder's (used e.g. as the FSDP wrap unit)."""
    base_prefix: str
    """Prefix of the backbone (`model.base_model`); parameters outside it are the task head."""
    below_blocks: frozenset[str] = frozenset()
    """Backbone parameters registered before the first block (the embeddings)."""
    head_prefixes: tuple[str, ...] = ()
    """The head's modules, for a model that is its own backbone (no `base_prefix`: T5's LM head)."""

    def is_head(self, name: str) -> bool:
        if not self.base_prefix:
            return any(name.startswith(p + ".") for p in self.head_prefixes)
        return not name.startswith(self.base_prefix + ".")

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


def _block_list(model: nn.Module, within: nn.Module | None = None) -> tuple[str, nn.ModuleList | None]:
    """The longest `nn.ModuleList` of same-class modules (in `within`, a submodule of `model`, if given)."""
    inside = {id(m) for m in within.modules()} if within is not None else None
    best_name, best_list = "", None
    for name, module in model.named_modules():
        if inside is not None and id(module) not in inside:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(m) for m in module}
            if len(classes) == 1 and (best_list is None or len(module) > len(best_list)):
                best_name, best_list = name, module
    return best_name, best_list


def _stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The block lists, input side first: an encoder-decoder's encoder blocks and decoder blocks (the
    decoder's are the top: the ones nearest the output), else the model's one longest list."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        halves = []
        for getter in ("get_encoder", "get_decoder"):
            part = getattr(model, getter, lambda: None)()
            found = _block_list(model, part) if isinstance(part, nn.Module) else ("", None)
            if found[1] is not None:
                halves.append(found)
        if len(halves) == 2 and halves[0][0] != halves[1][0]:
            return halves
    name, blocks = _block_list(model)
    return [(name, blocks)] if blocks is not None else []


def find_parts(model: nn.Module) -> ModelParts:
    """Locate the transformer blocks (the longest `nn.ModuleList` of same-class modules; an encoder-decoder's
    two), the backbone and the head."""
    stacks = _stacks(model)
    blocks = tuple(f"{name}.{i}" for name, stack in stacks for i in range(len(stack)))
    classes = tuple(dict.fromkeys(type(stack[0]) for _, stack in stacks))
    block_class = None if not classes else classes[0] if len(classes) == 1 else classes
    base = getattr(model, "base_model", model)
    base_prefix, head_prefixes = "", ()
    if base is not model:
        base_prefix = next((n for n, m in model.named_modules() if m is base), "")
    else:  # the model is its own backbone (T5): the head is its output layer
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_prefixes = tuple(n for n, m in model.named_modules() if head is not None and m is head and n)
    below: list[str] = []
    if blocks:
        for name, _ in model.named_parameters():
            if name.startswith(blocks[0] + "."):
                break
            below.append(name)
    parts = ModelParts(blocks=blocks, block_class=block_class, base_prefix=base_prefix, head_prefixes=head_prefixes)
    return ModelParts(
        blocks=blocks,
        block_class=block_class,
        base_prefix=base_prefix,
        below_blocks=frozenset(n for n in below if not parts.is_head(n)),
        head_prefixes=head_prefixes,
    )
