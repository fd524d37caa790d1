"""Writes BENCHMARKS.md from the JSON lines the benchmarks printed (benchmarks/results.jsonl)."""

from __future__ import annotations

import json
import platform
import statistics
import sys
from datetime import date
from pathlib import Path

from benchmarks.common import REPO


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


# Issue 15, before sharded loading (a 370M Llama, fp32): each rank's peak over one process's (rank 0 / rank 1)
SCALE_BEFORE = {("load", "fsdp"): (0.89, 0.78), ("load", "deepspeed_stage_3"): (1.26, 1.27),
                ("fit", "fsdp"): (0.64, 0.43), ("fit", "deepspeed_stage_3"): (0.91, 0.73)}
SCALE_GOALS = {"load": 0.65, "fit": 0.6}  # at 2 ranks, each rank's peak over one process's, at most
SCALE_STRATEGIES = ("fsdp", "deepspeed_stage_3")


def scale_section(records: list[dict], model: dict) -> list[str]:
    """Section 6 from benchmarks/scale.py's records: per-rank peaks as ratios of the one-process run of the
    same phase, the export's rise on rank 0, the time to the first optimizer step, each against its goal."""
    runs = {(r["phase"], r["strategy"]): r for r in records}
    what = (f"a {model['params'] / 1e6:.0f}M-parameter Llama ({model['layers']} blocks of {model['hidden']}, vocabulary "
            f"{model['vocab']:,}, untied embeddings; {model['checkpoint_mb']:,.0f} MB of safetensors; random weights) "
            if model else "a >= 300M-parameter Llama ")
    md = ["## 6. Scale: one process against 2 sharded ranks\n",
          f"`benchmarks/scale.py`: {what}fine-tuned in full, fp32, {model.get('batch', 4)} x {model.get('seq_len', 64)} "
          "tokens per rank of packed chatterbot conversations, through the CLI: one process (`python -m ftlab`, "
          "single device) and 2 ranks (`torchrun --nproc_per_node=2 -m ftlab`). Phases, each its own run: **load** "
          "(`validate` on one batch), **fit** (2 optimizer steps, then the last checkpoint), **export** (`fit` with "
          f"`max_steps=1`: load, one step, then the streamed export in {model.get('max_shard_size', '?')} shards). Memory: each "
          "rank's peak private memory (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup, sampled every "
          f"{model.get('sample_interval_s', 0.1)} s; checkpoint pages two ranks map are not counted twice), glibc's "
          "mmap threshold pinned as in section 4. Every figure includes each process's fixed cost (Python, torch, "
          "Lightning, DeepSpeed: about 0.5 GB), which sharding cannot divide.\n"]
    rows, ok = [], {}
    for phase in ("load", "fit", "export"):
        one = runs.get((phase, "single"))
        if one is None:
            continue
        base = one["peak_private_mb"][0]
        rows.append([phase, "one process", f"{base:,.0f}", "1.00x", "", ""])
        for strategy in SCALE_STRATEGIES:
            r = runs.get((phase, strategy))
            if r is None:
                continue
            ratios = [m / base for m in r["peak_private_mb"]]
            goal = SCALE_GOALS.get(phase)
            if goal is not None:
                ok[(phase, strategy)] = max(ratios) <= goal
            before = SCALE_BEFORE.get((phase, strategy))
            rows.append([phase, f"{strategy}, 2 ranks", " / ".join(f"{m:,.0f}" for m in r["peak_private_mb"]),
                         " / ".join(f"**{x:.2f}x**" for x in ratios),
                         " / ".join(f"{x:.2f}x" for x in before) if before else "",
                         f"<= {goal:.2f}x: {verdict(ok[(phase, strategy)])}" if goal is not None else "(see below)"])
            if r.get("load_alone_peak_mb"):
                rows.append(["load, no forward", f"{strategy}, 2 ranks", " / ".join(f"{m:,.0f}" for m in r["load_alone_peak_mb"]),
                             " / ".join(f"{m / base:.2f}x" for m in r["load_alone_peak_mb"]), "", "(see below)"])
    goals = "; ".join(f"{phase} <= {g}x of one process's: "
                      f"{verdict(all(v for (p, _), v in ok.items() if p == phase))}"
                      for phase, g in SCALE_GOALS.items() if any(p == phase for p, _ in ok))
    md += [f"Goals at 2 ranks, each rank's peak: {goals}.\n",
           table(["phase", "run", "peak private MB (rank 0 / rank 1)", "/ one process's", "before sharded loading "
                  "(issue 15, 370M)", "goal"], rows), ""]
    alone = {s: runs[("load", s)]["load_alone_peak_mb"] for s in SCALE_STRATEGIES
             if runs.get(("load", s), {}).get("load_alone_peak_mb") and runs.get(("load", "single"))}
    if alone:
        base = runs[("load", "single")]["peak_private_mb"][0]
        head = (f" ({model['vocab'] * model['hidden'] * 4 / 2**20:,.0f} MB here, "
                f"{model['vocab'] * model['hidden'] / model['params']:.0%} of the model)") if model else ""
        md += ["Load, without the forward (the same run with 0 batches: the sharded load alone), each rank's peak over "
               "one process's load phase: " + "; ".join(f"{s}: " + " / ".join(f"{m / base:.2f}x" for m in ms)
                                                        for s, ms in alone.items())
               + ". One process has no such figure of its own: its weights are mapped from the checkpoint and come into "
               "memory only when its forward reads them. What the forward adds on 2 ranks is the gathers: each unit "
               f"whole while it runs, the largest the LM head's weight{head}, which FSDP2 holds twice for a moment "
               "(its all-gather buffer, then the parameter it is copied into), and the logits. In a 70B Llama (vocabulary 128,256 x 8,192) "
               "the LM head is 1.5% of the model: on 8 ranks, 12% of a rank's shard.\n"]
    fit_one = runs.get(("fit", "single"), {})
    if fit_one.get("peak_before_checkpoint_mb"):
        steps = fit_one["peak_before_checkpoint_mb"][0]
        others = "; ".join(f"{name}: " + " / ".join(f"{m / steps:.2f}x" for m in runs[("fit", name)]["peak_before_checkpoint_mb"])
                           for name in SCALE_STRATEGIES if runs.get(("fit", name), {}).get("peak_before_checkpoint_mb"))
        md += [f"Fit: one process's peak before its checkpoint (the 2 steps) is {steps:,.0f} MB, "
               f"{fit_one['peak_private_mb'][0]:,.0f} MB with it"
               + (f"; the 2 ranks' peaks before their checkpoints over that: {others}" if others else "") + ".\n"]
    exports = [r for r in (runs.get(("export", s)) for s in ("single", *SCALE_STRATEGIES)) if r and "rank0_export_peak_mb" in r]
    if exports:
        rows, all_ok = [], True
        for r in exports:
            rise = r["rank0_export_peak_mb"] - r["rank0_at_export_start_mb"]
            allowed = r["largest_shard_mb"] + r["largest_block_mb"]
            load = runs.get(("load", r["strategy"]))
            met = rise <= allowed
            all_ok &= met or r["ranks"] == 1
            rows.append(["one process" if r["ranks"] == 1 else f"{r['strategy']}, 2 ranks",
                         f"{r['rank0_at_export_start_mb']:,.0f}", f"{r['rank0_export_peak_mb']:,.0f}",
                         f"**{rise:,.0f}**", f"{allowed:,.0f} ({r['largest_shard_mb']:,.0f} + {r['largest_block_mb']:,.0f})",
                         f"{load['peak_private_mb'][0]:,.0f}" if load else "",
                         verdict(met) if r["ranks"] > 1 else "(not a goal)"])
        md += ["Export: rank 0's rise during the export over its memory when the export starts (read at that "
               "moment: the model after one optimizer step, with its optimizer state), against the largest shard "
               "file written plus the largest block (one module's own "
               "tensors, gathered at once). One process gathers nothing (it copies its own blocks): shown for "
               "comparison. Goal at 2 ranks: the rise <= one shard + one block: "
               f"{verdict(all_ok)}.\n",
               table(["run", "rank 0 at export start MB", "rank 0 export peak MB", "rise MB",
                      "one shard + one block MB", "rank 0 load-phase peak MB", "goal"], rows), ""]
    fits = [r for r in (runs.get(("fit", s)) for s in ("single", *SCALE_STRATEGIES)) if r and r.get("time_to_first_step_s")]
    one = runs.get(("fit", "single"), {}).get("time_to_first_step_s")
    if fits and one:
        rows, all_ok = [], True
        for r in fits:
            met = r["time_to_first_step_s"] <= one
            if r["ranks"] > 1:
                all_ok &= met
            first = r.get("first_step_s")
            rows.append(["one process" if r["ranks"] == 1 else f"{r['strategy']}, 2 ranks", f"{r['time_to_first_step_s']:.1f}",
                         f"{first:.1f}" if first is not None else "",
                         f"{r['time_to_first_step_s'] - first:.1f}" if first is not None else "",
                         f"{r['time_to_first_step_s'] / one:.2f}x", "" if r["ranks"] == 1 else verdict(met)])
        md += ["Time to the first optimizer step: from the launch to the end of the first step (ftlab's "
               "\"trains in\" log line: start-up, loading, data, the step); the step itself from "
               "`train/step_time_s`; before it, start-up and loading. One run each. On CPU the 2 ranks share the "
               "cores the one process has to itself (one thread each, against its two), each doing the one "
               "process's per-rank batch: the step cannot match here, where on GPUs each rank has a device of its "
               f"own. Goal: 2 ranks no slower than one process: {verdict(all_ok)}.\n",
               table(["run", "to first step (s)", "first step (s)", "before it (s)", "vs one process", "goal"], rows),
               ""]
    return md


