import bz2
import gzip
import json
import os

import pytest

from ftlab.data import TextClassificationData
from ftlab.data.collate import PadCollator
from ftlab.errors import ConfigError
from tests.conftest import make_rows, write_csv


def data(source, tokenizer, **kw):
    kw.setdefault("val_size", 20)
    kw.setdefault("test_size", 20)
    return TextClassificationData(source, tokenizer=str(tokenizer), **kw)


def test_splits_labels_and_padding(reviews_csv, tiny_bert):
    dm = data(reviews_csv, tiny_bert, batch_size=8)
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 200, "validation": 20, "test": 20}
    assert dm.label_names == ["neg", "pos"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    assert batch["labels"].dtype.is_floating_point is False
    assert set(batch["labels"].tolist()) <= {0, 1}
    # dynamic padding: the batch is as long as its longest row, not max_length
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max()) < dm.max_length


@pytest.mark.parametrize("pair", [False, True], ids=["single", "pair"])
def test_batches_equal_the_tokenizers_padded_output(reviews_csv, tmp_path, pair):
    """The cache keeps only what carries information (no column of ones, no all-zero segment ids for one
    text); the collated batch is still exactly what the tokenizer pads, masks and segments, left padding too.
    MiniLM's BERT tokenizer: segment ids 1 on a pair's second text."""
    import torch

    kw = {"text_pair_column": "text"} if pair else {}
    dm = data(reviews_csv, "all-MiniLM-L6-v2", batch_size=8, cache_dir=str(tmp_path), **kw)
    dm.setup("fit")
    stored = set(dm.splits["train"].column_names)
    assert "attention_mask" not in stored and ("token_type_ids" in stored) == pair
    rows = [dm.splits["train"][i] for i in range(8)]
    sep = dm.tokenizer.sep_token_id  # each row is [CLS] text [SEP] (text [SEP]): the first segment, decoded
    texts = [dm.tokenizer.decode(r["input_ids"][1:r["input_ids"].index(sep)]) for r in rows]
    for side in ("right", "left"):
        dm.tokenizer.padding_side = side
        expected = dm.tokenizer(texts, texts if pair else None, padding=True, return_tensors="pt")
        got = PadCollator(dm.tokenizer.pad_token_id, padding_side=side)(rows)
        for key in expected:
            torch.testing.assert_close(got.get(key, torch.zeros_like(expected[key])), expected[key], msg=key)


def test_seq2seq_targets_longer_than_every_source_pad_to_their_own_length():
    rows = [{"input_ids": [5, 6], "labels": [7, 8, 9, 10]}, {"input_ids": [5], "labels": [7]}]
    batch = PadCollator(0)(rows)
    assert batch["labels"].tolist() == [[7, 8, 9, 10], [7, -100, -100, -100]]
    assert batch["input_ids"].tolist() == [[5, 6], [5, 0]] and batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_given_label_names_fix_the_id_order(reviews_csv, tiny_bert):
    dm = data(reviews_csv, tiny_bert, label_names=["pos", "neg"])
    dm.setup("fit")
    ds = dm.splits["train"]
    assert dm.label_names == ["pos", "neg"]
    # the same split seed gives the same rows; ids follow label_names
    other = data(reviews_csv, tiny_bert)
    other.setup("fit")
    assert [1 - x for x in ds["labels"]] == other.splits["train"]["labels"]


def test_compressed_json_lines_and_split_mapping(tmp_path, tiny_bert):
    rows = make_rows(60, seed=3)
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:40])
    with bz2.open(tmp_path / "test.jsonl.bz2", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[40:])
    dm = data({"train": str(tmp_path / "train.jsonl.gz"), "test": str(tmp_path / "test.jsonl.bz2")}, tiny_bert,
              val_size=0.25)
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 30, "validation": 10, "test": 20}


def test_keep_rows_and_deduplicate(tmp_path, tiny_bert):
    rows = make_rows(50) + make_rows(50)  # every row twice
    rows += [{"text": "plot summary only", "label": "plot", "topic": "film"}]
    path = write_csv(tmp_path / "dups.csv", rows)
    dm = data(path, tiny_bert, keep_rows={"label": ["pos", "neg"]}, deduplicate=True, val_size=5, test_size=5)
    dm.setup("fit")
    unique = {r["text"] for r in make_rows(50)}
    assert sum(len(v) for v in dm.splits.values()) == len(unique)
    assert dm.label_names == ["neg", "pos"]


def test_second_run_reuses_the_tokenised_cache(reviews_csv, tiny_bert, monkeypatch):
    first = data(reviews_csv, tiny_bert, max_length=32)
    first.setup("fit")
    calls = []
    monkeypatch.setattr(TextClassificationData, "encode", lambda self, batch: calls.append(1))
    second = data(reviews_csv, tiny_bert, max_length=32)
    second.setup("fit")
    assert calls == [] and second.cache_path == first.cache_path
    assert second.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
    # a different option is a different cache entry
    assert data(reviews_csv, tiny_bert, max_length=16).cache_path != first.cache_path


