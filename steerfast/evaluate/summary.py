"""The summary of an output directory: per run accuracy with a 95% Wilson interval, tokens/s,
the steered share (over the tokens the grader reads, and over every generated token) and steered
tokens per category; across runs the gap the hybrid recovers. As JSON and as a markdown table."""
from __future__ import annotations

import json
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


def write_summary(out_dir, problems: Sequence[Problem] | None = None,
                  category_names: Sequence[str] | None = None) -> dict:
    """Write OUT/summary.json and OUT/summary.md; return the summary."""
    out_dir = Path(out_dir)
    s = summarize(out_dir, problems, category_names)
    _atomic_write(out_dir / "summary.json", json.dumps(s, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(out_dir / "summary.md", markdown(s))
    return s
