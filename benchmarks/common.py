"""Shared by the benchmarks: run `ftlab fit` or a plain script in a subprocess, read step times back,
interleave repeats (this machine is shared and noisy: only ratios measured side by side are reported)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "FTLAB_CACHE": os.environ.get("FTLAB_CACHE", str(REPO / ".cache" / "ftlab"))}


def run(cmd: list[str], timeout: int = 1200) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed:\n{out.stderr[-3000:]}")
    return out


def launcher(ranks: int = 1) -> list[str]:
    """`python` for one process; torchrun for several (as the tests launch 2-rank CPU runs)."""
    if ranks == 1:
        return [PY]
    return [os.path.join(os.path.dirname(PY), "torchrun"), "--standalone", f"--nproc_per_node={ranks}"]


def ftlab_fit(config: str, *overrides: str, timeout: int = 1200, ranks: int = 1) -> tuple[Path, dict, list[dict]]:
    """One `ftlab fit` (on `ranks` processes) with a CSV log of every step; (run dir, summary, metric rows)."""
    run_dir = Path(tempfile.mkdtemp(prefix="ftlab-bench-run-"))
    run([*launcher(ranks), "-m", "ftlab", "fit", f"--config={config}", f"--trainer.default_root_dir={run_dir}",
         "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={run_dir}", "--trainer.logger.name=csv",
         "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", *overrides], timeout)
    rows = list(csv.DictReader(next(run_dir.glob("csv/*/metrics.csv")).open()))
    return run_dir, json.loads((run_dir / "summary.json").read_text()), rows


def plain_step(module, model, batch, opt, sched):
    """One optimizer step of the plain loops the framework is measured against: the task's loss, backward,
    clipping at 1.0 (as the ftlab configs), the update and the schedule; returns the loss."""
    import torch

    loss = module.task.forward(model, batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss


def step_times(rows: list[dict], skip: int = 5) -> list[float]:
    times = [float(r["train/step_time_s"]) for r in rows if r.get("train/step_time_s")]
    return times[skip:]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
