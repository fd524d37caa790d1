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
    Activations,
    MemoryEstimate,
    TensorBytes,
    activation_memory,
    blocks_with_activations,
    checkpoint_key,
    checkpoints_activations,
    count_blocks,
    host_memory,
    quantized_weight_bytes,
    read_checkpoint,
    state_per_rank,
)
from ftlab.estimate.throughput import GPUS, NO_BF16, flops_per_token, speed

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
    p.add_argument("--architecture", metavar="PATH",
                   help="the model's config.json (or a folder holding one) to size, instead of the one "
                        "model.name_or_path points to (e.g. a hub model's config, saved where the hub is not at hand)")
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
    return _strategy(value)[0]


def _strategy(value) -> tuple[str, dict]:
    """The strategy's layout name, and where it keeps state in host memory: {offload_optimizer,
    offload_params, fsdp_offload}. `value`: a name, or the strategy object a config's class path makes."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from ftlab.strategies import FSDP

    offload = {"offload_optimizer": False, "offload_params": False, "fsdp_offload": False}
    if isinstance(value, FSDP):
        return "fsdp", {**offload, "fsdp_offload": bool(value.cpu_offload)}
    if isinstance(value, DeepSpeedStrategy):
        zero = value.config.get("zero_optimization", {}) if isinstance(value.config, dict) else {}
        stage = int(zero.get("stage", 2))
        return f"deepspeed_stage_{max(stage, 1)}", {**offload, "offload_optimizer": bool(zero.get("offload_optimizer")),
                                                    "offload_params": bool(zero.get("offload_param"))}
    name = value if isinstance(value, str) else type(value).__name__.lower()
    name = {"fsdp": "fsdp", "deepspeed": "deepspeed_stage_2"}.get(name, name)
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy {name!r}: the estimate knows {sorted(STRATEGIES)}")
    if name.endswith("_offload"):
        offload.update(offload_optimizer=True, offload_params=name.startswith("deepspeed_stage_3"))
    return STRATEGIES[name], offload


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
    rows = data.max_train_rows
    if rows and getattr(data, "packing", False):  # examples: packed, they make fewer rows, as yet unknown
        return None, "data.max_train_rows (examples, before packing)"
    if isinstance(rows, float) and rows < 1:  # a fraction of a train split not counted yet
        return None, "data.max_train_rows (a fraction)"
    return (int(rows) if rows else rows), "data.max_train_rows"


def estimate(args: argparse.Namespace, fit_overrides: list[str]) -> dict:
    import torch

    from ftlab.cli import parse_fit_config

    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu} must be in (0, 1], e.g. 0.35")
    if args.gpu not in GPUS and not (args.peak_tflops and args.memory_gib):
        raise ConfigError(f"--gpu {args.gpu!r} is not in the table ({', '.join(GPUS)}); give --peak-tflops and --memory-gib")
    for flag, value in (("--devices", args.devices), ("--num-nodes", args.num_nodes)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be a positive number, e.g. {flag} 8")
    cli = parse_fit_config([a for c in args.config for a in ("--config", c)] + fit_overrides)
    cfg = cli.config["fit"]
    trainer = cfg["trainer"]
    devices = args.devices or _devices(trainer.get("devices", 1))
    nodes = args.num_nodes or int(trainer.get("num_nodes") or 1)
    world = devices * nodes
    # the strategy object a config's class path makes (its options: offload), else the name
    configured = cli.config_init["fit"]["trainer"].get("strategy") or trainer.get("strategy")
    strategy, offload = _strategy(args.strategy or configured or "auto")
    module, data = cli.model, cli.datamodule
    if getattr(data, "label_names", True) is None:
        data.label_names = ["0", "1"]  # the head's size only: the labels are read with the data
    # as fit picks it: bf16-mixed on a GPU that computes in bf16 when the config sets none (cli.default_precision)
    on_gpu = str(trainer.get("accelerator") or "auto") in ("auto", "gpu", "cuda")
    precision = str(trainer.get("precision") or ("bf16-mixed" if on_gpu and args.gpu in GPUS and args.gpu not in NO_BF16
                                                 else "32-true"))
    # the dtype the weights load (and train) in, as FineTuneModule.weight_dtype picks it
    load_dtype = module.load_dtype or {"bf16-true": "bfloat16", "16-true": "float16"}.get(precision, "float32")
    param_bytes = torch.empty(0, dtype=getattr(torch, load_dtype)).element_size()
    # the model's structure on the meta device: no weights
    skeleton = _skeleton(module, data, args.architecture) if args.architecture else module.skeleton(data)
    config = skeleton.config
    weight_bytes = _quantized_weights(module, skeleton)
    base_names = {n: p.numel() for n, p in skeleton.named_parameters()}  # what the checkpoint holds
    base_prefix = getattr(skeleton, "base_model_prefix", "")
    checkpoint = read_checkpoint(module.name_or_path, module.gguf_file, module.revision)
    whole_reason = (_fsdp_whole_load(module, skeleton, checkpoint) if strategy == "fsdp" else
                    _names_differ(skeleton, checkpoint) if strategy == "deepspeed_stage_3" else None)
    lacking = sum(n for name, n in base_names.items()
                  if checkpoint.found and not checkpoint_key(name, checkpoint.tensors, base_prefix))
    model = module.policy.apply(skeleton, module.task)
    stored, grad_bytes = _unquantized_bytes(module, model, precision, strategy, param_bytes, weight_bytes)
    weight_bytes.update(stored)
    # the optimizer's own groups, as the policy makes them for the run (lr scale x weight decay)
    groups = [sum(p.numel() for p in g["params"]) for g in module.policy.param_groups(model, 1.0, 0.0)]
    ranks = [state_per_rank(model, groups, strategy, world, r, param_bytes, grad_bytes, optimizer=module.optim.name,
                            weight_bytes=weight_bytes) for r in range(world)]
    params, grads, optim = ranks[0]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # rows are never longer than the model's positions (data.max_length may be; the tokenizer truncates)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq = min(data.max_length, positions) if isinstance(positions, int) else data.max_length
    target = getattr(data, "max_target_length", seq)
    # probes in the compute dtype (not autocast over fp32 weights: its cache of cast weights is no activation)
    act_dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32
    acts = Activations(0, 0) if args.no_activations else \
        activation_memory(module, config, data.batch_size, seq, target, act_dtype,
                          packed=getattr(data, "packing", False))
    frozen, frozen_text = _frozen_model(module, precision, param_bytes, strategy, world)
    mem = MemoryEstimate(strategy, world, params, grads, optim, acts.kept, total, trainable, acts.peak, frozen)
    outputs = cli.config_init["fit"].get("outputs")
    host = host_memory(strategy=strategy, world=world, devices=devices, ranks=ranks, total_params=total,
                       load_size=param_bytes, load_dtype=load_dtype, checkpoint=checkpoint, base_names=base_names,
                       base_prefix=base_prefix, new_numel=lacking + total - sum(base_names.values()),
                       whole_reason=whole_reason, **offload, **_export_shape(model, outputs, param_bytes))
    if not checkpoint.found and not whole_reason:
        host.load += "; checkpoint not at hand: assumed stored in another dtype"
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
            "optimizer_name": module.optim.name, "quantization": _quantization_text(module),
            "activation_checkpointing": checkpoints_activations(module),
            "loss_chunk_size": getattr(module, "loss_chunk_size", 0) or 0, "frozen_model": frozen_text,
            **mem.as_dict(), "nodes": nodes, "host_per_node": host.as_dict(), "param_numel_per_rank": [r[0].numel for r in ranks],
            "optimizer_state_numel_per_rank": [r[2].numel for r in ranks], "fits": mem.total_bytes <= capacity * GiB * 0.9,
            "flops_per_token": flops, "tokens_per_s": spd.tokens_per_s, "step_time_s": spd.step_time_s,
            "steps": steps, "train_rows": rows, "train_rows_from": rows_source if rows else None,
            "wall_time_s": spd.wall_time_s}


def _frozen_model(module, precision: str, param_bytes: int, strategy: str, world: int) -> tuple[TensorBytes, str | None]:
    """Per-rank bytes of the frozen model the task loads beside the trained one (a distillation teacher, a
    preference reference copy), counted from its config on the meta device: in the frozen dtype (a mixed
    precision's compute dtype: FineTuneModule.frozen_dtype), placed as strategies.build_frozen places it
    (sharded under fsdp and ZeRO-3, whole on every rank otherwise); and what it is, for the report."""
    import torch

    from ftlab.loading import load_config

    what = "teacher" if module.task.name == "distillation" else "reference copy"
    try:
        found = module.task.frozen_model(module)
        if found is None:
            return TensorBytes(0, 0), None
        path, gguf_file, revision = found
        config = load_config(path, gguf_file, **({"revision": revision} if revision else {}))
    except (OSError, ValueError, ConfigError) as err:  # e.g. a teacher run not finished yet
        return TensorBytes(0, 0), f"{what}: not counted, its config could not be read ({str(err).splitlines()[0][:160]})"
    with torch.device("meta"):
        numel = sum(p.numel() for p in module.task.auto_class.from_config(config).parameters())
    size = 2 if precision in ("bf16-mixed", "16-mixed", "bf16", "16") else param_bytes  # Lightning's aliases too
    sharded = strategy in ("fsdp", "deepspeed_stage_3")
    local = math.ceil(numel / world) if sharded else numel
    return TensorBytes(local, local * size), (f"{what} {path}: {numel:,} elements in {size} bytes, "
                                              + ("sharded" if sharded else "whole on every device"))


def _skeleton(module, data, architecture: str):
    """The model's structure (meta device) from a config.json given apart from the model: `--architecture`."""
    import torch
    from transformers import AutoConfig

    from ftlab.loading import apply_config_overrides

    path = os.path.expanduser(architecture)
    folder = path if os.path.isdir(path) else os.path.dirname(path) if os.path.basename(path) == "config.json" else None
    if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"--architecture {architecture!r}: no config.json there; give a model folder or its "
                          "config.json")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=module.trust_remote_code)
    apply_config_overrides(config, module.config_overrides, f" in {folder}")
    module.task.resolve(config)
    with torch.device("meta"):
        return module.task.auto_class.from_config(config, trust_remote_code=module.trust_remote_code)


