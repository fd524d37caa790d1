"""Distillation: the loss is Hinton's, the teacher stays frozen and in eval mode, a smaller student
learns from a trained teacher (classification and causal LM), and mismatched teachers are refused."""

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from ftlab.tasks import CausalLM, Distillation
from ftlab.tasks.distillation import FrozenTeacher
from tests.conftest import fit_args, run_ftlab
from tests.tasks.conftest import CHAT_TEMPLATE, task_args


class _Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, **inputs):
        return type("Out", (), {"logits": self.drop(self.logits)})()


def test_loss_is_alpha_task_plus_t2_kl_and_the_teacher_stays_in_eval_mode():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    task = Distillation(teacher="unused", alpha=0.3, temperature=2.0)
    task._teacher = FrozenTeacher(_Fixed(teacher))
    task._teacher.train()  # what Lightning does to the whole module each epoch: must not switch dropout on
    assert not task._teacher.training and not task._teacher.model.drop.training
    outputs = {"logits": student, "loss": F.cross_entropy(student, labels),
               "teacher_logits": task._teacher(input_ids=None)}
    outputs = type("O", (dict,), {"__getattr__": dict.__getitem__})(outputs)
    expected = 0.3 * F.cross_entropy(student, labels) + 0.7 * 4 * F.kl_div(
        F.log_softmax(student / 2, -1), F.softmax(teacher / 2, -1), reduction="batchmean")
    assert task.loss(outputs, {"labels": labels}).item() == pytest.approx(expected.item(), rel=1e-6)


