"""The summary of an output directory: per run accuracy with a 95% Wilson interval, tokens/s,
the steered share (over the tokens the grader reads, and over every generated token) and steered
tokens per category; across runs the gap the hybrid recovers. As JSON and as a markdown table."""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from .data import Problem
from .metrics import gap_recovered, gap_recovered_paper, wilson_interval
from .run import RUNS, _atomic_write, read_results


def _run_summary(recs: list[dict], names: dict | None = None) -> dict:
    n = len(recs)
    k = sum(bool(r.get("correct")) for r in recs)
    lo, hi = wilson_interval(k, n)
    tokens = sum(int(r.get("n_tokens", 0)) for r in recs)
    secs = sum(float(r.get("gen_s", 0.0)) for r in recs)
    steered = sum(int(r.get("n_steered", 0)) for r in recs)
    # the tokens the grader reads; records without the count (runs not cut) read every token
    graded = sum(int(r.get("n_tokens_graded", r.get("n_tokens", 0))) for r in recs)
    steered_graded = sum(int(r.get("n_steered_graded", r.get("n_steered", 0))) for r in recs)
    cats: Counter = Counter()
    for r in recs:
        cats.update({str(c): int(v) for c, v in (r.get("categories") or {}).items()})
    out = dict(n=n, correct=k, accuracy=k / n if n else None, ci95=[lo, hi], tokens=tokens,
               mean_tokens=tokens / n if n else None, tokens_per_s=tokens / secs if secs > 0 else None,
               gen_s=secs, stopped=sum(bool(r.get("stopped")) for r in recs),
               errors=sum("error" in r for r in recs), steered_tokens=steered,
               steered_share=steered_graded / graded if graded else 0.0,
               steered_share_raw=steered / tokens if tokens else 0.0, graded_tokens=graded,
               category_counts={c: cats[c] for c in sorted(cats, key=lambda c: (len(c), c))})
    if names:
        out["category_names"] = {c: names.get(c, c) for c in out["category_counts"]}
    return out


def summarize(out_dir, problems: Sequence[Problem] | None = None, category_names: Sequence[str] | None = None) -> dict:
    """The summary of every run in `out_dir` (restricted to `problems` when given)."""
    out_dir = Path(out_dir)
    wanted = None if problems is None else {p.idx for p in problems}
    runs: dict[str, list[dict]] = {}
    others = sorted(d.name for d in out_dir.iterdir() if d.is_dir() and d.name not in RUNS) if out_dir.exists() else []
    for name in [*RUNS, *others]:
        d = out_dir / name
        if not d.is_dir():
            continue
        recs = read_results(d)
        if wanted is not None:
            recs = {i: r for i, r in recs.items() if i in wanted}
        if recs:
            runs[name] = [recs[i] for i in sorted(recs)]
    names = {str(i): n for i, n in enumerate(category_names or [])}
    datasets = sorted({r.get("dataset") for rs in runs.values() for r in rs} - {None})
    summary = dict(dataset=datasets[0] if len(datasets) == 1 else datasets,
                   n_problems=len(wanted) if wanted is not None else max((len(v) for v in runs.values()), default=0),
                   runs={})
    for name, recs in runs.items():
        s = _run_summary(recs, names if name == "hybrid" else None)
        s["complete"] = wanted is None or len(recs) == len(wanted)
        cfg = out_dir / name / "config.json"
        if cfg.exists():
            try:
                s["config"] = json.loads(cfg.read_text())
            except (OSError, json.JSONDecodeError):
                pass
        summary["runs"][name] = s
    if all(r in runs for r in RUNS):
        common = set.intersection(*({r["idx"] for r in runs[name]} for name in RUNS))
        acc = {name: sum(bool(r.get("correct")) for r in runs[name] if r["idx"] in common) / len(common)
               for name in RUNS} if common else None
        if acc:
            summary["gap"] = dict(
                n=len(common), base=acc["base"], thinking=acc["thinking"], hybrid=acc["hybrid"],
                gap_recovered=gap_recovered(acc["base"], acc["hybrid"], acc["thinking"]),
                gap_recovered_paper=gap_recovered_paper(acc["base"], acc["hybrid"], acc["thinking"]))
    return summary


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(summary: dict) -> str:
    """The summary as a markdown table (the paper's table, one row per run)."""
    ds = summary.get("dataset")
    lines = [f"## {ds if isinstance(ds, str) else ', '.join(ds) or 'evaluation'}: {summary.get('n_problems', 0)} problems", "",
             "| run | accuracy | 95% CI | correct / n | mean tokens | steered share (graded / all tokens) | tokens/s |",
             "| --- | ---: | :---: | ---: | ---: | ---: | ---: |"]
    for name, s in summary["runs"].items():
        lo, hi = s["ci95"]
        steer = (f"{_pct(s['steered_share'])} / {_pct(s.get('steered_share_raw', s['steered_share']))}"
                 if name == "hybrid" or s["steered_tokens"] else "–")
        tps = "–" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f}"
        mean = "–" if s["mean_tokens"] is None else f"{s['mean_tokens']:.0f}"
        lines.append(f"| {name}{'' if s['complete'] else ' (incomplete)'} | {_pct(s['accuracy'])} | "
                     f"[{100 * lo:.1f}, {100 * hi:.1f}] | {s['correct']} / {s['n']} | {mean} | {steer} | {tps} |")
    gap = summary.get("gap")
    if gap and gap["gap_recovered"] is None:
        lines += ["", f"Gap recovered: n/a (thinking and base are equally accurate on the {gap['n']} problems "
                      "every run finished)."]
    elif gap:
        lines += ["", f"Gap recovered (hybrid − base) / (thinking − base): **{_pct(gap['gap_recovered'])}**; "
                      f"the paper code's variant max(0, (hybrid − min(thinking, base)) / |thinking − base|): "
                      f"{_pct(gap['gap_recovered_paper'])} (over {gap['n']} problems every run finished)."]
    h = summary["runs"].get("hybrid")
    if h and h["category_counts"]:
        names = h.get("category_names") or {}
        lines += ["", "| category | steered tokens | share of steered |", "| --- | ---: | ---: |"]
        for c, v in h["category_counts"].items():
            lines.append(f"| {names.get(c, c)} | {v} | {_pct(v / h['steered_tokens'] if h['steered_tokens'] else None)} |")
    return "\n".join(lines) + "\n"


