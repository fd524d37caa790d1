"""Seq2seq on a tiny T5 built from a config: fit, generation metrics, export and reload, bad input."""

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from tests.conftest import run_ftlab
from tests.tasks.conftest import task_args


def test_t5_learns_the_verdicts_and_exports(tmp_path, tiny_t5, seq2seq_csv):
    run = tmp_path / "run"
    out = run_ftlab(*task_args(run, tiny_t5, "Seq2SeqData", seq2seq_csv, "Seq2Seq", "--trainer.max_epochs=8",
                               "--data.max_target_length=8", "--model.optim.lr=0.01"))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    rouge = [h["val/rougeL_fmeasure"] for h in summary["val_history"]]
    assert rouge[-1] > rouge[0] + 0.2 and rouge[-1] > 0.5, rouge
    assert 0 <= summary["test/bleu"] <= 1 and summary["test/rougeL_fmeasure"] > 0.5
    # the export reloads with plain transformers and generates as the run scored it
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(run / "export"), AutoTokenizer.from_pretrained(run / "export")
    enc = tok(["the film superb of a lovely", "a dull plot and awful cast"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = tok.batch_decode(model.generate(**enc, max_new_tokens=8), skip_special_tokens=True)
    assert [set(o.split()) for o in out] == [{"good"}, {"bad"}]


def test_missing_target_column_is_named(tmp_path, tiny_t5, seq2seq_csv):
    out = run_ftlab(*task_args(tmp_path / "run", tiny_t5, "Seq2SeqData", seq2seq_csv, "Seq2Seq",
                               "--data.target_column=summary"))
    assert out.returncode == 2 and "data.target_column: column 'summary' is not in the train data" in out.stderr


def test_a_task_with_the_wrong_data_module_is_refused(tmp_path, tiny_t5, seq2seq_csv):
    out = run_ftlab(*task_args(tmp_path / "run", tiny_t5, "TextClassificationData", seq2seq_csv, "Seq2Seq",
                               "--data.label_column=target"))
    assert out.returncode == 2 and "task seq2seq reads data: class_path: ftlab.data.Seq2SeqData, got TextClassificationData" in out.stderr


def test_two_ranks_score_an_uneven_split_as_one_process_does(tmp_path, tiny_t5, seq2seq_csv):
    """33 validation and test rows on 2 ranks (17 and 16): the generation metrics sync (torchmetrics' ROUGEScore
    synced one gather per sentence, and the ranks waited on each other forever) and equal one process's on the
    same checkpoint."""
    run = tmp_path / "run"
    common = ["--data.max_target_length=8", "--data.val_size=33", "--data.test_size=33", "--data.eval_batch_size=8"]
    out = run_ftlab(*task_args(run, tiny_t5, "Seq2SeqData", seq2seq_csv, "Seq2Seq", *common, "--trainer.max_epochs=1",
                               "--trainer.devices=2", "--trainer.strategy=ddp"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads((run / "summary.json").read_text())
    assert two["world_size"] == 2 and "test/rougeL_fmeasure" in two
    args = task_args(tmp_path / "one", tiny_t5, "Seq2SeqData", seq2seq_csv, "Seq2Seq", *common)
    out = run_ftlab("validate", *args[1:], f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    for key in ("val/rougeL_fmeasure", "val/rougeL_recall", "val/bleu"):
        assert two["val_history"][-1][key] == pytest.approx(one[key], abs=1e-6), key


def test_rouge_l_as_sums_equals_torchmetrics():
    from torchmetrics.text import ROUGEScore

    from ftlab.metrics import RougeL

    preds, refs = ["the cat sat on the mat", "a dog barked", "hello there", ""], ["the cat is on the mat",
                                                                                  "the dog barked", "hi there", "x"]
    ours, theirs = RougeL(), ROUGEScore(rouge_keys="rougeL")
    for metric in (ours, theirs):
        metric.update(preds[:3], refs[:3])
        metric.update(preds[3:], refs[3:])
    for key, value in theirs.compute().items():
        assert float(ours.compute()[key]) == pytest.approx(float(value), abs=1e-6), key
    # cast with the module as bf16-true casts it, the sums keep their dtype (in bf16, 300 sentences sum to 256)
    ours = torch.nn.ModuleDict({"rouge": RougeL()}).to(dtype=torch.bfloat16)["rouge"]
    for _ in range(300):
        ours.update(["a b c"], ["a b c"])
    assert ours.fmeasure.dtype == torch.float64 and float(ours.compute()["rougeL_fmeasure"]) == 1.0


def test_freeze_and_lora_on_t5_train_the_decoders_top_not_the_whole_model(tmp_path, tiny_t5, seq2seq_csv):
    """T5 is its own backbone (no base_model prefix): the head is its LM head (tied here: no weights of its own),
    not every parameter. Freeze's top block is the decoder's last; LoRA adapts, with nothing else trained."""
    from ftlab.policies.layers import find_parts

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    parts = find_parts(model)
    assert parts.blocks == ("encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1")
    assert not [n for n, _ in model.named_parameters() if parts.is_head(n)]  # the LM head is tied to `shared`
    top = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.block.1."))
    for policy, extra, expected in (("Freeze", ["--model.policy.top_k_layers=1"], top),
                                    ("Adapter", ["--model.policy.r=2"], None)):
        run = tmp_path / policy
        out = run_ftlab(*task_args(run, tiny_t5, "Seq2SeqData", seq2seq_csv, "Seq2Seq", "--trainer.max_epochs=1",
                                   "--data.max_target_length=8", "--test_after_fit=false", *extra, policy=policy))
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads((run / "summary.json").read_text())
        if expected is not None:
            assert summary["trainable_params"] == expected, summary["trainable_params"]
        else:  # LoRA matrices only: a few percent of the weights
            assert 0 < summary["trainable_params"] < 0.2 * summary["total_params"]
            AutoModelForSeq2SeqLM.from_pretrained(run / "export" / "merged")