def mean_sd(xs: list[float], digits: int = 4) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}" if len(xs) > 1 else f"{xs[0]:.{digits}f}"


def data_prep_goals(records: list[dict]) -> str:
    """Issue 17's three goals, from benchmarks/data_prep.py's scaling records."""
    parts = []
    for r in records:
        if "per_process_vs_tokenizer" in r:
            x = r["per_process_vs_tokenizer"]
            parts.append(f"one process encodes at **{x:.2f}x** the tokenizer's own batched speed on the same texts "
                         f"({r['runs'][0]['encode_rows_per_s']:,.0f} against {r['tokenizer_rows_per_s']:,.0f} rows/s; "
                         f"goal >= 0.9x: {verdict(x >= 0.9)})")
    scaling = [(r["dataset"], r["two_vs_one_encode"]) for r in records]
    if scaling:
        parts.append("2 processes against 1, encode stage: " + ", ".join(f"{name} **{x:.2f}x**" for name, x in scaling)
                     + f" (goal >= 1.8x: {verdict(all(x >= 1.8 for _, x in scaling))})")
    chat = [(r["dataset"], r["packed_rows_per_s_2proc"], r["vs_233_packed_rows_per_s"]) for r in records
            if "vs_233_packed_rows_per_s" in r]
    if chat:
        parts.append("the SFT chat path, packed rows out per second of the whole preparation with 2 processes, "
                     "against the 233 rows/s of the single-process path it replaced: " + ", ".join(
                         f"{name} {n:,.0f} rows/s = **{x:.1f}x** (goal >= 5x: {verdict(x >= 5)})" for name, n, x in chat)
                     + "; on chatterbot's own 479 packed rows the fixed cost of starting the workers weighs most")
    return "Goals: " + "; ".join(parts) + ".\n" if parts else ""


