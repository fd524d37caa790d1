"""The estimator against measurement: per-rank parameter and optimizer-state element counts equal what
real 2-rank runs hold (DDP, FSDP, ZeRO-1/2/3); the activation probe matches the saved tensors of the
whole model; the command's fit / does-not-fit answer."""

import json

import pytest
import torch
from transformers import AutoConfig

from ftlab.estimate import memory
from ftlab.estimate.cli import estimate, parser
from ftlab.estimate.memory import (
    activation_bytes,
    activation_memory,
    batch_layout,
    probe_batch,
    saved_activation_bytes,
    step_activations,
)
from ftlab.module import FineTuneModule
from ftlab.policies import Adapter, Freeze, Full
from ftlab.tasks import CausalLM, Seq2Seq, SequenceClassification
from tests.conftest import fit_args, run_ftlab
from tests.test_strategies import MATRIX, distributed_fit


@pytest.mark.parametrize("strategy,kind,policy", [("ddp", "bert", "Full"), *MATRIX])
def test_per_rank_state_counts_equal_the_real_runs(tmp_path_factory, tiny_models, reviews_csv, strategy, kind, policy):
    run = distributed_fit(tmp_path_factory, tiny_models[kind], reviews_csv, strategy, policy)
    args = fit_args(run["dir"], tiny_models[kind], reviews_csv, f"--trainer.strategy={strategy}",
                    "--trainer.devices=2", "--data.label_names=[neg, pos]", policy=policy)[1:]
    if policy == "Adapter":
        args.append("--model.policy.dropout=0")
    est = estimate(parser().parse_args(["--no-activations"]), args)
    assert est["param_numel_per_rank"] == run["summary"]["param_numel_per_rank"]
    assert est["optimizer_state_numel_per_rank"] == run["summary"]["optimizer_state_numel_per_rank"]


CASES = [
    ("bert", SequenceClassification(), Full(), 8, 32),
    ("bert", SequenceClassification(), Freeze(top_k_layers=1), 8, 32),
    ("bert", SequenceClassification(), Freeze(), 8, 32),
    ("llama", CausalLM(), Adapter(r=4, dropout=0.0), 4, 48),
    ("llama", CausalLM(), Full(), 4, 48),
]


@pytest.mark.parametrize("kind,task,policy,batch,seq", CASES)
def test_activation_probe_matches_the_whole_model(tiny_models, kind, task, policy, batch, seq):
    """Probes of 1 and 2 blocks at batch 1, scaled to the model's blocks and the batch, against the saved
    tensors of the whole model at that batch."""
    path = tiny_models[kind]
    module = FineTuneModule(str(path), task=task, policy=policy)
    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = 4  # more blocks than the probes have
    if task.name == "sequence-classification":
        config.num_labels = 2
    estimated = activation_bytes(module, config, batch, seq, seq)
    torch.manual_seed(0)
    model = type(policy)(**({"r": 4, "dropout": 0.0} if isinstance(policy, Adapter) else
                            {"top_k_layers": policy.top_k_layers} if isinstance(policy, Freeze) else {}))
    whole = model.apply(task.auto_class.from_config(config).train(), task)
    measured, _ = saved_activation_bytes(whole, lambda: task.forward(whole, probe_batch(task, config, batch, seq, seq)))
    assert estimated == pytest.approx(measured, rel=0.05), (estimated, measured)
    if isinstance(policy, Freeze) and not policy.top_k_layers:
        assert measured < 0.05 * activation_bytes(FineTuneModule(str(path), task=task, policy=Full()), config,
                                                   batch, seq, seq)  # a frozen backbone keeps next to nothing


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fake_tensor_probes_take_the_attention_path_of_real_ones(tiny_models, monkeypatch, packed):
    """Probes on fake tensors (how large models are probed) equal the same probes on real tensors and a step
    of the whole model, for padded and packed batches of a grouped-KV Llama: whether SDPA gets a mask (and
    the KV heads repeated) depends on the batch, which fake tensors cannot read."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0)
    module = FineTuneModule(str(tiny_models["llama"]), task=CausalLM(), policy=Full())
    real = activation_memory(module, config, 2, 256, 256, packed=packed)
    monkeypatch.setattr(memory, "REAL_PROBE_BUDGET", 0)
    fake = activation_memory(module, config, 2, 256, 256, packed=packed)
    assert fake.kept == real.kept and fake.peak == pytest.approx(real.peak, rel=1e-3)
    torch.manual_seed(0)
    whole = step_activations(CausalLM.auto_class.from_config(config).train(), module.task,
                             probe_batch(module.task, config, 2, 256, 256, "packed" if packed else "padded"))
    assert real.kept == pytest.approx(whole.kept, rel=0.05) and real.peak == pytest.approx(whole.peak, rel=0.05)


def test_probes_take_the_runs_attention_kernel_and_batch_layout(tiny_models):
    """eager keeps each head's attention probabilities; SDPA on a padded batch a mask and repeated KV heads;
    on a batch of one unpacked row neither: each estimate against a step of the whole model so run."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0)
    per_row = {}
    for kernel, batch in (("sdpa", 1), ("sdpa", 2), ("eager", 2)):
        module = FineTuneModule(str(tiny_models["llama"]), task=CausalLM(), policy=Full(), attn_implementation=kernel)
        est = activation_memory(module, config, batch, 128, 128)
        torch.manual_seed(0)
        whole = step_activations(CausalLM.auto_class.from_config(config, attn_implementation=kernel).train(),
                                 module.task, probe_batch(module.task, config, batch, 128, 128,
                                                          batch_layout(module, batch, packed=False)))
        assert est.kept == pytest.approx(whole.kept, rel=0.05), (kernel, batch, est, whole)
        per_row[kernel, batch] = est.kept / batch
    assert per_row["eager", 2] > per_row["sdpa", 2] > per_row["sdpa", 1]


