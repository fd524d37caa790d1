"""Scale: what each rank holds when a >= 300M-parameter model is fine-tuned on 1 process and sharded on 2.

A Llama built from a config (random weights, saved as safetensors with SmolLM2's tokenizer into a temp
dir), full fine-tuning, fp32, 4 x 64 tokens per rank of packed chatterbot conversations, through ftlab's real
CLI: one process (`python -m ftlab ...`, the single-device strategy) and 2 ranks (`torchrun
--nproc_per_node=2 -m ftlab ...`, as the tests launch 2-rank CPU runs) under `fsdp` and `deepspeed_stage_3`.
Three phases, each its own run:

- load: `validate` on one batch: the model built and loaded, then one forward (no gradients, no optimizer).
  The forward is needed: a single process's from_pretrained maps the checkpoint lazily, its weights come
  into memory only when first used. The 2-rank runs are also measured without it (a second run of 0
  batches: the sharded load alone), since their forward gathers each unit whole (the LM head's weight);
- fit: `fit` for 2 optimizer steps, then the last checkpoint (no validation, no export);
- export: `fit --trainer.max_steps=1`: the model loaded, one step, then streamed into the Hugging Face export
  (in shards of SHARD_SIZE, so that "one shard" means something at this size). One step, not none: ftlab
  exports where training ends (on_train_end), which a skipped loop (max_steps 0) never reaches.

Measured: each rank's private memory (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup: what the
rank alone holds; pages of the memory-mapped checkpoint that two ranks share are not counted twice), sampled
every ~0.2 s by a thread following the rank processes (the launched process itself, or the children of
torchrun), with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave at once
and the figures are what the code holds, not what the allocator kept. The export is timed from the moment
rank 0 creates the export's temp folder (its first gather follows at once), the checkpoint from the moment its
`.partial` path appears. Time to the first optimizer step: from the launch to ftlab's "... trains in: ..." line,
which rank 0 logs at the end of the first step.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from math import prod
from pathlib import Path

from benchmarks.common import PY, REPO, emit, env

# ~358M parameters: 20 blocks of 1024 (12.85M each), untied 49,152 x 1024 embeddings and LM head (50.3M each)
MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=512, tie_word_embeddings=False)
TOKENIZER = "SmolLM2-135M-Instruct"  # an offline named model (its GGUF's tokenizer, chat template included)
BATCH, SEQ = 4, 64
SHARD_SIZE = "300MB"
STRATEGIES = ["fsdp", "deepspeed_stage_3"]
PHASES = ["load", "fit", "export"]
INTERVAL_S = 0.2


def build_model(folder: Path, layers: int, hidden: int) -> dict:
    """The Llama with random weights, saved like a hub checkpoint; its facts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftlab.loading import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    spec = dict(MODEL, num_hidden_layers=layers)
    if hidden != MODEL["hidden_size"]:  # a quick trial at another width keeps the proportions
        spec.update(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_attention_heads=max(1, hidden // 64),
                    num_key_value_heads=max(1, hidden // 64))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **spec)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)  # safetensors
    tok.save_pretrained(folder)
    del model
    return {"params": params, "layers": spec["num_hidden_layers"], "hidden": spec["hidden_size"],
            "vocab": len(tok), "checkpoint_mb": sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20}


def args_for(phase: str, strategy: str, ranks: int, model: Path, run_dir: Path, load_batches: int = 1) -> list[str]:
    common = [
        f"--trainer.default_root_dir={run_dir}", "--trainer.accelerator=cpu", f"--trainer.devices={ranks}",
        f"--trainer.strategy={strategy}", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={run_dir}",
        "--trainer.logger.name=csv", "--trainer.log_every_n_steps=1", "--seed_everything=0",
        f"--model.name_or_path={model}", "--model.task=CausalLM", "--model.policy=Full", "--model.optim.lr=1e-5",
        "--data=LanguageModelingData", "--data.source=chatterbot-english", f"--data.max_length={SEQ}",
        f"--data.batch_size={BATCH}", "--data.val_size=16", "--data.test_size=0", "--data.max_train_rows=200",
        "--data.sample_prompts=0",
    ]
    if phase == "load":
        return ["validate", *common, f"--trainer.limit_val_batches={load_batches}"]
    fit = ["fit", *common, "--test_after_fit=false", "--trainer.limit_val_batches=0",
           "--trainer.num_sanity_val_steps=0", "--trainer.val_check_interval=null"]
    if phase == "fit":
        return [*fit, "--trainer.max_steps=2", "--outputs.export=false"]
    return [*fit, "--trainer.max_steps=1", "--trainer.enable_checkpointing=false", "--outputs.export=true",
            f"--outputs.max_shard_size={SHARD_SIZE}"]


# ---- sampling the ranks


def _kb_fields(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in fields:
                out[key] = int(rest.split()[0])
    return out


def private_mb(pid: int) -> tuple[float, float]:
    """(Private_Clean, Private_Dirty) in MB: clean private pages are mostly file pages only this process maps
    (a memory-mapped checkpoint it reads), dirty ones its own allocations."""
    kb = _kb_fields(f"/proc/{pid}/smaps_rollup", ("Private_Clean", "Private_Dirty"))
    return kb.get("Private_Clean", 0) / 1024, kb.get("Private_Dirty", 0) / 1024


def hwm_mb(pid: int) -> float:
    return _kb_fields(f"/proc/{pid}/status", ("VmHWM",)).get("VmHWM", 0) / 1024


def children(pid: int) -> list[int]:
    """Child processes of every thread of `pid` (torchrun's agent may start its workers from any thread)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def rank_of(pid: int) -> int | None:
    """The RANK torchrun gave the process; None while it has none (between fork and exec: the launcher's)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for item in raw:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


class Sampler(threading.Thread):
    """Samples the ranks' private memory every INTERVAL_S: (seconds since launch, rank, MB) rows, and the
    clean / dirty split of each in `split`; notes when rank 0 starts the export (its temp folder appears in
    the run directory)."""

    def __init__(self, proc: subprocess.Popen, via_launcher: bool, run_dir: Path, t0: float):
        super().__init__(daemon=True)
        self.proc, self.via_launcher, self.run_dir, self.t0 = proc, via_launcher, run_dir, t0
        self.rows: list[tuple[float, int, float]] = []
        self.split: list[tuple[float, float]] = []
        self.hwm: dict[int, float] = {}
        self.ranks: dict[int, int] = {}
        self.export_start: float | None = None
        self.export_start_mb: float | None = None  # rank 0's private memory when its export started
        self.checkpoint_start: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and self.proc.poll() is None:
            t = time.monotonic() - self.t0
            try:
                pids = children(self.proc.pid) if self.via_launcher else [self.proc.pid]
            except OSError:
                pids = []
            for pid in pids:
                try:
                    if pid not in self.ranks:
                        rank = rank_of(pid) if self.via_launcher else 0
                        if rank is None:
                            continue  # not started yet: look again at the next sample
                        self.ranks[pid] = rank
                    clean, dirty = private_mb(pid)
                    self.hwm[self.ranks[pid]] = max(self.hwm.get(self.ranks[pid], 0), hwm_mb(pid))  # 0 once a zombie
                except (OSError, ValueError):  # the process just ended
                    continue
                self.rows.append((t, self.ranks[pid], clean + dirty))
                self.split.append((clean, dirty))
            time.sleep(INTERVAL_S)

    def watch_starts(self) -> None:
        """When the export and the checkpoint start, to within a few ms, and rank 0's memory at the export's
        start, read then: seen at the 0.2 s sampling, samples already holding the export's first blocks counted
        as the baseline (a one-process trial read a rise of 0 MB), and under ZeRO-3 a sample before the
        gradients were freed did (a rise of -307 MB)."""
        while not self.done.is_set() and self.proc.poll() is None:
            t = time.monotonic() - self.t0
            if self.export_start is None and any(self.run_dir.glob(".export.tmp-*")):
                self.export_start = t
                rank0 = next((pid for pid, rank in self.ranks.items() if rank == 0), None)
                try:  # the baseline read at once: memory can fall in the last 0.2 s (ZeRO-3 frees its gradients)
                    self.export_start_mb = sum(private_mb(rank0)) if rank0 is not None else None
                except OSError:
                    pass
            if self.checkpoint_start is None and any(self.run_dir.glob("checkpoints/*.partial")):
                self.checkpoint_start = t  # AtomicCheckpoint writes `<name>.partial` first
            time.sleep(0.005)


def launch(phase: str, strategy: str, ranks: int, model: Path, work: Path, timelines: Path | None = None,
           load_batches: int = 1, extra: list[str] | None = None) -> dict:
    """One run, sampled; its measurements (and, to `timelines`, every sample: for finding where memory went)."""
    run_dir = work / f"{phase}-{strategy}-{ranks}"
    args = args_for(phase, "auto" if ranks == 1 else strategy, ranks, model, run_dir, load_batches) + (extra or [])
    if ranks == 1:
        cmd = [PY, "-m", "ftlab", *args]
    else:
        torchrun = os.path.join(os.path.dirname(PY), "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc_per_node={ranks}", "-m", "ftlab", *args]
    run_env = {**env(), "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc, ranks > 1, run_dir, t0)
    sampler.start()
    threading.Thread(target=sampler.watch_starts, daemon=True).start()
    log, first_step = [], None
    for line in proc.stdout:  # ftlab's log lines, timed as they come
        log.append(line)
        if first_step is None and re.search(r"ftlab: .* trains in: ", line):
            first_step = time.monotonic() - t0
    proc.wait()
    wall = time.monotonic() - t0
    sampler.done.set()
    sampler.join()
    label = f"{phase} {strategy if ranks > 1 else 'one process'} x{ranks}"
    print(f"== {label}: {wall:.0f} s, rc {proc.returncode}\n" + "".join(log[-40:]), file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{''.join(log[-60:])}")
    rows = sampler.rows
    ranks_seen = sorted({r for _, r, _ in rows})
    if ranks_seen != list(range(ranks)):
        raise RuntimeError(f"{label}: sampled ranks {ranks_seen}, expected {ranks}")
    out = {"benchmark": "scale", "phase": phase, "strategy": strategy if ranks > 1 else "single",
           "ranks": ranks, "wall_s": round(wall, 1),
           "peak_private_mb": [round(max(m for _, r, m in rows if r == k), 1) for k in range(ranks)],
           "hwm_rss_mb": [round(sampler.hwm.get(k, 0), 1) for k in range(ranks)],
           "samples": len(rows)}
    # a coarse timeline (for reading where the memory went): each rank's level every ~2 s
    timeline = {k: [(round(t, 1), round(m)) for i, (t, r, m) in enumerate(rows) if r == k and i % (20 * ranks) < ranks]
                for k in range(ranks)}
    print(f"   timeline (s, MB) {label}: {json.dumps(timeline)}", file=sys.stderr, flush=True)
    if timelines:
        with open(timelines, "a") as f:
            f.write(json.dumps({"run": label, "export_start": sampler.export_start, "log": [line.rstrip() for line in log],
                                "rows": [(round(t, 2), r, round(c), round(d)) for (t, r, _), (c, d) in
                                         zip(rows, sampler.split)]}) + "\n")
    if phase == "fit":
        metrics = list(csv.DictReader(next(run_dir.glob("csv/*/metrics.csv")).open()))
        steps = [float(r["train/step_time_s"]) for r in metrics if r.get("train/step_time_s")]
        summary = json.loads((run_dir / "summary.json").read_text())
        start = sampler.checkpoint_start
        if start is not None:  # the steps' peak, and the checkpoint's
            out["peak_before_checkpoint_mb"] = [round(max((m for t, r, m in rows if r == k and t < start), default=0), 1)
                                                for k in range(ranks)]
        out.update(time_to_first_step_s=round(first_step, 1) if first_step else None,
                   first_step_s=round(steps[0], 1) if steps else None, steps=summary.get("steps"),
                   param_numel_per_rank=summary.get("param_numel_per_rank"),
                   checkpoint=sorted(p.name for p in (run_dir / "checkpoints").iterdir()))
        if summary.get("steps") != 2 or not out["checkpoint"]:
            raise RuntimeError(f"{label}: expected 2 steps and a checkpoint, got {summary.get('steps')}, {out['checkpoint']}")
    if phase == "export":
        from safetensors import safe_open

        files = sorted((run_dir / "export").glob("*.safetensors"))
        block_bytes: dict[str, int] = {}  # one block: a module's own tensors (what iter_full_state gathers at once)
        for file in files:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    block = name.rpartition(".")[0]
                    block_bytes[block] = block_bytes.get(block, 0) + 4 * prod(f.get_slice(name).get_shape())  # fp32
        start = sampler.export_start
        if start is None:
            raise RuntimeError(f"{label}: the export's start was not seen")
        before = [m for t, r, m in rows if r == 0 and t <= start]
        during = [m for t, r, m in rows if r == 0 and t >= start]
        at_start = sampler.export_start_mb or (before[-1] if before else during[0])
        out.update(shards=len(files), largest_shard_mb=round(max(f.stat().st_size for f in files) / 2**20, 1),
                   largest_block_mb=round(max(block_bytes.values()) / 2**20, 1),
                   export_start_s=round(start, 1), rank0_at_export_start_mb=round(at_start, 1),
                   rank0_export_peak_mb=round(max([at_start, *during]), 1))
    shutil.rmtree(run_dir, ignore_errors=True)  # GBs each (checkpoints, exports)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"], help="quick trials: fewer blocks")
    p.add_argument("--hidden", type=int, default=MODEL["hidden_size"], help="quick trials: narrower blocks")
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--phases", nargs="+", default=PHASES)
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="1: the one-process runs; 2: the sharded ones")
    p.add_argument("--timelines", type=Path, help="append every run's samples (s, rank, clean MB, dirty MB) here")
    p.add_argument("--load-batches", type=int, default=1, help="validation batches of the load phase (0: the load alone)")
    p.add_argument("--extra", action="append", default=[], help="one more CLI option for the 2-rank runs (repeatable): "
                   "e.g. --strategies ftlab.strategies.DeepSpeed --extra=--trainer.strategy.stage=3")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftlab-bench-scale-"))
    try:
        facts = build_model(work / "model", args.layers, args.hidden)
        emit({"benchmark": "scale-model", **facts, "batch": BATCH, "seq_len": SEQ, "precision": "32-true",
              "max_shard_size": SHARD_SIZE, "sample_interval_s": INTERVAL_S})
        for phase in args.phases:  # per phase: one process, then each strategy on 2 ranks
            if 1 in args.ranks:
                emit(launch(phase, "single", 1, work / "model", work, args.timelines, args.load_batches))
            for strategy in args.strategies if 2 in args.ranks else []:
                out = launch(phase, strategy, 2, work / "model", work, args.timelines, args.load_batches, args.extra)
                if phase == "load" and args.load_batches:
                    # the sharded load alone, apart from the forward's gathers (the LM head's whole weight); one
                    # process has no such figure: its weights come into memory only when the forward reads them
                    alone = launch(phase, strategy, 2, work / "model", work, args.timelines, 0, args.extra)
                    out["load_alone_peak_mb"] = alone["peak_private_mb"]
                emit(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
