"""The comparison report: numbers per variant (mean and spread over seeds) from each run's summary.json,
a plain-language reading of the trade-off, plots, and the same as JSON, Markdown and HTML."""

from __future__ import annotations

import html
import json
import math
import os
import statistics

from ftlab.compare.runner import Run


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main_metric(summaries: list[dict]) -> tuple[str, bool]:
    """The task's main metric and its direction, as the runs recorded them (older summaries: their
    `best/val/<metric>` key, with the direction guessed from the name)."""
    for s in summaries:
        if "main_metric" in s:
            return s["main_metric"], bool(s.get("higher_is_better", True))
    metric = next((k[len("best/val/"):] for s in summaries for k in s if k.startswith("best/val/")), None)
    if metric is None:  # nothing validated: a task metric it was tested on
        metric = next((m for m in _TASK_METRICS for s in summaries if f"test/{m}" in s), "loss")
    return metric, metric != "loss" and "perplexity" not in metric


_TASK_METRICS = ("accuracy", "f1", "reward_accuracy", "rougeL_fmeasure", "perplexity")  # ftlab's tasks' main ones


def failure(run: Run) -> str:
    """Why a run did not finish, in one line: made with other settings or stopped before its test (it has a
    summary), else its `ftlab: error:` line, else the last line of its log."""
    if os.path.exists(run.summary_path):
        if not run._same_plan():
            return "made with other settings (other arguments, or a --config edited since): run the command again"
        return "trained, but stopped before its test loop finished: run the same command again to rerun it"
    log = os.path.join(run.run_dir, "fit.log")
    if not os.path.exists(log):
        return "not run yet"
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("ftlab: error:")]
    return (errors or lines or ["no output"])[-1][:300]


def collect(runs: list[Run]) -> dict:
    """report.json's content: per variant, the metric over seeds and the cost figures, from whatever finished;
    runs that did not finish, or finished without the metric, are listed with the reason. With training-set
    sizes (--train-rows), the table is the largest size's, and `data_efficiency` holds every size's."""
    summaries: dict[tuple[str, str | None], list[dict]] = {}
    missing: list[dict] = []
    for run in runs:
        if run.finished():
            with open(run.summary_path) as f:
                summaries.setdefault((run.variant, run.rows), []).append(
                    {**json.load(f), "seed": run.seed, "dir": run.run_dir})
        else:
            missing.append({"variant": run.variant, "rows": run.rows, "seed": run.seed, "why": failure(run)})
    finished = [s for ss in summaries.values() for s in ss]
    metric, higher = main_metric(finished)
    # one split for every run (test when all have it): a variant ranked on test against another on val is no
    # comparison; a run that recorded neither (a budget too short to validate or test) counts as missing
    split = next((sp for sp in ("test", "val") if finished and all(f"{sp}/{metric}" in s for s in finished)), None)
    if split is None:
        counts = {sp: sum(f"{sp}/{metric}" in s for s in finished) for sp in ("test", "val")}
        split = max(counts, key=counts.get)
    key = f"{split}/{metric}"
    names = list(dict.fromkeys(r.variant for r in runs))
    sizes = list(dict.fromkeys(r.rows for r in runs))
    kept: dict[tuple[str, str | None], list[dict]] = {}
    for name in names:
        for rows in sizes:
            ss = summaries.get((name, rows), [])
            # a finished run without a test metric was not to test (test_after_fit off, no test split held out)
            cause = ("its fit ran no test loop: test_after_fit is off, or no test split" if split == "test"
                     else "no validation within its budget: raise the budget, or validate more often")
            missing += [{"variant": name, "rows": rows, "seed": s["seed"],
                         "why": f"finished after {s.get('steps')} step(s) without {key} ({cause})"}
                        for s in ss if s.get(key) is None]
            kept[name, rows] = [s for s in ss if s.get(key) is not None]
    headline = sizes[-1]  # the largest training set (sizes come smallest first)
    variants = {name: _variant(kept[name, headline], key) for name in names}
    done = {n: v for n, v in variants.items() if v.get("metric_mean") is not None}
    curves = {n: v["val_curve"] for n, v in done.items() if v["val_curve"]}
    target = None
    if curves:  # on the validation curves: the final validation value of the best variant is the reference
        pick = max if higher else min
        reference = pick(curve[-1]["value"] for curve in curves.values())
        target = 0.95 * reference if higher else reference / 0.95
        for n, curve in curves.items():
            done[n]["steps_to_95pct_of_best"] = next(
                (p["step"] for p in curve if (p["value"] >= target if higher else p["value"] <= target)), None)
    report = {"metric": key if done else None, "higher_is_better": higher, "variants": variants,
              "val_target_95pct": target, "missing": missing}
    if headline is not None:
        report["train_rows"] = headline
        report["data_efficiency"] = {
            "sizes": sizes,
            "variants": {name: [_point(rows, kept[name, rows], key) for rows in sizes] for name in names}}
    return report