def figure_data(summary: dict) -> dict:
    """What `summary_figure` draws: per run accuracy and its 95% interval, the hybrid's steered
    shares (graded / all tokens). Saved beside the pixels in the PNG's Description."""
    runs = summary["runs"]
    steered = {n: dict(graded=s["steered_share"], all=s.get("steered_share_raw", s["steered_share"]))
               for n, s in runs.items() if n == "hybrid" or s["steered_tokens"]}
    return dict(runs=list(runs), accuracy=[runs[n]["accuracy"] for n in runs],
                ci95=[list(runs[n]["ci95"]) for n in runs], n=[runs[n]["n"] for n in runs], steered_share=steered,
                gap_recovered=(summary.get("gap") or {}).get("gap_recovered"))


def _title(summary: dict) -> str:
    ds = summary.get("dataset")
    return f"{ds if isinstance(ds, str) else ', '.join(ds) or 'evaluation'}: {summary.get('n_problems', 0)} problems"


def summary_figure(summary: dict):
    """A matplotlib figure of the summary: accuracy per run with its 95% Wilson interval, and the
    share of steered tokens of the runs that steer (graded tokens and all tokens)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = figure_data(summary)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw=dict(width_ratios=[max(2, len(d["runs"])), 2]))
    acc = [float("nan") if x is None else x for x in d["accuracy"]]
    err = [[max(0.0, x - lo) for x, (lo, _) in zip(acc, d["ci95"])], [max(0.0, hi - x) for x, (_, hi) in
                                                                       zip(acc, d["ci95"])]]
    bars = a.bar(d["runs"], acc, yerr=err, capsize=6, color=["#8c8c8c", "#4c72b0", "#dd8452", "#55a868"][:len(acc)])
    for r, x, n in zip(bars, acc, d["n"]):
        if x == x:
            a.annotate(f"{100 * x:.1f}%\n(n={n})", (r.get_x() + r.get_width() / 2, x), xytext=(0, 3),
                       textcoords="offset points", ha="center", va="bottom", fontsize=8)
    a.set_ylim(0, 1.15)
    a.set_ylabel("accuracy (95% Wilson interval)")
    gap = d["gap_recovered"]
    a.set_title("accuracy" + (f"; gap recovered {100 * gap:.1f}%" if gap is not None else ""), fontsize=10)
    names = list(d["steered_share"])
    x = range(len(names))
    graded = [d["steered_share"][n]["graded"] for n in names]
    raw = [d["steered_share"][n]["all"] for n in names]
    b.bar([i - 0.2 for i in x], graded, width=0.4, label="graded tokens", color="#dd8452")
    b.bar([i + 0.2 for i in x], raw, width=0.4, label="all tokens", color="#f0b78f")
    b.set_xticks(list(x), names)
    b.set_ylim(0, max([0.05, *graded, *raw]) * 1.2)
    b.set_ylabel("steered share")
    b.set_title("steered tokens" if names else "steered tokens (no run steers)", fontsize=10)
    if names:
        b.legend(fontsize=8)
    fig.suptitle(_title(summary), fontsize=11)
    fig.tight_layout()
    return fig


def plot_summary(summary: dict, path) -> None:
    """PNG of `summary_figure`, with `figure_data` as JSON in its Description (readable without pixels)."""
    import matplotlib.pyplot as plt

    fig = summary_figure(summary)
    fig.savefig(str(path), format="png", dpi=110, metadata={"Title": _title(summary),
                                                            "Description": json.dumps(figure_data(summary))})
    plt.close(fig)


def write_summary(out_dir, problems: Sequence[Problem] | None = None,
                  category_names: Sequence[str] | None = None) -> dict:
    """Write OUT/summary.json, OUT/summary.md and (with matplotlib) OUT/summary.png; return the summary."""
    out_dir = Path(out_dir)
    s = summarize(out_dir, problems, category_names)
    _atomic_write(out_dir / "summary.json", json.dumps(s, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(out_dir / "summary.md", markdown(s))
    if s["runs"]:
        try:
            tmp = out_dir / f".summary.png.tmp{os.getpid()}"
            plot_summary(s, tmp)
            os.replace(tmp, out_dir / "summary.png")
        except ImportError:  # matplotlib is optional (the eval / research extras): the JSON and table stand
            print("note: no matplotlib, so no summary.png (pip install 'steerfast[research]')", file=sys.stderr)
    return s