def sharded_section(records: list[dict]) -> list[str]:
    """Section 1's sharded rows (benchmarks/sharded_overhead.py): ftlab at 2 ranks against plain FSDP2 and
    plain `deepspeed.initialize` loops."""
    plain = {"fsdp": "FSDP2 loop (`fully_shard` per block, then the root)",
             "deepspeed_stage_3": "`deepspeed.initialize` loop (ftlab's ZeRO-3 config)"}
    rows = [[r["strategy"], plain.get(r["strategy"], ""), r["steps"], r["rounds"], f"{r['ftlab_step_s']:.3f}",
             f"{r['plain_step_s']:.3f}", " / ".join(f"{x:.3f}" for x in r["ratios"]), f"**{r['ftlab_speed_vs_plain']:.3f}x**",
             verdict(r["ftlab_speed_vs_plain"] >= 0.97)] for r in records]
    return ["### Sharded, 2 ranks: against plain FSDP2 and DeepSpeed loops\n",
            "`benchmarks/sharded_overhead.py`: the small Llama above, full fine-tuning, 8 x 128 tokens a rank, fp32, "
            "2 ranks under torchrun (gloo). Held equal: weights, each rank's batches (ftlab's data and sampler, rank "
            "r of 2), fused AdamW and its groups, schedule, clipping 1.0, and the sharding (FSDP2: `fully_shard` on "
            "each decoder block, then the root; ZeRO-3: the config ftlab's `deepspeed_stage_3` uses, Lightning's "
            "`DeepSpeedStrategy(stage=3)` config with its buffers sized by the model). Differs: ftlab loads its "
            "shards and partitions from the checkpoint (the plain loops load the whole model on each rank, then "
            "shard it) and runs Lightning's loop with its callbacks and logging (every step here). Rank 0's median time between step ends after 5 warm-up steps; runs alternate ftlab, plain. "
            "Goal: ftlab >= 0.97x the plain loop's speed.\n",
            table(["strategy", "plain loop", "steps", "rounds", "ftlab s/step", "plain s/step", "ratio per round",
                   "ftlab speed / plain", "goal"], rows), ""]


