"""Row formats (ftlab.data.formats): Alpaca, ShareGPT, OpenAI messages, prompt/completion and plain text,
each on realistic rows; rendered into the right messages, found from the columns, and trained through the
real SFT CLI on the assistant's tokens only; rows in no known format get one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftlab.data import LanguageModelingData
from ftlab.errors import ConfigError
from tests.conftest import run_ftlab
from tests.tasks.conftest import CHAT_TEMPLATE

# Realistic rows, as the public sets write them (Stanford Alpaca, ShareGPT dumps, OpenAI fine-tuning files,
# TRL's prompt/completion), varied so that a tiny model has something to learn.
COUNTRIES = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
             ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo")]
WORDS = [("cat", "chat"), ("dog", "chien"), ("house", "maison"), ("water", "eau"), ("bread", "pain"), ("sun", "soleil")]
OPPOSITES = [("hot", "Cold"), ("up", "Down"), ("big", "Small"), ("fast", "Slow"), ("early", "Late"), ("old", "New")]


def alpaca_rows() -> list[dict]:
    rows = [{"instruction": "Give three tips for staying healthy.", "input": "",
             "output": "Eat a balanced diet, exercise regularly and sleep enough."}]
    rows += [{"instruction": "Translate the word into French.", "input": en, "output": fr} for en, fr in WORDS]
    return rows


def sharegpt_rows() -> list[dict]:
    return [{"id": f"sg-{i}", "conversations": [
        {"from": "system", "value": "You are a concise geography assistant."},
        {"from": "human", "value": f"What is the capital of {a}?"}, {"from": "gpt", "value": f"{ca}."},
        {"from": "human", "value": f"And of {b}?"}, {"from": "gpt", "value": f"{cb}."}]}
        for i, ((a, ca), (b, cb)) in enumerate(zip(COUNTRIES, COUNTRIES[1:] + COUNTRIES[:1]))]


def openai_rows() -> list[dict]:
    return [{"messages": [{"role": "system", "content": "You answer in one word."},
                          {"role": "user", "content": f"What is the opposite of {w}?"},
                          {"role": "assistant", "content": f"{o}.", "weight": 1}]} for w, o in OPPOSITES]


def prompt_completion_rows() -> list[dict]:
    return [{"prompt": f"Name the capital of {c}.", "completion": f"The capital of {c} is {cap}."} for c, cap in COUNTRIES]


ROWS = {"alpaca": alpaca_rows, "sharegpt": sharegpt_rows, "openai": openai_rows,
        "prompt_completion": prompt_completion_rows}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def format_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("formats")
    return {name: write_jsonl(folder / f"{name}.jsonl", rows()) for name, rows in ROWS.items()}


def read(source, **kwargs):
    """The normalised raw rows of a source, as the data module reads them before splitting."""
    return LanguageModelingData(source, val_size=0, test_size=0, **kwargs)._load_checked()["train"]


def test_alpaca_rows_with_and_without_input(format_files):
    rows = read(str(format_files["alpaca"]))  # the format found from the columns
    assert rows.column_names == ["messages"]
    assert rows[0]["messages"] == [{"role": "user", "content": "Give three tips for staying healthy."},
                                   {"role": "assistant", "content": "Eat a balanced diet, exercise regularly and sleep enough."}]
    assert rows[1]["messages"] == [{"role": "user", "content": "Translate the word into French.\n\ncat"},
                                   {"role": "assistant", "content": "chat"}]


def test_sharegpt_turns_become_roles_and_other_columns_stay(format_files):
    rows = read(str(format_files["sharegpt"]), format="sharegpt")
    assert sorted(rows.column_names) == ["id", "messages"]
    assert rows[0]["messages"] == [
        {"role": "system", "content": "You are a concise geography assistant."},
        {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]


def test_openai_messages_keep_role_and_content_and_join_text_parts(tmp_path, format_files):
    rows = read(str(format_files["openai"]))
    assert rows[0]["messages"] == [{"role": "system", "content": "You answer in one word."},  # "weight" dropped
                                   {"role": "user", "content": "What is the opposite of hot?"},
                                   {"role": "assistant", "content": "Cold."}]
    # content as a list of parts (the Chat Completions form)
    parts = write_jsonl(tmp_path / "parts.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is the opposite of "}, {"type": "text", "text": "wet?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Dry."}]}]}])
    assert read(str(parts))[0]["messages"] == [{"role": "user", "content": "What is the opposite of wet?"},
                                               {"role": "assistant", "content": "Dry."}]


def test_prompt_completion_texts_and_conversations(tmp_path, format_files):
    rows = read(str(format_files["prompt_completion"]))
    assert rows[0]["messages"] == [{"role": "user", "content": "Name the capital of France."},
                                   {"role": "assistant", "content": "The capital of France is Paris."}]
    # TRL's conversational form: lists of messages on both sides
    conv = write_jsonl(tmp_path / "conv.jsonl", [{
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}],
        "completion": [{"role": "assistant", "content": "Lima."}]}])
    assert read(str(conv), format="prompt_completion")[0]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."}]


def test_a_mapped_column_and_plain_text(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Capital of Peru?", "answer": "Lima."}] * 3)
    rows = read(None, sources=[{"source": str(qa), "format": "prompt_completion",
                                "columns": {"prompt": "question", "completion": "answer"}}])
    assert rows[0]["messages"] == [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]
    notes = write_jsonl(tmp_path / "notes.jsonl", [{"text": "Lima is the capital of Peru."}] * 3)
    data = LanguageModelingData(str(notes), format="text", val_size=0, test_size=0)
    assert data.mode == "text" and data._load_checked()["train"][0]["text"] == "Lima is the capital of Peru."


def test_rows_in_no_format_get_one_line_naming_columns_and_formats(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Capital of Peru?", "reply": "Lima."}] * 3)
    with pytest.raises(ConfigError) as err:
        read(str(bad))
    line = str(err.value)
    assert "\n" not in line
    assert "column 'messages' is not in the train data; its columns are ['question', 'reply']" in line
    for described in ("openai [messages]", "sharegpt [conversations, (system)]",
                      "alpaca [instruction, output, (input), (system)]", "prompt_completion [prompt, completion]"):
        assert described in line
    assert "columns: {prompt: question, completion: reply}" in line  # the mapping that makes them fit


@pytest.mark.parametrize("rows, fmt, message", [
    ([{"conversations": [], "prompt": "a", "completion": "b"}], None,
     r"columns \['conversations', 'prompt', 'completion'\] fit the formats \['sharegpt', 'prompt_completion'\]; set"),
    ([{"conversations": [{"from": "wizard", "value": "hi"}]}], None, r"row 0: conversations has a turn from 'wizard'"),
    ([{"messages": "hello"}], None, r"row 0: messages holds 'hello'; each row must be a list of \{role, content\}"),
    ([{"prompt": "a", "answer": "b"}], "prompt_completion", r"format prompt_completion needs the columns \['prompt', "
                                                            r"'completion'\]; \['completion'\] not in"),
])
def test_malformed_rows_are_named(tmp_path, rows, fmt, message):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ConfigError, match=message):
        read(str(path), format=fmt)


def test_an_unknown_format_name_is_refused_with_the_known_ones(format_files):
    with pytest.raises(ConfigError, match=r"data.format='alpacca' is not a known row format; did you mean 'alpaca'"):
        LanguageModelingData(str(format_files["alpaca"]), format="alpacca")
    with pytest.raises(ConfigError, match=r"data.sources\[1\].format='chatml' is not a known row format"):
        LanguageModelingData(sources=[{"source": str(format_files["alpaca"])},
                                      {"source": str(format_files["openai"]), "format": "chatml"}])


# ---- the real SFT CLI on every format at once
def _chat_model(folder: Path, texts: list[str]) -> Path:
    """A tiny Llama whose word-level vocabulary holds every word of the fixtures (so decoded labels are words)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[SEP]")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                  max_position_embeddings=128, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_every_format_trains_on_the_assistant_tokens_only_through_the_cli(tmp_path, format_files):
    from ftlab.data.formats import FORMATS

    conversations = {name: [FORMATS[name].convert(row, name) for row in rows()] for name, rows in ROWS.items()}
    texts = [m["content"] for convs in conversations.values() for c in convs for m in c] + \
        ["system user assistant :"]
    model = _chat_model(tmp_path / "model", texts)
    sources = [{"source": str(format_files[name]), "format": name} for name in ROWS]
    run = tmp_path / "run"
    options = ["--data=LanguageModelingData", f"--data.sources={json.dumps(sources)}",
               f"--data.chat_template={CHAT_TEMPLATE}", "--data.max_length=96", "--data.packing=false",
               "--data.val_size=4", "--data.test_size=4", "--data.sample_prompts=0"]
    out = run_ftlab("fit", f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
                    "--trainer.devices=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                    f"--model.name_or_path={model}", "--model.task=CausalLM", "--model.policy=Full",
                    "--data.batch_size=4", *options)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    n_rows = sum(len(c) for c in conversations.values())
    assert summary["steps"] >= (n_rows - 8) // 4 and summary["train_samples"] == n_rows - 8
    # concatenated (no weights): every source whole, its format reported
    assert [(s["format"], s["sampling"]) for s in summary["data_sources"]] == [(n, "all rows") for n in ROWS]
    assert sum(s["train_rows"] + s["validation_rows"] + s["test_rows"] for s in summary["data_sources"]) == n_rows

    # the rows that run trained on (its cache: the same options find it), decoded: the labels are the
    # assistant's turns, each with its end marker, and nothing else
    data = LanguageModelingData(sources=sources, tokenizer=str(model), chat_template=CHAT_TEMPLATE, max_length=96,
                                packing=False, val_size=4, test_size=4, sample_prompts=0)
    assert Path(data.cache_path).exists()
    data.setup()
    tok = data.tokenizer
    expected = {}
    for name, convs in conversations.items():
        for conv in convs:
            answer = [t for m in conv if m["role"] == "assistant" for t in tok.tokenize(m["content"]) + ["[SEP]"]]
            expected[tuple(answer)] = name
    seen = []
    for row in data.splits["train"]:
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert trained == [label for label in row["labels"] if label != -100]
        assert "[UNK]" not in tok.convert_ids_to_tokens(row["input_ids"])
        seen.append(expected[tuple(tok.convert_ids_to_tokens(trained))])  # KeyError: a prompt token trained
    assert set(seen) == set(ROWS)  # rows of every format trained
