"""Memory: (1) activations a training step keeps, measured for each shipped config against `ftlab
estimate`; (2) peak memory of freeze vs LoRA vs full at the same batch; (3) per-rank parameter and
optimizer-state elements of DDP, FSDP and ZeRO-1/2/3 in real 2-rank runs, as a share of DDP's; (4) each part
of a SmolLM2-135M SFT step at 4 x 1024 (weights, gradients, optimizer state, activations kept and at their
peak) for full, LoRA, QLoRA-4bit, + activation checkpointing, + chunked loss, + 8-bit AdamW, against the
estimate, and the QLoRA base's bytes under the recipe's bf16-mixed (`--parts-only [ROW ...]`; `--reestimate FILE`
estimates measured rows again).

Measuring on CPU: the process's resident memory (VmRSS) before and after the forward pass of a batch of
the configured size at full length, with glibc's mmap threshold pinned low (MALLOC_MMAP_THRESHOLD_) so
that every tensor buffer is its own mapping and freed memory leaves RSS at once. Each measurement runs
in its own process.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

from benchmarks.common import PY, REPO, emit, env, ftlab_fit

CONFIGS = ["quickstart", "quickstart-freeze", "quickstart-full", "ner-wnut16", "sft-smollm2-chatterbot",
           "domain-adapt-minilm-plots", "distill-minilm-sentiment"]
# ZeRO-1 lays parameters and optimizer state out as ZeRO-2 does (they differ in gradients, not counted here)
STRATEGIES = ["ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3"]


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(config: str) -> dict:
    """In this process: the estimate, then the measured activations and step peak of one config."""
    import torch

    from ftlab.cli import parse_fit_config
    from ftlab.estimate.memory import activation_bytes, batch_layout, probe_batch

    cli = parse_fit_config(["--config", f"configs/{config}.yaml"])
    module, data = cli.model, cli.datamodule
    data.prepare_data()
    data.setup()
    model_config = module.model_config(data)
    positions = getattr(model_config, "max_position_embeddings", None)
    seq = min(data.max_length, positions) if isinstance(positions, int) else data.max_length
    b = data.batch_size
    packed = getattr(data, "packing", False)
    estimate = activation_bytes(module, model_config, b, seq, getattr(data, "max_target_length", seq), packed=packed)
    model = module.build_model(data)
    module.model = model
    module.task.setup(module, data)
    batch = probe_batch(module.task, model_config, b, seq, getattr(data, "max_target_length", seq),
                        batch_layout(module, b, packed))
    batch = module.task.transform_batch(batch, training=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    with torch.no_grad():  # a first forward allocates one-time buffers (~86 MB here: thread pools, kernel caches)
        module.task.forward(model, batch)
    gc.collect()
    before = rss()
    outputs = module.task.forward(model, batch)
    loss = module.task.loss(outputs, batch)
    after_forward = rss()
    loss.backward()
    opt.step()
    after_step = rss()
    return {"config": config, "policy": module.policy.name, "batch": b, "seq_len": seq,
            "activations_measured_mb": (after_forward - before) / 2**20, "activations_estimated_mb": estimate / 2**20,
            "estimate_over_measured": estimate / max(after_forward - before, 1),
            "step_growth_mb": (after_step - before) / 2**20, "peak_rss_mb": after_step / 2**20}


def sharding() -> list[dict]:
    rows = []
    for strategy in STRATEGIES:
        _, summary, _ = ftlab_fit("configs/quickstart-full.yaml", f"--trainer.strategy={strategy}", "--trainer.devices=2",
                                  "--trainer.max_steps=2", "--data.init_args.max_train_rows=128",
                                  "--trainer.limit_val_batches=0", "--test_after_fit=false",
                                  "--trainer.val_check_interval=null", "--trainer.num_sanity_val_steps=0")
        rows.append({"strategy": strategy, "params": summary["param_numel_per_rank"],
                     "optimizer_state": summary["optimizer_state_numel_per_rank"]})
    ddp = rows[0]
    for r in rows:
        r["params_vs_ddp"] = max(r["params"]) / max(ddp["params"])
        r["optimizer_vs_ddp"] = max(r["optimizer_state"]) / max(ddp["optimizer_state"])
    return rows


# ---- the parts of one SFT step's memory, option by option (issue 18 item 6)
PARTS_CONFIG = "configs/sft-smollm2-chatterbot.yaml"
PARTS_BATCH, PARTS_SEQ = 4, 1024
_QLORA = ["--model.quantization.bits=4", "--model.quantization.gradient_checkpointing=false"]
_AC = [*_QLORA, "--model.activation_checkpointing=true"]
_CHUNK = [*_AC, "--model.loss_chunk_size=1024"]
# (row, its overrides of the config, the row it is compared with); the QLoRA rows stack one option at a time
PARTS_ROWS = [
    ("full", ["--model.policy=Full"], None),
    ("full + 8-bit AdamW", ["--model.policy=Full", "--model.optim.name=adamw_8bit"], "full"),
    ("LoRA", [], "full"),
    ("QLoRA-4bit", _QLORA, "LoRA"),
    ("+ activation checkpointing", _AC, "QLoRA-4bit"),
    ("+ chunked loss", _CHUNK, "+ activation checkpointing"),
    ("+ 8-bit AdamW", [*_CHUNK, "--model.optim.name=adamw_8bit"], "+ chunked loss"),
]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
        f.write("5")


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared tensors once)."""
    import torch

    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen.setdefault(s.data_ptr(), s.nbytes())
    return sum(seen.values())