def test_missing_file(tmp_path, tiny_bert):
    with pytest.raises(ConfigError, match="data file .*nope.csv' not found"):
        data(str(tmp_path / "nope.csv"), tiny_bert)


def test_missing_column_names_the_columns_there_are(reviews_csv, tiny_bert):
    with pytest.raises(ConfigError, match=r"text_column: column 'review' is not in the train data; its columns are \['text', 'label', 'topic'\]"):
        data(reviews_csv, tiny_bert, text_column="review").prepare_data()


def test_label_outside_label_names(reviews_csv, tiny_bert):
    with pytest.raises(ConfigError, match=r"labels 'pos' \(\d+ rows\) of the train split \(column 'label'\) are not in data.label_names \['neg', 'bad'\]"):
        data(reviews_csv, tiny_bert, label_names=["neg", "bad"]).prepare_data()


def test_unknown_format_and_bad_sizes(tmp_path, tiny_bert, reviews_csv):
    bad = tmp_path / "rows.xlsx"
    bad.write_text("x")
    with pytest.raises(ConfigError, match="unknown format '.xlsx'"):
        data(str(bad), tiny_bert)
    with pytest.raises(ConfigError, match="batch_size=0"):
        data(reviews_csv, tiny_bert, batch_size=0)
    with pytest.raises(ConfigError, match="leaves no training rows"):
        data(reviews_csv, tiny_bert, test_size=500).prepare_data()


def test_missing_tokenizer(reviews_csv, tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer could be loaded"):
        data(reviews_csv, tmp_path / "no-model").prepare_data()


def test_the_cache_key_follows_the_tokenizer_config_and_the_source_format(reviews_csv, tiny_bert, tmp_path):
    """Two tokenizers with one vocabulary but another chat template (rendered when data.chat_template is unset)
    or truncation side make other rows: other keys; so does reading the same file as another format."""
    import shutil

    keys = {}
    for name, edit in (("same", {}), ("template", {"chat_template": "{{ messages }}"}),
                       ("left", {"truncation_side": "left"})):
        folder = tmp_path / name
        shutil.copytree(tiny_bert, folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **edit}))
        keys[name] = data(reviews_csv, folder).cache_key()
    assert keys["same"] == data(reviews_csv, tiny_bert).cache_key()  # a copy: the same key
    assert len(set(keys.values())) == 3, keys
    assert data(reviews_csv, tiny_bert, source_format="csv").cache_key() != keys["same"]


def test_labels_found_are_the_training_splits_and_an_evaluation_only_label_is_refused(tmp_path, tiny_bert):
    """Without data.label_names, a label that only the validation file has is no class the model learns (sorted in,
    'meh' shifted the ids of 'neg' and 'pos'): refused, naming the split."""
    rows = make_rows(60, seed=5)
    train, val = write_csv(tmp_path / "train.csv", rows[:40]), tmp_path / "val.csv"
    write_csv(val, rows[40:50] + [{**rows[50], "label": "meh"}])
    dm = data({"train": str(train), "validation": str(val)}, tiny_bert, test_size=0)
    with pytest.raises(ConfigError, match=r"labels 'meh' \(1 rows\) of the validation split \(column 'label'\) are not "
                                          r"in the training split's labels \['neg', 'pos'\]"):
        dm.setup("fit")


def test_the_tokenizer_comes_from_the_models_revision(tmp_path, tiny_bert, reviews_csv):
    """model.revision reaches the tokenizer (data.tokenizer_revision): the main branch's tokenizer beside another
    revision's weights tokenised the data and went into the export. A hub cache with two revisions, offline."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO, fit_args

    repo = tmp_path / "hub" / "models--org--tiny"
    for revision, sha, side in (("main", "a" * 40, "right"), ("v2", "b" * 40, "left")):
        snapshot = repo / "snapshots" / sha
        shutil.copytree(tiny_bert, snapshot)
        config = json.loads((snapshot / "tokenizer_config.json").read_text())
        (snapshot / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": side}))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / revision).write_text(sha)
    code = ("import sys; from ftlab.cli import parse_fit_config; "
            "print(parse_fit_config(sys.argv[1:]).datamodule.tokenizer.padding_side)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    sides = []
    for extra in ([], ["--model.revision=v2"]):
        out = subprocess.run([sys.executable, "-c", code, *fit_args(tmp_path / "run", "org/tiny", reviews_csv)[1:],
                              *extra], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        sides.append(out.stdout.split()[-1])
    assert sides == ["right", "left"]
