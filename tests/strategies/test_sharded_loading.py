"""FSDP and ZeRO-3 load each rank's shards straight from the checkpoint files (FSDP: its rows of each
tensor; ZeRO-3: its flat range of each, into the partitions transformers' zero.Init created), and the model
they build is the one a whole-model load builds: pretrained tensors bit for bit, new ones (task head, LoRA matrices, rotary and position buffers)
with the same values from the same seed. 2 ranks on CPU, launched by torchrun."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import fit_args

DUMP = '''
import contextlib, os, sys, torch
from ftlab.cli import run_cli
cli = run_cli(sys.argv[2:])
model = cli.model.model
zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
if zero3:
    import deepspeed
gather = deepspeed.zero.GatheredParameters(list(model.parameters())) if zero3 else contextlib.nullcontext()
with gather:
    state = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
             for n, t in [*model.named_parameters(), *model.named_buffers()]}
if int(os.environ.get("RANK", 0)) == 0:
    torch.save(state, sys.argv[1])
    if zero3:  # the buffers the named preset sized by the model
        print("ZERO", {k: v for k, v in cli.trainer.strategy.config["zero_optimization"].items() if "bucket" in k},
              "HIDDEN", model.config.hidden_size, file=sys.stderr)
'''


def loaded_model(tmp_path: Path, name: str, args: list[str], ranks: int) -> tuple[dict, str]:
    """The model `validate` builds (before any step), gathered whole, and the run's log."""
    script = tmp_path / "dump.py"
    script.write_text(DUMP)
    out = tmp_path / f"{name}.pt"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", f"--nproc_per_node={ranks}", str(script), str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True), proc.stderr


@pytest.mark.parametrize("strategy,kind,policy", [("fsdp", "bert", "Full"), ("fsdp", "llama", "Adapter"),
                                                  ("deepspeed_stage_3", "llama", "Adapter")])
def test_sharded_load_equals_the_whole_model_load(tmp_path, tiny_models, reviews_csv, strategy, kind, policy):
    def args(run, strategy, ranks):
        a = fit_args(tmp_path / run, tiny_models[kind], reviews_csv, f"--trainer.strategy={strategy}",
                     f"--trainer.devices={ranks}", "--progress.every_n_seconds=1e-9", policy=policy)
        return ["validate", *a[1:]]  # build the model and run validation, train nothing

    whole, _ = loaded_model(tmp_path, "whole", args("ddp", "ddp", 1), 1)
    sharded, log = loaded_model(tmp_path, "sharded", args(strategy, strategy, 2), 2)
    assert ("each rank read only its shards of the pretrained weights" if strategy == "fsdp" else
            "each rank read only its partitions of the pretrained weights") in log
    # how far the load is, as it goes (every line due here: the interval is 1 ns), to the last tensor
    counts = [(int(a), int(b)) for a, b in re.findall(r"ftlab: \S+: each rank loading its \w+: (\d+) of (\d+) tensors", log)]
    assert counts and counts[-1][0] == counts[-1][1] == len(counts) <= len(sharded), (counts[-3:], len(sharded))
    if strategy == "deepspeed_stage_3":  # hidden^2 and 0.9 hidden^2 (the HF Trainer's auto), not Lightning's 2e8
        zero, hidden = re.search(r"ZERO (\{.*\}) HIDDEN (\d+)", log).groups()
        zero, hidden = ast.literal_eval(zero), int(hidden)
        assert zero["reduce_bucket_size"] == hidden**2 and zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden**2)
    assert whole.keys() == sharded.keys()
    for name, tensor in whole.items():
        assert torch.equal(sharded[name], tensor), name
