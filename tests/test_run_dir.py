"""One run, one folder: a fresh fit refuses a used run directory (before the model loads), a resume keeps one
`last.ckpt`, summary.json describes one run; checkpointing can be turned off; predictions on new rows; small
config traps answered in one line."""

from __future__ import annotations

import json
import os
import time

# imported at collection, so that the log handlers they make bind to the session's stderr (see test_bad_input)
import datasets  # noqa: F401
import pytest
import transformers  # noqa: F401

import ftlab.cli  # noqa: F401
from ftlab.__main__ import main
from ftlab.checkpoints import last_checkpoint, previous_run
from tests.conftest import fit_args, run_ftlab


def test_a_used_run_dir_is_refused_and_a_resume_keeps_one_last_checkpoint(tmp_path, tiny_bert, reviews_csv):
    run = tmp_path / "run"
    run.mkdir()
    # what a `validate` before training leaves: not a run, but not this run's summary either
    (run / "summary.json").write_text(json.dumps({"val/accuracy": 0.123, "best/step": 304}))
    # `--ckpt_path last` before any checkpoint exists (a resubmittable job's first start): a new run, said so
    first = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=1", "--ckpt_path=last"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"--ckpt_path last: no checkpoint in {run}/checkpoints yet: starting from the beginning" in first.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 10 and summary.get("best/step") != 304
    assert summary["val/accuracy"] != 0.123

    # a fresh fit into it: one line naming both ways out, before the model loads (its path is missing here)
    again = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--model.name_or_path=/nonexistent/model"))
    assert again.returncode == 2
    assert "already holds a run (checkpoints/, export/, summary.json): resume it with --ckpt_path last" in again.stderr
    assert f"--trainer.default_root_dir {run}-2" in again.stderr and "Traceback" not in again.stderr

    # a requeued Slurm job resumes into its own folder by itself (as with --ckpt_path last)
    resumed = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=2"), env={"SLURM_RESTART_COUNT": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Slurm restart 1: resuming from {run}/checkpoints/last.ckpt" in resumed.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["last.ckpt"]  # overwritten, no last-v1.ckpt
    assert json.loads((run / "summary.json").read_text())["steps"] == 20


def test_last_checkpoint_is_the_newest_as_lightning_resolves_it(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert last_checkpoint(str(ckpts)) is None and previous_run(str(tmp_path)) == []
    for i, name in enumerate(["last-v1.ckpt", "last.ckpt", "epoch=0-step=5.ckpt"]):
        (ckpts / name).write_text("x")
        os.utime(ckpts / name, (time.time() + 10 * (1 - i), time.time() + 10 * (1 - i)))
    assert last_checkpoint(str(ckpts)) == str(ckpts / "last-v1.ckpt")
    assert previous_run(str(tmp_path)) == ["checkpoints/"]


def test_checkpointing_can_be_turned_off(tmp_path, tiny_bert, reviews_csv):
    run = tmp_path / "run"
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=1",
                              "--trainer.enable_checkpointing=false"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (run / "checkpoints").exists() and (run / "export" / "config.json").exists()
    assert "export/" in out.stdout and "checkpoints/" not in out.stdout, out.stdout  # the summary's outputs: what is there
    again = run_ftlab(*fit_args(run, tiny_bert, reviews_csv))
    assert again.returncode == 2 and "already holds a run (export/, summary.json): start a new run" in again.stderr
    # nothing to resume: `--ckpt_path last` would have trained from scratch over the finished run, and evaluated
    # the pretrained model with an untrained head
    again = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--ckpt_path=last"))
    assert again.returncode == 2 and "already holds a run (export/, summary.json): start a new run" in again.stderr
    again = run_ftlab("validate", *fit_args(run, tiny_bert, reviews_csv)[1:], "--ckpt_path=last")
    assert again.returncode == 2 and f"ckpt_path=last: no checkpoint in {run}/checkpoints; give" in again.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, reviews_csv):
    run = tmp_path_factory.mktemp("trained") / "run"
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=3"))
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_predict_on_new_rows_in_their_order_with_one_file_for_two_ranks(trained, tiny_bert, reviews_csv, tmp_path):
    texts = ["the film is great and lovely", "awful boring plot", "superb sharp cast", "flat dull and tired story",
             "brilliant moving", "weak messy plot of the film", "good"]
    new = tmp_path / "new.csv"
    new.write_text("text\n" + "\n".join(texts) + "\n")
    args = [*fit_args(trained, tiny_bert, reviews_csv)[1:], f"--ckpt_path={trained}/checkpoints/last.ckpt",
            f"--data.predict_source={new}"]
    config = (trained / "config.yaml").read_text()
    one = run_ftlab("predict", *args)
    assert one.returncode == 0, one.stderr[-3000:]
    assert (trained / "config.yaml").read_text() == config  # the fit's config stays the run's config
    assert f"wrote 7 predictions on data.predict_source to {trained}/predictions.jsonl" in one.stderr + one.stdout
    rows = [json.loads(line) for line in (trained / "predictions.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg", "pos", "neg", "pos", "neg", "pos"]  # the file's order
    assert all("true_label" not in r for r in rows)

    two = run_ftlab("predict", *args, "--trainer.devices=2", "--trainer.strategy=ddp")
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in trained.glob("predictions*")) == ["predictions.jsonl"]
    again = [json.loads(line) for line in (trained / "predictions.jsonl").read_text().splitlines()]
    assert [r["label"] for r in again] == [r["label"] for r in rows]
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in rows], abs=1e-5)