def trainer_section(records: list[dict], trl: list[dict]) -> list[str]:
    """Section 2 from benchmarks/hf_trainer.py and benchmarks/trl_sft.py: speed ratios of runs made side by
    side, and quality, each against its goal."""
    md = ["## 2. Against the Hugging Face Trainer and TRL\n"]
    if records:
        r0 = records[0]
        md += ["### The Trainer on the classification job\n",
               f"`benchmarks/hf_trainer.py`: MiniLM on Rotten Tomatoes snippets, the same {r0['rows']:,} training "
               "rows as the same token ids (ftlab's split and tokenisation), batch 32, max length 64, 1 epoch, "
               "warmup 6% + linear decay, weight decay 0.01, clipping 1.0, fp32, the same seed on both sides; full "
               "fine-tuning at lr 5e-5, LoRA (r 8, alpha 16, dropout 0.05: the peft config ftlab builds, handed to "
               f"the Trainer's model) at lr 2e-3; then accuracy on the same {r0.get('test_rows', 2000):,} test rows. The Trainer at its best: "
               "`train_sampling_strategy=\"group_by_length\"` (transformers 5's name for `group_by_length=True`), "
               "`optim=\"adamw_torch_fused\"`, its data-loading advice (1 worker process, persistent, prefetch 4; "
               "pinned memory does nothing on CPU). Out of the box: its defaults (random batches). What differs: "
               "each tool's sampler, collator (the Trainer pads through `tokenizer.pad`, ftlab fills tensors) and "
               "loop. Each seed runs ftlab then the Trainer; the speed figure is the median of the seeds' ratios "
               "(Trainer training time / ftlab's). Goal (at its best): ftlab >= 1.0x at the same accuracy "
               "(means within the seeds' noise: 2 x the larger standard deviation, at least 0.01).\n"]
        rows = []
        for r in records:
            best = r["variant"] == "best"
            tol = 2 * max(r["accuracy_noise"], 0.005)
            same = abs(statistics.mean(r["ftlab_accuracy"]) - statistics.mean(r["hf_accuracy"])) <= tol
            goal = verdict(r["ftlab_speed_vs_hf"] >= 1.0 and same) if best else "(not a goal)"
            rows.append([r["policy"], "at its best" if best else "**out of the box**", f"`{r['hf_sampler']}`, `{r['hf_optim']}`",
                         len(r["seeds"]), " / ".join(f"{x:.0f}" for x in r["ftlab_train_s"]),
                         " / ".join(f"{x:.0f}" for x in r["hf_train_s"]), f"**{r['ftlab_speed_vs_hf']:.2f}x**",
                         mean_sd(r["ftlab_accuracy"]), mean_sd(r["hf_accuracy"]),
                         f"{r['ftlab_real_token_fraction']:.3f} / {r['hf_real_token_fraction']:.3f}", goal])
        md += [table(["policy", "Trainer", "its sampler, optimizer", "seeds", "ftlab train s", "Trainer train s",
                      "ftlab speed / Trainer", "ftlab accuracy", "Trainer accuracy", "real-token share ftlab / Trainer",
                      "goal"], rows), ""]
    for r in trl:
        same = abs(statistics.mean(r["ftlab_heldout_loss"]) - statistics.mean(r["trl_heldout_loss"])) <= 0.02 * statistics.mean(
            r["trl_heldout_loss"])
        md += ["### TRL's SFTTrainer on the SmolLM2 LoRA SFT job\n",
               f"`benchmarks/trl_sft.py`: `configs/sft-smollm2-chatterbot.yaml` (SmolLM2-135M-Instruct, LoRA r 16 / "
               f"alpha 32 on q,k,v,o) on its first {r['rows']} training conversations ({r['real_tokens']:,} tokens), "
               "trl `SFTTrainer` against `ftlab fit`. Held equal: the conversations as the same token ids (ftlab's "
               "chat-template rendering; TRL takes them pre-tokenised with an `assistant_masks` column: loss on the "
               "assistant's tokens only on both sides), the peft config, packing into rows of <= 256 tokens, 4 rows a "
               "step, 1 epoch, lr 1e-3, warmup 5% + linear decay, weight decay 0.01, clipping 1.0, fused AdamW, fp32, "
               "seed. Both trained models are scored by the same code: mean NLL of the assistant's tokens of the first "
               "50 held-out conversations. How each packs: ftlab by first-fit decreasing, a batch being 4 rows padded to "
               "the longest with per-example position ids (a block-diagonal causal mask per row); TRL "
               "(`packing=True`, `packing_strategy=\"bfd\"`) by best-fit decreasing, which turns on padding-free "
               "batches: the 4 rows are concatenated into one sequence with position ids, nothing padded, one "
               "block-diagonal mask over the concatenation. (TRL's `assistant_only_loss=True` needs a chat template with "
               "`{% generation %}` markers, which SmolLM2's lacks and TRL has no training template for; the mask "
               "column is TRL's route to the same loss on processed data.) Runs alternate ftlab, TRL on the same seed; "
               "tokens/s: the conversations' real tokens over each tool's training time. Goal: ftlab >= 1.0x TRL's "
               "tokens/s, held-out loss the same within noise (2% here: one seed).\n",
               table(["", "train s per round", "real tokens/s", "optimizer steps", "packed rows", "row fill",
                      "real-token share of computed", "held-out loss"],
                     [["ftlab", " / ".join(f"{x:.0f}" for x in r["ftlab_train_s"]), f"{r['ftlab_tokens_per_s']:.0f}",
                       r["ftlab_steps"], r["ftlab_packed_rows"], f"{r['ftlab_row_fill']:.3f}",
                       f"{r['ftlab_real_token_fraction']:.3f}", mean_sd(r["ftlab_heldout_loss"])],
                      ["TRL SFTTrainer", " / ".join(f"{x:.0f}" for x in r["trl_train_s"]), f"{r['trl_tokens_per_s']:.0f}",
                       r["trl_steps"], r["trl_packed_rows"], f"{r['trl_row_fill']:.3f}",
                       f"{r['trl_real_token_fraction']:.3f}", mean_sd(r["trl_heldout_loss"])],
                      ["ftlab / TRL", "", f"**{r['ftlab_speed_vs_trl']:.2f}x** (" + " / ".join(
                          f"{x:.2f}" for x in r["speed_ratios"]) + ")", "", "", "", "", verdict(r["ftlab_speed_vs_trl"] >= 1.0 and same)]]),
               ""]
    return md


