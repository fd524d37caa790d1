"""ftlab against TRL's `SFTTrainer` on the SmolLM2 LoRA SFT job (configs/sft-smollm2-chatterbot.yaml).

Held equal: SmolLM2-135M-Instruct, LoRA r 16 / alpha 32 / dropout 0.05 on q,k,v,o (the peft config ftlab
builds, handed to TRL as `peft_config`), the same training conversations as the same token ids (ftlab's
chat-template rendering, one conversation a row; TRL gets them pre-tokenised with an `assistant_masks`
column, from which it builds its labels: loss on the assistant's tokens only on both sides), packing into
rows of 256 tokens, 4 rows a step, 1 epoch, lr 1e-3, warmup 5% then linear decay, weight decay 0.01,
clipping 1.0, fused AdamW, fp32, seed. Then both trained models are scored by the same code: mean NLL of
the assistant's tokens of the first 50 held-out (validation) conversations, one conversation a row.

What differs is each tool's packing and loop. ftlab: first-fit decreasing into rows of <= 256 tokens, each
example with its own position ids; a batch is 4 rows padded to the longest (a block-diagonal causal mask
per row). TRL (`packing=True`, its default `packing_strategy="bfd"`): best-fit decreasing into rows of
<= 256, which turns on padding-free batches: the 4 rows are concatenated into one sequence with position
ids (no padding at all; transformers builds one block-diagonal mask over the whole concatenation).
TRL's `assistant_only_loss=True` needs a chat template with `{% generation %}` markers, which SmolLM2's
lacks and TRL has no training template for; the `assistant_masks` column is TRL's own route to the same
loss on processed data. The runs alternate ftlab, TRL, ftlab, TRL... on the same seed; tokens/s is the
real (non-padding) tokens of the training conversations over each tool's training time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from benchmarks.common import PY, emit, ftlab_fit, median, run

CONFIG = "configs/sft-smollm2-chatterbot.yaml"
HELDOUT = 50  # held-out conversations scored (of the config's 100)


def overrides(rows: int, seed: int) -> list[str]:
    return [f"--data.init_args.max_train_rows={rows}", f"--seed_everything={seed}", "--trainer.limit_val_batches=0",
            "--trainer.val_check_interval=null", "--trainer.num_sanity_val_steps=0", "--test_after_fit=false"]


def conversations(rows: int, seed: int):
    """ftlab's data module for the job, unpacked (one conversation a row), and its parsed config."""
    from ftlab.cli import parse_fit_config

    cli = parse_fit_config(["--config", CONFIG, *overrides(rows, seed), "--data.init_args.packing=false"])
    cli.datamodule.setup()
    return cli, cli.datamodule


