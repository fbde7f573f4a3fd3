"""The figures researchers look at, offline: the taxonomy grid (Venhoff et al. 2025, Figure 2)
and Ward et al.'s per-layer logit lens of a steering vector. Each is a JSON-ready dict and a PNG
(matplotlib, Agg: `pip install 'steerfast[research]'`).

Taxonomy grid: one SAE per (layer, number of clusters) scored by its fraction of variance
unexplained (FVU), its cluster balance (entropy of the cluster sizes over log n: 1 when every
cluster is as large, 0 when one holds everything) and, when a judge was given, the paper's
LLM-judged completeness / independence / consistency. The elbow of each layer's FVU curve (the
point farthest below the chord from the fewest to the most clusters) is marked.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InvalidInputError
from .sae_train import JUDGE_METRICS


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the figures need matplotlib: pip install 'steerfast[research]'") from None
    return plt


def balance(sizes: Sequence[int]) -> float:
    """Entropy of the cluster-size distribution over log(number of clusters): 1 for equal sizes."""
    total = sum(sizes)
    if len(sizes) < 2 or total <= 0:
        return 0.0
    p = [s / total for s in sizes if s > 0]
    return -sum(q * math.log(q) for q in p) / math.log(len(sizes))


def elbow(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The x of a decreasing curve's elbow: after scaling both axes to [0, 1], the point farthest
    below the straight line from the first point to the last. None with fewer than 3 points."""
    if len(xs) < 3:
        return None
    pts = sorted(zip(xs, ys))
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    sy = (max(y for _, y in pts) - min(y for _, y in pts)) or 1.0
    sx = (x1 - x0) or 1.0

    def below(x, y):  # chord value minus curve value, in scaled units
        return (y0 + (y1 - y0) * (x - x0) / sx - y) / sy

    return max(pts, key=lambda p: below(*p))[0]


def taxonomy_grid(entries: Sequence) -> dict:
    """The grid from `sae_grid` results or from the CLI's taxonomy.json entries (each with layer,
    n_latents, scores): layers, n_latents, scores[metric][layer index][n index] (None where not
    trained), the elbow of each layer's FVU curve, and whether judged scores are present."""
    rows = [(e["layer"], e["n_latents"], e["scores"]) if isinstance(e, dict) else (e.layer, e.n_latents, e.scores)
            for e in entries]
    if not rows:
        raise InvalidInputError("the taxonomy grid has no entry")
    layers = sorted({r[0] for r in rows})
    ns = sorted({r[1] for r in rows})
    judged = all("judged" in s for *_, s in rows)
    metrics = ["fvu", "balance", *(JUDGE_METRICS if judged else ())]
    scores = {m: [[None] * len(ns) for _ in layers] for m in metrics}
    for layer, n, s in rows:
        li, ni = layers.index(layer), ns.index(n)
        scores["fvu"][li][ni] = float(s["fvu"])
        scores["balance"][li][ni] = float(s.get("balance", balance(s["sizes"])))
        for m in metrics[2:]:
            scores[m][li][ni] = float(s["judged"][m])
    elbows = {}
    for li, layer in enumerate(layers):
        pts = [(n, v) for n, v in zip(ns, scores["fvu"][li]) if v is not None]
        elbows[str(layer)] = elbow([p[0] for p in pts], [p[1] for p in pts])
    return dict(layers=layers, n_latents=ns, metrics=metrics, scores=scores, elbow=elbows, judged=judged)


