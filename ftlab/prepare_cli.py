"""`python -m ftlab prepare --config X.yaml`: load, check, split and tokenise a fit config's data into the cache
that `fit` reads (the same key), without a Trainer or model weights; then print what is in it.

On a CPU node or a login node, before the GPU job: `fit` then finds the cache and tokenises nothing.
"""

from __future__ import annotations

import sys
import time

from ftlab.data import prepare


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m ftlab prepare --config FILE.yaml [fit overrides, e.g. --data.num_proc 8]\n\n"
              "Tokenises the config's data into the cache `fit` reads (the same cache key), without loading model "
              "weights, and prints rows, tokens, padding/packing efficiency and where the cache is. One process "
              "prepares a cache at a time (a file lock); others wait for it.")
        return 0
    from ftlab.cli import parse_fit_config

    dm = parse_fit_config(argv).datamodule  # every config check, no weights, no Trainer
    start = time.perf_counter()
    dm.prepare_data()
    seconds = time.perf_counter() - start
    dm.setup()
    info = prepare.summary(dm)
    how = (f"prepared in {seconds:.1f} s with {dm.processes()} processes (data.num_proc)" if dm.prepared_here
           else "already there: nothing tokenised")
    print(f"ftlab prepare: {info['cache']} ({how})")
    print(f"  {'split':<11}{'rows':>12}{'tokens':>15}  real tokens / computed")
    for split, s in info["splits"].items():
        print(f"  {split:<11}{s['rows']:>12,}{s['tokens']:>15,}  {s['efficiency']:.3f} ({s['of']})")
    sys.stdout.flush()
    return 0