MISTAKES = {
    "validate with a missing checkpoint": (["validate", "--ckpt_path=/nonexistent/last.ckpt"],
                                           "ckpt_path='/nonexistent/last.ckpt' does not exist"),
    "test with a missing checkpoint": (["test", "--ckpt_path=/nonexistent/last.ckpt"],
                                       "ckpt_path='/nonexistent/last.ckpt' does not exist"),
    "predict with a missing checkpoint": (["predict", "--ckpt_path=/nonexistent/last.ckpt"],
                                          "ckpt_path='/nonexistent/last.ckpt' does not exist"),
    "labels YAML reads as booleans": (["fit", "--data.label_names=[no, yes]"],
                                      "YAML reads unquoted no/yes, false/true and off/on as booleans; quote the label "
                                      "names as they are in the data, e.g. label_names: ['no', 'yes']"),
    "missing file to predict on": (["predict", "--data.predict_source=/nonexistent/new.csv"],
                                   "data.predict_source: data file '/nonexistent/new.csv' not found"),
}


@pytest.mark.parametrize("name", MISTAKES)
def test_one_line_before_the_model_loads(name, tmp_path, tiny_bert, reviews_csv, capsys):
    (command, *extra), expected = MISTAKES[name]
    # the model path is missing too: the mistake named must be found first, before the model loads
    args = [command, *fit_args(tmp_path / "run", tiny_bert, reviews_csv, *extra)[1:]]
    args = [a if not a.startswith("--model.name_or_path") else "--model.name_or_path=/nonexistent/model" for a in args]
    assert main(args) == 2, name
    err = capsys.readouterr().err
    assert expected in err, err[-2000:]
    assert "Traceback" not in err


def test_labels_written_in_yaml_as_numbers_are_kept_as_written(tiny_bert, reviews_csv):
    from ftlab.data import TextClassificationData

    assert TextClassificationData(str(reviews_csv), label_names=[0, 1]).given_label_names == ["0", "1"]


def test_a_prompt_response_file_for_the_chat_config_names_the_options(tmp_path, tiny_models, capsys):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("question,answer\n" + "".join(f"the film {i},a story {i}\n" for i in range(40)))
    args = ["fit", "--config=configs/sft-smollm2-chatterbot.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--model.name_or_path={tiny_models['llama']}", f"--data.source={pairs}",
            "--data.chat_template={% for m in messages %}{{ m['content'] }}{% endfor %}",
            "--data.val_size=4", "--data.test_size=4", "--trainer.logger=false", "--trainer.accelerator=cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("column 'messages' is not in the train data; its columns are ['question', 'answer']; for a prompt/response "
            "file set data.prompt_column and data.response_column (--data.prompt_column question "
            "--data.response_column answer)") in err, err[-2000:]


def test_adapter_config_names_the_base_model_as_the_user_gave_it(tmp_path, tiny_bert, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from ftlab.export import export_streamed, local_gather, portable_base_name

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"]))
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_bert)  # where it was loaded from
    export_streamed(model, local_gather, str(tmp_path / "export"), base_model="my-org/tiny-bert")
    config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "my-org/tiny-bert"
    assert str(tiny_bert) not in (tmp_path / "export" / "adapter" / "README.md").read_text()  # peft's model card
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_bert)  # the live model is unchanged
    assert portable_base_name("all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"  # a named model stays a name
    monkeypatch.chdir(tiny_bert.parent)
    assert portable_base_name(tiny_bert.name) == str(tiny_bert)  # a local folder: absolute, not relative


def test_bf16_mixed_is_the_default_on_a_gpu_that_computes_in_bf16(monkeypatch, capsys):
    import torch

    from ftlab.cli import default_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    bf16 = {"yes": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16["yes"])
    for given, expected in [({}, "bf16-mixed"), ({"accelerator": "gpu"}, "bf16-mixed"),
                            ({"precision": "32-true"}, "32-true"), ({"accelerator": "cpu"}, None)]:
        cfg = dict(given)
        default_precision(cfg)
        assert cfg.get("precision") == expected, given
    assert capsys.readouterr().err.count("ftlab: precision bf16-mixed (the default on NVIDIA H100") == 2
    bf16["yes"] = False  # a V100 or T4: left to Lightning (32-true)
    cfg = {}
    default_precision(cfg)
    assert cfg.get("precision") is None


def test_evaluating_a_new_head_without_a_checkpoint_is_said_and_predicting_with_it_refused(tmp_path, tiny_bert,
                                                                                         reviews_csv):
    """tiny_bert has no classifier: without --ckpt_path, validate scores a random head (a chance baseline: said, in
    a warning and the header) and predict would write random predictions (refused before the model loads)."""
    args = fit_args(tmp_path / "run", tiny_bert, reviews_csv)[1:]
    out = run_ftlab("predict", *args)
    assert out.returncode == 2 and "has no weights for the classifier head of task 'sequence-classification', and " \
        "no --ckpt_path was given: its predictions would be random" in out.stderr, out.stderr[-2000:]
    out = run_ftlab("validate", *args, "--trainer.limit_val_batches=1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "the head is random (scores at chance level); give --ckpt_path" in out.stderr
    assert "classifier head: not in the pretrained model (randomly initialised: no --ckpt_path)" in out.stderr + out.stdout
