"""Judge a causal LM's movie reviews with the sentiment classifier `make quickstart` trains
(docs/preference-sentiment.md).

For one held-out prompt per movie of a pairs file (scripts/build_review_pairs.py), the model writes a greedy
review; the classifier (runs/quickstart's export: fresh / rotten) labels it. Prints one JSON line of figures
and writes every review with its label to --out.

    python scripts/judge_reviews.py --model SmolLM2-135M-Instruct --out runs/review-pairs/judged-before.jsonl
    python scripts/judge_reviews.py --model runs/preference-smollm2-sentiment --out runs/review-pairs/judged-after.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re

import torch


def load_causal_lm(name: str):
    """A run directory or model folder (its merged export), or a named/hub model as ftlab loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftlab.generate import model_folder
    from ftlab.loading import resolve_pretrained

    folder = model_folder(name) if os.path.isdir(os.path.expanduser(name)) else resolve_pretrained(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return folder, tokenizer, AutoModelForCausalLM.from_pretrained(folder).eval()


def held_out_prompts(pairs: str, n: int) -> list[dict]:
    """The first pair of each movie, in file order, up to n."""
    rows, movies = [], set()
    with open(pairs, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["movie"] not in movies:
                movies.add(row["movie"])
                rows.append(row)
    return rows[:n]


@torch.no_grad()
def generate(tokenizer, model, prompts: list[str], max_new_tokens: int, batch_size: int = 10) -> list[str]:
    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts[i:i + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
        out += [t.strip() for t in tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


@torch.no_grad()
def judge(folder: str, texts: list[str]) -> list[float]:
    """P(fresh) of each text."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    fresh = model.config.label2id["fresh"]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    return model(**batch).logits.float().softmax(-1)[:, fresh].tolist()


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory, model folder, or named/hub model")
    parser.add_argument("--pairs", default="runs/review-pairs/test.jsonl", help="held-out pairs (prompts)")
    parser.add_argument("--train-pairs", default="runs/review-pairs/train.jsonl",
                        help="training pairs: how much of a review repeats their snippets")
    parser.add_argument("--judge", default="runs/quickstart", help="the sentiment classifier (run or folder)")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", help="jsonl of prompt, review, p_fresh")
    args = parser.parse_args()
    torch.manual_seed(0)

    from ftlab.generate import model_folder

    rows = held_out_prompts(args.pairs, args.prompts)
    folder, tokenizer, model = load_causal_lm(args.model)
    reviews = generate(tokenizer, model, [r["prompt"] for r in rows], args.max_new_tokens)
    judge_folder = model_folder(args.judge)
    p_fresh = judge(judge_folder, [r or "." for r in reviews])
    # the same classifier on the held-out snippets themselves: how well it separates real fresh from rotten
    p_chosen = judge(judge_folder, [r["chosen"] for r in rows])
    p_rejected = judge(judge_folder, [r["rejected"] for r in rows])

    train_grams: set[tuple[str, ...]] = set()
    with open(args.train_pairs, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            train_grams |= ngrams(row["chosen"], 5) | ngrams(row["rejected"], 5)
    words = [len(r.split()) for r in reviews]
    figures = {
        "model": folder, "prompts": len(rows),
        "share_fresh": round(sum(p > 0.5 for p in p_fresh) / len(rows), 3),
        "mean_p_fresh": round(sum(p_fresh) / len(rows), 3),
        "mean_words": round(sum(words) / len(rows), 1),
        "max_words": max(words),
        "hit_max_new_tokens": sum(len(tokenizer(r)["input_ids"]) >= args.max_new_tokens - 1 for r in reviews),
        "single_sentence": sum(len(re.findall(r"[.!?](?:\s|$)", rv)) <= 1 and len(rv.split()) < 40 for rv in reviews),
        "refusals": sum("sorry" in rv.lower() or "chatbot" in rv.lower() for rv in reviews),
        "distinct_reviews": len(set(reviews)),
        "names_the_movie": sum(r["movie"].replace("_", " ") in rv.lower() for r, rv in zip(rows, reviews)),
        "shares_5gram_with_train_snippets": sum(bool(ngrams(rv, 5) & train_grams) for rv in reviews),
        "judge_on_snippets": {"chosen_fresh": round(sum(p > 0.5 for p in p_chosen) / len(rows), 3),
                              "rejected_fresh": round(sum(p > 0.5 for p in p_rejected) / len(rows), 3)},
    }
    print(json.dumps(figures))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            for r, review, p in zip(rows, reviews, p_fresh):
                f.write(json.dumps({"movie": r["movie"], "prompt": r["prompt"], "review": review,
                                    "p_fresh": round(p, 3)}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
