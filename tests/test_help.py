"""The CLI shows itself: every subcommand in `--help`, `--version`, whole help sentences, defaults."""

from __future__ import annotations

import re

from ftlab.help import SUBCOMMANDS
from tests.conftest import run_ftlab


def test_top_level_help_lists_every_subcommand_and_version():
    out = run_ftlab("--help")
    assert out.returncode == 0, out.stderr
    for name, _ in SUBCOMMANDS:
        assert re.search(rf"^  {name} +\S", out.stdout, re.MULTILINE), name
    for name in ("fit", "validate", "test", "predict", "generate", "export", "compare", "estimate", "slurm submit",
                 "slurm render"):
        assert name in dict(SUBCOMMANDS)
    assert "--version" in out.stdout and "--verbose" in out.stdout
    version = run_ftlab("--version")
    assert re.fullmatch(r"ftlab \d+\.\d+\.\d+.*\n", version.stdout), version.stdout


def test_fit_help_documents_optim_data_progress_and_whole_titles():
    out = run_ftlab("fit", "--help").stdout
    assert "written to `<path>.partial`, then swapped in when every rank has finished writing:" in out
    assert not re.search(r"[,(]:$", out, re.MULTILINE)  # no title cut mid-sentence
    assert re.search(r"--model\.optim\.lr LR +Peak learning rate", out)
    assert re.search(r"--model\.optim\.schedule \{linear,cosine,constant\}\n +Decay after warmup", out)
    for option in ("--data.source", "--data.batch_size", "--data.label_column", "--data.tokens_column",
                   "--data.chat_template", "--progress.every_n_seconds"):
        assert option in out, option
    adapter = run_ftlab("fit", "--model.policy.help", "Adapter").stdout
    assert "small adapters train" in adapter and "(and the task:" not in adapter


def test_slurm_help_names_the_subcommand_and_shows_defaults():
    out = run_ftlab("slurm", "render", "--help").stdout
    assert out.startswith("usage: python -m ftlab slurm render ")
    assert "{submit,render}" not in out
    assert re.search(r"--cpus-per-task CPUS_PER_TASK\n +CPU cores per task .*\(default:\s+8\)", out)
    assert re.search(r"--time TIME +time limit, e.g. 12:00:00 or 1-00:00:00 \(default:\s+04:00:00\)", out)
