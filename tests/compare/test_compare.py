"""`ftlab compare` on a tiny model: 3 variants x 2 seeds, the report against each run's summary.json, and a
rerun after a failed variant that reuses what finished."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics

import yaml

from tests.conftest import make_rows, run_ftlab, write_csv


def config(tmp_path, model, data, **trainer):
    cfg = {
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, **trainer},
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
    # the failed full runs were made at another learning rate: replaced, and said so
    assert second.stdout.count("holds a run made with other settings; it is replaced") == 2

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

    # the comparison moved as a whole (scratch space to project storage): every run still counts as finished
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    moved = run_ftlab(*common[:-1], str(tmp_path / "moved"), "--variants-file", str(variants(tmp_path, "0.01")),
                      timeout=300)
    assert moved.returncode == 0, moved.stdout[-3000:] + moved.stderr[-3000:]
    assert moved.stdout.count("finished before, reused") == 6 and ": running" not in moved.stdout
    again = json.loads((tmp_path / "moved" / "compare-task" / "report.json").read_text())["variants"]
    assert {n: v["metric_mean"] for n, v in again.items()} == {n: v["metric_mean"] for n, v in report["variants"].items()}


def test_an_edited_config_is_another_run(tmp_path, tiny_bert, reviews_csv):
    """The arguments read the same, the --config file does not (another data.source): its run is made again,
    not reused."""
    cfg = config(tmp_path, tiny_bert, reviews_csv)
    common = ["compare", "--config", str(cfg), "--variants", "freeze", "--budget-steps", "2",
              "--runs-dir", str(tmp_path / "runs")]
    first = run_ftlab(*common, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    other = write_csv(tmp_path / "other.csv", make_rows(240, seed=1))
    cfg.write_text(cfg.read_text().replace(str(reviews_csv), str(other)))
    second = run_ftlab(*common, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "finished before, reused" not in second.stdout and second.stdout.count(": done in") == 1
    assert "holds a run made with other settings; it is replaced" in second.stdout
    run = tmp_path / "runs" / "compare-task" / "freeze" / "seed0"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]["source"] == str(other)


def test_a_run_stopped_before_its_test_is_not_finished(tmp_path, tiny_bert, reviews_csv):
    """A fit killed after training (its summary written) but before its test loop finished: missing, with that
    reason, and the command fails until a rerun has made it whole."""
    cfg = config(tmp_path, tiny_bert, reviews_csv, callbacks=[{"class_path": "tests.compare.stop.KillAtTest"}])
    common = ["compare", "--config", str(cfg), "--variants", "freeze", "--budget-steps", "2",
              "--runs-dir", str(tmp_path / "runs")]
    first = run_ftlab(*common, env={"FTLAB_TEST_KILL_AT_TEST": "1"}, timeout=300)
    assert first.returncode == 1 and "FAILED" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    root = tmp_path / "runs" / "compare-task"
    summary = json.loads((root / "freeze" / "seed0" / "summary.json").read_text())
    assert summary["steps"] == 2 and not any(k.startswith("test/") for k in summary)  # trained, not tested

    report_only = run_ftlab(*common, "--report-only", timeout=300)
    assert report_only.returncode == 1 and "1 run(s) did not finish" in report_only.stderr
    md = (root / "report.md").read_text()
    assert "- Missing: freeze seed 0: trained, but stopped before its test loop finished" in md
    assert "no test loop ran" not in md and json.loads((root / "report.json").read_text())["variants"]["freeze"] == {"seeds": 0}

    again = run_ftlab(*common, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "finished before, reused" not in again.stdout and again.stdout.count(": done in") == 1
    summary = json.loads((root / "freeze" / "seed0" / "summary.json").read_text())
    report = json.loads((root / "report.json").read_text())
    assert report["metric"] == "test/accuracy" and report["variants"]["freeze"]["metric_mean"] == summary["test/accuracy"]
    assert not report["missing"]


def test_report_from_one_seed_and_a_budget_too_short_to_validate(tmp_path, tiny_bert, reviews_csv):
    """The README's quick try (a few steps, no validation within the budget) and one seed: a report, not a
    traceback; a run that recorded no metric is listed with the reason, one seed shows no spread."""
    cfg = config(tmp_path, tiny_bert, reviews_csv)
    path = tmp_path / "variants.yaml"
    wandb = ["--trainer.logger=WandbLogger", "--trainer.logger.project=ftlab-compare-tests"]
    path.write_text(yaml.safe_dump({"head": ["--model.policy=Freeze", "--model.optim.lr=0.05", *wandb],
                                    "untested": ["--model.policy=Freeze", "--test_after_fit=false", *wandb]}))
    out = run_ftlab("compare", "--config", str(cfg), "--variants-file", str(path), "--budget-steps", "2",
                    "--seeds", "1", "--runs-dir", str(tmp_path / "runs"), timeout=600,
                    env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
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
    # with W&B, the report is a run of the comparison's group too: its table, read back from the offline files
    from tests.test_tracking import merged, wandb_records

    reports = list((root / "wandb").glob("offline-run-*"))
    assert len(reports) == 1
    records = wandb_records(reports[0])
    logged = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert any(item.get("compare/table._type") == "table-file" for item in logged)
    table = json.loads(next(reports[0].glob("files/media/table/compare/table_*.table.json")).read_text())
    assert table["columns"][2] == "test/accuracy (mean ± std)" and [row[0] for row in table["data"]] == ["head", "untested"]
    assert merged(records, "summary")["metric"] == "test/accuracy"
    run = next(r["run"] for r in records if r.get("type") == "run")
    assert run["run_group"] == "compare-task" and run["job_type"] == "compare"


def test_nested_training_subsets():
    """data.max_train_rows: one seeded random order of the train split, its first N rows: a smaller subset is
    inside a larger one, a fraction is a count, and the split seed (not the training seed) draws them."""
    from ftlab.data.module import train_subset

    small, large, frac = train_subset(500, 50, 0), train_subset(500, 200, 0), train_subset(500, 0.1, 0)
    assert len(small) == len(frac) == 50 and len(large) == 200 and small == sorted(small)
    assert set(small) < set(large) and frac == small
    assert small != list(range(50)) and train_subset(500, 50, 1) != small  # random, and drawn with split_seed
    assert train_subset(30, 100, 0) == list(range(30))


def test_successive_halving_prunes_the_worse_half_each_rung(tmp_path):
    """4 rates: rung 0 runs all 4 for S steps, the best 2 go on to rung 1 at 2S, the better of those is chosen;
    a diverged rate (no finite metric) is pruned first."""
    from ftlab.compare.runner import PLAN_FILE
    from ftlab.compare.tune import LrSearch

    search = LrSearch(["c.yaml"], {"v": ["--model.policy=Full"]}, [], None, str(tmp_path), {"v": 1e-3},
                      [0.3, 1, 3, 10], steps=5)
    val = {(0, 3e-4): 0.6, (0, 1e-3): 0.7, (0, 3e-3): 0.8, (0, 1e-2): float("nan"), (1, 1e-3): 0.9, (1, 3e-3): 0.85}

    def finish(runs):
        for r in runs:
            rung, lr = int(os.path.basename(r.run_dir)[4]), float(r.run_dir.rsplit("-lr", 1)[1])
            os.makedirs(r.run_dir)
            with open(os.path.join(r.run_dir, PLAN_FILE), "w") as f:
                json.dump(r.record(), f)
            with open(os.path.join(r.run_dir, "config.yaml"), "w") as f:
                f.write("test_after_fit: false\n")  # what the fit saved: a rung run does not test
            with open(r.summary_path, "w") as f:
                json.dump({"main_metric": "accuracy", "higher_is_better": True, "steps": 5 * 2 ** rung,
                           "val/accuracy": val[rung, lr]}, f)

    needed, result = search.state("v", lambda r: False)
    assert result is None and sorted(r.run_dir.rsplit("/", 1)[1] for r in needed) == [
        "rung0-lr0.0003", "rung0-lr0.001", "rung0-lr0.003", "rung0-lr0.01"]
    assert all("--trainer.max_steps=5" in r.args and "--test_after_fit=false" in r.args for r in needed)
    finish(needed)
    needed, result = search.state("v", lambda r: False)
    assert sorted(r.run_dir.rsplit("/", 1)[1] for r in needed) == ["rung1-lr0.001", "rung1-lr0.003"]
    assert all("--trainer.max_steps=10" in r.args for r in needed)
    finish(needed)
    needed, result = search.state("v", lambda r: False)
    assert not needed and result["chosen_lr"] == 1e-3 and result["metric"] == "val/accuracy"
    assert [r["kept"] for r in result["rungs"]] == [["0.003", "0.001"], ["0.001"]]
    assert "0.01" in result["rungs"][0]["failed"]


def test_data_efficiency_curves_on_nested_subsets(tmp_path, tiny_bert, reviews_csv):
    """`--train-rows 0.25,all`: each variant at each size (2 x 2 fits), the same nested subsets for every
    variant, a report with a data-efficiency section, table and plot."""
    from ftlab.data.module import TextClassificationData

    cfg = config(tmp_path, tiny_bert, reviews_csv)
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump({"head": ["--model.policy=Freeze", "--model.optim.lr=0.05"],
                                    "lora": ["--model.policy=Adapter", "--model.policy.r=4", "--model.optim.lr=0.01"]}))
    out = run_ftlab("compare", "--config", str(cfg), "--variants-file", str(path), "--budget-steps", "2",
                    "--train-rows", "all,0.25", "--runs-dir", str(tmp_path / "runs"), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    root = tmp_path / "runs" / "compare-task"
    caches = {}
    for name in ("head", "lora"):
        for rows, n in (("0.25", 40), ("all", 160)):  # 240 rows - 40 val - 40 test = 160
            run = root / name / f"rows{rows}" / "seed0"
            s = json.loads((run / "summary.json").read_text())
            assert (s["train_rows"], s["steps"], s["train_samples"]) == (n, 2, 32)
            log = (run / "fit.log").read_text()
            caches.setdefault(rows, set()).add(re.search(r"(?:cached in|tokenisation cache) ([^;\s]+)", log).group(1))
    assert all(len(c) == 1 for c in caches.values()) and caches["0.25"] != caches["all"]  # one subset per size
    small, full = (TextClassificationData(str(reviews_csv), tokenizer=str(tiny_bert), val_size=40, test_size=40,
                                          max_train_rows=m, cache_dir=str(tmp_path / "c")) for m in (0.25, None))
    for d in (small, full):
        d.setup()
    rows = {tuple(r["input_ids"]) + (r["labels"],) for r in full.splits["train"]}
    assert len(small.splits["train"]) == 40 and all(
        tuple(r["input_ids"]) + (r["labels"],) in rows for r in small.splits["train"])  # nested
    report = json.loads((root / "report.json").read_text())
    de = report["data_efficiency"]
    assert de["sizes"] == ["0.25", "all"] and report["train_rows"] == "all"
    for name in ("head", "lora"):
        assert [(p["rows"], p["train_rows"], p["seeds"]) for p in de["variants"][name]] == [("0.25", 40, 1), ("all", 160, 1)]
        summary = json.loads((root / name / "rowsall" / "seed0" / "summary.json").read_text())
        assert report["variants"][name]["metric_mean"] == summary["test/accuracy"]  # the table: the largest size
    md = (root / "report.md").read_text()
    assert "## Data efficiency" in md and "| 0.25 of the rows (40) |" in md and "| all rows (160) |" in md
    assert "Crossovers:" in md and "The frozen backbone (**head**) is" in md
    assert (root / "data_efficiency.png").read_bytes()[:4] == b"\x89PNG"


def test_tuned_learning_rate_is_the_best_on_validation(tmp_path, tiny_bert, reviews_csv):
    """`--tune lr` with a 3-rate grid: rung 0 (3 short fits, validated, not tested) keeps the best one, whose
    rate the seed then runs at; the report shows the search."""
    cfg = config(tmp_path, tiny_bert, reviews_csv)
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump({"head": ["--model.policy=Freeze", "--model.optim.lr=0.01"]}))
    out = run_ftlab("compare", "--config", str(cfg), "--variants-file", str(path), "--budget-steps", "3",
                    "--tune", "lr", "--lr-grid", "0.1,1,30", "--tune-steps", "4", "--runs-dir", str(tmp_path / "runs"),
                    timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    root = tmp_path / "runs" / "compare-task"
    scores = {}
    for lr in ("0.001", "0.01", "0.3"):
        s = json.loads((root / "head" / "tune" / f"rung0-lr{lr}" / "summary.json").read_text())
        assert s["steps"] == 4 and len(s["val_history"]) == 1 and not any(k.startswith("test/") for k in s)
        scores[float(lr)] = s["val/accuracy"]
    best = max(scores.values())
    chosen = min((lr for lr, v in scores.items() if v == best), key=lambda lr: (abs(math.log(lr / 0.01)), lr))
    tune = json.loads((root / "head" / "tune" / "tune.json").read_text())
    assert tune["chosen_lr"] == chosen and tune["metric"] == "val/accuracy"
    plan = json.loads((root / "head" / "seed0" / "compare-run.json").read_text())
    assert f"--model.optim.lr={chosen:g}" == [a for a in plan["args"] if a.startswith("--model.optim.lr=")][-1]
    assert json.loads((root / "head" / "seed0" / "summary.json").read_text())["steps"] == 3
    report = json.loads((root / "report.json").read_text())
    assert report["tuning"]["head"]["chosen_lr"] == chosen
    md = (root / "report.md").read_text()
    assert "## Learning rate search" in md and f"**head** {chosen:g} (of 0.001, 0.01, 0.3" in md
    assert re.search(rf"^\| head \| {chosen:g} \| 0\.\d{{4}} \| yes \|$", md, re.M), md
    assert (root / "lr_search.png").read_bytes()[:4] == b"\x89PNG"
    again = run_ftlab("compare", "--config", str(cfg), "--variants-file", str(path), "--budget-steps", "3",
                      "--tune", "lr", "--lr-grid", "0.1,1,30", "--tune-steps", "4", "--runs-dir", str(tmp_path / "runs"),
                      "--report-only", timeout=300)
    assert again.returncode == 0 and json.loads((root / "report.json").read_text())["tuning"] == report["tuning"]


def test_reading_when_the_best_variant_is_also_the_cheapest():
    # WNUT-16 at a short budget: the frozen head was both the best and the fastest; the reading must not call
    # the others "0.5x faster" nor say that extra cost buys quality
    from ftlab.compare.report import reading

    def variant(metric, wall, share):
        return {"metric_mean": metric, "metric_std": 0.01, "seeds": 3, "trainable_params": 1000,
                "trainable_share": share, "wall_time_s": wall, "peak_memory_mb": 900.0}

    report = {"metric": "test/f1", "higher_is_better": True, "missing": [],
              "variants": {"head": variant(0.15, 100.0, 0.001), "lora": variant(0.05, 250.0, 0.004),
                           "full": variant(0.14, 400.0, 1.0)}}
    lines = reading(report)
    assert lines[0].startswith("Best test/f1: **head**")
    assert "**full**: 0.0100 below head, training 100.00% of the weights, 4.0x slower, 1.00x the peak memory." in lines
    assert "**lora**: 0.1000 below head, training 0.40% of the weights, 2.5x slower, 1.00x the peak memory." in lines
    assert lines[-1] == "Knee: **head** is both the best and the cheapest: no trade-off to make here."
    assert not any("faster" in line for line in lines)

    report["variants"]["head"]["metric_mean"] = 0.10  # full is best now: the others are cheaper
    lines = reading(report)
    assert "Cheapest: **head**, 100 s (4.0x faster than full), 0.0400 below it." in lines
    assert "**lora**: 0.0900 below full, training 0.40% of the weights, 1.6x faster, 1.00x the peak memory." in lines
    assert lines[-1].startswith("Knee: no cheaper variant comes within 0.0200")
