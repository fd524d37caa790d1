"""`ftlab compare` on a tiny model: 3 variants x 2 seeds, the report against each run's summary.json, and a
rerun after a failed variant that reuses what finished."""

from __future__ import annotations

import json
import re
import statistics

import yaml

from tests.conftest import run_ftlab


def config(tmp_path, model, data):
    cfg = {
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"name_or_path": str(model)},
        "data": {"class_path": "TextClassificationData",
                 "init_args": {"source": str(data), "batch_size": 16, "val_size": 40, "test_size": 40}},
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def variants(tmp_path, full_lr: str):
    path = tmp_path / f"variants-{full_lr}.yaml"
    path.write_text(yaml.safe_dump({
        "head": ["--model.policy=Freeze", "--model.optim.lr=0.05"],
        "lora": ["--model.policy=Adapter", "--model.policy.r=4", "--model.optim.lr=0.01"],
        "full": ["--model.policy=Full", f"--model.optim.lr={full_lr}", "--model.optim.schedule=constant",
                 "--model.optim.warmup_ratio=0"],
    }, sort_keys=False))
    return path


def test_compare_reports_every_variant_and_reruns_only_what_failed(tmp_path, tiny_bert, reviews_csv):
    cfg = config(tmp_path, tiny_bert, reviews_csv)
    common = ["compare", "--config", str(cfg), "--seeds", "2", "--val-checks-per-epoch", "2",
              "--runs-dir", str(tmp_path / "runs")]
    # the full variant's learning rate makes its loss NaN: it fails, the others finish
    first = run_ftlab(*common, "--variants-file", str(variants(tmp_path, "1e30")), timeout=900)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("FAILED") == 2 and first.stdout.count(": done in") == 4
    root = tmp_path / "runs" / "compare-task"
    report = json.loads((root / "report.json").read_text())
    assert report["variants"]["full"] == {"seeds": 0}
    md = (root / "report.md").read_text()
    assert "| full | - | no result (see Missing) |" in md
    assert md.count("- Missing: full seed ") == 2 and "non-finite training loss (nan)" in md  # each seed's reason

    second = run_ftlab(*common, "--variants-file", str(variants(tmp_path, "0.01")), timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("finished before, reused") == 4 and second.stdout.count(": done in") == 2

    report = json.loads((root / "report.json").read_text())
    assert report["metric"] == "test/accuracy" and list(report["variants"]) == ["head", "lora", "full"]
    for name, v in report["variants"].items():
        summaries = [json.loads((root / name / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
        accs = [s["test/accuracy"] for s in summaries]
        assert v["seeds"] == 2
        assert v["metric_mean"] == statistics.fmean(accs) and v["metric_std"] == statistics.stdev(accs)
        assert v["trainable_params"] == summaries[0]["trainable_params"]
        assert v["wall_time_s"] == statistics.fmean(s["wall_time_s"] for s in summaries)
        assert v["peak_memory_mb"] == statistics.fmean(s["peak_memory_mb"] for s in summaries)
        assert len(v["val_curve"]) == 4  # 2 validations an epoch x 2 epochs
    shares = {n: v["trainable_share"] for n, v in report["variants"].items()}
    assert shares["head"] < shares["lora"] < shares["full"] == 1.0
    assert report["reading"] and report["reading"][0].startswith("Best test/accuracy: **")
    md = (root / "report.md").read_text()
    for name in ("head", "lora", "full"):
        assert re.search(rf"^\| {name} \| \w+ \| 0\.\d{{4}} ± 0\.\d{{4}} \| 2 \|", md, re.M), md
    html = (root / "report.html").read_text()
    for png in ("metric_vs_trainable_params.png", "metric_vs_wall_time.png", "validation_curves.png",
                "peak_memory.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"src='{png}'" in html


def test_report_from_one_seed_and_a_budget_too_short_to_validate(tmp_path, tiny_bert, reviews_csv):
    """The README's quick try (a few steps, no validation within the budget) and one seed: a report, not a
    traceback; a run that recorded no metric is listed with the reason, one seed shows no spread."""
    cfg = config(tmp_path, tiny_bert, reviews_csv)
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump({"head": ["--model.policy=Freeze", "--model.optim.lr=0.05"],
                                    "untested": ["--model.policy=Freeze", "--test_after_fit=false"]}))
    out = run_ftlab("compare", "--config", str(cfg), "--variants-file", str(path), "--budget-steps", "2",
                    "--seeds", "1", "--runs-dir", str(tmp_path / "runs"), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    root = tmp_path / "runs" / "compare-task"
    report = json.loads((root / "report.json").read_text())
    head = json.loads((root / "head" / "seed0" / "summary.json").read_text())
    assert head["steps"] == 2 and not head["val_history"]  # it really did not validate
    assert report["metric"] == "test/accuracy" and report["variants"]["head"]["metric_mean"] == head["test/accuracy"]
    assert report["variants"]["head"]["metric_std"] is None and report["variants"]["untested"] == {"seeds": 0}
    md = (root / "report.md").read_text()
    assert re.search(r"^\| head \| \w+ \| 0\.\d{4} \(1 seed\) \| 1 \|", md, re.M), md
    assert "- Missing: untested seed 0: finished after 2 step(s) without test/accuracy" in md
    assert "Only **head** has a result" in md