def _point(rows: str, ss: list[dict], key: str) -> dict:
    """One size of a data-efficiency curve: the metric over seeds, and the training rows the runs recorded."""
    mean, std = _mean_std([s[key] for s in ss])
    counts = sorted({s["train_rows"] for s in ss if s.get("train_rows")})
    return {"rows": rows, "train_rows": counts[0] if len(counts) == 1 else (counts or None),
            "seeds": len(ss), "metric_mean": mean, "metric_std": std if len(ss) > 1 else None,
            "metric_per_seed": {s["seed"]: s[key] for s in ss},
            "steps": sorted({s.get("steps") for s in ss if s.get("steps") is not None}),
            "train_samples": sorted({s.get("train_samples") for s in ss if s.get("train_samples") is not None}),
            "wall_time_s": _mean_std([s.get("wall_time_s") for s in ss])[0]}


def _variant(ss: list[dict], key: str) -> dict:
    if not ss:
        return {"seeds": 0}
    mean, std = _mean_std([s[key] for s in ss])
    first = ss[0]
    return {
        "seeds": len(ss),
        "metric_mean": mean,
        "metric_std": std if len(ss) > 1 else None,  # one seed: no spread to show
        "metric_per_seed": {s["seed"]: s[key] for s in ss},
        "policy": first.get("policy"),
        "trainable_params": first.get("trainable_params"),
        "total_params": first.get("total_params"),
        "trainable_share": (first.get("trainable_params") or 0) / max(first.get("total_params") or 1, 1),
        "peak_memory_mb": _mean_std([s.get("peak_memory_mb") for s in ss])[0],
        "wall_time_s": _mean_std([s.get("wall_time_s") for s in ss])[0],
        "train_samples_per_s": _mean_std([s.get("train_samples_per_s") for s in ss])[0],
        "train_tokens_per_s": _mean_std([s.get("train_tokens_per_s") for s in ss])[0],
        "steps": first.get("steps"),
        "train_rows": first.get("train_rows"),
        "val_curve": _mean_curve([s.get("val_history", []) for s in ss], f"val/{key.split('/', 1)[1]}"),
        "runs": [s["dir"] for s in ss],
    }


def _mean_curve(histories: list[list[dict]], key: str) -> list[dict]:
    """The validation curve averaged over seeds, at the steps every seed validated."""
    by_step: dict[int, list[float]] = {}
    for history in histories:
        for point in history:
            if key in point:
                by_step.setdefault(point["step"], []).append(point[key])
    n = len(histories)
    return [{"step": step, "value": statistics.fmean(vals)} for step, vals in sorted(by_step.items()) if len(vals) == n]


def _pm(v: dict) -> str:
    """mean ± std, or the mean and "1 seed" where there is no spread."""
    if v.get("metric_std") is None:
        return f"{v['metric_mean']:.4f} (1 seed)"
    return f"{v['metric_mean']:.4f} ± {v['metric_std']:.4f}"