def _student(tmp_path, teacher_export):
    """A 1-layer student with the teacher's tokenizer (the teacher has 2)."""
    from transformers import AutoModel

    folder = tmp_path / "student"
    config = AutoConfig.from_pretrained(teacher_export)
    config.num_hidden_layers = 1
    torch.manual_seed(1)
    AutoModel.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher_export).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_bert, reviews_csv):
    """A trained 2-layer teacher run."""
    run = tmp_path_factory.mktemp("teacher")
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=3"))
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_a_smaller_student_learns_from_a_trained_teacher(tmp_path, teacher, reviews_csv):
    teacher_weights = load_file(teacher / "export" / "model.safetensors")
    student = _student(tmp_path, teacher / "export")
    run = tmp_path / "run"
    out = run_ftlab(*fit_args(run, student, reviews_csv, "--trainer.max_epochs=3", "--model.task=Distillation",
                              f"--model.task.teacher={teacher}", "--model.task.alpha=0.5",
                              "--model.task.temperature=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "distillation" and summary["test/accuracy"] > 0.8
    exported = AutoModelForSequenceClassification.from_pretrained(run / "export")
    assert exported.config.num_hidden_layers == 1  # the student, not the teacher
    assert not any(k.startswith("teacher") for k in load_file(run / "export" / "model.safetensors"))
    assert summary["trainable_params"] < sum(v.numel() for v in teacher_weights.values())
    # the teacher stayed frozen to the end: checkpoints leave frozen weights out (the resume rebuilds it)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert not [k for k in ckpt if k.startswith("teacher.")] and [k for k in ckpt if k.startswith("model.")]


@pytest.mark.parametrize("strategy", ["deepspeed_stage_3", "fsdp"])
def test_distillation_two_ranks_with_the_teacher_partitioned(tmp_path, teacher, reviews_csv, strategy):
    student = _student(tmp_path, teacher / "export")
    run = tmp_path / "run"
    # batch 8 per rank: the same 16 rows per step, and as many steps, as the single-device test; alpha 0:
    # the student learns from the teacher alone, so a teacher loaded or gathered wrong would show
    out = run_ftlab(*fit_args(run, student, reviews_csv, "--trainer.max_epochs=3", "--model.task=Distillation",
                              f"--model.task.teacher={teacher}", "--model.task.alpha=0", f"--trainer.strategy={strategy}",
                              "--trainer.devices=2", "--data.batch_size=8"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test/accuracy"] > 0.8 and len(summary["param_numel_per_rank"]) == 2
    if strategy == "fsdp":  # the teacher is sharded too: each rank read about half of it
        held, total = map(lambda s: int(s.replace(",", "")), re.search(
            r"sharded, frozen: rank 0 read and holds ([\d,]+) of ([\d,]+) parameters", out.stderr).groups())
        assert total == sum(v.numel() for v in load_file(teacher / "export" / "model.safetensors").values())
        assert held < 0.6 * total
    else:  # the student and the teacher: each rank filled its partitions of each from the checkpoint files
        assert len(re.findall(r"each rank read only its partitions of the pretrained weights of", out.stderr)) == 2
    assert AutoModelForSequenceClassification.from_pretrained(run / "export").config.num_hidden_layers == 1


def test_a_frozen_teacher_is_resharded_after_each_forward_even_under_grad_op(tmp_path, teacher, reviews_csv):
    """grad-op leaves resharding to the backward pass, which a teacher never has: it would stay gathered whole
    on every device for the whole run. ftlab shards frozen models to reshard after every forward."""
    student = _student(tmp_path, teacher / "export")
    probe = tmp_path / "probe"
    out = run_ftlab(*fit_args(tmp_path / "run", student, reviews_csv, "--trainer.max_steps=3", "--model.task=Distillation",
                              f"--model.task.teacher={teacher}", "--trainer.strategy=ftlab.strategies.FSDP",
                              "--trainer.strategy.sharding=grad-op", "--test_after_fit=false",
                              "--trainer.callbacks+=tests.strategies.probe.GatheredProbe",
                              f"--trainer.callbacks.folder={probe}"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (probe / "gathered-rank0.txt").read_text() == "0"  # units existed (-1 if none) and none stayed whole


def test_a_teacher_with_other_labels_is_refused(tmp_path, tiny_bert, teacher, reviews_csv):
    out = run_ftlab(*fit_args(tmp_path / "run", tiny_bert, reviews_csv, "--model.task=Distillation",
                              f"--model.task.teacher={teacher}", "--data.label_names=[pos, neg]"))
    assert out.returncode == 2
    assert "predicts labels ['neg', 'pos'], the student's data has ['pos', 'neg']" in out.stderr


def test_causal_lm_distillation_runs_and_a_teacher_with_another_vocabulary_is_refused(tmp_path, tiny_models,
                                                                                      chat_file):
    args = ["--data.max_length=64", "--data.batch_size=4", f"--data.chat_template={CHAT_TEMPLATE}",
            "--trainer.max_steps=4", "--model.task=Distillation", "--model.task.student=CausalLM",
            "--model.task.student.max_new_tokens=2"]
    run = tmp_path / "run"
    out = run_ftlab(*task_args(run, tiny_models["llama"], "LanguageModelingData", chat_file, "Distillation",
                               *args, f"--model.task.teacher={tiny_models['llama']}"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["test/perplexity"] > 1
    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_models["llama"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    out = run_ftlab(*task_args(tmp_path / "run2", tiny_models["llama"], "LanguageModelingData", chat_file,
                               "Distillation", *args, f"--model.task.teacher={other}"))
    assert out.returncode == 2
    assert "its vocabulary (36 tokens) differs from the student's (35 tokens" in out.stderr
    assert CausalLM().data_class == Distillation("x", CausalLM()).data_class


def test_a_teacher_runs_the_students_attention_kernel_only_where_its_class_has_it():
    """A GPT-2 teacher has no flex attention: it runs its default instead of failing after the student loaded."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from ftlab.tasks.distillation import teacher_supports

    assert not teacher_supports(AutoModelForCausalLM, GPT2Config(), "flex_attention")
    assert teacher_supports(AutoModelForCausalLM, LlamaConfig(), "flex_attention")
    assert teacher_supports(AutoModelForCausalLM, GPT2Config(), "sdpa") and teacher_supports(
        AutoModelForCausalLM, GPT2Config(), "eager")