def _quantized_weights(module, skeleton) -> dict[int, int]:
    """id(weight) -> its bytes quantized, for each linear layer bitsandbytes would quantize (transformers
    leaves the output head, and what is tied to it, in full precision); empty without model.quantization."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    quant = module.quantization
    if quant is None:
        return {}
    keep = get_keys_to_not_convert(skeleton)
    out = {}
    for name, layer in skeleton.named_modules():
        if isinstance(layer, torch.nn.Linear) and not any(name == k or name.endswith("." + k) for k in keep):
            out[id(layer.weight)] = quantized_weight_bytes(layer.weight.numel(), quant.bits, quant.double_quant,
                                                           layer.out_features)
    return out


def _unquantized_bytes(module, model, precision: str, strategy: str, load_bytes: int,
                       quantized: dict[int, int]) -> tuple[dict[int, int], int]:
    """({id(weight): its bytes} for the weights not stored in the load dtype, bytes of a gradient), as
    FineTuneModule._settle_weight_dtypes and peft's k-bit preparation leave them. Under a mixed precision (not
    DeepSpeed, which converts the module and keeps fp32 partitions itself): what trains (or will, by gradual
    unfreezing) in fp32, frozen weights in the load dtype. Otherwise a quantized base's other weights are fp32
    (peft's upcast), and the rest is in the load dtype."""
    from ftlab.module import keeps_fp32_masters

    mixed = keeps_fp32_masters(precision, strategy.startswith("deepspeed"))
    out = {}
    for name, p in model.named_parameters():
        if id(p) in quantized:
            continue
        if (p.requires_grad or module.policy.will_train(name)) if mixed else bool(quantized):
            out[id(p)] = p.numel() * 4
    return out, 4 if mixed or quantized else load_bytes


def _quantization_text(module) -> str | None:
    quant = module.quantization
    if quant is None:
        return None
    return "LLM.int8" if quant.bits == 8 else f"{quant.type} 4-bit" + (", double-quantized scales" * quant.double_quant)


def _fsdp_whole_load(module, skeleton, checkpoint) -> str | None:
    """Why fsdp.load_sharded would have every rank load the whole model (its checks, in its order, for GPU
    ranks), or None where each rank reads only its shards."""
    blocker = module.policy.meta_init_blocker()
    if blocker:
        return blocker
    return _names_differ(skeleton, checkpoint)


def _names_differ(skeleton, checkpoint) -> str | None:
    """Why the sharded loading of FSDP or ZeRO-3 cannot map the model's weights to the checkpoint's tensors
    (it then loads through from_pretrained), or None: a new task head is all the checkpoint may lack."""
    from ftlab.policies.layers import find_parts

    if checkpoint.folder is not None and not checkpoint.tensors:
        return "its weights are not in safetensors files"
    if checkpoint.found:
        parts = find_parts(skeleton)
        prefix = getattr(skeleton, "base_model_prefix", "")
        for name, _ in skeleton.named_parameters():
            if not checkpoint_key(name, checkpoint.tensors, prefix) and not parts.is_head(name):
                return f"the checkpoint names its weights otherwise, e.g. it has no {name}"
    return None


def _export_shape(model, outputs, load_size: int) -> dict:
    """What the export after fit gathers and writes (export.export_streamed's blocks, on the weightless model):
    the bytes of each block's tensors, in the dtype they are written in, in order."""
    from ftlab.export import (
        DEFAULT_MAX_SHARD_SIZE,
        _is_peft_unit,
        is_peft_model,
        parse_size,
        skipped_on_save,
        state_blocks,
    )

    limit = parse_size(getattr(outputs, "max_shard_size", DEFAULT_MAX_SHARD_SIZE), "outputs.max_shard_size")
    if outputs is not None and not outputs.export:
        return {"max_shard_size": limit, "export_blocks": []}

    def nbytes(t) -> int:
        return t.numel() * (load_size if t.is_floating_point() else t.element_size())

    if is_peft_model(model):
        adapter = model.peft_config[model.active_adapter]
        if not (getattr(outputs, "merge_adapter", True) and not adapter.is_prompt_learning):
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            blocks = state_blocks(model, keep=names.__contains__)  # the adapter alone
        else:
            base = model.get_base_model()
            prefix = next(f"{name}." for name, m in model.named_modules() if m is base)
            skip = skipped_on_save(base, prefix)
            blocks = state_blocks(base, prefix=prefix, keep=lambda n: n not in skip, whole=_is_peft_unit)
    else:
        skip = skipped_on_save(model)
        blocks = state_blocks(model, keep=lambda n: n not in skip)
    return {"max_shard_size": limit, "export_blocks": [([nbytes(t) for t in b.tensors().values()], b.whole)
                                                       for b in blocks]}


OPTIMIZER_TEXT = {"adamw": "AdamW, fp32", "adamw_8bit": "AdamW 8-bit"}


def _compute_text(est: dict) -> str:
    """The options that change the activations, as the report names them."""
    parts = ["activation checkpointing"] * est["activation_checkpointing"]
    if est["loss_chunk_size"]:
        parts.append(f"loss in chunks of {est['loss_chunk_size']:,} tokens")
    return "".join(f"; {p}" for p in parts)


def report(est: dict) -> str:
    def gib(b):
        return f"{b / GiB:.2f} GiB"

    lines = [
        f"ftlab estimate: {est['policy']} policy, {est['strategy']} on {est['devices']} x {est['gpu']} "
        f"({est['memory_gib']:g} GiB, {est['peak_tflops']:g} TFLOP/s peak, MFU {est['mfu']:g}), {est['precision']}",
        f"  parameters   {est['total_params']:>14,} total, {est['trainable_params']:,} trainable",
        "  per device:",
        f"    parameters  {gib(est['params']['bytes']):>12}  ({est['params']['numel']:,} elements"
        + (f"; base quantized: {est['quantization']})" if est["quantization"] else ")"),
        f"    gradients   {gib(est['grads']['bytes']):>12}  ({est['grads']['numel']:,})",
        f"    optimizer   {gib(est['optimizer']['bytes']):>12}  ({est['optimizer']['numel']:,}: "
        f"{OPTIMIZER_TEXT.get(est['optimizer_name'], est['optimizer_name'])})",
        f"    activations {gib(est['activation_peak_bytes']):>12}  (batch {est['batch_per_device']} x {est['seq_len']} "
        f"tokens: the step's peak; {gib(est['activations_bytes'])} kept for backward{_compute_text(est)})",
        *([f"    frozen      {gib(est['frozen']['bytes']):>12}  ({est['frozen_model']})"] if est["frozen_model"] else []),
        f"    total       {gib(est['total_bytes']):>12}  -> {'fits' if est['fits'] else 'DOES NOT FIT'} "
        f"(90% of {est['memory_gib']:g} GiB usable)",
    ]
    host = est["host_per_node"]
    nodes = f" x {est['nodes']} nodes, node 0 shown" if est["nodes"] > 1 else ""
    lines += [
        f"  host memory per node ({host['devices_per_node']} ranks{nodes}):",
        f"    loading     {gib(host['load_bytes']):>12}  {host['load']}",
        f"    offload     {gib(host['offload_bytes']):>12}  {host['offload'] or 'none: training state stays on the devices'}",
        f"    export      {gib(host['export_bytes']):>12}  {host['export']}",
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
