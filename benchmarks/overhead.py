"""Loop overhead: ftlab `fit` against a plain PyTorch training loop doing the same work.

Same model, same batches (the plain loop reads ftlab's own tokenised data in the same order), batch size,
fused AdamW with the same parameter groups, warmup + linear decay, gradient clipping, fp32. No validation.
Measured: the median time between consecutive step ends (data loading, forward, backward, optimizer and
everything the framework adds), after 5 warm-up steps; the runs alternate, twice each.
Cases: MiniLM sequence classification (full fine-tuning) and a small Llama-architecture causal LM (built
from a config, SmolLM2's tokenizer) on packed chatterbot conversations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.common import PY, REPO, emit, ftlab_fit, median, plain_step, run, step_times

STEPS = 30
CASES = {
    "minilm-classification": ("configs/quickstart-full.yaml", ["--data.init_args.max_train_rows=2000"]),
    "small-llama-sft": ("configs/sft-smollm2-chatterbot.yaml", [
        "--model.name_or_path=SMALL_LLAMA", "--model.policy=Full", "--model.optim.lr=1e-4",
        "--data.init_args.tokenizer=SmolLM2-135M-Instruct", "--data.init_args.batch_size=8",
        "--data.init_args.max_length=128"]),
}
COMMON = [f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0", "--test_after_fit=false",
          "--trainer.val_check_interval=null", "--trainer.num_sanity_val_steps=0"]


def small_llama(folder: str) -> str:
    """A ~20M-parameter Llama (4 blocks of 256) with SmolLM2's tokenizer, saved like a hub checkpoint."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from ftlab.loading import load_tokenizer

        tok = load_tokenizer("SmolLM2-135M-Instruct")
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
        LlamaForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def plain_loop(config: str, overrides: list[str]) -> list[float]:
    """The hand-written loop: ftlab only parses the config and serves the same tokenised batches."""
    import torch

    from ftlab.cli import parse_fit_config
    from ftlab.loading import load_model

    os.environ["PL_GLOBAL_SEED"] = "0"  # the seed ftlab's sampler reads: the same batch order
    cli = parse_fit_config(["--config", config, *overrides, *COMMON])
    module, data = cli.model, cli.datamodule
    torch.manual_seed(0)
    data.setup()
    model = load_model(module.task.auto_class, module.name_or_path, **module._load_kwargs(data)).train()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = data.tokenizer.pad_token_id
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith("bias") and "norm" not in n.lower()],
               "weight_decay": module.optim.weight_decay},
              {"params": [p for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n.lower()],
               "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=module.optim.lr, fused=True)
    warmup = max(1, int(0.06 * STEPS))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, max(0.0, (STEPS - s) / (STEPS - warmup))))
    times, last = [], time.perf_counter()
    for step, batch in enumerate(data.train_dataloader()):
        if step == STEPS:
            break
        loss = plain_step(module, model, batch, opt, sched)
        loss.item()  # the framework logs the loss each step: so does the plain loop
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times[5:]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--plain", help="internal: run the plain loop of this case and print its step times")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    llama = small_llama(str(REPO / ".cache" / "bench-small-llama"))
    cases = {k: (c, [o.replace("SMALL_LLAMA", llama) for o in ov]) for k, (c, ov) in CASES.items()}
    if args.plain:
        config, overrides = cases[args.plain]
        print(json.dumps(plain_loop(config, overrides)))
        return
    for name, (config, overrides) in cases.items():
        ftlab_medians, plain_medians = [], []
        for _ in range(args.rounds):
            _, summary, rows = ftlab_fit(config, *overrides, *COMMON)
            ftlab_medians.append(median(step_times(rows)))
            out = run([PY, "-m", "benchmarks.overhead", "--plain", name])
            plain_medians.append(median(json.loads(out.stdout.strip().splitlines()[-1])))
        ratio = median(plain_medians) / median(ftlab_medians)
        emit({"benchmark": "overhead", "case": name, "steps": STEPS, "rounds": args.rounds,
              "ftlab_step_s": median(ftlab_medians), "plain_step_s": median(plain_medians),
              "ftlab_speed_vs_plain": ratio})


if __name__ == "__main__":
    sys.exit(main())
