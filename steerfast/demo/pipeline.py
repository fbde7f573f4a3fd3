"""The paper's pipeline on the miniature, through steerfast's public API: thinking-model traces ->
labelled sentence spans -> activations -> taxonomy SAE (clusters 5..N, the FVU elbow) -> steering
vectors (difference of means; optimised, with the bias vector) -> `sf.Hybrid`, evaluated by
`steerfast eval` on a held-out set never used to choose anything."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

import steerfast as sf
from steerfast import research
from steerfast.evaluate.data import thinking_prompt

from . import task


@dataclass
class Settings:
    n_traces: int = 160  # thinking-model traces (training problems) for the taxonomy and the vectors
    sae_layer: int = 1  # thinking-model layer the taxonomy SAE reads
    steer_layer: int = 0  # base-model layer whose output is steered (the middle of two)
    n_latents: tuple = (5, 6, 7, 8, 9, 10)
    sae_k: int = 3
    sae_epochs: int = 200
    vector_epochs: int = 10
    vector_lr: float = 0.3
    vector_batch: int = 16
    vector_examples: int = 64  # per category
    # each category's target: the first token(s) of its sentences, where the behaviour is decided
    # (difference of means, too, reads only a sentence's first tokens); None: whole sentences.
    # Whole sentences trade the decision off against the copying after it: the vector then lifts
    # the base model's "We add" from ~25% to ~35% and the hybrid rarely flips (measured).
    vector_target_tokens: int | None = 1
    max_new_tokens: int = 64
    seed: int = 0
    version: int = 1  # bump when the pipeline's code changes what it writes

    def key(self) -> str:
        import hashlib
        from dataclasses import asdict
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def load_pair(pair_dir: Path, device, dtype):
    from transformers import AutoTokenizer

    out = {}
    for name in ("base", "thinking"):
        d = pair_dir / name
        out[name] = (sf.load_model(str(d), device=device, dtype=dtype),
                     AutoTokenizer.from_pretrained(str(d), local_files_only=True))
    return out


def traces(think, tok, problems, max_new_tokens: int, batch: int = 64) -> list[dict]:
    """The thinking model's greedy answers to `problems` (its chat prompt), with their text."""
    out = []
    for s in range(0, len(problems), batch):
        ps = problems[s:s + batch]
        prompts = [thinking_prompt(tok, p.question, task.THINKING_TEMPLATE) for p in ps]
        gen = think.generate(prompts, max_new_tokens, eos_token_id=tok.eos_token_id)
        for p, ids in zip(ps, gen):
            out.append(dict(question=p.question, answer=p.answer, text=tok.decode(ids, skip_special_tokens=True)))
    return out


def span_records(traces_: list[dict], tok, prompt_fn) -> list:
    """Research records: prompt + trace text, the trace's sentences as character spans labelled by
    the task's labeller (labels are known by construction); the prompt itself is not a span."""
    recs = []
    for t in traces_:
        prompt = tok.decode(prompt_fn(t["question"]), skip_special_tokens=False)
        sents = research.split_sentences(t["text"])
        labels = task.labeller([t["text"][a:b] for a, b in sents])
        spans = [dict(start=len(prompt) + a, end=len(prompt) + b, label=lab) for (a, b), lab in zip(sents, labels)]
        obj = dict(text=prompt + t["text"], spans=spans)
        recs.append(research.parse_record(obj, tok, where=t["question"]))
    return recs


