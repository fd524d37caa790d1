"""ZeRO checkpoints resume at another world size through DeepSpeed's universal checkpoint, the optimizer state
with them: 2 ranks -> 1 -> 2 under ZeRO-2 and ZeRO-3, each a real `ftlab fit` on CPU (gloo), ending where the
run never stopped ends. What cannot convert is refused before anything loads."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ftlab.errors import ConfigError
from ftlab.strategies import DeepSpeed, check_resume
from ftlab.strategies.deepspeed import UNIVERSAL, convert_to_universal
from tests.conftest import fit_args, run_ftlab

# the learning rate must not depend on max_steps, which only the stopped runs set
COMMON = ["--model.optim.schedule=constant", "--model.optim.warmup_ratio=0", "--test_after_fit=false",
          "--trainer.max_epochs=2"]


def probe(folder):
    return ["--trainer.callbacks+=tests.strategies.probe.ZeroProbe", f"--trainer.callbacks.folder={folder}"]


def fit(run, model, data, ranks, *extra):
    out = run_ftlab(*fit_args(run, model, data, f"--trainer.devices={ranks}", *COMMON, *extra), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def assert_same_state(saved, resumed):
    """The state a run saved is the state the resumed run starts from: the fp32 master weights, both AdamW
    moments and AdamW's step count, whole, bit for bit (a resume with fresh moments, or the weights alone,
    fails here)."""
    assert saved["adam_steps"] == resumed["adam_steps"] and len(saved["adam_steps"]) == 1
    assert saved["params"].keys() == resumed["params"].keys()
    for name, state in saved["params"].items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed["params"][name][key], state[key]), (name, key)
        assert state["exp_avg"].abs().sum() > 0, name  # moments there to compare (they trained)


@pytest.mark.parametrize("strategy,policy", [("deepspeed_stage_2", "Adapter"), ("deepspeed_stage_3", "Full")])
def test_zero_checkpoint_resumes_at_another_world_size(tmp_path, tiny_models, reviews_csv, strategy, policy):
    """2 ranks to step 3 (mid-epoch), then 1 rank with accumulation 2 (the same global batch) to step 6, then 2
    ranks to the end (10 steps). Each resume converts the checkpoint into a universal one and continues from the
    saved optimizer state, on the global batches the 2 ranks would have taken: it ends bit for bit where the
    2-rank run that never stopped ends, with the same sample count. (The LoRA run's checkpoints hold no base
    weights: the conversion and the resume do without them.)"""
    model = tiny_models["llama"]
    straight, moved, probes = tmp_path / "straight", tmp_path / "moved", tmp_path / "probes"
    two = [f"--trainer.strategy={strategy}", f"--model.policy={policy}",
           *(["--model.policy.dropout=0"] if policy == "Adapter" else [])]
    trace = ["--trainer.callbacks+=tests.strategies.probe.TraceProbe", f"--trainer.callbacks.folder={probes}"]
    fit(straight, model, reviews_csv, 2, *two, *(trace if strategy == "deepspeed_stage_3" else []))
    if strategy == "deepspeed_stage_3":  # ZeRO-3 keeps its module trace from the third step on (prefetch, reuse)
        for rank in (0, 1):
            states = (probes / f"trace-rank{rank}.txt").read_text().split()
            assert len(states) == 10 and set(states[2:]) == {"complete"}, states
    fit(moved, model, reviews_csv, 2, *two, "--trainer.max_steps=3", *probe(probes))
    log = fit(moved, model, reviews_csv, 1, *two, "--trainer.accumulate_grad_batches=2", "--trainer.max_steps=6",
              "--ckpt_path=last", *probe(probes))
    assert "through its universal checkpoint" in log
    assert not (moved / "checkpoints" / f"last.ckpt{UNIVERSAL}").exists()  # stale once last.ckpt was replaced
    fit(moved, model, reviews_csv, 2, *two, "--ckpt_path=last", *probe(probes))

    load = lambda name: torch.load(probes / name, weights_only=False)  # noqa: E731
    for step in (3, 6):  # 2 ranks -> 1, then 1 -> 2
        assert_same_state(load(f"end-{step}.pt"), load(f"start-{step}.pt"))
    assert load("start-3.pt")["world_size"] == 1 and load("start-6.pt")["world_size"] == 2
    a, b = (json.loads((run / "summary.json").read_text()) for run in (straight, moved))
    assert a["steps"] == b["steps"] == 10 and b["world_size"] == 2
    assert a["train_samples"] == b["train_samples"] == 160 * 2  # every row of both epochs once, none twice
    export = "export/merged" if policy == "Adapter" else "export"
    for name, tensor in load_file(straight / export / "model.safetensors").items():
        torch.testing.assert_close(load_file(moved / export / "model.safetensors")[name], tensor, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def zero2_checkpoint(tmp_path_factory, tiny_models, reviews_csv):
    """A 2-rank ZeRO-2 checkpoint (2 steps)."""
    run = tmp_path_factory.mktemp("zero2")
    fit(run, tiny_models["llama"], reviews_csv, 2, "--trainer.strategy=deepspeed_stage_2", "--trainer.max_steps=2")
    return run / "checkpoints" / "last.ckpt"


def test_conversion_is_reused_while_its_checkpoint_stands(tmp_path, zero2_checkpoint):
    """Converted once into `<ckpt>.universal`; a conversion of a checkpoint since replaced is never reused.
    (No process group here: the strategy's barrier and broadcast are those of one process.)"""
    import shutil

    ckpt = tmp_path / "last.ckpt"
    shutil.copytree(zero2_checkpoint, ckpt)
    strategy = DeepSpeed(stage=2)
    out = convert_to_universal(strategy, str(ckpt))
    assert out == str(ckpt) + UNIVERSAL and (ckpt.parent / "last.ckpt.universal" / "latest_universal").exists()
    files = sorted((ckpt.parent / "last.ckpt.universal" / "checkpoint" / "zero").iterdir())
    assert (files[0] / "exp_avg.pt").exists() and (files[0] / "fp32.pt").exists()  # the optimizer state too
    marker = ckpt.parent / "last.ckpt.universal" / "ftlab_source.json"
    written = marker.stat().st_mtime_ns
    convert_to_universal(strategy, str(ckpt))
    assert marker.stat().st_mtime_ns == written  # reused
    optim = next((ckpt / "checkpoint").glob("*_optim_states.pt"))
    os.utime(optim, ns=(optim.stat().st_atime_ns, optim.stat().st_mtime_ns + 10**9))  # the checkpoint rewritten
    convert_to_universal(strategy, str(ckpt))
    assert marker.stat().st_mtime_ns != written and not (ckpt.parent / "last.ckpt.universal.partial").exists()


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_zero_checkpoint_of_the_other_stage_family_is_refused_at_any_world_size(zero2_checkpoint, world_size):
    """ZeRO-3 finds none of ZeRO-1/2's files (and the other way): a bare assert in DeepSpeed, at the same
    world size too."""
    with pytest.raises(ConfigError, match="was written under ZeRO-1/2, this run is ZeRO-3: resume it with the stage "
                                          "it was written with") as err:
        check_resume(str(zero2_checkpoint), str(zero2_checkpoint.parent), DeepSpeed(stage=3), world_size)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("strategy,message", [
    (lambda: DeepSpeed(stage=2, offload_optimizer=True, offload_optimizer_device="nvme"),
     "does not load a universal checkpoint with offload_optimizer on NVMe"),
    (lambda: __import__("lightning").pytorch.strategies.DeepSpeedStrategy(stage=2),
     "only ftlab's DeepSpeed strategy"),
])
def test_what_cannot_resume_at_another_world_size_is_refused_up_front(zero2_checkpoint, strategy, message):
    with pytest.raises(ConfigError, match="was written by 2 DeepSpeed ranks, this run has 1") as err:
        check_resume(str(zero2_checkpoint), str(zero2_checkpoint.parent), strategy(), 1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_same_world_size_loads_deepspeed_own_checkpoint(zero2_checkpoint):
    strategy = DeepSpeed(stage=2)
    check_resume(str(zero2_checkpoint), str(zero2_checkpoint.parent), strategy, 2)
    assert "load_universal" not in strategy.config.get("checkpoint", {})
    check_resume(str(zero2_checkpoint), str(zero2_checkpoint.parent), strategy, 1)
    assert strategy.config["checkpoint"]["load_universal"] is True