def _ratio(a, b) -> str:
    return f"{a / b:.1f}x" if a and b else "?x"


def _speed(best_s, other_s) -> str:
    """Another variant's training time against the best's: "1.2x faster", or "2.2x slower" (not "0.5x faster")."""
    if not best_s or not other_s or other_s <= best_s:
        return f"{_ratio(best_s, other_s)} faster"
    return f"{_ratio(other_s, best_s)} slower"


def reading(report: dict) -> list[str]:
    """The trade-off in plain words: who wins on quality, on cost, and the knee between them; then what is
    missing from the comparison."""
    done = {n: v for n, v in report["variants"].items() if v.get("metric_mean") is not None}
    lines = _ranking(report, done) if done else ["No variant has a result yet: nothing to compare."]
    if report.get("train_rows") is not None:
        lines[0] = f"At {_rows_label(report['train_rows'])}: {lines[0]}"
    for m in report.get("missing", []):
        rows = f" rows {m['rows']}" if m.get("rows") else ""
        lines.append(f"Missing: {m['variant']}{rows} seed {m['seed']}: {m['why']}")
    return lines


def _ranking(report: dict, done: dict) -> list[str]:
    metric, higher = report["metric"], report["higher_is_better"]
    order = sorted(done, key=lambda n: done[n]["metric_mean"], reverse=higher)
    best, b = order[0], done[order[0]]
    spread = f" ± {b['metric_std']:.4f}" if b["metric_std"] is not None else ""
    lines = [f"Best {metric}: **{best}** ({b['metric_mean']:.4f}{spread} over {b['seeds']} seed(s)), training "
             f"{b['trainable_params'] or 0:,} parameters ({100 * b['trainable_share']:.2f}%) in {_fmt(b['wall_time_s'])} s."]
    if len(done) == 1:
        return lines + [f"Only **{best}** has a result: nothing to compare it with yet."]
    cheapest = min(done, key=lambda n: done[n]["wall_time_s"] or math.inf)
    c = done[cheapest]
    below = "below" if higher else "above"
    if cheapest != best:
        gap = abs(b["metric_mean"] - c["metric_mean"])
        lines.append(f"Cheapest: **{cheapest}**, {_fmt(c['wall_time_s'])} s ({_ratio(b['wall_time_s'], c['wall_time_s'])} "
                     f"faster than {best}), {gap:.4f} {below} it.")
    for n in order[1:]:  # the others, against the best
        if n == cheapest:
            continue
        v = done[n]
        memory = (f"{v['peak_memory_mb'] / b['peak_memory_mb']:.2f}x" if v["peak_memory_mb"] and b["peak_memory_mb"]
                  else "?x")
        lines.append(f"**{n}**: {abs(b['metric_mean'] - v['metric_mean']):.4f} {below} {best}, "
                     f"training {100 * v['trainable_share']:.2f}% of the weights, "
                     f"{_speed(b['wall_time_s'], v['wall_time_s'])}, {memory} the peak memory.")
    # the knee: the cheapest variant whose metric is within the best's noise (2 std, at least 0.005)
    margin = max(2 * (b["metric_std"] or 0.0), 0.005)
    noise = "the seeds' noise" if b["metric_std"] is not None else "one seed: no measure of noise, 0.005 assumed"
    close = [n for n in done if abs(done[n]["metric_mean"] - b["metric_mean"]) <= margin]
    knee = min(close, key=lambda n: done[n]["wall_time_s"] or math.inf)
    if knee != best:
        k = done[knee]
        lines.append(f"Knee: **{knee}** is within {margin:.4f} of the best ({noise}) at "
                     f"{_ratio(b['wall_time_s'], k['wall_time_s'])} less time and {k['trainable_params'] or 0:,} trainable "
                     f"parameters: the better buy.")
    elif cheapest == best:  # no cheaper variant exists: there is no cost to weigh against quality
        lines.append(f"Knee: **{best}** is both the best and the cheapest: no trade-off to make here.")
    else:
        lines.append(f"Knee: no cheaper variant comes within {margin:.4f} ({noise}) of **{best}**; "
                     "the extra cost buys real quality here.")
    return lines


