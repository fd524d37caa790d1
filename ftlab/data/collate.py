"""Dynamic padding: pad each batch to its own longest row.

Why not transformers' DataCollatorWithPadding: it goes through `tokenizer.pad` per batch, a slow path
(transformers itself warns about it); rows here are already token ids, so padding is a tensor fill.
"""

from __future__ import annotations

import torch

_PAD_ZERO = ("attention_mask", "token_type_ids", "position_ids")  # position 0 after a packed row: a pad "example" of its own


class PadCollator:
    """Stacks rows of token ids into padded tensors; `labels` lists are padded with -100 (ignored). Rows
    without an attention mask get one from their lengths (the cache does not store a column of ones),
    except packed rows (position_ids): their examples are told apart by positions, not by a mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.left = padding_side == "left"

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            if key == "length":
                continue
            values = [r[key] for r in rows]
            if not isinstance(values[0], list):
                batch[key] = torch.tensor(values)
                continue
            # each column to its own longest row: a seq2seq target may be longer than every source
            longest = self._padded(max(len(v) for v in values))
            fill = -100 if key == "labels" else 0 if key in _PAD_ZERO else self.pad_token_id
            out = torch.full((len(rows), longest), fill, dtype=torch.long)
            for i, v in enumerate(values):
                if self.left:
                    out[i, longest - len(v):] = torch.tensor(v, dtype=torch.long)
                else:
                    out[i, : len(v)] = torch.tensor(v, dtype=torch.long)
            batch[key] = out
        if "attention_mask" not in batch and "position_ids" not in batch:
            lengths = torch.tensor([len(r["input_ids"]) for r in rows])
            longest = batch["input_ids"].shape[1]
            columns = torch.arange(longest)
            batch["attention_mask"] = (columns >= longest - lengths[:, None] if self.left else
                                       columns < lengths[:, None]).long()
        return batch

    def _padded(self, length: int) -> int:
        return -(-length // self.multiple) * self.multiple if self.multiple else length


def batch_counts(batch: dict) -> tuple[int, int]:
    """(rows, real tokens) of a padded batch: padding does not count as a token."""
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    if "pair_index" in batch:  # preference pairs: one sample is a pair of sequences
        return batch["pair_index"].shape[0], tokens
    return batch["input_ids"].shape[0], tokens