def heldout_loss(model, data, conversations: int = HELDOUT) -> float:
    """Mean NLL over the assistant's tokens of the first held-out (validation) conversations, one a row,
    padded in batches of 10 (the same code for both tools)."""
    import torch

    from ftlab.data.collate import PadCollator

    model.eval()
    rows = data.splits["validation"].select(range(min(conversations, len(data.splits["validation"]))))
    collate = PadCollator(data.tokenizer.pad_token_id)
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 10):
            batch = collate([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows.select(range(i, min(i + 10, len(rows))))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                             ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def real_tokens(data) -> int:
    return sum(len(ids) for ids in data.splits["train"]["input_ids"])


def trl_side(rows: int, seed: int) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from ftlab.loading import resolve_pretrained

    cli, data = conversations(rows, seed)
    train = data.splits["train"]
    ds = datasets.Dataset.from_dict({"input_ids": train["input_ids"],
                                     "assistant_masks": [[int(x != -100) for x in y] for y in train["labels"]]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(cli.model.name_or_path)).train()
    optim, max_length = cli.model.optim, data.max_length
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=data.batch_size, num_train_epochs=1,
                     learning_rate=optim.lr, warmup_steps=optim.warmup_ratio, lr_scheduler_type="linear",
                     weight_decay=optim.weight_decay, max_grad_norm=1.0, optim="adamw_torch_fused",
                     packing=True, packing_strategy="bfd", max_length=max_length, seed=seed, use_cpu=True,
                     report_to=[], save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=data.tokenizer,
                         peft_config=cli.model.policy.peft_config(model, cli.model.task))
    packed = trainer.train_dataset
    rows_packed = len(packed)
    computed = sum(len(x) for x in packed["input_ids"])  # padding-free: the concatenated rows, no padding
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    return {"train_s": seconds, "steps": out.global_step, "packed_rows": rows_packed,
            "row_fill": computed / (rows_packed * max_length), "real_token_fraction": real_tokens(data) / computed,
            "real_tokens": real_tokens(data), "train_loss": out.training_loss, "heldout_loss": heldout_loss(trainer.model, data)}


def ftlab_side(rows: int, seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    from ftlab.cli import parse_fit_config

    run_dir, summary, metrics = ftlab_fit(CONFIG, *overrides(rows, seed), timeout=3600)
    _, data = conversations(rows, seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    packed = parse_fit_config(["--config", CONFIG, *overrides(rows, seed)]).datamodule
    packed.setup()
    batches = list(packed.train_dataloader())
    computed = sum(b["input_ids"].numel() for b in batches)  # padded to each batch's longest row
    rows_packed = len(packed.splits["train"])
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "export" / "merged"))
    return {"train_s": summary["wall_time_s"], "steps": summary.get("steps") or len(batches),
            "packed_rows": rows_packed,
            "row_fill": sum(len(x) for x in packed.splits["train"]["input_ids"]) / (rows_packed * packed.max_length),
            "real_token_fraction": real_tokens(data) / computed, "real_tokens": real_tokens(data),
            "heldout_loss": heldout_loss(model, data)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["ftlab", "trl"], help="internal: run one side and print its result")
    p.add_argument("--rows", type=int, default=160, help="training conversations (the job's config: 600)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.side:
        side = trl_side if args.side == "trl" else ftlab_side
        print(json.dumps(side(args.rows, args.seed)))
        return
    pairs = []
    for _ in range(args.rounds):  # ftlab, TRL, ftlab, TRL...: the same seed, side by side
        pair = []
        for name in ("ftlab", "trl"):
            out = run([PY, "-m", "benchmarks.trl_sft", "--side", name, "--rows", str(args.rows), "--seed", str(args.seed)],
                      timeout=3600)
            pair.append(json.loads(out.stdout.strip().splitlines()[-1]))
        pairs.append(pair)
    f, t = pairs[0]
    emit({"benchmark": "trl_sft", "rows": args.rows, "rounds": args.rounds, "seed": args.seed,
          "real_tokens": f["real_tokens"], "ftlab_train_s": [a["train_s"] for a, _ in pairs],
          "trl_train_s": [b["train_s"] for _, b in pairs],
          "ftlab_tokens_per_s": median([a["real_tokens"] / a["train_s"] for a, _ in pairs]),
          "trl_tokens_per_s": median([b["real_tokens"] / b["train_s"] for _, b in pairs]),
          "speed_ratios": [b["train_s"] / a["train_s"] for a, b in pairs],
          "ftlab_speed_vs_trl": median([b["train_s"] / a["train_s"] for a, b in pairs]),
          "ftlab_heldout_loss": [a["heldout_loss"] for a, _ in pairs], "trl_heldout_loss": [b["heldout_loss"] for _, b in pairs],
          "ftlab_steps": f["steps"], "trl_steps": t["steps"], "ftlab_packed_rows": f["packed_rows"],
          "trl_packed_rows": t["packed_rows"], "ftlab_row_fill": f["row_fill"], "trl_row_fill": t["row_fill"],
          "ftlab_real_token_fraction": f["real_token_fraction"], "trl_real_token_fraction": t["real_token_fraction"]})


if __name__ == "__main__":
    sys.exit(main())
