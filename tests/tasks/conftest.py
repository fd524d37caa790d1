"""Small task datasets and models for the task tests: a learnable NER file (CoNLL), chat rows, a
copy-the-sentiment seq2seq set, plain text; a tiny T5 (no seq2seq weights ship offline)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import FILLER, NEGATIVE, POSITIVE, _tokenizer, write_csv

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def _sentences(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [rng.choices(FILLER, k=rng.randint(3, 9)) for _ in range(n)]


@pytest.fixture(scope="session")
def ner_file(tmp_path_factory) -> Path:
    """Tweet-like rows: each sentiment word is an entity (B-POS / B-NEG); learnable from the word alone.
    (Sub-word alignment and I- tags are checked on the real WNUT-16 file.)"""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("ner") / "train.conll"
    with open(path, "w") as f:
        for words in _sentences(200, 1):
            at = rng.randrange(len(words))
            kind, pool = rng.choice([("POS", POSITIVE), ("NEG", NEGATIVE)])
            entity = rng.choices(pool, k=1)
            tagged = [(w, "O") for w in words[:at]] + [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(entity)]
            tagged += [(w, "O") for w in words[at:]]
            f.write("".join(f"{w}\t{t}\n" for w, t in tagged) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    """Conversations whose answer is the question's sentiment words, twice: learnable, and checkable."""
    rng = random.Random(2)
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with open(path, "w") as f:
        for words in _sentences(160, 2):
            pos = rng.choices(POSITIVE, k=2)
            question = " ".join(words + pos)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": " ".join(pos + pos)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="session")
def seq2seq_csv(tmp_path_factory) -> Path:
    """A review to its verdict: "good good" or "bad bad" after its sentiment words."""
    rng = random.Random(3)
    rows = []
    for words in _sentences(160, 3):
        positive = rng.random() < 0.5
        mixed = words + rng.choices(POSITIVE if positive else NEGATIVE, k=2)
        rng.shuffle(mixed)
        rows.append({"source": " ".join(mixed), "target": "good good" if positive else "bad bad"})
    return write_csv(tmp_path_factory.mktemp("s2s") / "pairs.csv", rows)


@pytest.fixture(scope="session")
def text_csv(tmp_path_factory) -> Path:
    rows = [{"text": " ".join(w) * 3} for w in _sentences(120, 4)]
    return write_csv(tmp_path_factory.mktemp("text") / "text.csv", rows)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-t5"
    tok = _tokenizer(folder)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def task_args(run_dir: Path, model: Path, data_class: str, source: Path, task: str, *extra: str,
              policy: str = "Full") -> list[str]:
    """A small real `ftlab fit` of a task."""
    return [
        "fit", f"--trainer.default_root_dir={run_dir}", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--model.name_or_path={model}", f"--model.task={task}",
        f"--model.policy={policy}", "--model.optim.lr=0.01", f"--data={data_class}", f"--data.source={source}",
        "--data.batch_size=16", "--data.val_size=32", "--data.test_size=32", *extra,
    ]


def write_pairs(path: Path, n: int, seed: int = 6) -> Path:
    """Preference pairs: a filler prompt; chosen: two positive words, rejected: two negative ones (learnable)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for words in _sentences(n, seed):
            f.write(json.dumps({"prompt": " ".join(words), "chosen": " ".join(rng.choices(POSITIVE, k=2)),
                                "rejected": " ".join(rng.choices(NEGATIVE, k=2))}) + "\n")
    return path


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 120)
