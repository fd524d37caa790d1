"""`ftlab estimate`'s host (CPU RAM) figures per node, from the real command on a tiny model: they scale as
each strategy lays the model out while loading, with offloaded state, and while rank 0 exports."""

import json

import pytest

from tests.conftest import fit_args, run_ftlab


@pytest.fixture(scope="module")
def args(tiny_models, reviews_csv, tmp_path_factory):
    """A fit of the tiny Llama in bf16-true: its fp32 checkpoint is copied on load (what the figures count)."""
    run = tmp_path_factory.mktemp("run")
    return fit_args(run, tiny_models["llama"], reviews_csv, "--data.label_names=[neg, pos]",
                    "--trainer.precision=bf16-true")[1:]


_RUNS: dict = {}


def estimate(args, *extra):
    """The command's JSON (each command line run once per module)."""
    if extra not in _RUNS:
        out = run_ftlab("estimate", "--json", "--no-activations", *extra, *args)
        assert out.returncode == 0, out.stderr[-2000:]
        _RUNS[extra] = json.loads(out.stdout)
    est = _RUNS[extra]
    return est, est["host_per_node"]


def test_loading_ddp_grows_with_devices_fsdp_shrinks_with_ranks(args):
    _, ddp2 = estimate(args, "--strategy", "ddp", "--devices", "2")
    est, ddp4 = estimate(args, "--strategy", "ddp", "--devices", "4")
    # every rank copies the whole model (bf16 copies of the fp32 checkpoint); the mapped file is shared
    assert ddp4["load_private_bytes"] == 2 * ddp2["load_private_bytes"] >= 4 * est["total_params"] * 2
    assert ddp4["load_mapped_bytes"] == ddp2["load_mapped_bytes"] > 0
    assert "every rank loads the whole model (bfloat16 copies" in ddp4["load"]
    _, fsdp1 = estimate(args, "--strategy", "fsdp", "--devices", "4", "--num-nodes", "1")
    _, fsdp4 = estimate(args, "--strategy", "fsdp", "--devices", "4", "--num-nodes", "4")
    assert fsdp4["load_bytes"] < fsdp1["load_bytes"] < ddp4["load_bytes"]  # each rank reads only its rows
    assert fsdp4["load_mapped_bytes"] * 4 == pytest.approx(fsdp1["load_mapped_bytes"], abs=4)
    assert "maps its rows" in fsdp1["load"] and fsdp1["offload_bytes"] == 0
    # ZeRO-3: each rank its flat partition of each tensor, as FSDP's rows: the whole checkpoint over the ranks
    _, zero3 = estimate(args, "--strategy", "deepspeed_stage_3", "--devices", "4", "--num-nodes", "1")
    assert zero3["load_mapped_bytes"] == pytest.approx(fsdp1["load_mapped_bytes"], abs=4)
    assert zero3["load_bytes"] < ddp4["load_bytes"] and "the rows its partition of each tensor spans" in zero3["load"]


def test_offload_lives_in_host_memory(args):
    est, zero = estimate(args, "--strategy", "deepspeed_stage_2", "--devices", "2")
    est_off, off = estimate(args, "--strategy", "deepspeed_stage_2_offload", "--devices", "2")
    assert zero["offload_bytes"] == 0 and zero["offload"] is None
    # the partition's fp32 master weights, fp32 gradients and AdamW's two states: 16 bytes an element
    partition = sum(est_off["optimizer_state_numel_per_rank"]) // 2
    assert off["offload_bytes"] == 16 * partition and "ZeRO offload" in off["offload"]
    assert off["export_bytes"] == zero["export_bytes"] + off["offload_bytes"]  # still resident while exporting
    # FSDP2 cpu_offload, from the config's strategy options: shards on the host, filled there by the sharded load
    est, fsdp = estimate(args, "--devices", "2", "--trainer.strategy=ftlab.strategies.FSDP",
                         "--trainer.strategy.cpu_offload=true")
    assert est["strategy"] == "fsdp" and "FSDP cpu_offload" in fsdp["offload"]
    assert fsdp["offload_bytes"] >= 2 * (est["params"]["bytes"] + est["grads"]["bytes"] + est["optimizer"]["bytes"]) // 2
    _, plain = estimate(args, "--devices", "2", "--strategy", "fsdp")
    assert "into its host shards (cpu_offload)" in fsdp["load"]
    # the plain sharded load's transients plus the two ranks' bf16 parameter shards, held on the host
    assert fsdp["load_private_bytes"] - plain["load_private_bytes"] == 2 * sum(est["param_numel_per_rank"][:2])


def test_export_is_bounded_by_max_shard_size(args):
    est, whole = estimate(args, "--strategy", "fsdp", "--devices", "4", "--num-nodes", "1")
    _, small = estimate(args, "--strategy", "fsdp", "--devices", "4", "--outputs.max_shard_size=5KB")
    model = est["total_params"] * 2  # written in bf16
    assert whole["export_bytes"] >= model * 0.95  # the whole (small) model fits one 5GB shard
    # one shard of at most 5 KB + the block just gathered (the largest of this model is under 5 KB)
    assert small["max_shard_size"] == 5_000 and small["export_bytes"] <= 2 * 5_000 < model
    assert "a shard of at most 5KB" in small["export"]


def test_text_report_and_bad_values(args):
    out = run_ftlab("estimate", "--no-activations", "--strategy", "ddp", "--devices", "2", "--num-nodes", "2", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "host memory per node (2 ranks x 2 nodes, node 0 shown):" in out.stdout
    for row in ("loading", "offload", "export"):
        assert f"\n    {row} " in out.stdout
    for bad, message in ((["--devices", "0"], "--devices 0 must be a positive number"),
                         (["--outputs.max_shard_size=5XB"], "outputs.max_shard_size='5XB' is not a size")):
        out = run_ftlab("estimate", *bad, *args)
        errors = [line for line in out.stderr.splitlines() if line.startswith("ftlab: error:")]
        assert out.returncode == 2 and len(errors) == 1 and message in errors[0], out.stderr[-2000:]
        assert "Traceback" not in out.stderr