def main(path: str = "benchmarks/results.jsonl", seconds: float | None = None) -> None:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]
    by = {}
    for r in records:
        by.setdefault(r["benchmark"], []).append(r)
    md = [f"# Benchmarks\n\nWritten by `benchmarks/run_all` on {date.today()} ({platform.machine()}, "
          f"{__import__('os').cpu_count()} CPU cores, no GPU){f', in {seconds / 60:.1f} min' if seconds else ''}. "
          "Every figure that compares speed is a ratio of runs made side by side in the same invocation, never "
          "an absolute time from another run.\n"]
    if "overhead" in by:
        rows = [[r["case"], r["steps"], r["rounds"], f"{r['ftlab_step_s']:.3f}", f"{r['plain_step_s']:.3f}",
                 f"**{r['ftlab_speed_vs_plain']:.3f}x**"] for r in by["overhead"]]
        ok = all(r["ftlab_speed_vs_plain"] >= 0.97 for r in by["overhead"])
        md += ["## 1. Overhead against a plain PyTorch loop\n",
               "Same model, batches (ftlab's tokenised data in the same order), fused AdamW, schedule, clipping, fp32; "
               "median time between step ends after 5 warm-up steps; runs alternate. Goal: ftlab >= 0.97x "
               f"the plain loop's speed: {verdict(ok)}.\n",
               table(["case", "steps", "rounds", "ftlab s/step", "plain s/step", "ftlab speed / plain"], rows), ""]
    if "sharded_overhead" in by:
        md += sharded_section(by["sharded_overhead"])
    if "hf_trainer" in by:
        md += trainer_section(by["hf_trainer"], by.get("trl_sft", []))
    if "padding" in by:
        rows, ok = [], True
        for r in by["padding"]:
            default = r["packing"] if r["default"] == "packing" else r["length_grouped"]
            ok &= default >= 0.95
            rows.append([r["dataset"], r["examples"], f"{r['mean_tokens']:.0f}", f"{r['pad_to_max']:.3f}",
                         f"{r['dynamic']:.3f}", f"{r['length_grouped']:.3f}",
                         f"{r['packing']:.3f}" if "packing" in r else "-", f"{r['default']} ({default:.3f})"])
        md += ["## 3. Padding waste: real tokens / computed tokens\n",
               f"Training split of each real dataset. Goal: >= 0.95 for each task's default batching: {verdict(ok)}.\n",
               table(["dataset", "examples", "mean tokens", "pad to max", "dynamic", "length-grouped", "packing",
                      "ftlab default"], rows), ""]
    if "memory" in by:
        rows, ok = [], True
        for r in by["memory"]:
            if "activations_measured_mb" not in r:
                rows.append([r["config"], "", "", "", "", r.get("skipped") or r.get("error")])
                continue
            ok &= abs(r["activations_estimated_mb"] - r["activations_measured_mb"]) <= max(
                0.25 * r["activations_measured_mb"], 10)  # a frozen backbone keeps a few MB: 10 MB slack
            rows.append([r["config"], r["policy"], f"{r['batch']} x {r['seq_len']}", f"{r['activations_measured_mb']:.0f}",
                         f"{r['activations_estimated_mb']:.0f}", f"{r['estimate_over_measured']:.2f}",
                         f"{r['peak_rss_mb']:.0f}"])
        md += ["## 4. Memory\n",
               "Activations kept by one training step (forward of a full-length batch of the configured size; RSS "
               "growth after a warm-up forward, with glibc's mmap threshold pinned) against `ftlab estimate`. Goal: "
               f"the estimate within 25% of the measurement (10 MB for the near-empty frozen case): {verdict(ok)}. Same batch (32 x 64), the three policies: the quickstart rows.\n",
               table(["config", "policy", "batch", "measured MB", "estimated MB", "estimate / measured",
                      "process peak MB"], rows), ""]
    if "sharding" in by:
        rows = [[r["strategy"], " / ".join(f"{x:,}" for x in r["params"]), f"{r['params_vs_ddp']:.3f}",
                 " / ".join(f"{x:,}" for x in r["optimizer_state"]), f"{r['optimizer_vs_ddp']:.3f}"]
                for r in by["sharding"]]
        md += ["Per-rank elements in real 2-rank runs of MiniLM full fine-tuning (rank 0 / rank 1; `ftlab estimate` "
               "predicts these exactly: tests/estimate):\n",
               table(["strategy", "parameters per rank", "vs DDP", "AdamW state per rank", "vs DDP"], rows), ""]
    if "memory_parts" in by:
        from benchmarks.memory import parts_section

        md += parts_section(by["memory_parts"], table, verdict, (by.get("memory_recipe_base") or [None])[-1])
    if "data_prep" in by:
        rows = [[r["dataset"], f"{r['rows']:,}", f"{r['tokens']:,}", f"{r['rows_per_s']:,.0f}", f"{r['tokens_per_s']:,.0f}",
                 f"{r['cached_s']:.2f}", "yes" if r["retokenised"] else "no"] for r in by["data_prep"]]
        ok = not any(r["retokenised"] for r in by["data_prep"])
        md += ["## 5. Data preparation\n",
               "Load, filter, split and tokenise into the cache (cold), then the same data module again (cached). "
               f"Goal: the second run tokenises nothing: {verdict(ok)}.\n",
               table(["dataset", "rows", "tokens", "rows/s", "tokens/s", "cached run (s)", "re-tokenised"], rows), ""]
    if "data_prep_scale" in by:  # benchmarks/data_prep.py: data.num_proc 1 vs 2, and the tokenizer alone
        rows = [[r["dataset"], str(run["num_proc"]), f"{run['rows_in']:,}", f"{run['rows_out']:,}", f"{run['tokens']:,}",
                 f"{run['load_s']:.1f}", f"{run['encode_s']:.1f}", f"{run['encode_rows_per_s']:,.0f}",
                 f"{run['total_out_rows_per_s']:,.0f}"] for r in by["data_prep_scale"] for run in r["runs"]]
        md += ["Scaling over processes (`data.num_proc`), cold caches, one tokenizer thread per process: a 400k-row "
               "classification CSV generated from the Rotten Tomatoes snippets (distinct suffixes), 40k generated "
               "chat conversations and chatterbot itself; `python -m benchmarks.data_prep scale`. The encode stage "
               "(tokenising, chat rendering, packing, writing the Arrow shards: what runs in the worker processes) is "
               "timed apart from loading and splitting.\n", data_prep_goals(by["data_prep_scale"]),
               table(["dataset", "processes", "rows in", "rows out", "tokens", "load+split (s)", "encode (s)",
                      "encode rows/s", "rows out/s (whole)"], rows), ""]
    if "scale" in by:
        md += scale_section(by["scale"], (by.get("scale-model") or [{}])[0])
    if "distill_speed" in by and "student_speedup" in by["distill_speed"][0]:
        r = by["distill_speed"][0]
        md += ["## Distillation: the student against its teacher\n",
               "The full fine-tuned MiniLM (teacher) and the student distilled from it "
               "(`configs/distill-minilm-sentiment.yaml`); inference on the same batches of 32 x 64 tokens, "
               "alternating, median of 5 rounds.\n",
               table(["", "blocks", "parameters", "test accuracy", "inference speed"],
                     [["teacher", r["teacher_layers"], f"{r['teacher_params']:,}", f"{r['teacher_accuracy']:.4f}", "1.00x"],
                      ["student", r["student_layers"], f"{r['student_params']:,}", f"{r['student_accuracy']:.4f}",
                       f"**{r['student_speedup']:.2f}x**"]]), ""]
    (REPO / "BENCHMARKS.md").write_text("\n".join(md))
    print(f"wrote {REPO / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2], *(float(a) for a in sys.argv[2:3])))
