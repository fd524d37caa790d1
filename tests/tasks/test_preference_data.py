"""PreferenceData: response-only labels, both sequences of a pair in one row (so one batch and one rank),
chosen then rejected in each batch, over-long prompts dropped and counted, conversations, and bad input
refused in one line before any model loads."""

import json

import pytest

from ftlab.data import PreferenceData
from ftlab.errors import ConfigError
from tests.conftest import NEGATIVE, POSITIVE, run_ftlab
from tests.tasks.conftest import CHAT_TEMPLATE, task_args, write_pairs


def _data(tmp_path, model, source, **kwargs) -> PreferenceData:
    options = {"tokenizer": str(model), "chat_template": CHAT_TEMPLATE, "max_length": 32, "val_size": 4,
               "test_size": 4, "cache_dir": str(tmp_path / "cache"), **kwargs}
    data = PreferenceData(str(source), **options)
    data.setup()
    return data


def _trained(tok, ids, labels):
    return tok.convert_ids_to_tokens([t for t, lab in zip(ids, labels) if lab != -100])


def test_labels_cover_the_responses_only_and_a_batch_stacks_chosen_then_rejected(tmp_path, tiny_models, pairs_file):
    data = _data(tmp_path, tiny_models["llama"], pairs_file)
    tok = data.tokenizer
    rows = [{k: v for k, v in data.splits["train"][i].items() if k != "length"} for i in range(5)]
    for row in rows:
        chosen, rejected = _trained(tok, row["input_ids"], row["labels"]), _trained(
            tok, row["rejected_input_ids"], row["rejected_labels"])
        assert chosen[-1] == rejected[-1] == "[SEP]" and len(chosen) == len(rejected) == 3  # 2 words + end
        assert all(w in POSITIVE for w in chosen[:2]) and all(w in NEGATIVE for w in rejected[:2])
        # the same prompt before both
        n = row["labels"].index(next(x for x in row["labels"] if x != -100))
        assert row["input_ids"][:n] == row["rejected_input_ids"][:n]
    batch = data.collator()(rows)
    assert batch["input_ids"].shape[0] == 10 and batch["pair_index"].tolist() == [r["pair_index"] for r in rows]
    for i, row in enumerate(rows):
        assert batch["input_ids"][i, : len(row["input_ids"])].tolist() == row["input_ids"]
        assert batch["input_ids"][5 + i, : len(row["rejected_input_ids"])].tolist() == row["rejected_input_ids"]
        assert batch["attention_mask"][5 + i].sum() == len(row["rejected_input_ids"])
    # pair_index numbers every pair of every split once
    indices = [i for split in data.splits.values() for i in split["pair_index"]]
    assert sorted(indices) == list(range(data.pair_rows)) and data.pair_rows == 120


def test_pairs_whose_prompt_fills_max_length_are_dropped_and_counted(tmp_path, tiny_models, pairs_file, caplog):
    data = _data(tmp_path, tiny_models["llama"], pairs_file, max_length=10)
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    prompt_tokens = [len(data.tokenizer(data.render([{"role": "user", "content": r["prompt"]}], generation_prompt=True),
                                        add_special_tokens=False)["input_ids"]) for r in rows]
    too_long = sum(1 for n in prompt_tokens if n >= 10 - 1)  # not one response token would be predicted
    assert too_long and data.meta["dropped_pairs"] == too_long
    assert sum(data.meta["sizes"].values()) == 120 - too_long


def test_conversations_that_differ_in_the_last_turn(tmp_path, tiny_models):
    path = tmp_path / "chats.jsonl"
    with open(path, "w") as f:
        for i in range(12):
            prompt = [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "is"},
                      {"role": "user", "content": "a story"}]
            f.write(json.dumps({"chosen": prompt + [{"role": "assistant", "content": POSITIVE[i % 8]}],
                                "rejected": prompt + [{"role": "assistant", "content": NEGATIVE[i % 8]}]}) + "\n")
    data = _data(tmp_path, tiny_models["llama"], path, prompt_column=None)
    row = data.splits["train"][0]
    tok = data.tokenizer
    assert _trained(tok, row["input_ids"], row["labels"])[0] in POSITIVE  # the earlier assistant turn is prompt
    assert len(_trained(tok, row["input_ids"], row["labels"])) == 2


@pytest.mark.parametrize("rows,message", [
    ([{"question": "a", "chosen": "good", "rejected": "bad"}],
     "data.prompt_column: column 'prompt' is not in the train data; its columns are"),
    ([{"prompt": "a", "chosen": " ", "rejected": "bad"}], "has an empty chosen response"),
    ([{"prompt": "a", "chosen": "good", "rejected": "good"}], "chosen and rejected are the same text"),
])
def test_bad_input_is_refused(tmp_path, tiny_models, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 20))
    with pytest.raises(ConfigError, match=message):
        _data(tmp_path, tiny_models["llama"], path)


def test_bad_input_gets_one_line_before_the_model_loads(tmp_path, tiny_models):
    bad = write_pairs(tmp_path / "pairs.jsonl", 40)
    lines = bad.read_text().splitlines()
    row = json.loads(lines[7])
    lines[7] = json.dumps({**row, "rejected": row["chosen"]})
    bad.write_text("\n".join(lines) + "\n")
    out = run_ftlab(*task_args(tmp_path / "run", tiny_models["llama"], "PreferenceData", bad, "Preference",
                               f"--data.chat_template={CHAT_TEMPLATE}"))
    assert out.returncode == 2 and "chosen and rejected are the same text" in out.stderr
    assert "policy" not in out.stderr.split("error:")[0]  # no model was built (its summary line names the policy)
