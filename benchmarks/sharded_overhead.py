"""Sharded overhead: ftlab `fsdp` and `deepspeed_stage_3` at 2 ranks against the same sharding written by hand.

Case: the small Llama of benchmarks/overhead.py (~20M parameters, SmolLM2's tokenizer) fine-tuned in full on
packed chatterbot conversations, 8 x 128 tokens a rank, fp32, 2 ranks launched by torchrun (gloo, CPU).
Held equal: the model and its weights, each rank's batches (ftlab's tokenised data and its sampler, rank r
of 2), fused AdamW with the same parameter groups, warmup + linear decay, clipping 1.0, and the sharding:
- fsdp: the plain loop applies FSDP2's `fully_shard` to each decoder block, then to the root (the tied
  embedding stays in the root, as ftlab leaves it), and clips with `torch.nn.utils.clip_grad_norm_`.
- deepspeed_stage_3: the plain loop calls `deepspeed.initialize` with the ZeRO-3 config ftlab's
  `deepspeed_stage_3` uses (Lightning's `DeepSpeedStrategy(stage=3)` config, buffers sized by the model as
  ftlab sizes them), DeepSpeed's clipping, and `engine.backward` / `engine.step`.
What differs: ftlab loads its FSDP shards and ZeRO-3 partitions straight from the checkpoint (the plain loop
loads the whole model on each rank, then shards it), and runs Lightning's
loop with ftlab's callbacks and logging. Measured: rank 0's median time between step ends after 5 warm-up
steps; the runs alternate ftlab, plain, ftlab, plain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.common import REPO, emit, ftlab_fit, launcher, median, plain_step, run, step_times
from benchmarks.overhead import CASES, small_llama

STRATEGIES = ("fsdp", "deepspeed_stage_3")
COMMON = ["--trainer.limit_val_batches=0", "--test_after_fit=false", "--trainer.val_check_interval=null",
          "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu", "--trainer.devices=2",
          "--trainer.precision=32-true"]


def case(steps: int) -> tuple[str, list[str]]:
    config, overrides = CASES["small-llama-sft"]
    llama = small_llama(str(REPO / ".cache" / "bench-small-llama"))
    return config, [o.replace("SMALL_LLAMA", llama) for o in overrides] + COMMON + [f"--trainer.max_steps={steps}"]


def plain_loop(strategy: str, steps: int) -> list[float] | None:
    """One rank of the hand-written loop; rank 0 returns its step times."""
    import torch
    import torch.distributed as dist

    from ftlab.cli import parse_fit_config
    from ftlab.loading import load_model

    config, overrides = case(steps)
    os.environ["PL_GLOBAL_SEED"] = "0"  # the seed ftlab's sampler reads: the same batch order
    cli = parse_fit_config(["--config", config, *overrides])
    module, data = cli.model, cli.datamodule
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    data.setup()  # the ftlab run before it cached the tokenised data
    loader = data.train_dataloader()
    loader.batch_sampler.num_replicas, loader.batch_sampler.rank = world, rank  # rank r of W, as under Lightning
    model = load_model(module.task.auto_class, module.name_or_path, **module._load_kwargs(data)).train()
    no_decay = [n for n, _ in model.named_parameters() if n.endswith("bias") or "norm" in n.lower()]
    def groups(named):
        named = list(named)
        return [{"params": [p for n, p in named if n not in no_decay], "weight_decay": module.optim.weight_decay},
                {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}]

    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        block = type(model.model.layers[0])
        for m in model.modules():
            if isinstance(m, block):
                fully_shard(m)
        fully_shard(model)
        opt, sched = module.optim.build(groups(model.named_parameters()), steps)  # torch's fused AdamW, LambdaLR

        def step(batch):
            return plain_step(module, model, batch, opt, sched)
    else:
        import deepspeed

        from ftlab.strategies import resolve_strategy

        preset = resolve_strategy("deepspeed_stage_3")  # Lightning's ZeRO-3 config, buffers sized as ftlab sizes them
        preset.size_buffers(model.config)
        ds_config = {**preset.config, "train_micro_batch_size_per_gpu": data.batch_size,
                     "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
        opt, sched = module.optim.build(groups(model.named_parameters()), steps)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config,
                                               dist_init_required=False)

        def step(batch):
            loss = module.task.forward(engine, batch).loss
            engine.backward(loss)
            engine.step()
            return loss
    times, last = [], time.perf_counter()
    for i, batch in enumerate(loader):
        if i == steps:
            break
        step(batch).item()  # the framework logs the loss each step: so does the plain loop
        now = time.perf_counter()
        times.append(now - last)
        last = now
    dist.destroy_process_group()
    return times[5:] if rank == 0 else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--plain", choices=STRATEGIES, help="internal: one rank of the plain loop (under torchrun)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    # a round's ratio varies by +-10% on a shared 2-core host: a 3% goal needs several
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps a run (the first 5 are not timed)")
    args = p.parse_args()
    if args.plain:
        times = plain_loop(args.plain, args.steps)
        if times is not None:
            print("STEP_TIMES " + json.dumps(times), flush=True)
        return
    config, overrides = case(args.steps)
    for strategy in args.strategies:
        ftlab_medians, plain_medians = [], []
        for _ in range(args.rounds):  # ftlab, plain, ftlab, plain
            _, _, rows = ftlab_fit(config, *overrides, f"--trainer.strategy={strategy}", ranks=2)
            ftlab_medians.append(median(step_times(rows)))
            out = run([*launcher(2), "-m", "benchmarks.sharded_overhead", "--plain", strategy,
                       "--steps", str(args.steps)])
            line = next(x for x in out.stdout.splitlines() if x.startswith("STEP_TIMES "))
            plain_medians.append(median(json.loads(line.split(" ", 1)[1])))
        emit({"benchmark": "sharded_overhead", "strategy": strategy, "ranks": 2, "steps": args.steps, "rounds": args.rounds,
              "ftlab_step_s": median(ftlab_medians), "plain_step_s": median(plain_medians),
              "ftlab_round_s": ftlab_medians, "plain_round_s": plain_medians,
              "ratios": [p / f for f, p in zip(ftlab_medians, plain_medians)],
              "ftlab_speed_vs_plain": median([p / f for f, p in zip(ftlab_medians, plain_medians)])})


if __name__ == "__main__":
    sys.exit(main())
