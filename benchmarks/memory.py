"""Memory: (1) activations a training step keeps, measured for each shipped config against `ftlab
estimate`; (2) peak memory of freeze vs LoRA vs full at the same batch; (3) per-rank parameter and
optimizer-state elements of DDP, FSDP and ZeRO-1/2/3 in real 2-rank runs, as a share of DDP's.

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
    from ftlab.estimate.memory import activation_bytes, probe_batch

    cli = parse_fit_config(["--config", f"configs/{config}.yaml"])
    module, data = cli.model, cli.datamodule
    data.prepare_data()
    data.setup()
    model_config = module.model_config(data)
    positions = getattr(model_config, "max_position_embeddings", None)
    seq = min(data.max_length, positions) if isinstance(positions, int) else data.max_length
    b = data.batch_size
    estimate = activation_bytes(module, model_config, b, seq, getattr(data, "max_target_length", seq))
    model = module.build_model(data)
    module.model = model
    module.task.setup(module, data)
    batch = probe_batch(module.task, model_config, b, seq, getattr(data, "max_target_length", seq))
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", help="internal: measure one config in this process")
    p.add_argument("--skip-sharding", action="store_true")
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    for config in CONFIGS:
        if config.startswith("distill") and not (REPO / "runs" / "quickstart-full" / "export").exists():
            emit({"benchmark": "memory", "config": config, "skipped": "needs runs/quickstart-full (its teacher)"})
            continue
        out = subprocess.run([PY, "-m", "benchmarks.memory", "--one", config], cwd=REPO, capture_output=True, text=True,
                             env={**env(), "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=900)
        if out.returncode != 0:
            emit({"benchmark": "memory", "config": config, "error": out.stderr.strip().splitlines()[-1][:300]})
            continue
        emit({"benchmark": "memory", **json.loads(out.stdout.strip().splitlines()[-1])})
    if not args.skip_sharding:
        for row in sharding():
            emit({"benchmark": "sharding", **row})


if __name__ == "__main__":
    sys.exit(main())
