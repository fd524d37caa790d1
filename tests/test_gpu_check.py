"""scripts/gpu-check, the prepared GPU check, run on CPU: one case passes with a well-formed line; a run that
exits 0 but trains nothing, and one that ftlab refuses, are FAILs with a non-zero exit."""

import re
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu-check"
PASS_LINE = re.compile(r"^PASS ddp bf16-mixed bert-lora steps=8 samples=256 loss=\d+(\.\d+)?(e-?\d+)? "
                       r"dtypes=(n/a|params:\w+,\S+) \d+\.\ds$", re.MULTILINE)


def gpu_check(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--accelerator", "cpu", "--wheels", "none",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_case_passes_with_one_line_and_a_closing_count(tmp_path):
    out = gpu_check(tmp_path, "--cases", "^ddp bf16-mixed bert-lora$")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert PASS_LINE.search(out.stdout), out.stdout
    assert out.stdout.splitlines()[-1] == "gpu-check: 1 passed, 0 failed"
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert "distributed_backend=gloo" in log  # a real process group, even at world size 1


def test_exit_0_without_training_and_a_refused_option_are_failures(tmp_path):
    # max_steps=0: ftlab exits 0 having trained nothing, the worst failure; 16-mixed is skipped on CPU
    out = gpu_check(tmp_path, "--cases", "^ddp .*bert-lora(\\+fp16base)?$", "--fit-arg=--trainer.max_steps=0")
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    assert re.search(r"^FAIL ddp bf16-mixed bert-lora steps=0 .*trained 0 of 8 steps", out.stdout, re.MULTILINE), out.stdout
    assert re.search(r"^SKIP ddp 16-mixed bert-lora\+fp16base", out.stdout, re.MULTILINE), out.stdout
    assert out.stdout.splitlines()[-1] == "gpu-check: 0 passed, 1 failed, 1 skipped"

    out = gpu_check(tmp_path, "--cases", "^ddp bf16-mixed bert-lora$", "--fit-arg=--trainer.precision=bogus")
    assert out.returncode == 1
    assert re.search(r"^FAIL ddp bf16-mixed bert-lora ftlab: error: .*precision", out.stdout, re.MULTILINE), out.stdout
    assert out.stdout.splitlines()[-1] == "gpu-check: 0 passed, 1 failed"
