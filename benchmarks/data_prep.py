"""Data preparation: tokenisation throughput on the real datasets, and cache reuse (a second run with the
same data, tokenizer and options must not tokenise again)."""

from __future__ import annotations

import os
import sys
import tempfile
import time

from benchmarks.common import emit
from benchmarks.padding import CASES


def main() -> None:
    for name, make in CASES.items():
        # a fresh cache (or run_all's, empty at the start: padding.py reads it afterwards)
        cache = os.environ.get("FTLAB_BENCH_CACHE") or tempfile.mkdtemp(prefix="ftlab-bench-cache-")
        first = make(cache)
        first.tokenizer  # noqa: B018 - load the tokenizer outside the timing
        t0 = time.perf_counter()
        first.prepare_data()
        cold = time.perf_counter() - t0
        first.setup()
        rows = sum(len(s) for s in first.splits.values())
        tokens = sum(sum(s["length"]) for s in first.splits.values())
        second = make(cache)
        second.tokenizer  # noqa: B018
        calls = []
        second.encode = lambda batch, _f=second.encode, _c=calls: _c.append(1) or _f(batch)  # count tokenising
        t0 = time.perf_counter()
        second.prepare_data()
        second.setup()
        warm = time.perf_counter() - t0
        emit({"benchmark": "data_prep", "dataset": name, "rows": rows, "tokens": tokens, "cold_s": cold,
              "rows_per_s": rows / cold, "tokens_per_s": tokens / cold, "cached_s": warm,
              "retokenised": bool(calls), "speedup": cold / warm})


if __name__ == "__main__":
    sys.exit(main())
