"""Padding waste: real tokens / computed tokens of each batching on the real offline datasets.

Batchings: pad every row to max_length; dynamic padding (each batch to its longest row) over random
batches; length-grouped batches (ftlab's default for classification and NER: mega-batches of 50 sorted by
length); packing (ftlab's default for language modelling: several examples per max_length row).
Prints one JSON line per dataset.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

from ftlab.data import LanguageModelingData, TextClassificationData, TokenClassificationData
from ftlab.data.samplers import GroupedBatchSampler

CASES = {
    "rotten-tomatoes (classification)": lambda cache: TextClassificationData(
        "rotten-tomatoes-snippets", tokenizer="all-MiniLM-L6-v2", text_column="text", label_column="category",
        label_names=["rotten", "fresh"], keep_rows={"category": ["rotten", "fresh"]}, deduplicate=True,
        val_size=1000, test_size=2000, max_length=64, batch_size=32, cache_dir=cache),
    "wnut16 (NER)": lambda cache: TokenClassificationData(
        "wnut16-ner", tokenizer="all-MiniLM-L6-v2", val_size=200, test_size=300, max_length=64, batch_size=16,
        cache_dir=cache),
    "plot summaries (domain adaptation, MLM)": lambda cache: LanguageModelingData(
        "rotten-tomatoes-snippets", tokenizer="all-MiniLM-L6-v2", text_column="text", keep_rows={"category": ["plot"]},
        val_size=60, test_size=60, max_length=128, batch_size=16, cache_dir=cache),
    "chatterbot (SFT, SmolLM2 chat template)": lambda cache: LanguageModelingData(
        "chatterbot-english", tokenizer="SmolLM2-135M-Instruct", val_size=100, test_size=100, max_length=256,
        batch_size=4, cache_dir=cache),
}


def efficiency(lengths: list[int], batches: list[list[int]], pad_to: int | None = None) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * (pad_to or max(lengths[i] for i in b)) for b in batches)
    return real / computed


def measure(name: str, make, cache: str) -> dict:
    packed = make(cache)
    packed.setup()
    out = {"benchmark": "padding", "dataset": name, "max_length": packed.max_length, "batch_size": packed.batch_size}
    if isinstance(packed, LanguageModelingData):
        # the examples one per row (packing off) give the per-example lengths
        single = make(cache)
        single.packing = False
        single.setup()
        lengths = list(single.splits["train"]["length"])
        rows = list(packed.splits["train"]["length"])
        out["packing"] = sum(rows) / (len(rows) * packed.max_length)
        out["default"] = "packing"
    else:
        lengths = list(packed.splits["train"]["length"])
        out["default"] = "length-grouped"
    b = packed.batch_size
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(lengths), generator=g).tolist()
    random_batches = [order[i:i + b] for i in range(0, len(order) - b + 1, b)]
    out["pad_to_max"] = efficiency(lengths, random_batches, packed.max_length)
    out["dynamic"] = efficiency(lengths, random_batches)
    grouped = list(GroupedBatchSampler(lengths, b, shuffle=True, group_by_length=True, seed=0))
    out["length_grouped"] = efficiency(lengths, grouped)
    out["examples"] = len(lengths)
    out["mean_tokens"] = sum(lengths) / len(lengths)
    return out


def main() -> None:
    cache = os.environ.get("FTLAB_BENCH_CACHE") or tempfile.mkdtemp(prefix="ftlab-bench-")
    for name, make in CASES.items():
        print(json.dumps(measure(name, make, cache)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
