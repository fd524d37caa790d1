"""Domain-adaptive pretraining: masked-LM for encoders (BERT-style masking), causal-LM for decoders, and
the export as the start of a later fine-tuning run."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from ftlab.data import LanguageModelingData
from ftlab.data.collate import PadCollator
from ftlab.tasks import DomainAdaptation
from tests.conftest import fit_args, run_ftlab
from tests.tasks.conftest import task_args


def test_masking_follows_bert_and_evaluation_masks_the_same_tokens(tmp_path, tiny_bert, text_csv):
    data = LanguageModelingData(str(text_csv), tokenizer=str(tiny_bert), text_column="text", max_length=32,
                                cache_dir=str(tmp_path), val_size=8, test_size=8)
    data.setup()
    task = DomainAdaptation()
    task.resolve(AutoConfig.from_pretrained(tiny_bert))
    assert task.objective == "mlm" and task.auto_class is AutoModelForMaskedLM
    task.model_kwargs(data)
    rows = [{k: r[k] for k in ("input_ids", "labels", "position_ids")} for r in data.splits["train"]]
    batch = PadCollator(data.tokenizer.pad_token_id)(rows)
    torch.manual_seed(0)
    out = task.transform_batch(dict(batch), training=True)
    special = torch.isin(batch["input_ids"], torch.tensor(data.tokenizer.all_special_ids))
    chosen = out["labels"] != -100
    assert not (chosen & special).any()
    share = chosen.sum() / (~special).sum()
    assert 0.12 < share < 0.18  # 15% of the ordinary tokens are predicted...
    masked = (out["input_ids"] == data.tokenizer.mask_token_id) & chosen
    assert 0.7 < masked.sum() / chosen.sum() < 0.9  # ...80% of them shown as [MASK]
    assert torch.equal(out["labels"][chosen], batch["input_ids"][chosen])
    assert "position_ids" not in out and out["attention_mask"].sum() == (batch["input_ids"] != 0).sum()
    first = task.transform_batch(dict(batch), training=False)
    again = task.transform_batch(dict(batch), training=False)
    assert torch.equal(first["input_ids"], again["input_ids"])  # the next validation masks the same tokens...
    assert 0.1 < (first["labels"] != -100).sum() / (~special).sum() < 0.2
    # ...and so does each row in another batch, with other padding (another batch size, another rank's share)
    for part in (rows[:3], rows[3:7]):
        alone = task.transform_batch(dict(PadCollator(data.tokenizer.pad_token_id)(part)), training=False)
        for i, row in enumerate(part):
            j, n = rows.index(row), len(row["input_ids"])
            assert torch.equal(alone["input_ids"][i, :n], first["input_ids"][j, :n])
            assert torch.equal(alone["labels"][i, :n], first["labels"][j, :n])


def test_mlm_adaptation_then_classification_from_its_export(tmp_path, tiny_bert, text_csv, reviews_csv):
    run = tmp_path / "adapt"
    out = run_ftlab(*task_args(run, tiny_bert, "LanguageModelingData", text_csv, "DomainAdaptation",
                               "--data.text_column=text", "--data.max_length=32", "--trainer.max_epochs=4"))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    ppl = [h["val/perplexity"] for h in summary["val_history"]]
    assert ppl[-1] < ppl[0] and summary["task"] == "domain-adaptation"
    AutoModelForMaskedLM.from_pretrained(run / "export")
    # a later fit starts from the adapted encoder
    fine = tmp_path / "fine"
    out = run_ftlab(*fit_args(fine, run / "export", reviews_csv, "--trainer.max_epochs=3"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((fine / "summary.json").read_text())["test/accuracy"] > 0.8


def test_decoders_adapt_with_next_token_prediction(tmp_path, tiny_models, text_csv):
    run = tmp_path / "adapt"
    out = run_ftlab(*task_args(run, tiny_models["llama"], "LanguageModelingData", text_csv, "DomainAdaptation",
                               "--data.text_column=text", "--data.max_length=32", "--trainer.max_steps=6"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["test/perplexity"] > 1
    AutoModelForCausalLM.from_pretrained(run / "export")


@pytest.mark.parametrize("extra,message", [
    ((), "task domain-adaptation trains on plain text"),
    (("--data.text_column=text", "--model.task.objective=mlm", "--model.name_or_path=LLAMA"),
     "a llama model has no masked-LM head"),
])
def test_bad_domain_adaptation_configs(tmp_path, tiny_models, text_csv, extra, message):
    extra = [e.replace("LLAMA", str(tiny_models["llama"])) for e in extra]
    out = run_ftlab(*task_args(tmp_path / "run", tiny_models["bert"], "LanguageModelingData", text_csv,
                               "DomainAdaptation", *extra))
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
