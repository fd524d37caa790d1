"""Sharded strategies for real: 2 processes on CPU (gloo), each run a subprocess of `python -m ftlab fit`."""

import csv
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from tests.conftest import assert_only_trained_weights, fit_args, run_ftlab, tracked

_RUNS: dict = {}


def distributed_fit(tmp_path_factory, model_dir: Path, data: Path, strategy: str, policy: str, *extra: str) -> dict:
    """One 2-rank fit per (model, strategy, policy, extra), shared by the tests that look at it."""
    key = (str(model_dir), strategy, policy, extra)
    if key not in _RUNS:
        run = tmp_path_factory.mktemp(f"{strategy}-{policy}")
        args = fit_args(run, model_dir, data, f"--trainer.strategy={strategy}", "--trainer.devices=2",
                        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={run}", "--trainer.logger.name=csv",
                        "--trainer.log_every_n_steps=1", *extra, policy=policy)
        if policy == "Adapter":
            args.append("--model.policy.dropout=0")
        out = run_ftlab(*args, timeout=600)
        assert out.returncode == 0, (key, out.stderr[-4000:])
        rows = list(csv.DictReader(next(run.glob("csv/*/metrics.csv")).open()))
        _RUNS[key] = {
            "dir": run,
            "summary": json.loads((run / "summary.json").read_text()),
            "losses": [float(r["train/loss"]) for r in rows if r.get("train/loss")],
            "stderr": out.stderr,
        }
    return _RUNS[key]


# What each strategy promises per rank, as a share of a DDP rank's: (parameters, optimizer state)
PROMISE = {"fsdp": (0.5, 0.5), "deepspeed_stage_1": (1.0, 0.5), "deepspeed_stage_2": (1.0, 0.5),
           "deepspeed_stage_2_offload": (1.0, 0.5), "deepspeed_stage_3": (0.5, 0.5),
           "deepspeed_stage_3_offload": (0.5, 0.5)}
# Each strategy with each policy at least once, on an encoder and a decoder. (Session 2 ran 14 pairs; the
# 5 dropped here, e.g. ZeRO-3 x llama Full, never failed apart from a pair kept here, and cost ~2.5 min of CI.)
MATRIX = [
    ("fsdp", "bert", "Full"), ("fsdp", "llama", "Adapter"), ("fsdp", "bert", "Freeze"),
    ("deepspeed_stage_1", "bert", "Full"), ("deepspeed_stage_2", "llama", "Adapter"),
    ("deepspeed_stage_3", "bert", "Full"), ("deepspeed_stage_3", "llama", "Adapter"), ("deepspeed_stage_3", "bert", "Freeze"),
    ("deepspeed_stage_2_offload", "bert", "Full"), ("deepspeed_stage_3_offload", "bert", "Full"),
]


def near(value: int, share: float, total: int) -> bool:
    """A per-rank count is the promised share of the total (ZeRO pads partitions by a few elements)."""
    return abs(value - share * total) <= 0.1 * total + 64


@pytest.mark.parametrize("strategy,kind,policy", MATRIX)
def test_sharded_run_shards_as_promised_and_matches_ddp(tmp_path_factory, tiny_models, reviews_csv, strategy,
                                                        kind, policy):
    ddp = distributed_fit(tmp_path_factory, tiny_models[kind], reviews_csv, "ddp", policy)
    run = distributed_fit(tmp_path_factory, tiny_models[kind], reviews_csv, strategy, policy)
    d, r = ddp["summary"], run["summary"]
    assert d["world_size"] == r["world_size"] == 2
    # the model's size, not a rank's partition of it (ZeRO-3 builds the model partitioned)
    assert (r["total_params"], r["trainable_params"]) == (d["total_params"], d["trainable_params"])

    params, state = d["param_numel_per_rank"][0], d["optimizer_state_numel_per_rank"][0]
    assert d["param_numel_per_rank"] == [params, params]
    assert state == 2 * d["trainable_params"]  # AdamW: two moments per trainable weight
    param_share, state_share = PROMISE[strategy]
    assert all(near(n, param_share, params) for n in r["param_numel_per_rank"]), r["param_numel_per_rank"]
    assert all(near(n, state_share, state) for n in r["optimizer_state_numel_per_rank"]), \
        (r["optimizer_state_numel_per_rank"], state)
    if param_share < 1:
        assert sum(r["param_numel_per_rank"]) >= params  # nothing lost

    # the same training, step by step (fp32)
    assert len(ddp["losses"]) == len(run["losses"]) == 10
    assert max(abs(a - b) for a, b in zip(ddp["losses"], run["losses"])) <= 1e-5
    assert r["test/accuracy"] == pytest.approx(d["test/accuracy"], abs=1e-6)


