"""Distillation: size and inference speed of the student against its teacher (the runs of
configs/quickstart-full.yaml and configs/distill-minilm-sentiment.yaml), forward passes on the same
batches (32 x 64 tokens), alternating, median of 5 rounds; plus both test accuracies from the runs."""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from benchmarks.common import REPO, emit

RUNS = {"teacher": REPO / "runs" / "quickstart-full", "student": REPO / "runs" / "distill-minilm-sentiment"}


def main() -> None:
    from transformers import AutoModelForSequenceClassification

    if not all((r / "export" / "config.json").exists() for r in RUNS.values()):
        emit({"benchmark": "distill_speed", "skipped": "run configs/quickstart-full.yaml and "
              "configs/distill-minilm-sentiment.yaml first"})
        return
    models = {k: AutoModelForSequenceClassification.from_pretrained(r / "export").eval() for k, r in RUNS.items()}
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(1000, 20000, (32, 64), generator=g) for _ in range(10)]
    times = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(5):
            for name, model in models.items():
                t0 = time.perf_counter()
                for ids in batches:
                    model(input_ids=ids)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    summaries = {k: json.loads((r / "summary.json").read_text()) for k, r in RUNS.items()}
    emit({"benchmark": "distill_speed", **{f"{k}_params": sum(p.numel() for p in m.parameters()) for k, m in models.items()},
          **{f"{k}_layers": m.config.num_hidden_layers for k, m in models.items()},
          **{f"{k}_accuracy": s["test/accuracy"] for k, s in summaries.items()},
          "student_speedup": med["teacher"] / med["student"]})


if __name__ == "__main__":
    sys.exit(main())