def taxonomy(think, recs, s: Settings, out: Path, progress: bool):
    """Sentence-mean activations of the thinking model, one SAE per cluster count, the elbow's SAE.
    Returns (sae, per-sentence category, labels, grid, purity)."""
    acts_dir = research.extract_activations(think, recs, s.sae_layer, out / "activations", mode="sentence",
                                            progress=progress, model_name="thinking")
    a = research.load_activations(acts_dir)
    results = research.sae_grid({s.sae_layer: a.acts}, n_latents=s.n_latents, k=s.sae_k, sentences=a.texts,
                                epochs=s.sae_epochs, seed=s.seed)
    from steerfast.research.figures import save_taxonomy_grid, taxonomy_grid

    grid = taxonomy_grid(results)
    try:
        save_taxonomy_grid(grid, out / "taxonomy_grid.json", out / "taxonomy_grid.png")
    except ImportError:  # no matplotlib: the numbers only
        save_taxonomy_grid(grid, out / "taxonomy_grid.json")
    n = grid["elbow"][str(s.sae_layer)] or s.n_latents[0]
    best = next(r for r in results if r.n_latents == n)
    cats, _ = research.categories(best.sae, a.acts)
    truth = torch.tensor([task.KINDS.index(lab) if lab in task.KINDS else -1 for lab in a.labels])
    purity = research.purity(cats, truth)
    best.sae.save(out / "sae.safetensors")
    tax = research.taxonomy(best.sae, a.acts, a.texts, n_examples=3)
    names = []
    for c in range(best.sae.n_latents):
        kinds = Counter(lab for lab, k in zip(a.labels, cats.tolist()) if k == c)
        top = (kinds.most_common(1)[0][0] or "unlabelled") if kinds else "unused"
        names.append(f"{c}:{top}")
        tax[c]["kinds"] = dict(kinds)
    (out / "taxonomy.json").write_text(json.dumps(dict(n_latents=n, purity=purity, names=names, categories=tax,
                                                       grid_elbow=grid["elbow"]), indent=1))
    return best.sae, a, cats, names, purity


def vectors(base, tok, recs, a, cats, sae, s: Settings, out: Path, progress: bool):
    """Per category (SAE latent) of the base model at steer_layer: the difference of means of its
    sentences, and an optimised vector on top of a bias trained on whole traces (the paper's order).
    recs: the traces under the base model's prompt (sentence spans in the same order as `a`)."""
    # sentence i of the activations is span a.span[i] of record a.record[i]; label it by its category
    by_cat: dict[str, list] = {}
    for r, sp, c in zip(a.record.tolist(), a.span.tolist(), cats.tolist()):
        by_cat.setdefault(f"c{c}", []).append((r, sp))
    spans = [[research.Span(x.start, x.end, None) for x in rec.spans] for rec in recs]
    for key, members in by_cat.items():
        for r, sp in members:
            spans[r][sp].label = key
    ids = [rec.ids for rec in recs]
    dm = research.label_diff_of_means(base, ids, spans, s.steer_layer)
    g = torch.Generator().manual_seed(s.seed)
    traces_ex, cat_ex = [], {}
    for rec in recs:
        if not rec.spans:  # an empty answer: nothing to learn from
            continue
        p0 = rec.spans[0].start
        traces_ex.append(research.Example(rec.ids[:p0], rec.ids[p0:]))
    for key, members in sorted(by_cat.items()):
        pick = torch.randperm(len(members), generator=g)[:s.vector_examples].tolist()
        cat_ex[key] = []
        for r, sp in (members[i] for i in pick):
            a, b = spans[r][sp].start, spans[r][sp].end
            b = b if s.vector_target_tokens is None else min(b, a + s.vector_target_tokens)
            cat_ex[key].append(research.Example(recs[r].ids[:a], recs[r].ids[a:b]))
    n_tr = max(1, int(0.8 * len(traces_ex)))
    bias, opt, results = research.train_bias_and_categories(
        base, traces_ex[:n_tr], cat_ex, s.steer_layer, eval_traces=traces_ex[n_tr:], epochs=s.vector_epochs,
        seed=s.seed, progress=progress, lr=s.vector_lr,
        batch_size=s.vector_batch)
    d = base.args.dim
    rows_dm = {f"c{c}": dm.get(f"c{c}", torch.zeros(d)).cpu() for c in range(sae.n_latents)}
    rows_opt = {f"c{c}": opt.get(f"c{c}", torch.zeros(d)).cpu() for c in range(sae.n_latents)}
    meta = dict(model="base", layer=s.steer_layer, point="output")
    research.save_vector_set(out / "vectors_diffmeans.safetensors", rows_dm, None, method="label_diff_of_means", **meta)
    research.save_vector_set(out / "vectors_optimized.safetensors", rows_opt, bias, method="optimized", **meta)
    losses = {k: dict(baseline=v.baseline_loss, best=v.best_loss, epochs=len(v.history)) for k, v in results.items()}
    (out / "vectors.json").write_text(json.dumps(losses, indent=1))
    return losses