def plot_taxonomy_grid(grid: dict, path) -> None:
    """PNG: a heatmap per score (layer x clusters) and FVU against the number of clusters, one line
    per layer, its elbow marked. Without a judge the title says the judged scores are absent."""
    plt = _pyplot()
    metrics, layers, ns = grid["metrics"], grid["layers"], grid["n_latents"]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 3.2 + 0.25 * len(layers)),
                             squeeze=False)
    axes = axes[0]
    for ax, m in zip(axes, metrics):
        data = torch.tensor([[float("nan") if v is None else v for v in row] for row in grid["scores"][m]])
        im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis_r" if m == "fvu" else "viridis")
        ax.set_xticks(range(len(ns)), [str(n) for n in ns], fontsize=7)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
        ax.set_xlabel("clusters (SAE latents)")
        ax.set_ylabel("layer")
        ax.set_title(m + (" (lower is better)" if m == "fvu" else ""), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        for li, layer in enumerate(layers):
            e = grid["elbow"].get(str(layer))
            if e is not None:
                ax.scatter([ns.index(e)], [li], marker="*", s=70, c="red", label="FVU elbow" if li == 0 else None)
    ax = axes[-1]
    for li, layer in enumerate(layers):
        pts = [(n, v) for n, v in zip(ns, grid["scores"]["fvu"][li]) if v is not None]
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"layer {layer}")
        e = grid["elbow"].get(str(layer))
        if e is not None:
            ax.scatter([e], [dict(pts)[e]], marker="*", s=120, color=line.get_color(), edgecolors="red", zorder=3)
    ax.set_xlabel("clusters (SAE latents)")
    ax.set_ylabel("FVU")
    ax.set_title("FVU by clusters (* elbow)", fontsize=9)
    ax.legend(fontsize=7)
    judged = ("scores: FVU, cluster balance and the judged completeness / independence / consistency"
              if grid["judged"] else "no judge given: completeness / independence / consistency not scored "
              "(FVU and cluster balance only)")
    title = f"Taxonomy grid — {judged}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110, metadata={"Title": title})  # the title, readable without the pixels
    plt.close(fig)


def save_taxonomy_grid(grid: dict, json_path, png_path=None) -> None:
    Path(json_path).write_text(json.dumps(grid, indent=1))
    if png_path is not None:
        plot_taxonomy_grid(grid, png_path)


# ---------------------------------------------------------------------- per-layer logit lens
@torch.no_grad()
def logit_lens_by_layer(model, vectors: dict[int, torch.Tensor], token_ids: dict[str, int]) -> dict:
    """Ward et al.'s per-layer logit lens: for the vector found at each layer ({layer: [d]}), the
    logit and rank (0: the top token) of each chosen token through the final norm and the
    unembedding, and the mean logit over the vocabulary for scale. -> a JSON-ready dict."""
    if not vectors:
        raise InvalidInputError("no vector to read")
    net, d = model.net, model.args.dim
    layers = sorted(vectors)
    bad = [layer for layer in layers if tuple(vectors[layer].shape) != (d,)]
    if bad:
        raise InvalidInputError(f"vectors must be [{d}]; layers {bad} are not")
    V = torch.stack([vectors[layer].to(model.device, model.dtype) for layer in layers])
    logits = net.lm_head(net.norm(V)).double()  # [layers, vocab]
    ids = torch.tensor(list(token_ids.values()), device=logits.device)
    chosen = logits[:, ids]  # [layers, tokens]
    ranks = (logits[:, None, :] > chosen[..., None]).sum(-1)
    return dict(layers=layers, tokens={s: dict(id=int(t), logit=chosen[:, j].tolist(), rank=ranks[:, j].tolist())
                                       for j, (s, t) in enumerate(token_ids.items())},
                mean_logit=logits.mean(-1).tolist(), vocab_size=int(logits.shape[-1]))


def plot_logit_lens_by_layer(result: dict, path, title: str | None = None) -> None:
    """PNG: each chosen token's logit against the layer its vector was found at (the vocabulary's
    mean logit dashed), and its rank (log scale)."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    layers = result["layers"]
    for s, t in result["tokens"].items():
        a.plot(layers, t["logit"], marker="o", label=repr(s))
        b.plot(layers, [r + 1 for r in t["rank"]], marker="o", label=repr(s))
    a.plot(layers, result["mean_logit"], ls="--", c="gray", label="vocabulary mean")
    a.set_xlabel("layer")
    a.set_ylabel("logit (final norm + unembedding)")
    b.set_xlabel("layer")
    b.set_ylabel(f"rank among {result['vocab_size']} tokens (1: top)")
    b.set_yscale("log")
    b.invert_yaxis()
    a.legend(fontsize=8)
    title = title or "logit lens of the steering vector at each layer"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110, metadata={"Title": title})
    plt.close(fig)
