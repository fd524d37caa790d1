"""Causal-LM SFT: chat templates, assistant-only loss, packing without cross-example attention, the CLI
end to end (sample generations, export), a 2-process FSDP run, the real GGUF SmolLM2, bad input."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftlab.data import LanguageModelingData
from ftlab.data.collate import PadCollator
from ftlab.tasks import CausalLM
from tests.conftest import POSITIVE, run_ftlab
from tests.tasks.conftest import CHAT_TEMPLATE, task_args


def _data(tmp_path, model, source, **kwargs) -> LanguageModelingData:
    data = LanguageModelingData(str(source), tokenizer=str(model), chat_template=CHAT_TEMPLATE, max_length=64,
                                val_size=8, test_size=8, cache_dir=str(tmp_path / "cache"), **kwargs)
    data.setup()
    return data


def test_only_assistant_tokens_are_trained(tmp_path, tiny_models, chat_file):
    data = _data(tmp_path, tiny_models["llama"], chat_file, packing=False)
    tok = data.tokenizer
    rows = [json.loads(line) for line in chat_file.read_text().splitlines()]
    answers = {" ".join(r["messages"][1]["content"].split()) for r in rows}
    for row in data.splits["train"].select(range(20)):
        trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
        assert trained == [lab for lab in row["labels"] if lab != -100]
        words = tok.convert_ids_to_tokens(trained)
        assert words[-1] == "[SEP]" and " ".join(words[:-1]) in answers  # the answer and its end marker only
        assert all(w in POSITIVE for w in words[:-1])


def test_packing_gives_the_same_loss_as_one_example_per_row(tmp_path, tiny_models, chat_file):
    """Packed rows (position ids restart per example, no attention mask) must score every token exactly as
    unpacked rows do: no token may see another example."""
    packed = _data(tmp_path / "p", tiny_models["llama"], chat_file, packing=True)
    single = _data(tmp_path / "s", tiny_models["llama"], chat_file, packing=False)
    assert len(packed.splits["train"]) <= len(single.splits["train"]) / 3  # several examples per row
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    task = CausalLM()

    def total_nll(data, n_tokens):
        collate = PadCollator(data.tokenizer.pad_token_id)
        nll = tokens = 0.0
        for start in range(0, len(data.splits["train"]), 8):
            rows = data.splits["train"].select(range(start, min(start + 8, len(data.splits["train"]))))
            batch = collate([{k: r[k] for k in r if k != "length"} for r in rows])
            with torch.no_grad():
                logits = task.forward(model, {k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="sum")
            nll += loss.item()
            tokens += int((labels != -100).sum())
            if tokens >= n_tokens:
                break
        return nll, tokens

    nll_packed, n = total_nll(packed, float("inf"))
    nll_single, n_single = total_nll(single, float("inf"))
    assert n == n_single > 0
    assert nll_packed == pytest.approx(nll_single, rel=1e-5)


def test_sft_fit_learns_logs_samples_exports_and_reloads(tmp_path, tiny_models, chat_file):
    run = tmp_path / "run"
    out = run_ftlab(*task_args(run, tiny_models["llama"], "LanguageModelingData", chat_file, "CausalLM",
                               f"--data.chat_template={CHAT_TEMPLATE}", "--data.max_length=64", "--data.batch_size=4",
                               "--trainer.max_epochs=6", "--model.task.max_new_tokens=6"))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    ppl = [h["val/perplexity"] for h in summary["val_history"]]
    assert ppl[-1] < 0.6 * ppl[0], ppl  # held-out answer loss falls (first point: after epoch 1)
    assert summary["test/perplexity"] == pytest.approx(ppl[-1], rel=0.5)
    # the losses are means over the split's predicted tokens, as the perplexities are (not over its batches)
    for point in summary["val_history"]:
        assert point["val/loss"] == pytest.approx(math.log(point["val/perplexity"]), rel=1e-5)
    assert summary["test/loss"] == pytest.approx(math.log(summary["test/perplexity"]), rel=1e-5)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * len(ppl) and {"prompt", "reference", "generated", "step"} <= set(samples[0])
    # by the end the greedy answers are made of the answer words
    generated = [w for s in samples[-3:] for w in s["generated"].split()]
    assert generated and all(w in POSITIVE for w in generated), samples[-3:]
    # the export, reloaded with plain transformers, answers the last prompt as the run's last sample did
    from transformers import AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(run / "export"), AutoTokenizer.from_pretrained(run / "export")
    prompt = tok.apply_chat_template([{"role": "user", "content": samples[-1]["prompt"]}], tokenize=False,
                                     add_generation_prompt=True, chat_template=CHAT_TEMPLATE)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                         pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == samples[-1]["generated"]


@pytest.mark.parametrize("policy,extra", [
    ("Full", ()),
    # LoRA with the untied head trained beside it (peft's ModulesToSaveWrapper, an FSDP unit of its own: the export
    # copied it through FSDP's class, whose __new__ re-ran peft's __init__), and the chunked loss (it reshards the
    # root after evaluation, and peft's generate runs past the root's pre-forward: the final norm was sharded)
    ("Adapter", ("--model.loss_chunk_size=16", "--model.policy.dropout=0")),
])
def test_sft_under_fsdp_two_ranks(tmp_path, tiny_models, chat_file, policy, extra):
    run = tmp_path / "run"
    out = run_ftlab(*task_args(run, tiny_models["llama"], "LanguageModelingData", chat_file, "CausalLM",
                               f"--data.chat_template={CHAT_TEMPLATE}", "--data.max_length=64", "--data.batch_size=2",
                               "--trainer.strategy=fsdp", "--trainer.devices=2", "--model.task.max_new_tokens=4",
                               *extra, policy=policy),
                    timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert max(summary["param_numel_per_rank"]) < 0.6 * summary["total_params"]
    ppl = [h["val/perplexity"] for h in summary["val_history"]]
    assert ppl[-1] < ppl[0]
    for point in summary["val_history"]:  # the token mean over both ranks' batches
        assert point["val/loss"] == pytest.approx(math.log(point["val/perplexity"]), rel=1e-5)
    assert len((run / "samples.jsonl").read_text().splitlines()) == 3 * len(ppl)  # rank 0 writes, once
    AutoModelForCausalLM.from_pretrained(run / "export" / ("merged" if policy == "Adapter" else ""))


def test_a_tokenizer_without_chat_template_is_refused_before_the_model_loads(tmp_path, tiny_models, chat_file):
    run = tmp_path / "run"
    out = run_ftlab(*task_args(run, tiny_models["llama"], "LanguageModelingData", chat_file, "CausalLM"))
    assert out.returncode == 2
    assert "has no chat template to render messages rows; set data.chat_template" in out.stderr
    assert "policy" not in out.stderr.split("error:")[0]  # no model was built (its summary line names the policy)


def test_a_chat_template_path_that_names_no_file_is_refused(tmp_path, tiny_models, chat_file):
    out = run_ftlab(*task_args(tmp_path / "run", tiny_models["llama"], "LanguageModelingData", chat_file, "CausalLM",
                               "--data.chat_template=templates/chat.jinja"))  # used as the template itself before
    assert out.returncode == 2 and "data.chat_template='templates/chat.jinja' names no file" in out.stderr, \
        out.stderr[-2000:]


def test_rows_without_messages_are_refused(tmp_path, tiny_models, chat_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n' * 30)
    out = run_ftlab(*task_args(tmp_path / "run", tiny_models["llama"], "LanguageModelingData", bad, "CausalLM",
                               f"--data.chat_template={CHAT_TEMPLATE}"))
    assert out.returncode == 2 and "column 'messages' is not in the train data" in out.stderr


def test_smollm2_gguf_fine_tunes_with_lora_on_chatterbot(tmp_path):
    """The real SmolLM2-135M-Instruct GGUF file (dequantized), LoRA, on the chatterbot Q/A pairs."""
    run = tmp_path / "run"
    out = run_ftlab(
        "fit", "--config=configs/sft-smollm2-chatterbot.yaml", f"--trainer.default_root_dir={run}",
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.logger=false",
        "--data.max_train_rows=24", "--data.val_size=4", "--data.test_size=4", "--data.batch_size=2",
        "--data.max_length=96", "--data.sample_prompts=1", "--model.task.max_new_tokens=8", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total_params"] > 134e6 and summary["trainable_params"] < 0.02 * summary["total_params"]
    assert summary["val/perplexity"] < 200  # a pretrained chat model, not random weights (vocab 49k)
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["generated"].strip()
    assert (run / "export" / "adapter" / "adapter_config.json").exists()


def test_prompt_response_columns_train_on_the_response_only(tmp_path, tiny_models):
    import csv

    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer"])
        w.writeheader()
        w.writerows({"question": "the film is good", "answer": f"{POSITIVE[i % 8]} superb"} for i in range(40))
    data = _data(tmp_path, tiny_models["llama"], path, prompt_column="question", response_column="answer",
                 packing=False)
    tok = data.tokenizer
    for row in data.splits["train"].select(range(10)):
        trained = tok.convert_ids_to_tokens([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])
        assert trained[-2:] == ["superb", "[SEP]"] and trained[0] in POSITIVE and len(trained) == 3
    with pytest.raises(Exception, match="prompt_column and data.response_column go together"):
        LanguageModelingData(str(path), prompt_column="question")


def test_sample_generations_run_in_the_steps_precision(tmp_path, tiny_models, chat_file):
    """LoRA SFT with the recipes' bf16 frozen base (`model.dtype: bfloat16`) under bf16-mixed: the trained weights
    are fp32, so the model computes only under autocast. The sample generations at each validation run in a hook,
    outside the steps' autocast: they stopped the run ("expected m1 and m2 to have the same dtype")."""
    from ftlab.cli import run_cli

    run = tmp_path / "run"
    run_cli(task_args(run, tiny_models["llama"], "LanguageModelingData", chat_file, "CausalLM",
                      f"--data.chat_template={CHAT_TEMPLATE}", "--data.max_length=64", "--data.batch_size=8",
                      "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--model.task.max_new_tokens=3",
                      "--trainer.precision=bf16-mixed", "--model.dtype=bfloat16", "--test_after_fit=false",
                      policy="Adapter"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["dtypes"]["params"] == "float32"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all("generated" in s for s in samples)


def test_predict_of_a_task_without_per_row_predictions_is_refused_up_front(tmp_path, tiny_models, chat_file):
    """`ftlab predict` of an SFT config wrote an empty predictions.jsonl; it now says where to go instead."""
    args = task_args(tmp_path / "run", tiny_models["llama"], "LanguageModelingData", chat_file, "CausalLM",
                     f"--data.chat_template={CHAT_TEMPLATE}")
    out = run_ftlab("predict", *args[1:])
    assert out.returncode == 2 and "the causal-lm task has no per-row predictions to write" in out.stderr, out.stderr[-2000:]
    assert "ftlab generate --run" in out.stderr and not (tmp_path / "run" / "predictions.jsonl").exists()