def _rows_label(rows: str, train_rows=None) -> str:
    """How a size reads: "300 rows", "all rows (2,400)", "0.1 of the rows (240)"."""
    n = f" ({train_rows:,})" if isinstance(train_rows, int) else ""
    if rows == "all":
        return f"all rows{n}"
    if "." in str(rows):
        return f"{rows} of the rows{n}"
    return f"{int(rows):,} rows"


def _cell(p: dict) -> str:
    if p.get("metric_mean") is None:
        return "-"
    return _pm(p)


def efficiency_reading(report: dict) -> list[str]:
    """The data-efficiency curves in plain words: up to which size the frozen backbone (else the cheapest
    variant) is within noise of the best, from which size each other variant stays within it, and where
    two variants' curves cross."""
    de, higher = report["data_efficiency"], report["higher_is_better"]
    sizes = de["sizes"]
    points = {n: {p["rows"]: p for p in ps if p["metric_mean"] is not None} for n, ps in de["variants"].items()}
    names = [n for n in points if points[n]]
    if len(names) < 2:
        return ["Data efficiency: fewer than two variants have results; no curves to compare."]
    name_of = {}
    for ps in de["variants"].values():
        for p in ps:
            name_of.setdefault(p["rows"], _rows_label(p["rows"], p["train_rows"]))
    best: dict[str, str] = {}
    close: dict[str, set[str]] = {}
    margin: dict[str, float] = {}
    for rows in sizes:
        at = {n: points[n][rows] for n in names if rows in points[n]}
        if not at:
            continue
        b = (max if higher else min)(at, key=lambda n: at[n]["metric_mean"])
        best[rows] = b
        margin[rows] = max(2 * (at[b]["metric_std"] or 0.0), 0.005)
        close[rows] = {n for n in at if abs(at[n]["metric_mean"] - at[b]["metric_mean"]) <= margin[rows]}
    measured = [r for r in sizes if r in best]
    variants = report["variants"]
    frozen = next((n for n in names if str((variants.get(n) or {}).get("policy")).lower() == "freeze"), None)
    cheap = frozen or min(names, key=lambda n: (variants.get(n) or {}).get("wall_time_s") or math.inf)
    what = f"the frozen backbone (**{cheap}**)" if frozen else f"the cheapest variant (**{cheap}**)"
    lines = [f"Data efficiency ({report['metric']} against training rows; within noise: 2 std of the best at that "
             f"size, at least 0.005):"]
    prefix = []
    for rows in measured:
        if cheap not in close[rows]:
            break
        prefix.append(rows)
    if len(prefix) == len(measured):
        lines.append(f"{what[0].upper()}{what[1:]} is within noise of the best at every size, up to "
                     f"{name_of[measured[-1]]}" + (": on this task, adapting the backbone buys nothing measurable."
                                                   if frozen else "."))
    elif not prefix:
        r = measured[0]
        lines.append(f"{what[0].upper()}{what[1:]} is not within noise of the best even at {name_of[r]} "
                     f"(**{best[r]}** leads by {_gap(points, best[r], cheap, r)}).")
    else:
        r, nxt = prefix[-1], measured[len(prefix)]
        lines.append(f"Up to {name_of[r]}, {what} is within noise of the best; from {name_of[nxt]} on it is not "
                     f"(**{best[nxt]}** leads by {_gap(points, best[nxt], cheap, nxt)}).")
    for n in names:
        if n == cheap:
            continue
        stays = [r for i, r in enumerate(measured) if all(n in close[q] for q in measured[i:])]
        if len(stays) == len(measured):
            lines.append(f"**{n}** is within noise of the best at every size.")
        elif stays:
            lines.append(f"**{n}** catches up from {name_of[stays[0]]}: within noise of the best from there on.")
        else:
            lines.append(f"**{n}** is not within noise of the best at the largest size ({name_of[measured[-1]]}).")
    crossings = []
    for i, a in enumerate(names):
        for c in names[i + 1:]:
            shared = [r for r in measured if r in points[a] and r in points[c]]
            for r0, r1 in zip(shared, shared[1:]):
                d0 = points[a][r0]["metric_mean"] - points[c][r0]["metric_mean"]
                d1 = points[a][r1]["metric_mean"] - points[c][r1]["metric_mean"]
                if d0 * d1 < 0:
                    ahead = a if (d1 > 0) == higher else c
                    behind = c if ahead == a else a
                    crossings.append(f"**{ahead}** overtakes **{behind}** between {name_of[r0]} and {name_of[r1]}")
    lines.append("Crossovers: " + "; ".join(crossings) + "." if crossings else
                 "Crossovers: none; the curves keep their order at every size measured.")
    return lines