def _quant_state_tensors(model):
    """bitsandbytes' block scales and lookup tables of each 4-bit weight (attributes, not parameters)."""
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        while qs is not None:
            yield from (qs.absmax, qs.code, getattr(qs, "offset", None))
            qs = getattr(qs, "state2", None)


def full_training_batch(data, batch_size: int, seq_len: int) -> dict:
    """The first batch of the run's own training data that is batch_size x seq_len (packed chat rows: several
    conversations per row, as the step sees them)."""
    for batch in data.train_dataloader():
        if tuple(batch["input_ids"].shape) == (batch_size, seq_len):
            return batch
    raise SystemExit(f"no {batch_size} x {seq_len} batch in the training data")


def measure_parts(row: str) -> dict:
    """In this process: one SFT step of SmolLM2-135M at 4 x 1024 with the row's options; the bytes of each
    part from the objects themselves, the step's peak from VmHWM; and `ftlab estimate` of the same config."""
    import torch

    from ftlab.cli import parse_fit_config
    from ftlab.estimate.memory import batch_layout, probe_batch, saved_activation_bytes
    from ftlab.quantization import is_quantized_layer, quantized_numels

    cli = parse_fit_config(_parts_args(row))
    module, data = cli.model, cli.datamodule
    data.prepare_data()
    data.setup()
    config = module.model_config(data)
    model = module.build_model(data)
    module.model = model
    module.task.setup(module, data)
    task = module.task
    layout = batch_layout(module, PARTS_BATCH, getattr(data, "packing", False))
    small = task.transform_batch(probe_batch(task, config, 1, 16, 16, layout), training=True)
    with torch.no_grad():  # one-time buffers (thread pools, kernel caches) before anything is measured
        task.forward(model, small)
    batch = task.transform_batch(full_training_batch(data, PARTS_BATCH, PARTS_SEQ), training=True)
    optimizer = module.optim.optimizer(module.policy.param_groups(model, module.optim.lr, module.optim.weight_decay))
    trainable = [p for p in model.parameters() if p.requires_grad]
    numels = quantized_numels(model)
    base = [p for p in model.parameters() if not p.requires_grad]
    weights = _storage_bytes([*model.parameters(), *model.buffers(), *_quant_state_tensors(model)])
    base_bytes = _storage_bytes([*base, *_quant_state_tensors(model)])
    base_fp32 = 4 * sum(numels.get(id(p), p.numel()) for p in base)
    quantized = [m for m in model.modules() if is_quantized_layer(m)]
    q_bytes = _storage_bytes([t for m in quantized for t in (m.weight, *_quant_state_tensors(m))])
    q_fp32 = 4 * sum(m.in_features * m.out_features for m in quantized)

    gc.collect()
    before = _status("VmRSS")
    _reset_peak()
    kept, outputs = saved_activation_bytes(model, lambda: module(batch))
    loss = task.loss(outputs, batch)
    del outputs  # as a training step: only the loss is returned
    loss.backward()
    fwd_bwd_peak = _status("VmHWM")
    grads = _storage_bytes([p.grad for p in trainable if p.grad is not None])
    optimizer.step()
    step_peak = _status("VmHWM")
    state = _storage_bytes([v for s in optimizer.state.values() for v in s.values()])
    state_fp32 = 8 * sum(p.numel() for p in trainable)  # AdamW's two fp32 moments
    return {"row": row, "batch": PARTS_BATCH, "seq_len": PARTS_SEQ, "loss": float(loss),
            "weights_mb": weights / 2**20, "base_weights_mb": base_bytes / 2**20, "base_fp32_mb": base_fp32 / 2**20,
            "quantized_layers_mb": q_bytes / 2**20, "quantized_layers_fp32_mb": q_fp32 / 2**20,
            "grads_mb": grads / 2**20, "optimizer_mb": state / 2**20, "optimizer_fp32_adamw_mb": state_fp32 / 2**20,
            "activations_kept_mb": kept / 2**20,
            "activation_peak_mb": (fwd_bwd_peak - before - grads) / 2**20, "step_peak_mb": step_peak / 2**20}