@pytest.mark.parametrize("strategy,kind,policy", MATRIX)
def test_export_is_whole_and_reloads_with_plain_transformers(tmp_path_factory, tiny_models, reviews_csv,
                                                             strategy, kind, policy):
    ddp = distributed_fit(tmp_path_factory, tiny_models[kind], reviews_csv, "ddp", policy)
    run = distributed_fit(tmp_path_factory, tiny_models[kind], reviews_csv, strategy, policy)
    ids = torch.tensor([[2, 7, 9, 30, 3], [2, 15, 20, 3, 0]])
    mask = (ids != 0).long()

    def logits(run_dir):
        export = run_dir / "export"
        if policy == "Adapter":
            merged = AutoModelForSequenceClassification.from_pretrained(export / "merged").eval()
            base = AutoModelForSequenceClassification.from_pretrained(tiny_models[kind], num_labels=2)
            adapter = PeftModel.from_pretrained(base, export / "adapter").eval()
            with torch.no_grad():
                a, m = adapter(input_ids=ids, attention_mask=mask).logits, merged(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(a, m, rtol=1e-5, atol=1e-5)  # the adapter file is whole
            return m
        model = AutoModelForSequenceClassification.from_pretrained(export).eval()
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    torch.testing.assert_close(logits(run["dir"]), logits(ddp["dir"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy,kind,policy", [("fsdp", "llama", "Adapter"), ("fsdp", "bert", "Freeze"),
                                                  ("deepspeed_stage_2", "llama", "Adapter"),
                                                  ("deepspeed_stage_3", "bert", "Full")])
def test_export_command_consolidates_sharded_checkpoints(tmp_path_factory, tiny_models, reviews_csv, strategy, kind,
                                                         policy):
    from safetensors.torch import load_file

    run = distributed_fit(tmp_path_factory, tiny_models[kind], reviews_csv, strategy, policy)
    out = tmp_path_factory.mktemp("export")
    result = run_ftlab("export", f"--run={run['dir']}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    sub = "merged" if policy == "Adapter" else ""
    # ZeRO-1 + LoRA: DeepSpeed's converter returns only the trained tensors; the frozen base weights
    # come from the pretrained model, so the export is still whole
    fresh, at_fit_end = load_file(out / sub / "model.safetensors"), load_file(run["dir"] / "export" / sub / "model.safetensors")
    assert fresh.keys() == at_fit_end.keys()
    for name, tensor in at_fit_end.items():
        torch.testing.assert_close(fresh[name], tensor, rtol=0, atol=1e-6)
    if policy == "Adapter":
        assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_export_command_refuses_a_missing_run_and_a_bad_interval(tmp_path):
    out = run_ftlab("export", f"--run={tmp_path / 'nope'}")
    assert out.returncode == 2 and "no config.yaml there" in out.stderr and "Traceback" not in out.stderr
    out = run_ftlab("export", f"--run={tmp_path / 'nope'}", "--progress-every-n-seconds=-1")  # refused before the run is read
    assert out.returncode == 2 and "--progress-every-n-seconds=-1.0 is not a number of seconds >= 0" in out.stderr
    assert "Traceback" not in out.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_launched_by_torchrun_train_as_one_node(tmp_path_factory, tiny_models, reviews_csv, strategy):
    """2 nodes x 1 process: two `torchrun` launches on localhost, as on two machines."""
    import os
    import subprocess
    import sys

    one_node = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, strategy, "Full")
    run = tmp_path_factory.mktemp(f"two-nodes-{strategy}")
    args = fit_args(run, tiny_models["bert"], reviews_csv, f"--trainer.strategy={strategy}", "--trainer.devices=1",
                    "--trainer.num_nodes=2", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={run}",
                    "--trainer.logger.name=csv", "--trainer.log_every_n_steps=1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    port = free_port()
    logs = [tmp_path_factory.mktemp("logs") / f"node{rank}.log" for rank in (0, 1)]
    # output to files: a node whose pipe nobody reads yet (read one after the other) would block on it when full
    nodes = [tracked(subprocess.Popen([torchrun, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                                       "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "ftlab", *args],
                                      stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
             for rank, log in zip((0, 1), logs)]
    for node in nodes:
        node.wait(timeout=600)
    outputs = [log.read_text() for log in logs]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_nodes"] == 2 and summary["world_size"] == 2
    assert summary["param_numel_per_rank"] == one_node["summary"]["param_numel_per_rank"]
    rows = list(csv.DictReader(next(run.glob("csv/*/metrics.csv")).open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert max(abs(a - b) for a, b in zip(losses, one_node["losses"])) <= 1e-6 and len(losses) == 10


def test_resume_across_strategies_where_the_format_allows(tmp_path_factory, tiny_models, reviews_csv):
    """FSDP full -> DDP -> FSDP: single files any strategy resumes, with the frozen backbone left out of them
    (Freeze: the top block and the head train)."""
    run = tmp_path_factory.mktemp("fsdp-full")
    common = fit_args(run, tiny_models["bert"], reviews_csv, "--trainer.devices=2", "--test_after_fit=false",
                      "--model.policy.top_k_layers=1", policy="Freeze")
    fsdp_full = ["--trainer.strategy=ftlab.strategies.FSDP", "--trainer.strategy.state_dict_type=full"]
    out = run_ftlab(*common, "--trainer.max_epochs=1", *fsdp_full, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()  # one full file
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any(".layer.1." in n for n in saved) and not any(".layer.0." in n or "embeddings.word" in n for n in saved)
    out = run_ftlab(*common, "--trainer.max_epochs=2", "--trainer.strategy=ddp", "--ckpt_path=last", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 10
    out = run_ftlab(*common, "--trainer.max_epochs=3", *fsdp_full, "--ckpt_path=last", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 15


def test_resume_refused_where_the_format_does_not_allow(tmp_path_factory, tiny_models, reviews_csv):
    sharded = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, "fsdp", "Full")["dir"]
    zero3 = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, "deepspeed_stage_3", "Full")["dir"]
    cases = [
        (sharded, ["--trainer.strategy=ddp", "--trainer.devices=2"], "is a sharded FSDP checkpoint"),
        (zero3, ["--trainer.strategy=deepspeed_stage_2", "--trainer.devices=1"], "resume it with the stage it was written with"),
        (zero3, ["--trainer.strategy=fsdp", "--trainer.devices=2"], "is a DeepSpeed ZeRO checkpoint"),
    ]
    for run, extra, message in cases:
        out = run_ftlab(*fit_args(run, tiny_models["bert"], reviews_csv, *extra, "--trainer.max_epochs=3",
                                  "--ckpt_path=last"), timeout=600)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr[-2000:])
        assert "Traceback" not in out.stderr
    # evaluating a checkpoint is checked alike (it was a traceback: torch.load of a folder)
    evaluations = [
        ("test", sharded, ["--trainer.strategy=ddp", "--trainer.devices=1"], "is a sharded FSDP checkpoint: load it with"),
        ("validate", zero3, ["--trainer.strategy=deepspeed_stage_2", "--trainer.devices=2"],
         "was written under ZeRO-3, this run is ZeRO-2: load it with the stage it was written with"),
    ]
    for subcommand, run, extra, message in evaluations:
        out = run_ftlab(subcommand, *fit_args(run, tiny_models["bert"], reviews_csv, *extra,
                                              f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")[1:], timeout=600)
        assert out.returncode == 2 and message in out.stderr, (subcommand, out.stderr[-2000:])
        assert "Traceback" not in out.stderr
    # a ZeRO-3 checkpoint of 2 ranks, evaluated on 1: its trained weights fill the partitions from its universal
    # conversion (DeepSpeed's own load fails on Lightning's evaluation engine): the fit's last validation again
    fitted = json.loads((zero3 / "summary.json").read_text())
    out = run_ftlab("validate", *fit_args(zero3, tiny_models["bert"], reviews_csv, "--trainer.strategy=deepspeed_stage_3",
                                          "--trainer.devices=1", f"--ckpt_path={zero3 / 'checkpoints' / 'last.ckpt'}")[1:],
                    timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "into this run's partitions on 1 rank(s)" in out.stderr, out.stderr[-2000:]
    evaluated = json.loads((zero3 / "summary.json").read_text())
    assert evaluated["val/loss"] == pytest.approx(fitted["val_history"][-1]["val/loss"], rel=1e-5)
    assert evaluated["val/loss"] != pytest.approx(fitted["val_history"][0]["val/loss"], rel=1e-3)  # trained weights
    # what evaluation can load at another world size, it does: a ZeRO-2 checkpoint of 2 ranks (one model file) on 1
    zero2 = distributed_fit(tmp_path_factory, tiny_models["llama"], reviews_csv, "deepspeed_stage_2", "Adapter")["dir"]
    out = run_ftlab("validate", *fit_args(zero2, tiny_models["llama"], reviews_csv, "--trainer.strategy=deepspeed_stage_2",
                                          "--trainer.devices=1", f"--ckpt_path={zero2 / 'checkpoints' / 'last.ckpt'}",
                                          policy="Adapter")[1:], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((zero2 / "summary.json").read_text())
    assert summary["val/accuracy"] > 0.5 and summary["world_size"] == 2, summary  # the trained weights, evaluated


@pytest.mark.parametrize("options,param_share", [
    (("--trainer.strategy.sharding=grad-op", "--trainer.strategy.activation_checkpointing=true"), 0.5),
    (("--trainer.strategy.sharding=hybrid", "--trainer.strategy.replicate_size=2"), 1.0),
    (("--trainer.strategy.cpu_offload=true",), 0.5),  # a GPU config debugged on CPU: offload is moot there
])
def test_fsdp_options_train_exactly_like_ddp(tmp_path_factory, tiny_models, reviews_csv, options, param_share):
    """grad-op keeps parameters gathered between forward and backward, activation checkpointing recomputes,
    hybrid replicates across groups (2 replicas of 1 rank here: each rank holds the whole model): none
    may change the training. A hybrid mesh that silently fell back to no gradient sync would diverge."""
    ddp = distributed_fit(tmp_path_factory, tiny_models["llama"], reviews_csv, "ddp", "Full")
    run = distributed_fit(tmp_path_factory, tiny_models["llama"], reviews_csv, "ftlab.strategies.FSDP", "Full",
                          *options)
    total = ddp["summary"]["param_numel_per_rank"][0]
    assert all(near(n, param_share, total) for n in run["summary"]["param_numel_per_rank"])
    assert max(abs(a - b) for a, b in zip(ddp["losses"], run["losses"])) <= 1e-5


def test_activation_checkpointing_under_zero3_trains_exactly_like_ddp(tmp_path_factory, tiny_models, reviews_csv):
    """`model.activation_checkpointing` (non-reentrant) under ZeRO-3 with LoRA: the recompute in backward must
    gather the partitioned weights again, and the frozen inputs of each block still pass gradients on."""
    ddp = distributed_fit(tmp_path_factory, tiny_models["llama"], reviews_csv, "ddp", "Adapter")
    run = distributed_fit(tmp_path_factory, tiny_models["llama"], reviews_csv, "deepspeed_stage_3", "Adapter",
                          "--model.activation_checkpointing=true")
    assert len(run["losses"]) == 10 and run["summary"]["steps"] == 10
    assert max(abs(a - b) for a, b in zip(ddp["losses"], run["losses"])) <= 1e-5
    assert "activation checkpointing: each block recomputes" in run["stderr"]


# What bf16-mixed keeps in fp32 under each sharded strategy. FSDP2: fp32 shards (what AdamW updates), bf16
# gathered for compute, gradients reduced in fp32. DeepSpeed: a bf16 module with fp32 master weights and
# optimizer state in its optimizer, gradients accumulated in bf16 and reduced in fp32.
MIXED = {"fsdp": {"params": "float32", "master_params": "float32", "grads": "float32", "optimizer_state": "float32",
                  "reduce": "float32"},
         "deepspeed_stage_2": {"params": "bfloat16", "master_params": "float32", "grads": "bfloat16",
                               "optimizer_state": "float32", "reduce": "float32"}}


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_2"])
def test_bf16_mixed_precision_under_sharding(tmp_path_factory, tiny_models, reviews_csv, strategy):
    ddp = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, "ddp", "Full")
    run = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, strategy, "Full",
                          "--trainer.precision=bf16-mixed")
    assert run["summary"]["precision"] == "bf16-mixed"
    assert run["summary"]["dtypes"] == MIXED[strategy]
    diffs = [abs(a - b) for a, b in zip(ddp["losses"], run["losses"])]
    assert len(diffs) == 10 and max(diffs) <= 2e-2 and max(diffs) > 0  # bf16 rounding, not another run


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_bf16_mixed_zero_with_accumulation_steps_as_ddp(tmp_path_factory, tiny_models, reviews_csv, strategy):
    """LoRA with a new head, bf16-mixed, accumulation 2 over epochs of 5 batches: the same steps and losses as
    DDP. ZeRO-3 builds the model partitioned in bf16 and peft's adapters came after in fp32: DeepSpeed's
    optimizer stopped on a parameter group of two dtypes (AssertionError in `defragment`)."""
    accumulate = "--trainer.accumulate_grad_batches=2"
    ddp = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, "ddp", "Adapter", accumulate)
    run = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, strategy, "Adapter",
                          accumulate, "--trainer.precision=bf16-mixed")
    # the report waits for a real step: with accumulation, DeepSpeed's first one was an accumulation step
    assert run["summary"]["dtypes"] == {"params": "bfloat16", "master_params": "float32", "grads": "bfloat16",
                                        "optimizer_state": "float32", "reduce": "float32"}
    # 5 batches an epoch (160 rows, 16 a rank, 2 ranks): steps after batches 2, 4 and the epoch's last, 2 epochs.
    # DeepSpeed once kept its own count across epochs: 5 updates, of which Lightning counted 4
    assert run["summary"]["steps"] == ddp["summary"]["steps"] == 6
    assert len(run["losses"]) == len(ddp["losses"]) >= 5
    diffs = [abs(a - b) for a, b in zip(ddp["losses"], run["losses"])]
    assert max(diffs) <= 2e-2 and max(diffs) > 0  # bf16 rounding, not another run


@pytest.mark.parametrize("strategy,expected", [
    ("fsdp", {"params": "bfloat16", "master_params": "bfloat16", "grads": "bfloat16", "optimizer_state": "bfloat16",
              "reduce": "bfloat16"}),
    # DeepSpeed has no pure bf16: its bf16 mode always keeps fp32 master weights
    ("deepspeed_stage_3", {"params": "bfloat16", "master_params": "float32", "grads": "bfloat16",
                           "optimizer_state": "float32", "reduce": "bfloat16"}),
])
def test_bf16_true_under_sharding_with_clipping(tmp_path_factory, tiny_models, reviews_csv, strategy, expected):
    run = distributed_fit(tmp_path_factory, tiny_models["llama"], reviews_csv, strategy, "Full",
                          "--trainer.precision=bf16-true", "--trainer.gradient_clip_val=0.5")
    assert run["summary"]["dtypes"] == expected
    assert len(run["losses"]) == 10 and run["summary"]["steps"] == 10


@pytest.mark.parametrize("strategy,kind,policy", [("deepspeed_stage_1", "bert", "Full"),
                                                  ("deepspeed_stage_2", "llama", "Adapter"),
                                                  ("deepspeed_stage_2_offload", "bert", "Full")])
def test_zero1_and_zero2_resume_on_the_same_ranks_and_continue(tmp_path_factory, tiny_models, reviews_csv, strategy,
                                                               kind, policy):
    """ZeRO-1/2 write one model-state file and one optimizer file per rank: a resume counted the model
    files and refused every ZeRO-1/2 checkpoint ("written by 1 DeepSpeed ranks"), so every requeue died.
    (ZeRO-3 resume: tests/test_checkpoints.py kills and resumes a ZeRO-3 run.)"""
    import shutil

    first = distributed_fit(tmp_path_factory, tiny_models[kind], reviews_csv, strategy, policy)  # the matrix's run
    run = tmp_path_factory.mktemp(f"resume-{strategy}") / "run"
    shutil.copytree(first["dir"], run)  # the matrix's tests read the first run's own outputs
    args = fit_args(run, tiny_models[kind], reviews_csv, f"--trainer.strategy={strategy}",
                    "--trainer.devices=2", "--trainer.max_epochs=3", "--ckpt_path=last", "--test_after_fit=false",
                    *(["--model.policy.dropout=0"] if policy == "Adapter" else []), policy=policy)
    out = run_ftlab(*args, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 15 and summary["train_samples"] == 3 * 160  # 2 epochs before, 1 more now
    assert_only_trained_weights(run / "checkpoints" / "last.ckpt", policy)  # a LoRA run's: no base weights


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradual_unfreezing_trains_the_unfrozen_blocks_on_every_rank(tmp_path_factory, tiny_models, reviews_csv,
                                                                     strategy):
    """DDP all-reduces only the parameters that trained when it wrapped the model: blocks unfrozen later
    trained on each rank's own gradients and the replicas drifted apart (34 of 105 tensors). FSDP2 re-reads
    requires_grad at every unshard: it must train exactly as DDP does."""
    unfreeze = ("--trainer.max_epochs=3", "--model.policy.unfreeze_every=1")
    ddp = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, "ddp", "Freeze", *unfreeze)
    assert ddp["summary"]["replicas_in_sync"] is True  # every parameter equal across the ranks
    assert ddp["summary"]["trainable_params"] < ddp["summary"]["total_params"]
    if strategy == "fsdp":
        run = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, "fsdp", "Freeze", *unfreeze)
        assert len(run["losses"]) == len(ddp["losses"]) == 15
        assert max(abs(a - b) for a, b in zip(ddp["losses"], run["losses"])) <= 1e-5


def test_bf16_base_under_mixed_precision_trains_fp32_adapters_under_fsdp_as_ddp(tmp_path_factory, tiny_models,
                                                                                reviews_csv):
    """The recipes' `model.dtype: bfloat16` under bf16-mixed with LoRA and a trained head: FSDP2 units hold the
    frozen bf16 base beside fp32 adapters and head (FSDP2 needs one dtype among a unit's trained parameters: the
    head was left in bf16), and train as DDP trains them."""
    bf16_base = ("--trainer.precision=bf16-mixed", "--model.dtype=bfloat16")
    ddp = distributed_fit(tmp_path_factory, tiny_models["llama"], reviews_csv, "ddp", "Adapter", *bf16_base)
    run = distributed_fit(tmp_path_factory, tiny_models["llama"], reviews_csv, "fsdp", "Adapter", *bf16_base)
    assert ddp["summary"]["dtypes"] == run["summary"]["dtypes"] == MIXED["fsdp"]
    assert run["summary"]["steps"] == ddp["summary"]["steps"] == 10
    diffs = [abs(a - b) for a, b in zip(ddp["losses"], run["losses"])]
    assert len(diffs) == 10 and max(diffs) <= 2e-2


def test_gradual_unfreezing_under_bf16_mixed_with_a_bf16_base_trains_as_ddp(tmp_path_factory, tiny_models,
                                                                            reviews_csv):
    """Gradual unfreezing under bf16-mixed over a bf16 base: the blocks to unfreeze are fp32 from the start. FSDP2
    settles a unit's gradient dtypes at its first forward, from what trains then: a unit unfrozen later got bf16
    gradients for its fp32 shards and the first backward after the unfreeze failed."""
    unfreeze = ("--trainer.max_epochs=3", "--model.policy.unfreeze_every=1", "--trainer.precision=bf16-mixed",
                "--model.dtype=bfloat16")
    ddp = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, "ddp", "Freeze", *unfreeze)
    run = distributed_fit(tmp_path_factory, tiny_models["bert"], reviews_csv, "fsdp", "Freeze", *unfreeze)
    for r in (ddp, run):
        assert r["summary"]["steps"] == 15 and r["summary"]["dtypes"]["params"] == "float32"
        assert r["stderr"].count("unfroze") == 2  # epochs 1 and 2
    assert ddp["summary"]["replicas_in_sync"] is True
    diffs = [abs(a - b) for a, b in zip(ddp["losses"], run["losses"])]
    assert len(diffs) == 15 and max(diffs) <= 2e-2


def test_cpu_ranks_share_the_cores_when_no_thread_count_is_set(tmp_path, tiny_bert, reviews_csv):
    """`--trainer.devices=2` on a CPU host without OMP_NUM_THREADS (a laptop; `make test` sets it to 1 for the
    whole suite, so only this test runs without it): ftlab gives each rank its share of the cores, said in one
    line, and the ranks train (each starting one thread per core, they ran ~30x slower)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "ftlab", *fit_args(run, tiny_bert, reviews_csv, "--trainer.strategy=ddp",
                          "--trainer.devices=2", "--trainer.max_steps=2", "--test_after_fit=false")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"ftlab: 2 CPU ranks on this host: {threads} thread(s) each (OMP_NUM_THREADS)" in out.stderr + out.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (2, 2)


def test_fsdp_evaluates_under_no_grad_even_where_a_config_asks_for_inference_mode(tmp_path, tiny_bert, reviews_csv):
    """On NCCL Lightning runs validate/test/predict under inference mode, where FSDP2 on one rank cannot gather
    for a first forward. ftlab's default is false; a config that holds true (older run configs, dumped whole,
    do) still runs under fsdp, evaluated under no_grad, and says so in one line. Other strategies keep it."""
    from ftlab.strategies import FSDP, evaluation_inference_mode, resolve_strategy

    assert evaluation_inference_mode(FSDP(), True) is False
    assert evaluation_inference_mode(resolve_strategy("ddp"), True) is True
    assert evaluation_inference_mode(FSDP(), False) is False
    run = tmp_path / "run"
    out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, "--trainer.strategy=fsdp", "--trainer.inference_mode=true",
                              "--trainer.max_steps=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ftlab: fsdp evaluates under no_grad (trainer.inference_mode=true is not used" in out.stderr + out.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and "test/accuracy" in summary


@pytest.mark.parametrize("name", ["fsdp", "deepspeed_stage_2", "deepspeed_stage_3_offload"])
def test_the_class_form_an_error_suggests_is_the_named_strategy(name):
    """A strategy option after its name is refused with the class form to give instead: it must be the same
    strategy (a DeepSpeed preset also sizes its buckets by the model)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    from ftlab.strategies import class_form, resolve_strategy

    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    args = [a.replace("--trainer.strategy", "--strategy") for a in class_form(name)]
    built, named = parser.instantiate(parser.parse_args(args)).strategy, resolve_strategy(name)
    assert type(built) is type(named)
    if name.startswith("deepspeed"):
        assert built.model_sized_buffers and named.model_sized_buffers and built.config == named.config


def test_fsdp_gives_no_unit_of_its_own_to_a_weight_other_modules_hold_too():
    """T5's encoder and decoder embed_tokens hold `shared`'s weight: as a unit of its own, `shared` would be
    sharded apart from the copies they kept (the embeddings untied); an untied LM head is a unit still."""
    from transformers import T5Config, T5ForConditionalGeneration

    from ftlab.strategies.fsdp import _embedding_units

    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=8, vocab_size=100))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied, as flan-t5's
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert _embedding_units(model) == [model.lm_head]