def _gap(points: dict, a: str, b: str, rows: str) -> str:
    return f"{abs(points[a][rows]['metric_mean'] - points[b][rows]['metric_mean']):.4f}"


def efficiency_table(report: dict) -> tuple[list[str], list[list[str]]]:
    de = report["data_efficiency"]
    names = list(de["variants"])
    head = ["training rows", *[f"{n} ({report['metric'] or 'metric'})" for n in names]]
    rows = []
    for i, size in enumerate(de["sizes"]):
        counts = {de["variants"][n][i]["train_rows"] for n in names} - {None}
        count = next(iter(counts)) if len(counts) == 1 else None
        rows.append([_rows_label(size, count)] + [_cell(de["variants"][n][i]) for n in names])
    return head, rows


def tuning_reading(report: dict) -> list[str]:
    parts = []
    metric = next((t["metric"] for t in report["tuning"].values() if t.get("metric")), "the validation metric")
    for n, t in report["tuning"].items():
        parts.append(f"**{n}** {t['chosen_lr']:g} (of {', '.join(f'{x:g}' for x in t['grid'])}; configured "
                     f"{t['base_lr']:g})")
    return [f"Learning rates, tuned on {metric} by successive halving: " + "; ".join(parts) + "."]


def tuning_table(report: dict) -> tuple[list[str], list[list[str]]]:
    depth = max((len(t["rungs"]) for t in report["tuning"].values()), default=0)
    steps = next((t["rungs"] for t in report["tuning"].values() if len(t["rungs"]) == depth), [])
    head = ["variant", "learning rate", *[f"rung {i} ({r['steps']} steps)" for i, r in enumerate(steps)], "used"]
    rows = []
    for n, t in report["tuning"].items():
        for lr in t["grid"]:
            cells = []
            for r in t["rungs"]:
                key = f"{lr:g}"
                if key not in r["scores"]:
                    cells.append("")
                elif r["scores"][key] is None:
                    cells.append("failed")
                else:
                    cells.append(f"{r['scores'][key]:.4f}")
            cells += [""] * (depth - len(t["rungs"]))
            rows.append([n, f"{lr:g}", *cells, "yes" if lr == t["chosen_lr"] else ""])
    return head, rows


def _fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


TABLE_HEAD = ["variant", "policy", "{metric} (mean ± std)", "seeds", "trainable params", "share",
              "peak memory MB", "wall time s", "samples/s", "tokens/s", "steps to 95% of best"]


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for name, v in report["variants"].items():
        if not v.get("seeds"):
            rows.append([name, "-", "no result (see Missing)", "0"] + ["-"] * 7)
            continue
        rows.append([name, str(v["policy"]), _pm(v), str(v["seeds"]),
                     _fmt(v["trainable_params"]), f"{100 * v['trainable_share']:.2f}%", _fmt(v["peak_memory_mb"]),
                     _fmt(v["wall_time_s"]), _fmt(v["train_samples_per_s"], ",.1f"), _fmt(v["train_tokens_per_s"]),
                     _fmt(v.get("steps_to_95pct_of_best"))])
    return rows