# the QLoRA recipe's precision: what is not quantized (the tied embedding, the norms) is kept in bf16
RECIPE_BASE = [*_QLORA, "--trainer.precision=bf16-mixed", "--model.dtype=bfloat16"]


def measure_recipe_base() -> dict:
    """The QLoRA base as a fit under the recipe's precision builds it (bf16-mixed, model.dtype bfloat16: a
    Trainer attached, as in a fit, so the frozen weights settle in bf16): its bytes against their fp32
    bytes. Weights only: the step's parts are the fp32 rows'."""
    import lightning.pytorch as pl

    from ftlab.cli import parse_fit_config
    from ftlab.quantization import quantized_numels

    cli = parse_fit_config(["--config", PARTS_CONFIG, *RECIPE_BASE])
    module, data = cli.model, cli.datamodule
    module.trainer = pl.Trainer(precision=cli.config["fit"]["trainer"]["precision"], accelerator="cpu", devices=1,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
    data.prepare_data()
    data.setup()
    model = module.build_model(data)
    numels = quantized_numels(model)
    base = [p for p in model.parameters() if not p.requires_grad]
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in base if id(p) not in numels})
    return {"weights_mb": _storage_bytes([*model.parameters(), *model.buffers(), *_quant_state_tensors(model)]) / 2**20,
            "base_weights_mb": _storage_bytes([*base, *_quant_state_tensors(model)]) / 2**20,
            "base_fp32_mb": 4 * sum(numels.get(id(p), p.numel()) for p in base) / 2**20,
            "unquantized_dtypes": dtypes}


def _parts_args(row: str) -> list[str]:
    overrides = next(o for name, o, _ in PARTS_ROWS if name == row)
    return ["--config", PARTS_CONFIG, f"--data.init_args.max_length={PARTS_SEQ}",
            f"--data.init_args.batch_size={PARTS_BATCH}", *overrides]


def estimate_weights(overrides: list[str]) -> float:
    """`ftlab estimate`'s weight bytes (MB) of the parts config with `overrides`."""
    from ftlab.estimate.cli import estimate, parser

    return estimate(parser().parse_args([]), ["--config", PARTS_CONFIG, *overrides])["params"]["bytes"] / 2**20


def estimate_parts(row: str) -> dict:
    """`ftlab estimate` of a row's config (the same code path as the command), in MB."""
    from ftlab.estimate.cli import estimate, parser

    est = estimate(parser().parse_args([]), _parts_args(row))
    return {"weights_mb": est["params"]["bytes"] / 2**20, "grads_mb": est["grads"]["bytes"] / 2**20,
            "optimizer_mb": est["optimizer"]["bytes"] / 2**20, "activations_kept_mb": est["activations_bytes"] / 2**20,
            "activation_peak_mb": est["activation_peak_bytes"] / 2**20}


