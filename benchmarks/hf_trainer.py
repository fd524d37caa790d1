"""ftlab against the Hugging Face `Trainer` on the same job, each as configured out of the box.

Job: MiniLM full fine-tuning on Rotten Tomatoes snippets, the same 3,000 training rows (ftlab's split and
tokenisation, so both see identical tokens), batch 32, max length 64, 1 epoch, lr 5e-5, warmup 6% then
linear decay, clipping 1.0; then accuracy on the same 2,000 test rows. Reported: the training wall-time
ratio, samples/s of each, and both accuracies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from benchmarks.common import PY, emit, ftlab_fit, run

CONFIG = "configs/quickstart-full.yaml"
OVERRIDES = ["--data.init_args.max_train_rows=3000", "--trainer.limit_val_batches=0",
             "--trainer.val_check_interval=null", "--trainer.num_sanity_val_steps=0"]


def hf_trainer() -> dict:
    import numpy as np
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from ftlab.cli import parse_fit_config
    from ftlab.data.sources import resolve_model_path

    cli = parse_fit_config(["--config", CONFIG, *OVERRIDES])
    data = cli.datamodule
    data.setup()
    train, test = data.splits["train"], data.splits["test"]
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"), num_labels=2)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=32, per_device_eval_batch_size=64,
                             num_train_epochs=1, learning_rate=5e-5, warmup_steps=0.06, lr_scheduler_type="linear",
                             weight_decay=0.01, max_grad_norm=1.0, report_to=[], save_strategy="no", eval_strategy="no",
                             logging_steps=20, seed=0, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(data.tokenizer))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    pred = trainer.predict(test)
    accuracy = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {"train_s": seconds, "samples_per_s": len(train) / seconds, "accuracy": accuracy, "optim": args.optim}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf", action="store_true", help="internal: run the HF Trainer side and print its result")
    if p.parse_args().hf:
        print(json.dumps(hf_trainer()))
        return
    _, summary, _ = ftlab_fit(CONFIG, *OVERRIDES)
    hf = json.loads(run([PY, "-m", "benchmarks.hf_trainer", "--hf"]).stdout.strip().splitlines()[-1])
    emit({"benchmark": "hf_trainer", "rows": summary["train_samples"], "ftlab_train_s": summary["wall_time_s"],
          "hf_train_s": hf["train_s"], "ftlab_speed_vs_hf": hf["train_s"] / summary["wall_time_s"],
          "ftlab_samples_per_s": summary["train_samples_per_s"], "hf_samples_per_s": hf["samples_per_s"],
          "ftlab_accuracy": summary["test/accuracy"], "hf_accuracy": hf["accuracy"], "hf_optim": hf["optim"]})


if __name__ == "__main__":
    sys.exit(main())