def plot(report: dict, out_dir: str) -> list[str]:
    """PNG plots: metric vs trainable params (log x), metric vs wall time, validation curves, peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {n: v for n, v in report["variants"].items() if v.get("metric_mean") is not None}
    metric = report["metric"]
    files: list[str] = []
    if not done:
        return files
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(done)}

    def scatter(x_key: str, xlabel: str, name: str, logx: bool) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for n, v in done.items():
            if v[x_key] is None:
                continue
            ax.errorbar(v[x_key], v["metric_mean"], yerr=v["metric_std"], fmt="o", ms=8, capsize=4,
                        color=colors[n], label=n)
            ax.annotate(n, (v[x_key], v["metric_mean"]), textcoords="offset points", xytext=(8, 6), fontsize=9)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (mean ± std over seeds)")
        ax.set_title(f"{metric} vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.15)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name))
        plt.close(fig)
        files.append(name)

    scatter("trainable_params", "trainable parameters (log scale)", "metric_vs_trainable_params.png", True)
    scatter("wall_time_s", "training wall time (s)", "metric_vs_wall_time.png", False)

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for n, v in done.items():
        curve = v["val_curve"]
        if curve:
            ax.plot([p["step"] for p in curve], [p["value"] for p in curve], marker="o", color=colors[n], label=n)
    if report.get("val_target_95pct") is not None:
        ax.axhline(report["val_target_95pct"], ls="--", color="gray", lw=1, label="95% of the best final value")
    ax.set_xlabel("training step")
    ax.set_ylabel(metric.replace("test/", "val/"))
    ax.set_title("validation curves (mean over seeds)")
    ax.grid(alpha=0.3)
    if any(v["val_curve"] for v in done.values()):
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "validation_curves.png"))
    plt.close(fig)
    files.append("validation_curves.png")

    if report.get("data_efficiency"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for i, (n, ps) in enumerate(report["data_efficiency"]["variants"].items()):
            ps = [p for p in ps if p["metric_mean"] is not None and isinstance(p["train_rows"], int)]
            if not ps:
                continue
            x = [p["train_rows"] for p in ps]
            y = [p["metric_mean"] for p in ps]
            sd = [p["metric_std"] or 0.0 for p in ps]
            color = colors.get(n, plt.cm.tab10(i % 10))
            ax.plot(x, y, marker="o", color=color, label=n)
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], color=color, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("training rows (log scale)")
        ax.set_ylabel(f"{metric} (mean ± std over seeds)")
        ax.set_title("data efficiency")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "data_efficiency.png"))
        plt.close(fig)
        files.append("data_efficiency.png")

    if report.get("tuning"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for i, (n, t) in enumerate(report["tuning"].items()):
            color = colors.get(n, plt.cm.tab10(i % 10))
            for k, r in enumerate(t["rungs"]):
                pts = [(float(lr), v) for lr, v in r["scores"].items() if v is not None]
                if pts:
                    ax.plot(*zip(*sorted(pts)), marker="o", ls="-" if k == 0 else ":", color=color,
                            label=f"{n} ({r['steps']} steps)")
            chosen = [v for r in t["rungs"] for lr, v in r["scores"].items()
                      if v is not None and float(lr) == t["chosen_lr"]]
            if chosen:
                ax.plot([t["chosen_lr"]], [chosen[-1]], marker="*", ms=16, color=color, ls="none")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel(next((t["metric"] for t in report["tuning"].values() if t.get("metric")), "validation metric"))
        ax.set_title("learning rate search (star: the rate used)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "lr_search.png"))
        plt.close(fig)
        files.append("lr_search.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    names = list(done)
    bars = ax.bar(names, [done[n]["peak_memory_mb"] or 0 for n in names], color=[colors[n] for n in names])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("peak memory (MB)")
    ax.set_title("peak memory per variant")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "peak_memory.png"))
    plt.close(fig)
    files.append("peak_memory.png")
    return files


def write(report: dict, out_dir: str, title: str) -> dict[str, str]:
    """report.json, report.md, report.html and the plots, in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    report = {**report, "reading": reading(report)}
    if report.get("tuning"):
        report["reading"] = tuning_reading(report) + report["reading"]
    sections = []  # (title, reading lines, table head, table rows)
    if report.get("data_efficiency"):
        report["data_efficiency_reading"] = efficiency_reading(report)
        sections.append(("Data efficiency", report["data_efficiency_reading"], *efficiency_table(report)))
    if report.get("tuning"):
        sections.append(("Learning rate search", [], *tuning_table(report)))
    has_results = any(v.get("seeds") for v in report["variants"].values()) or any(
        p["seeds"] for ps in (report.get("data_efficiency") or {}).get("variants", {}).values() for p in ps)
    plots = plot(report, out_dir) if has_results else []
    head = [h.format(metric=report["metric"] or "metric") for h in TABLE_HEAD]
    rows = table_rows(report)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)

    def md_table(h: list[str], rs: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(h) + " |", "|" + "---|" * len(h), *["| " + " | ".join(r) + " |" for r in rs]]

    md = [f"# {title}", "", *[f"- {line}" for line in report["reading"]], "", *md_table(head, rows), ""]
    for name, lines, h, rs in sections:
        md += [f"## {name}", "", *[f"- {line}" for line in lines], *([""] if lines else []), *md_table(h, rs), ""]
    md += [*[f"![{p}]({p})" for p in plots], ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md))

    def bold(s: str) -> str:
        parts = html.escape(s).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    page = ["<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
            "text-align:right}td:first-child,th:first-child,td:nth-child(2){text-align:left}th{background:#f3f3f3}"
            ".plots{display:grid;grid-template-columns:1fr 1fr;gap:12px}.plots img{width:100%}</style></head><body>",
            f"<h1>{html.escape(title)}</h1><ul>", *[f"<li>{bold(line)}</li>" for line in report["reading"]], "</ul>",
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>",
            *["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows], "</table>",
            *[part for name, lines, h, rs in sections for part in (
                f"<h2>{html.escape(name)}</h2>",
                *(["<ul>", *[f"<li>{bold(line)}</li>" for line in lines], "</ul>"] if lines else []),
                "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in h) + "</tr>",
                *["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rs], "</table>")],
            "<div class='plots'>", *[f"<img src='{p}' alt='{p}'>" for p in plots], "</div></body></html>"]
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write("\n".join(page))
    return {"json": "report.json", "md": "report.md", "html": "report.html", **{p: p for p in plots}}


def to_wandb(report: dict, out_dir: str, files: dict[str, str], project: str, group: str) -> str:
    """The report as a W&B run of the comparison's group (job type `compare`, beside its runs): the table
    as a W&B table, the plots as images, the reading in the summary. Returns the run's id."""
    import wandb

    head = [h.format(metric=report["metric"] or "metric") for h in TABLE_HEAD]
    run = wandb.init(project=project, group=group, job_type="compare", name=f"{group}-report", dir=out_dir,
                     config={"metric": report["metric"], "variants": list(report["variants"])})
    try:
        images = {f"compare/{os.path.splitext(f)[0]}": wandb.Image(os.path.join(out_dir, f))
                  for f in files.values() if f.endswith(".png")}
        run.log({"compare/table": wandb.Table(columns=head, data=table_rows(report)), **images})
        run.summary.update({"reading": "\n".join(reading(report)), "metric": report["metric"]})
        return run.id
    finally:
        run.finish()

