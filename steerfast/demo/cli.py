"""`steerfast demo`: a miniature of Venhoff et al. (2025) that runs on a laptop CPU.

Trains a tiny base model (two-digit addition, mostly answered directly, a minority step by step) and a thinking model (the base model further trained to always reason first), caches
both as Hugging Face checkpoints, runs the paper's pipeline on them (traces, labelled sentences,
activations, taxonomy SAE, steering vectors) and `steerfast eval` of the base model, the thinking
model and the hybrid on a held-out set: OUT/summary.json and OUT/summary.md as `steerfast eval`
writes them, hybrid traces as HTML, the taxonomy figure.

    steerfast demo --out demo-out
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


# --small: every stage at a reduced size (seconds), for tests; the numbers mean nothing
SMALL_RECIPE = dict(base_steps=40, think_steps=20)
SMALL_SETTINGS = dict(n_traces=24, n_latents=(5, 6, 7), sae_epochs=20, vector_epochs=1, vector_examples=8)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", default="steerfast-demo", help="output directory (default ./steerfast-demo)")
    p.add_argument("--n-eval", type=int, default=200, help="held-out problems (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training, the problems and the pipeline")
    p.add_argument("--fresh", action="store_true", help="retrain the models even when cached")
    p.add_argument("--cache-dir", help="where the trained pair is cached (default $XDG_CACHE_HOME/steerfast/demo)")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: tiny models gain nothing from more, and lose a lot "
                        "when the cores are shared)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the table")
    p.add_argument("--small", action="store_true", help="every stage at a reduced size, in seconds (tests; "
                                                        "the accuracies mean nothing)")


def _log(args, msg):
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def run(args) -> int:
    quiet_before = os.environ.get("STEERFAST_QUIET")
    try:
        return _run(args)
    finally:  # --quiet silences steerfast's bars for this run only
        if quiet_before is None:
            os.environ.pop("STEERFAST_QUIET", None)
        else:
            os.environ["STEERFAST_QUIET"] = quiet_before


def _run(args) -> int:
    import torch

    from . import pipeline, task
    from .train import Recipe, cache_root, train_pair

    t_start = time.perf_counter()
    if args.quiet:
        os.environ["STEERFAST_QUIET"] = "1"
    from steerfast.progress import enabled

    progress = enabled()  # bars on a terminal, none under --quiet / STEERFAST_QUIET or in a pipe
    torch.set_num_threads(max(1, args.threads))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its checkpoint-writing bars, whatever --quiet says
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    recipe = Recipe(**{**(SMALL_RECIPE if args.small else {}), "n_eval": args.n_eval, "seed": args.seed})
    settings = pipeline.Settings(**{**(SMALL_SETTINGS if args.small else {}), "seed": args.seed})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = task.problems(recipe.n_eval, recipe.heldout_seed)
    exclude = {(p.a, p.b) for p in heldout}

    # 1. the trained pair, cached by the recipe's hash
    pair = Path(args.cache_dir) if args.cache_dir else cache_root()
    pair = pair / recipe.key()
    if args.fresh and pair.exists():
        shutil.rmtree(pair)
    trained_now = not (pair / "train.json").exists()
    if trained_now:
        _log(args, f"training the base and thinking models (cached in {pair}) ...")
        tmp = pair.with_name(pair.name + f".tmp{os.getpid()}")
        info = train_pair(recipe, tmp, progress=progress, device=device, exclude=exclude)
        if pair.exists():
            shutil.rmtree(pair)
        os.replace(tmp, pair)
    info = json.loads((pair / "train.json").read_text())
    _log(args, f"models: {pair} ({info['params']:,} parameters each)")
    t_train = time.perf_counter()

    # 2. the research pipeline on training problems (never the held-out ones), cached beside the pair
    res = out / "research"
    if res.exists():
        shutil.rmtree(res)  # a stale one would refuse new inputs
    cached = pair / f"research-{settings.key()}"
    if not (cached / "taxonomy.json").exists():
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        _research(args, pair, tmp, recipe, settings, exclude, device, progress)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    shutil.copytree(cached, res)
    tax = json.loads((res / "taxonomy.json").read_text())
    names, purity = tax["names"], tax["purity"]
    _log(args, f"taxonomy: {tax['n_latents']} categories (FVU elbow), purity against the true kinds {purity:.2f}: "
               f"{', '.join(names)}")
    t_research = time.perf_counter()

    # 3. steerfast eval of base, thinking and hybrid on the held-out set
    data = out / "heldout.jsonl"
    with open(data, "w") as fh:
        for p in heldout:
            fh.write(json.dumps(dict(question=p.question, answer=f"{task.text(task.steps(p))}\n#### {p.answer}")) + "\n")
    for run_dir in ("base", "thinking", "hybrid"):
        if (out / run_dir).exists():
            shutil.rmtree(out / run_dir)  # the models may have been retrained: do not resume into old results
    from steerfast.evaluate import cli as eval_cli

    p = argparse.ArgumentParser(prog="steerfast eval")
    eval_cli.add_arguments(p)
    argv = ["--data", str(data), "--out", str(out), "--base-model", str(pair / "base"),
            "--thinking-model", str(pair / "thinking"), "--sae", str(res / "sae.safetensors"),
            "--vectors", str(res / "vectors_optimized.safetensors"), "--sae-layer", str(settings.sae_layer),
            "--steer-layer", str(settings.steer_layer), "--max-new-tokens", str(settings.max_new_tokens),
            "--batch-size", "200", "--base-template", task.BASE_TEMPLATE,
            "--thinking-template", task.THINKING_TEMPLATE, "--device", device, "--dtype", "fp32",
            "--category-names", ",".join(names)]
    if not progress:
        argv.append("--no-progress")
    rc = eval_cli.run(p.parse_args(argv))
    if rc != 0:
        return rc
    t_end = time.perf_counter()
    timing = dict(train_s=round(t_train - t_start, 1), research_s=round(t_research - t_train, 1),
                  eval_s=round(t_end - t_research, 1), total_s=round(t_end - t_start, 1), models_cached=not trained_now,
                  threads=args.threads, device=device)
    reasoned = {}
    for run_name in ("base", "thinking", "hybrid"):  # how often each run chose to reason step by step
        recs = [json.loads(x) for x in (out / run_name / "results.jsonl").read_text().splitlines() if x.strip()]
        reasoned[run_name] = sum(r["completion"].lstrip().startswith("We add") for r in recs) / max(1, len(recs))
    (out / "demo.json").write_text(json.dumps(dict(timing=timing, training=info, reasoned=reasoned, purity=purity,
                                                   categories=names, settings=vars(settings)), indent=1))
    figure = res / "taxonomy_grid.png"
    if not figure.exists():  # no matplotlib: the numbers only
        figure = f"{res / 'taxonomy_grid.json'} (pip install 'steerfast[research]' for the figure)"
    print("answers that reason step by step: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in reasoned.items()))
    print(f"demo: {timing['total_s']:.0f} s (models {timing['train_s']:.0f} s, pipeline {timing['research_s']:.0f} s, "
          f"eval {timing['eval_s']:.0f} s); traces: {out / 'hybrid' / 'traces'}, taxonomy: {figure}")
    return rc


def _research(args, pair, res, recipe, settings, exclude, device, progress):
    """Traces, spans, activations, taxonomy SAE and vectors into `res`."""
    import torch

    from . import pipeline, task

    models = pipeline.load_pair(pair, device, torch.float32)
    (think, ttok), (base, btok) = models["thinking"], models["base"]
    res.mkdir(parents=True)
    train_probs = task.problems(settings.n_traces, recipe.seed + 7, exclude=exclude)
    _log(args, f"thinking-model traces on {len(train_probs)} training problems ...")
    tr = pipeline.traces(think, ttok, train_probs, settings.max_new_tokens)
    with open(res / "traces.jsonl", "w") as fh:
        fh.writelines(json.dumps(t) + "\n" for t in tr)
    t_recs = pipeline.span_records(tr, ttok, lambda q: thinking_ids(ttok, q))
    b_recs = pipeline.span_records(tr, btok, lambda q: base_ids(btok, q))
    _log(args, "taxonomy SAE over sentence activations ...")
    sae, acts, cats, names, purity = pipeline.taxonomy(think, t_recs, settings, res, progress)
    _log(args, "steering vectors (difference of means; optimised with a bias) ...")
    pipeline.vectors(base, btok, b_recs, acts, cats, sae, settings, res, progress)
    shutil.rmtree(res / "activations", ignore_errors=True)  # large and rebuilt in seconds


def base_ids(tok, q):
    from steerfast.evaluate.data import base_prompt

    from . import task
    return base_prompt(tok, q, task.BASE_TEMPLATE)


def thinking_ids(tok, q):
    from steerfast.evaluate.data import thinking_prompt

    from . import task
    return thinking_prompt(tok, q, task.THINKING_TEMPLATE)
