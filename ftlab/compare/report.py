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
    """Why a run has no summary, in one line: its `ftlab: error:` line, else the last line of its log."""
    log = os.path.join(run.run_dir, "fit.log")
    if not os.path.exists(log):
        return "not run yet"
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("ftlab: error:")]
    return (errors or lines or ["no output"])[-1][:300]


def collect(runs: list[Run]) -> dict:
    """report.json's content: per variant, the metric over seeds and the cost figures, from whatever finished;
    runs that did not finish, or finished without the metric, are listed with the reason."""
    summaries: dict[str, list[dict]] = {}
    missing: list[dict] = []
    for run in runs:
        if os.path.exists(run.summary_path):
            with open(run.summary_path) as f:
                summaries.setdefault(run.variant, []).append({**json.load(f), "seed": run.seed, "dir": run.run_dir})
        else:
            missing.append({"variant": run.variant, "seed": run.seed, "why": failure(run)})
    finished = [s for ss in summaries.values() for s in ss]
    metric, higher = main_metric(finished)
    # one split for every run (test when all have it): a variant ranked on test against another on val is no
    # comparison; a run that recorded neither (a budget too short to validate or test) counts as missing
    split = next((sp for sp in ("test", "val") if finished and all(f"{sp}/{metric}" in s for s in finished)), None)
    if split is None:
        counts = {sp: sum(f"{sp}/{metric}" in s for s in finished) for sp in ("test", "val")}
        split = max(counts, key=counts.get)
    key = f"{split}/{metric}"
    variants = {}
    for name in dict.fromkeys(r.variant for r in runs):
        ss = summaries.get(name, [])
        without = [s for s in ss if s.get(key) is None]
        missing += [{"variant": name, "seed": s["seed"], "why": f"finished after {s.get('steps')} step(s) without "
                     f"{key} (no {split} loop ran: raise the budget, or validate more often)"} for s in without]
        ss = [s for s in ss if s.get(key) is not None]
        if not ss:
            variants[name] = {"seeds": 0}
            continue
        mean, std = _mean_std([s[key] for s in ss])
        first = ss[0]
        variants[name] = {
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
            "val_curve": _mean_curve([s.get("val_history", []) for s in ss], f"val/{metric}"),
            "runs": [s["dir"] for s in ss],
        }
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
    return {"metric": key if done else None, "higher_is_better": higher, "variants": variants,
            "val_target_95pct": target, "missing": missing}


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


def reading(report: dict) -> list[str]:
    """The trade-off in plain words: who wins on quality, on cost, and the knee between them; then what is
    missing from the comparison."""
    done = {n: v for n, v in report["variants"].items() if v.get("metric_mean") is not None}
    lines = _ranking(report, done) if done else ["No variant has a result yet: nothing to compare."]
    for m in report.get("missing", []):
        lines.append(f"Missing: {m['variant']} seed {m['seed']}: {m['why']}")
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
                     f"{_ratio(b['wall_time_s'], v['wall_time_s'])} faster, {memory} the peak memory.")
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
    else:
        lines.append(f"Knee: no cheaper variant comes within {margin:.4f} ({noise}) of **{best}**; "
                     "the extra cost buys real quality here.")
    return lines


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
    plots = plot(report, out_dir) if any(v.get("seeds") for v in report["variants"].values()) else []
    head = [h.format(metric=report["metric"] or "metric") for h in TABLE_HEAD]
    rows = table_rows(report)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = [f"# {title}", "", *[f"- {line}" for line in report["reading"]], "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in rows], "",
          *[f"![{p}]({p})" for p in plots], ""]
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
            "<div class='plots'>", *[f"<img src='{p}' alt='{p}'>" for p in plots], "</div></body></html>"]
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write("\n".join(page))
    return {"json": "report.json", "md": "report.md", "html": "report.html", **{p: p for p in plots}}
