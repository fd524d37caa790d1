"""`python -m ftlab estimate --config X.yaml [--devices 8 --num-nodes 4 --strategy S --gpu H100]`:
memory per device and speed of a fit config, before any weights load or a job is queued."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from ftlab.errors import ConfigError
from ftlab.estimate.memory import (
    MemoryEstimate,
    activation_bytes,
    blocks_with_activations,
    count_blocks,
    state_per_rank,
)
from ftlab.estimate.throughput import GPUS, flops_per_token, speed

STRATEGIES = {"auto": "ddp", "ddp": "ddp", "single": "ddp", "fsdp": "fsdp", "deepspeed_stage_1": "deepspeed_stage_1",
              "deepspeed_stage_2": "deepspeed_stage_2", "deepspeed_stage_2_offload": "deepspeed_stage_2",
              "deepspeed_stage_3": "deepspeed_stage_3", "deepspeed_stage_3_offload": "deepspeed_stage_3"}
GiB = 1024**3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ftlab estimate", allow_abbrev=False,
        description="Per-device memory (parameters, gradients, optimizer state, activations) and speed of a fit "
                    "config. Arguments not listed here go to `ftlab fit` (e.g. --data.batch_size 8).")
    p.add_argument("--config", action="append", default=[], help="fit config file (repeatable, as for fit)")
    p.add_argument("--devices", type=int, help="devices per node (default: the config's trainer.devices)")
    p.add_argument("--num-nodes", type=int, help="nodes (default: the config's trainer.num_nodes)")
    p.add_argument("--strategy", help="ddp, fsdp, deepspeed_stage_1/2/3 (default: the config's)")
    p.add_argument("--gpu", default="H100", type=str.upper, help=f"GPU type: {', '.join(GPUS)} (default H100)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation (default 0.35)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device (overrides the --gpu table)")
    p.add_argument("--memory-gib", type=float, help="memory per device in GiB (overrides the --gpu table)")
    p.add_argument("--no-activations", action="store_true", help="skip the activation probe (parameters only)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return p


def _strategy_name(value) -> str:
    name = value if isinstance(value, str) else type(value).__name__.lower()
    name = {"fsdp": "fsdp", "deepspeed": "deepspeed_stage_2"}.get(name, name)
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy {name!r}: the estimate knows {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def _devices(value) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, (list, tuple)):
        return len(value)
    return 1  # "auto" on a machine without the GPUs in question: give --devices


def _train_rows(data) -> tuple[int | None, str]:
    """Training rows and where the count comes from: the tokenised cache when this data was prepared
    before (rows as batched, i.e. after packing), else data.max_train_rows (examples)."""
    try:
        meta = os.path.join(data.cache_path, "meta.json")
        if os.path.exists(meta):
            with open(meta) as f:
                return json.load(f)["sizes"]["train"], "tokenised cache"
    except Exception:  # noqa: BLE001 - no tokenizer at hand: fall back
        pass
    return data.max_train_rows, "data.max_train_rows"


def estimate(args: argparse.Namespace, fit_overrides: list[str]) -> dict:
    import torch

    from ftlab.cli import parse_fit_config

    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu} must be in (0, 1], e.g. 0.35")
    if args.gpu not in GPUS and not (args.peak_tflops and args.memory_gib):
        raise ConfigError(f"--gpu {args.gpu!r} is not in the table ({', '.join(GPUS)}); give --peak-tflops and --memory-gib")
    cli = parse_fit_config([a for c in args.config for a in ("--config", c)] + fit_overrides)
    cfg = cli.config["fit"]
    trainer = cfg["trainer"]
    devices = args.devices or _devices(trainer.get("devices", 1))
    nodes = args.num_nodes or int(trainer.get("num_nodes") or 1)
    world = devices * nodes
    strategy = _strategy_name(args.strategy or trainer.get("strategy") or "auto")
    module, data = cli.model, cli.datamodule
    if getattr(data, "label_names", True) is None:
        data.label_names = ["0", "1"]  # the head's size only: the labels are read with the data
    precision = str(trainer.get("precision") or "32-true")
    low = precision.startswith(("bf16-true", "16-true"))
    param_bytes = 2 if low or module.load_dtype in ("bfloat16", "float16") else 4
    skeleton = module.skeleton(data)  # the model's structure on the meta device: no weights
    config = skeleton.config
    model = module.policy.apply(skeleton, module.task)
    # the optimizer's own groups, as the policy makes them for the run (lr scale x weight decay)
    groups = [sum(p.numel() for p in g["params"]) for g in module.policy.param_groups(model, 1.0, 0.0)]
    ranks = [state_per_rank(model, groups, strategy, world, r, param_bytes) for r in range(world)]
    params, grads, optim = ranks[0]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # rows are never longer than the model's positions (data.max_length may be; the tokenizer truncates)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq = min(data.max_length, positions) if isinstance(positions, int) else data.max_length
    target = getattr(data, "max_target_length", seq)
    act_dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32
    acts = 0 if args.no_activations else activation_bytes(module, config, data.batch_size, seq, target, act_dtype)
    mem = MemoryEstimate(strategy, world, params, grads, optim, acts, total, trainable)
    peak, capacity = GPUS.get(args.gpu, (None, None))
    peak, capacity = args.peak_tflops or peak, args.memory_gib or capacity
    blocks = count_blocks(config)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 0)
    from ftlab.policies import Full

    flops = flops_per_token(total, trainable, blocks, blocks_with_activations(module.policy, blocks), hidden, seq,
                            isinstance(module.policy, Full))
    rows, rows_source = _train_rows(data)
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    max_steps = trainer.get("max_steps")
    if max_steps and max_steps > 0:
        steps = max_steps
    elif rows:
        steps = int(trainer.get("max_epochs") or 1) * math.ceil(rows / (data.batch_size * world * accumulate))
    else:
        steps = None
    tokens_per_step = data.batch_size * seq * world * accumulate
    spd = speed(flops, peak, args.mfu, world, tokens_per_step, steps)
    return {"gpu": args.gpu, "memory_gib": capacity, "peak_tflops": peak, "mfu": args.mfu, "precision": precision,
            "devices": world, "batch_per_device": data.batch_size, "seq_len": seq, "policy": module.policy.name,
            **mem.as_dict(), "param_numel_per_rank": [r[0].numel for r in ranks],
            "optimizer_state_numel_per_rank": [r[2].numel for r in ranks], "fits": mem.total_bytes <= capacity * GiB * 0.9,
            "flops_per_token": flops, "tokens_per_s": spd.tokens_per_s, "step_time_s": spd.step_time_s,
            "steps": steps, "train_rows": rows, "train_rows_from": rows_source if rows else None,
            "wall_time_s": spd.wall_time_s}


def report(est: dict) -> str:
    def gib(b):
        return f"{b / GiB:.2f} GiB"

    lines = [
        f"ftlab estimate: {est['policy']} policy, {est['strategy']} on {est['devices']} x {est['gpu']} "
        f"({est['memory_gib']:g} GiB, {est['peak_tflops']:g} TFLOP/s peak, MFU {est['mfu']:g}), {est['precision']}",
        f"  parameters   {est['total_params']:>14,} total, {est['trainable_params']:,} trainable",
        "  per device:",
        f"    parameters  {gib(est['params']['bytes']):>12}  ({est['params']['numel']:,} elements)",
        f"    gradients   {gib(est['grads']['bytes']):>12}  ({est['grads']['numel']:,})",
        f"    optimizer   {gib(est['optimizer']['bytes']):>12}  ({est['optimizer']['numel']:,}: AdamW, fp32)",
        f"    activations {gib(est['activations_bytes']):>12}  (batch {est['batch_per_device']} x {est['seq_len']} tokens)",
        f"    total       {gib(est['total_bytes']):>12}  -> {'fits' if est['fits'] else 'DOES NOT FIT'} "
        f"(90% of {est['memory_gib']:g} GiB usable)",
        f"  speed: {est['tokens_per_s']:,.0f} tokens/s, {est['step_time_s']:.3f} s/step "
        f"({est['flops_per_token'] / 1e9:.2f} GFLOP/token)",
    ]
    if est["wall_time_s"]:
        t = est["wall_time_s"]
        source = f" ({est['train_rows']:,} training rows, from the {est['train_rows_from']})" if est["train_rows"] else ""
        lines.append(f"  {est['steps']:,} steps{source}: " + (f"{t / 3600:.1f} h" if t > 5400 else
                                                               f"{t / 60:.1f} min" if t > 90 else f"{t:.1f} s"))
    else:
        lines.append("  total time: unknown until the data is prepared once (or set trainer.max_steps)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args, rest = parser().parse_known_args(argv)
    est = estimate(args, rest)
    print(json.dumps(est, indent=2) if args.json else report(est))
    return 0 if est["fits"] else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