def in_child(flag: str, name: str, timeout: int) -> dict:
    """One measurement in a fresh process (its peak is its own; glibc's mmap threshold pinned as in section
    4): the record it prints, or {"error": its last line of stderr}."""
    out = subprocess.run([PY, "-m", "benchmarks.memory", flag, name], cwd=REPO, capture_output=True, text=True,
                         env={**env(), "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=timeout)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


RECIPE_ROW = "QLoRA-4bit base, bf16-mixed"


def parts_rows(rows: list[str] | None = None) -> None:
    """Each row in its own process, one after another (the step at 4 x 1024 takes the machine's cores)."""
    for name, _, _ in PARTS_ROWS:
        if rows and name not in rows:
            continue
        record = in_child("--part", name, timeout=1800)
        if "error" in record:
            emit({"benchmark": "memory_parts", "row": name, **record})
        else:
            emit({"benchmark": "memory_parts", **record, "estimate": estimate_parts(name)})
    if not rows or RECIPE_ROW in rows:
        record = in_child("--part", RECIPE_ROW, timeout=900)
        if "error" not in record:
            record["estimate"] = {"weights_mb": estimate_weights(RECIPE_BASE)}
        emit({"benchmark": "memory_recipe_base", "row": RECIPE_ROW, **record})


def reestimate(path: str) -> None:
    """The measured rows of an earlier run (JSON lines), with the estimate of today's code."""
    for line in open(path):
        record = json.loads(line)
        if record.get("benchmark") == "memory_parts" and "weights_mb" in record:
            record["estimate"] = estimate_parts(record["row"])
        emit(record)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", help="internal: measure one config in this process")
    p.add_argument("--part", help="internal: measure one row of the parts benchmark in this process")
    p.add_argument("--skip-sharding", action="store_true")
    p.add_argument("--parts-only", nargs="*", metavar="ROW",
                   help="only the parts benchmark (SmolLM2-135M SFT at 4 x 1024), all rows or those named")
    p.add_argument("--reestimate", metavar="JSONL", help="the parts records of an earlier run, estimated again")
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    if args.part:
        print(json.dumps(measure_recipe_base() if args.part == RECIPE_ROW else measure_parts(args.part)))
        return
    if args.reestimate:
        reestimate(args.reestimate)
        return
    if args.parts_only is not None:
        parts_rows(args.parts_only)
        return
    for config in CONFIGS:
        if config.startswith("distill") and not (REPO / "runs" / "quickstart-full" / "export").exists():
            emit({"benchmark": "memory", "config": config, "skipped": "needs runs/quickstart-full (its teacher)"})
            continue
        record = in_child("--one", config, timeout=900)
        emit({"benchmark": "memory", **({"config": config} if "error" in record else {}), **record})
    if not args.skip_sharding:
        for row in sharding():
            emit({"benchmark": "sharding", **row})
    parts_rows()


if __name__ == "__main__":
    sys.exit(main())


PARTS = ("weights_mb", "grads_mb", "optimizer_mb", "activations_kept_mb", "activation_peak_mb")


def parts_section(records: list[dict], table, verdict, recipe: dict | None = None) -> list[str]:
    """BENCHMARKS.md's part of section 4 from the parts records: each row's parts measured and estimated, the
    goals of issue 18 item 6; `recipe`: the QLoRA base measured under the recipe's bf16-mixed."""
    rows, by, close = [], {}, True
    for r in records:
        if "weights_mb" not in r:
            rows.append([r["row"], *[""] * 7, r.get("skipped") or r.get("error", "")])
            continue
        by[r["row"]] = r
        est = r.get("estimate", {})
        cells = []
        for key in PARTS:
            e = est.get(key)
            ok = e is not None and (abs(e - r[key]) <= 0.15 * r[key] or abs(e - r[key]) < 1)
            close &= ok
            cells.append(f"{r[key]:,.0f} / {e:,.0f}" + ("" if ok else " **!**") if e is not None else f"{r[key]:,.0f}")
        base = f"{r['base_weights_mb'] / r['base_fp32_mb']:.2f}x" if r["base_fp32_mb"] else "-"  # full: no frozen base
        rows.append([r["row"], *cells, f"{r['step_peak_mb']:,.0f}", base, ""])

    def ratio(row, key, base_row, base_key=None):
        if row in by and base_row in by:
            return by[row][key] / by[base_row][base_key or key]
        return None

    goals = []
    quant = next((r for name, r in by.items() if r["quantized_layers_mb"]), None)
    if quant:
        whole, layers = quant["base_weights_mb"] / quant["base_fp32_mb"], quant["quantized_layers_mb"] / quant[
            "quantized_layers_fp32_mb"]
        text = (f"QLoRA's base weights <= 0.2x of their fp32 bytes: the quantized layers {layers:.3f}x "
                f"({verdict(layers <= 0.2)}); the whole base {whole:.2f}x in these fp32 rows ({verdict(whole <= 0.2)})")
        if recipe and "base_weights_mb" in recipe:
            bf16 = recipe["base_weights_mb"] / recipe["base_fp32_mb"]
            est = recipe.get("estimate", {}).get("weights_mb")
            text += (f", {bf16:.3f}x under the QLoRA recipe's bf16-mixed with model.dtype bfloat16 (weights only, "
                     f"measured as a fit builds them: {verdict(bf16 <= 0.2)}; all weights {recipe['weights_mb']:,.1f} MB"
                     + (f", estimated {est:,.1f} MB" if est is not None else "") + ")")
        elif recipe:
            text += f", under the recipe's bf16-mixed: {recipe.get('error', 'not measured')}"
        goals.append(text + ". What is not quantized is the tied 49,152 x 576 embedding (also the LM head), 21% of "
                     "SmolLM2-135M's weights: QLoRA keeps it in the compute dtype, as peft, Axolotl and the QLoRA "
                     "paper do; at 4.13 bits a weight for the rest, the whole base cannot reach 0.2x while it is a "
                     "fifth of the model in 16 bits")
    for text, value, goal in (
            ("activation checkpointing keeps <= 0.35x of the activations (kept for backward, QLoRA rows)",
             ratio("+ activation checkpointing", "activations_kept_mb", "QLoRA-4bit"), 0.35),
            ("the chunked loss cuts the step's activation peak by >= 40% (over the row above it)",
             None if ratio("+ chunked loss", "activation_peak_mb", "+ activation checkpointing") is None else
             1 - ratio("+ chunked loss", "activation_peak_mb", "+ activation checkpointing"), -0.4),
            ("8-bit AdamW state <= 0.3x of fp32 AdamW's (full fine-tuning)",
             ratio("full + 8-bit AdamW", "optimizer_mb", "full + 8-bit AdamW", "optimizer_fp32_adamw_mb"), 0.3),
            ("8-bit AdamW state <= 0.3x of fp32 AdamW's (the LoRA matrices of the QLoRA rows)",
             ratio("+ 8-bit AdamW", "optimizer_mb", "+ 8-bit AdamW", "optimizer_fp32_adamw_mb"), 0.3)):
        if value is None:
            goals.append(f"{text}: not measured in this run")
        elif goal < 0:
            goals.append(f"{text}: {value:.0%} ({verdict(value >= -goal)})")
        else:
            goals.append(f"{text}: {value:.2f}x ({verdict(value <= goal)})")
    goals.append(f"`ftlab estimate` within 15% of each measured part: {verdict(close)}")
    return ["Each part of one training step's memory, option by option: SmolLM2-135M-Instruct SFT "
            f"(`{PARTS_CONFIG}`, LoRA r=16 on q/k/v/o), batch {PARTS_BATCH} x {PARTS_SEQ} tokens, fp32 on CPU, "
            "one step per row, each row in its own process (`benchmarks/memory.py --parts-only`). Weights, "
            "gradients and optimizer state: bytes of the objects themselves (each storage once; QLoRA's "
            "quantization state included). Kept: bytes autograd saves for backward (saved-tensor hooks). Peak: "
            "the process's peak RSS over forward and backward (VmHWM, reset before the step; glibc's mmap "
            "threshold pinned) minus its RSS before the step and the gradients. The QLoRA rows stack one option "
            "at a time. Cells: measured / estimated MB (**!**: more than 15% apart).\n",
            "Goals: " + "; ".join(goals) + ".\n",
            table(["row", "weights", "gradients", "optimizer state", "activations kept", "activation peak",
                   "process peak MB", "base / its fp32", "note"], rows), ""]
