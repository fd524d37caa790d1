"""ftlab against the Hugging Face `Trainer` on the classification job: the Trainer at its best, and as it
comes out of the box.

Job: MiniLM sequence classification on Rotten Tomatoes snippets, full fine-tuning (lr 5e-5) and LoRA (r 8,
alpha 16, dropout 0.05, the same peft config ftlab builds; lr 2e-3); the same training rows (ftlab's split and
tokenisation, so both see identical tokens), batch 32, max length 64, 1 epoch, warmup 6% then linear decay,
weight decay 0.01, clipping 1.0, fp32; then accuracy on the same test rows (2,000, or --test-rows).

Held equal: data, tokens, batch, schedule, optimizer hyper-parameters, seed. The Trainer at its best:
`train_sampling_strategy="group_by_length"` (transformers 5's name for `group_by_length=True`: its
LengthGroupedSampler), `optim="adamw_torch_fused"`, and its data-loading advice (a worker process,
kept alive, prefetching; pinned memory has no effect on CPU). Out of the box: random batches, defaults.
What differs: each tool's own sampler, collator (ftlab fills tensors, the Trainer calls `tokenizer.pad`)
and loop. Each seed runs ftlab then the Trainer, back to back; the speed ratio is the median of the pairs'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from benchmarks.common import PY, emit, ftlab_fit, median, run

POLICIES = {"full": ("configs/quickstart-full.yaml", 5e-5), "lora": ("configs/quickstart.yaml", 2e-3)}
OVERRIDES = ["--trainer.limit_val_batches=0", "--trainer.val_check_interval=null", "--trainer.num_sanity_val_steps=0"]


TEST_ROWS = 2000  # the configs' test split; --test-rows sets another (for both tools: their split is ftlab's)


def ftlab_overrides(rows: int, seed: int) -> list[str]:
    return [f"--data.init_args.max_train_rows={rows}", f"--data.init_args.test_size={TEST_ROWS}",
            f"--seed_everything={seed}", *OVERRIDES]


def hf_trainer(policy: str, rows: int, seed: int, best: bool) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from ftlab.cli import parse_fit_config
    from ftlab.data.sources import resolve_model_path

    config, lr = POLICIES[policy]
    cli = parse_fit_config(["--config", config, *ftlab_overrides(rows, seed)])
    data = cli.datamodule
    data.setup()
    train, test = data.splits["train"], data.splits["test"]
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"), num_labels=2)
    if policy == "lora":
        import peft

        # the LoraConfig ftlab builds for this model (targets, head in modules_to_save): the same adapter
        model = peft.get_peft_model(model, cli.model.policy.peft_config(model, cli.model.task))
    tuned = dict(train_sampling_strategy="group_by_length", optim="adamw_torch_fused", dataloader_num_workers=1,
                 dataloader_persistent_workers=True, dataloader_prefetch_factor=4) if best else {}
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=32, per_device_eval_batch_size=64,
                             num_train_epochs=1, learning_rate=lr, warmup_steps=0.06, lr_scheduler_type="linear",
                             weight_decay=0.01, max_grad_norm=1.0, report_to=[], save_strategy="no", eval_strategy="no",
                             logging_steps=20, seed=seed, use_cpu=True, disable_tqdm=True, **tuned)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(data.tokenizer))
    real = computed = 0
    for batch in trainer.get_train_dataloader():  # the Trainer's own batches: the share of real tokens it computes
        real += int(batch["attention_mask"].sum())
        computed += batch["attention_mask"].numel()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    pred = trainer.predict(test)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    accuracy = float((np.argmax(logits, -1) == pred.label_ids).mean())
    return {"train_s": seconds, "samples_per_s": len(train) / seconds, "accuracy": accuracy, "optim": getattr(args.optim, "value", str(args.optim)),
            "sampler": args.train_sampling_strategy, "real_token_fraction": real / computed}


def ftlab_real_fraction(policy: str, rows: int, seed: int) -> float:
    """The share of real tokens in ftlab's training batches (its length-grouped sampler, PadCollator)."""
    import os

    from ftlab.cli import parse_fit_config

    os.environ["PL_GLOBAL_SEED"] = str(seed)
    data = parse_fit_config(["--config", POLICIES[policy][0], *ftlab_overrides(rows, seed)]).datamodule
    data.setup()
    masks = [b["attention_mask"] for b in data.train_dataloader()]
    return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def spread(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    global TEST_ROWS
    p = argparse.ArgumentParser()
    p.add_argument("--hf", nargs=3, metavar=("POLICY", "SEED", "VARIANT"),
                   help="internal: run the HF Trainer side (VARIANT best or default) and print its result")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", type=int, default=3000, help="training rows (1 epoch)")
    p.add_argument("--test-rows", type=int, default=TEST_ROWS, help="test rows scored (the split's size)")
    p.add_argument("--out-of-the-box", type=int, default=1, help="seeds of the out-of-the-box pair (full only)")
    args = p.parse_args()
    TEST_ROWS = args.test_rows
    if args.hf:
        policy, seed, variant = args.hf
        print(json.dumps(hf_trainer(policy, args.rows, int(seed), variant == "best")))
        return

    def hf(policy: str, seed: int, variant: str) -> dict:
        out = run([PY, "-m", "benchmarks.hf_trainer", "--rows", str(args.rows), "--test-rows", str(args.test_rows),
                   "--hf", policy, str(seed), variant])
        return json.loads(out.stdout.strip().splitlines()[-1])

    jobs = [(policy, "best", args.seeds) for policy in args.policies]
    if args.out_of_the_box and "full" in args.policies:
        jobs.append(("full", "default", args.seeds[: args.out_of_the_box]))
    for policy, variant, seeds in jobs:
        pairs = []
        for seed in seeds:  # ftlab, then the Trainer, on the same seed: side by side
            _, summary, _ = ftlab_fit(POLICIES[policy][0], *ftlab_overrides(args.rows, seed))
            pairs.append((summary, hf(policy, seed, variant)))
        f_acc = [s["test/accuracy"] for s, _ in pairs]
        h_acc = [h["accuracy"] for _, h in pairs]
        noise = max(spread(f_acc), spread(h_acc), 0.005)  # one seed alone: half a point
        emit({"benchmark": "hf_trainer", "policy": policy, "variant": variant, "rows": pairs[0][0]["train_samples"],
              "test_rows": args.test_rows,
              "seeds": seeds, "ftlab_train_s": [s["wall_time_s"] for s, _ in pairs],
              "hf_train_s": [h["train_s"] for _, h in pairs],
              "speed_ratios": [h["train_s"] / s["wall_time_s"] for s, h in pairs],
              "ftlab_speed_vs_hf": median([h["train_s"] / s["wall_time_s"] for s, h in pairs]),
              "ftlab_samples_per_s": median([s["train_samples_per_s"] for s, _ in pairs]),
              "hf_samples_per_s": median([h["samples_per_s"] for _, h in pairs]),
              "ftlab_accuracy": f_acc, "hf_accuracy": h_acc, "accuracy_noise": noise,
              "ftlab_real_token_fraction": ftlab_real_fraction(policy, args.rows, seeds[0]),
              "hf_real_token_fraction": pairs[0][1]["real_token_fraction"],
              "hf_optim": pairs[0][1]["optim"], "hf_sampler": pairs[0][1]["sampler"]})


if __name__ == "__main__":
    sys.exit(main())
