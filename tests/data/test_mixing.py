"""Several sources in one run (ftlab.data.mixing): each with its own columns, concatenated or mixed by
weight (to the weight share, drawn with split_seed, after the held-out rows are taken), the mix reported on
the console and in summary.json; split selection, first-N rows and streaming; the checks made up front."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ftlab.data import LanguageModelingData, TextClassificationData
from ftlab.data.mixing import Sources
from ftlab.errors import ConfigError
from tests.conftest import REPO, fit_args, make_rows, run_ftlab, write_csv


def unique_rows(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    rows, seen = [], set(exclude)
    for row in make_rows(4 * n, seed):
        if row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
    return rows[:n]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path, set[str], set[str]]:
    """Source A: 300 reviews in a csv with its own column names; source B: 60 in jsonl (text, label)."""
    folder = tmp_path_factory.mktemp("mix")
    a = unique_rows(300, 11)
    b = unique_rows(60, 12, exclude={r["text"] for r in a})
    write_csv(folder / "a.csv", [{"review": r["text"], "sentiment": r["label"]} for r in a])
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in b))
    return folder / "a.csv", folder / "b.jsonl", {r["text"] for r in a}, {r["text"] for r in b}


def sources(two_sources, weights=(None, None)) -> list[dict]:
    a, b, _, _ = two_sources
    out = [{"source": str(a), "columns": {"text": "review", "label": "sentiment"}}, {"source": str(b)}]
    for entry, weight in zip(out, weights):
        if weight is not None:
            entry["weight"] = weight
    return out


def test_weights_mix_the_training_rows_to_their_shares_without_leaking_held_out_rows(two_sources):
    _, _, a_texts, b_texts = two_sources
    dm = TextClassificationData(sources=sources(two_sources, (1, 1)), val_size=20, test_size=20)
    splits, meta = dm.load_and_split()
    train = Counter(splits["train"]["text"])
    from_a = {t: n for t, n in train.items() if t in a_texts}
    from_b = {t: n for t, n in train.items() if t in b_texts}
    assert len(from_a) + len(from_b) == len(train)
    a_rows, b_rows = sum(from_a.values()), sum(from_b.values())
    assert a_rows + b_rows == 320  # the mix is as large as the training rows together (360 - 40 held out)
    assert a_rows == b_rows == 160  # weights 1:1
    assert set(from_a.values()) == {1}  # A is cut to its share: a subset, without replacement
    report = meta["sources"]
    b_have = report[1]["available_train_rows"]  # B's rows left for training after the held-out rows
    assert len(from_b) == b_have and set(from_b.values()) == {160 // b_have, 160 // b_have + 1}  # upsampled evenly
    held_out = set(splits["validation"]["text"]) | set(splits["test"]["text"])
    assert not held_out & set(train)  # no copy of a training row is held out
    assert [(r["source"], r["train_rows"], r["share"]) for r in report] == [("a.csv", 160, 0.5), ("b.jsonl", 160, 0.5)]
    assert report[0]["sampling"].startswith(f"a random 160 of {report[0]['available_train_rows']} rows, without")
    assert report[1]["sampling"].startswith("upsampled x")
    assert sum(r["validation_rows"] + r["test_rows"] for r in report) == 40
    # deterministic from split_seed
    again, _ = TextClassificationData(sources=sources(two_sources, (1, 1)), val_size=20, test_size=20).load_and_split()
    other, _ = TextClassificationData(sources=sources(two_sources, (1, 1)), val_size=20, test_size=20,
                                      split_seed=1).load_and_split()
    assert again["train"]["text"] == splits["train"]["text"] != other["train"]["text"]


def test_uneven_weights_give_their_proportions(two_sources):
    _, _, a_texts, _ = two_sources
    splits, meta = TextClassificationData(sources=sources(two_sources, (3, 1.0)), val_size=0,
                                          test_size=0).load_and_split()
    a_rows = sum(t in a_texts for t in splits["train"]["text"])
    assert (a_rows, len(splits["train"]) - a_rows) == (270, 90)  # 360 rows, 3:1
    assert [r["share"] for r in meta["sources"]] == [0.75, 0.25]


def test_without_weights_the_sources_are_concatenated(two_sources):
    splits, meta = TextClassificationData(sources=sources(two_sources), val_size=0, test_size=0).load_and_split()
    assert len(splits["train"]) == 360 and len(set(splits["train"]["text"])) == 360
    assert [(r["train_rows"], r["share"], r["sampling"]) for r in meta["sources"]] == [
        (300, 0.8333, "all rows"), (60, 0.1667, "all rows")]


def test_a_weighted_mix_is_reported_on_the_console_and_in_summary(tmp_path, tiny_bert, two_sources):
    run = tmp_path / "run"
    args = [a for a in fit_args(run, tiny_bert, Path("unused"), "--trainer.max_epochs=1")
            if not a.startswith("--data.source=")]
    out = run_ftlab(*args, f"--data.sources={json.dumps(sources(two_sources, (1, 3)))}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("ftlab: data sources mixed by weight (seed 0): a.csv: 70 train rows (25.0%, a random 70 of "
            in out.stderr), out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert [(s["source"], s["train_rows"], s["share"]) for s in summary["data_sources"]] == [
        ("a.csv", 70, 0.25), ("b.jsonl", 210, 0.75)]
    assert summary["train_rows"] == 280 and summary["train_samples"] == 280 and summary["steps"] == 18


def test_split_selection_and_first_rows(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(30)]
    for name, part in (("train", rows[:20]), ("test", rows[20:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    files = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}

    def train_rows(**entry):
        dm = LanguageModelingData(sources=[{"source": files, **entry}], val_size=0, test_size=0)
        return [m[0]["content"] for m in dm._load_checked()["train"]["messages"]]

    assert train_rows(split="test") == [f"q{i}" for i in range(20, 30)]  # the source's test split, to train on
    assert train_rows(split="train[:5]") == [f"q{i}" for i in range(5)]
    assert train_rows(max_rows=7) == [f"q{i}" for i in range(7)]
    with pytest.raises(ConfigError, match=r"Unknown split"):
        train_rows(split="validation")


def test_streaming_writes_the_first_rows_to_disk_in_batches(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(5000)))
    dm = LanguageModelingData(sources=[{"source": str(path), "streaming": True, "max_rows": 3000}], val_size=0.1,
                              test_size=0)
    raw = dm._load_checked()["train"]
    assert len(raw) == 3000 and raw.cache_files  # an Arrow file on disk, not rows in memory
    assert [m[1]["content"] for m in raw.select([0, 1, 2999])["messages"]] == ["0", "1", "2999"]  # the first rows
    # the same rows as reading the file whole and keeping its first 3000; the held-out fraction is of those
    whole = LanguageModelingData(sources=[{"source": str(path), "max_rows": 3000}], val_size=0.1, test_size=0)
    assert whole._load_checked()["train"]["messages"] == raw["messages"]
    splits = dm._split(dm._load_checked())
    assert (len(splits["train"]), len(splits["validation"])) == (2700, 300)


def test_the_cache_key_covers_every_source_and_is_stable(two_sources):
    base = sources(two_sources, (1, 3))
    key = Sources(sources=base).fingerprint()
    assert Sources(sources=json.loads(json.dumps(base))).fingerprint() == key
    changed = [[{**base[0], "weight": 2}, base[1]], [base[0], {**base[1], "max_rows": 10}],
               [base[0], {**base[1], "columns": {"label": "label"}}], [base[1], base[0]], base[:1]]
    assert len({key} | {Sources(sources=c).fingerprint() for c in changed}) == len(changed) + 1
    fmt = Sources(sources=[{"source": str(two_sources[1]), "format": "text"}], formats=("text",)).fingerprint()
    assert fmt != Sources(sources=[{"source": str(two_sources[1])}]).fingerprint()
    # the same in a fresh interpreter (no hash randomisation in it)
    code = f"from ftlab.data.mixing import Sources; print(Sources(sources={base!r}).fingerprint())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == key


@pytest.mark.parametrize("kwargs, message", [
    ({"source": "A", "sources": [{"source": "B"}]}, r"data.source and data.sources are both set"),
    ({"sources": [{"source": "A", "weight": 2}, {"source": "B"}]},
     r"weight is given on some sources but not on \[1\]; give every source a weight"),
    ({"sources": [{"source": "A", "weight": 0}, {"source": "B", "weight": 1}]},
     r"data.sources\[0\].weight=0 must be a positive number"),
    ({"sources": [{"source": "A", "weight": "high"}]}, r"data.sources\[0\].weight='high' must be a positive number"),
    ({"sources": [{"source": "A", "wieght": 2}]}, r"data.sources\[0\].wieght: not an option of a source; did you mean 'weight'"),
    ({"sources": [{"source": "A", "streaming": True}]}, r"data.sources\[0\].streaming: true reads the first max_rows rows"),
    ({"sources": [{"source": "A", "format": "alpaca"}]}, r"data.sources\[0\].format='alpaca': row formats are read by "
                                                         r"LanguageModelingData"),
    ({"sources": [{"source": "A", "split": {"dev": "train"}}]}, r"'dev' is not a run split"),
    ({"sources": []}, r"data.sources=\[\]: give a list of sources"),
    ({"sources": [{"source": "A"}], "format": "alpaca"}, r"data.format='alpaca' applies to data.source"),
])
def test_bad_sources_are_refused_in_one_line(two_sources, kwargs, message):
    names = {"A": str(two_sources[0]), "B": str(two_sources[1])}
    kwargs = json.loads(json.dumps(kwargs).replace('"A"', json.dumps(names["A"])).replace('"B"', json.dumps(names["B"])))
    with pytest.raises(ConfigError, match=message) as err:
        TextClassificationData(**kwargs)
    assert "\n" not in str(err.value)


def test_a_bad_mix_stops_the_cli_before_the_model_loads(tmp_path, two_sources, capsys):
    from ftlab.__main__ import main

    bad = sources(two_sources, (1, -1))
    args = [a for a in fit_args(tmp_path / "run", Path("/nonexistent/model"), Path("unused"))
            if not a.startswith("--data.source=")]
    assert main([*args, f"--data.sources={json.dumps(bad)}"]) == 2
    err = capsys.readouterr().err
    assert "data.sources[1].weight=-1 must be a positive number (a relative share)" in err
    assert "/nonexistent/model" not in err and "Traceback" not in err  # the model was never looked for


# each data class's columns, and the names another source gives them (mapped with `columns`)
OTHER_COLUMNS = {
    "token classification": {"tokens": "words", "tags": "ner"},
    "seq2seq": {"source": "document", "target": "summary"},
    "preference pairs": {"prompt": "question", "chosen": "good", "rejected": "bad"},
}


def _rows(kind: str, n: int, seed: int) -> list[dict]:
    import random

    from tests.conftest import FILLER, NEGATIVE, POSITIVE

    rng = random.Random(seed)
    words = lambda k: [rng.choice(FILLER + POSITIVE + NEGATIVE) for _ in range(k)]  # noqa: E731
    if kind == "token classification":
        rows = [words(rng.randint(2, 8)) for _ in range(n)]
        return [{"tokens": w, "tags": ["B-x" if x in POSITIVE else "O" for x in w]} for w in rows]
    if kind == "seq2seq":
        return [{"source": " ".join(words(12)), "target": " ".join(words(3))} for _ in range(n)]
    return [{"prompt": " ".join(words(4)), "chosen": " ".join(words(3)) + " good",
             "rejected": " ".join(words(3)) + " bad"} for _ in range(n)]


@pytest.mark.parametrize("kind", list(OTHER_COLUMNS))
def test_every_data_class_takes_several_sources(tmp_path, tiny_bert, kind):
    """Token classification, seq2seq and preference data read data.sources as the others do: a source whose
    columns have other names, mapped with `columns`, beside one with the class's own; both in every split."""
    from ftlab.data import Seq2SeqData, TokenClassificationData
    from ftlab.data.preference import PreferenceData
    from tests.data.test_prepare import TEMPLATE

    mine, theirs = _rows(kind, 80, 1), _rows(kind, 40, 2)
    renamed = [{OTHER_COLUMNS[kind][k]: v for k, v in row.items()} for row in theirs]
    for name, rows in (("mine.jsonl", mine), ("theirs.jsonl", renamed)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    entries = [{"source": str(tmp_path / "mine.jsonl")},
               {"source": str(tmp_path / "theirs.jsonl"), "columns": OTHER_COLUMNS[kind]}]
    make = {"token classification": TokenClassificationData, "seq2seq": Seq2SeqData,
            "preference pairs": lambda **kw: PreferenceData(chat_template=TEMPLATE, max_length=64, **kw)}[kind]
    dm = make(sources=entries, tokenizer=str(tiny_bert), val_size=0.2, test_size=0.2, cache_dir=str(tmp_path / "c"))
    dm.setup()
    report = dm.meta["sources"]
    assert [r["source"] for r in report] == ["mine.jsonl", "theirs.jsonl"]
    assert sum(r["train_rows"] for r in report) == len(dm.splits["train"])
    for r, total in zip(report, (80, 40)):
        assert r["train_rows"] > 0 and r["train_rows"] + r["validation_rows"] + r["test_rows"] == total


def test_sources_that_number_their_labels_differently_keep_each_labels_meaning(tmp_path, tiny_bert):
    """Hub datasets store NER tags (and class labels) as ids into their own names: two sources whose ids mean
    different tags are combined by name, never by number."""
    import datasets

    from ftlab.data import TokenClassificationData
    from tests.conftest import FILLER

    counts = Counter()
    for name, tag_names, tag in (("loc", ["O", "B-LOC"], "B-LOC"), ("per", ["O", "B-PER"], "B-PER")):
        rows = [FILLER[i % len(FILLER): i % len(FILLER) + 3] for i in range(60)]
        tags = [[tag_names.index(tag)] + [0] * (len(r) - 1) for r in rows]
        counts.update(t for r in tags for t in [tag_names[i] for i in r])
        features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                      "tags": datasets.Sequence(datasets.ClassLabel(names=tag_names))})
        datasets.Dataset.from_dict({"tokens": rows, "tags": tags}, features=features).to_parquet(tmp_path / f"{name}.parquet")
    dm = TokenClassificationData(sources=[{"source": str(tmp_path / "loc.parquet")}, {"source": str(tmp_path / "per.parquet")}],
                                 tokenizer=str(tiny_bert), val_size=0.2, test_size=0.2, cache_dir=str(tmp_path / "c"))
    dm.setup()
    assert sorted(dm.label_names) == ["B-LOC", "B-PER", "O"]
    seen = Counter(dm.label_names[t] for split in dm.splits.values() for row in split["labels"] for t in row if t >= 0)
    assert seen == counts  # 60 B-LOC and 60 B-PER: with the ids kept, every B-PER would have read as B-LOC
