"""The console of a real `ftlab fit` (stdout not a terminal, as in a Slurm log): a header, plain progress
lines, one line per validation, the summary; none of the libraries' noise unless --verbose."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_ftlab

STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss [\d.e+-]+ \| lr [\d.e-]+ \| [\d.]+ samples/s \| ETA \d+[smh]")
NOISE = ["LOAD REPORT", "GPU available", "TPU available", "Tip:", "Trainable params", "Total FLOPs",
         "Loading weights", "is deprecated", "srun", "Seed set to", "Loading `train_dataloader`"]


def _fit(run, tiny_bert, reviews_csv, *extra, env=None):
    return run_ftlab(
        "fit", f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.logger=false", "--trainer.val_check_interval=0.5",
        f"--model.name_or_path={tiny_bert}", "--model.policy=Adapter", "--model.optim.lr=0.01",
        "--data=TextClassificationData", f"--data.source={reviews_csv}", "--data.batch_size=16",
        "--data.val_size=40", "--data.test_size=40", "--progress.every_n_steps=3", *extra, env=env)


@pytest.fixture(scope="module")
def quiet_and_verbose(tmp_path_factory, tiny_bert, reviews_csv):
    root = tmp_path_factory.mktemp("console")
    # its own tokenisation cache: the header must say the data was tokenised now (the session's cache may have it)
    # null, as a frozen config (`slurm submit`'s submitted-config.yaml) holds it: still no model-summary table
    quiet = _fit(root / "quiet", tiny_bert, reviews_csv, "--trainer.enable_model_summary=null",
                 env={"FTLAB_CACHE": str(root / "cache")})
    return quiet, _fit(root / "verbose", tiny_bert, reviews_csv, "--verbose")


def test_quiet_console_has_header_progress_validation_lines_and_summary(quiet_and_verbose):
    out = quiet_and_verbose[0]
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ftlab fit: run directory ")
    header = "\n".join(lines[:8])
    for key in ("model", "policy", "data", "device", "steps"):
        assert re.search(rf"^  {key} +\S", header, re.MULTILINE), header
    assert "new classifier head: randomly initialised, as expected" in header  # instead of "classifier MISSING"
    assert re.search(r"policy +adapter \(lora r=8\): [\d,]+ of [\d,]+ parameters train \([\d.]+%\)", header)
    assert re.search(r"data +\d+ train / 40 validation / 40 test rows, tokenised now", header), header
    assert re.search(r"device +1 x cpu; precision 32-true", header)
    steps = [STEP_LINE.match(line) for line in lines]
    steps = [int(m.group(1)) for m in steps if m]
    total = int(re.search(r"steps +(\d+) optimizer steps", header).group(1))
    assert steps[0] == 1 and steps[-1] == total and all(s % 3 == 0 for s in steps[1:-1]), out.stdout
    assert len([line for line in lines if line.startswith("validation at step ")]) == 2, out.stdout
    assert re.search(r"^validation at step \d+/\d+ \| accuracy [\d.]+ \| f1_macro [\d.]+ \| loss [\d.]+$",
                     out.stdout, re.MULTILINE), out.stdout
    assert "ftlab run " in out.stdout and "outputs" in out.stdout  # the summary table, last
    everything = out.stdout + out.stderr
    for noise in NOISE:
        assert noise not in everything, (noise, everything[-3000:])
    assert "Traceback" not in everything


def test_verbose_brings_the_libraries_output_back(quiet_and_verbose):
    out = quiet_and_verbose[1]
    assert out.returncode == 0, out.stderr[-3000:]
    everything = out.stdout + out.stderr
    for line in ("LOAD REPORT", "GPU available", "Trainable params", "ftlab: policy adapter: training"):
        assert line in everything, (line, everything[-3000:])
    assert out.stdout.startswith("ftlab fit: run directory")


def test_long_work_without_a_count_prints_a_line_per_interval_while_it_runs(monkeypatch, capsys):
    """A whole from_pretrained (minutes at 70B, transformers' bar silenced) says it is still loading: a line per
    interval while it runs, none once it is done, none on other ranks, none with the interval at 0."""
    import time

    from ftlab import console

    monkeypatch.setattr(console, "progress_every_s", 0.1)
    with console.still_running("loading some/model"):
        time.sleep(0.45)
    time.sleep(0.25)  # done: no line after it
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 5 and all(re.fullmatch(r"ftlab: loading some/model: \d+ s", line) for line in lines), lines
    monkeypatch.setenv("RANK", "1")
    with console.still_running("loading some/model"):
        time.sleep(0.25)
    monkeypatch.delenv("RANK")
    monkeypatch.setattr(console, "progress_every_s", 0)
    with console.still_running("loading some/model"):
        time.sleep(0.25)
    assert capsys.readouterr().err == ""