def test_a_preference_run_of_one_pair_a_batch_is_probed_padded(tiny_models):
    """A pair is two rows of their own lengths, so its batch is padded even at one pair a batch (the
    reference pass reads the mask)."""
    from ftlab.tasks import Preference

    module = FineTuneModule(str(tiny_models["llama"]), task=Preference(), policy=Adapter(r=4, dropout=0.0))
    assert batch_layout(module, 1, packed=False) == "padded"
    est = activation_memory(module, AutoConfig.from_pretrained(tiny_models["llama"]), 1, 32, 32)
    assert est.peak >= est.kept > 0


def test_seq2seq_probe_counts_encoder_and_decoder(tmp_path):
    from transformers import T5Config

    config = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=3, num_heads=2, dropout_rate=0.0,
                      decoder_start_token_id=0)
    config.save_pretrained(tmp_path)
    task = Seq2Seq()
    module = FineTuneModule(str(tmp_path), task=task, policy=Full())
    estimated = activation_bytes(module, config, 4, 24, 12)
    whole = task.auto_class.from_config(config).train()
    batch = probe_batch(task, config, 4, 24, 12)
    measured, _ = saved_activation_bytes(whole, lambda: whole(**batch))
    assert estimated == pytest.approx(measured, rel=0.05)


def test_estimate_command_reports_and_says_whether_it_fits(tiny_bert, reviews_csv, tmp_path):
    args = fit_args(tmp_path / "run", tiny_bert, reviews_csv, "--data.label_names=[neg, pos]")[1:]
    out = run_ftlab("estimate", "--gpu", "T4", "--devices", "4", "--strategy", "fsdp", "--json", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    est = json.loads(out.stdout)
    assert est["strategy"] == "fsdp" and est["devices"] == 4 and est["memory_gib"] == 16 and est["fits"]
    assert len(est["param_numel_per_rank"]) == 4 and sum(est["param_numel_per_rank"]) == est["total_params"]
    assert est["activations_bytes"] > 0 and est["tokens_per_s"] > 0 and est["steps"] is None
    out = run_ftlab("estimate", "--memory-gib", "0.0001", "--peak-tflops", "10", *args)
    assert out.returncode == 3 and "DOES NOT FIT" in out.stdout
    out = run_ftlab("estimate", "--gpu", "B300", *args)
    assert out.returncode == 2 and "--gpu 'B300' is not in the table" in out.stderr
    # no precision in the config: fit trains bf16-mixed on a GPU that computes in bf16, fp32 on an older one
    for gpu, precision in (("H100", "bf16-mixed"), ("T4", "32-true")):
        out = run_ftlab("estimate", "--gpu", gpu, "--json", *args, "--trainer.accelerator=auto")
        assert out.returncode == 0 and json.loads(out.stdout)["precision"] == precision, (gpu, out.stderr[-2000:])
