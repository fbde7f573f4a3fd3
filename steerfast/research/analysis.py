"""Analysis of steering vectors (Ward et al. 2025): logit lens, cosine similarity, baselines, and
the backtracking-emission metric over a magnitude sweep (JSON + PNG).

Baselines, each swept over the same magnitudes as the vectors: the mean activation, random noise
(a Gaussian direction), other behaviours' vectors, all rescaled to unit norm so that magnitude m
adds a vector of norm m; and "scale": scaling up the activation itself, h <- h + m * h / ||h||
(the same added norm, along each position's own direction). With normalize=False the vectors
keep their norms and m is a plain coefficient.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InvalidInputError
from ..engine import right_pad
from ..model import Capture, Context
from .activations import check_ids, check_layer

SCALE = "scale"  # the name of the scaling-up-the-activation baseline in a sweep


@torch.no_grad()
def logit_lens(model, vector: torch.Tensor, top: int = 10, tokenizer=None) -> list[tuple]:
    """The tokens a residual-stream vector promotes: final norm, then unembedding. -> [(token id,
    logit)] best first, or [(token id, token string, logit)] with a tokenizer."""
    net = model.net
    if vector.shape != (model.args.dim,):
        raise InvalidInputError(f"vector must be [{model.args.dim}], got {tuple(vector.shape)}")
    logits = net.lm_head(net.norm(vector.to(model.device, model.dtype)[None]))[0].float()
    vals, ids = logits.topk(min(top, logits.numel()))
    if tokenizer is None:
        return list(zip(ids.tolist(), vals.tolist()))
    return [(i, tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), vals.tolist())]


def token_label(tokenizer, token_id: int) -> str:
    """How to print a token: its id and the repr of its text (`123 ' Wait'`), `<id 123: undecodable>`
    when it decodes to nothing or only to U+FFFD (a byte-level piece of a character), and the bare
    id without a tokenizer."""
    token_id = int(token_id)
    if tokenizer is None:
        return f"{token_id}"
    try:
        text = tokenizer.decode([token_id])
    except Exception:  # a tokenizer that cannot decode this id at all
        text = ""
    if not text or set(text) <= {"\ufffd"}:
        return f"<id {token_id}: undecodable>"
    return f"{token_id} {text!r}"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten().to(a.device), dim=0))


def cosine_matrix(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """{name_a: {name_b: cosine}}, e.g. base- vs thinking-derived vectors of each behaviour."""
    b = a if b is None else b
    return {i: {j: cosine(u, v) for j, v in b.items()} for i, u in a.items()}


def baselines(vector: torch.Tensor, mean_activation: torch.Tensor | None = None,
              others: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """The baselines to sweep beside `vector`: "mean_activation", "random" (same norm as vector),
    each of `others`, and SCALE (None: not a vector, see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(vector.shape[-1], generator=g, dtype=torch.float64)
    out: dict[str, torch.Tensor | None] = {"random": (noise / noise.norm() * vector.double().norm().cpu()).float()}
    if mean_activation is not None:
        out["mean_activation"] = mean_activation.float()
    out.update(others or {})
    out[SCALE] = None
    return out


def token_ids_for(tokenizer, strings: Sequence[str]) -> dict[str, int]:
    """{string: id} for strings that are one token each (" Wait", " But", " Hmm"); refuses others,
    since a multi-token string has no single emission to count."""
    out, bad = {}, []
    for s in strings:
        ids = tokenizer.encode(s, add_special_tokens=False)
        (out.__setitem__(s, ids[0]) if len(ids) == 1 else bad.append((s, ids)))
    if bad:
        raise InvalidInputError(f"these strings are not single tokens for this tokenizer: {bad}")
    return out


def emission_rate(generations: Sequence[Sequence[int]], token_ids) -> dict:
    """rate: share of generated tokens that are in token_ids; any: share of generations holding one."""
    ids = set(int(t) for t in token_ids)
    n = sum(len(g) for g in generations)
    hits = sum(sum(t in ids for t in g) for g in generations)
    return dict(rate=hits / max(1, n), any=sum(any(t in ids for t in g) for g in generations) / max(1, len(generations)),
                tokens=n)


@torch.no_grad()
def generate_scaled(model, prompts: Sequence[Sequence[int]], layer: int, magnitude: float, max_new_tokens: int,
                    positions: str = "all") -> list[list[int]]:
    """Greedy generation with h <- h + magnitude * h / ||h|| at the output of `layer` (the SCALE
    baseline: a function of the activation, which `sf.Steering` cannot express). Each step runs the
    model to `layer`, then re-runs the later layers from the changed residual; the second pass
    rewrites those layers' keys and values at the same positions, so the cache stays consistent."""
    check_layer(model, layer)
    prompts = check_ids(model, prompts)
    B, dev, net = len(prompts), model.device, model.net
    tokens, pos, lens = right_pad(prompts, dev)
    T = tokens.shape[1]
    model.ensure_cache(B, T + max_new_tokens)
    start = lens if positions == "generated" else torch.zeros_like(lens)

    def step(tok, pos, kv_len, logits_index):
        cap = Capture(layer)
        net(tok, Context(input_pos=pos, kv_len=kv_len, logits_index=torch.zeros(B, dtype=torch.int64, device=dev),
                         edits=(cap,)))
        h = cap.value
        on = (pos >= start[:, None])[..., None]
        h = h + on * magnitude * h / h.float().norm(dim=-1, keepdim=True).clamp(min=1e-6).to(h.dtype)
        if layer == model.args.n_layers - 1:  # nothing after it: the final norm and head directly
            x = h[torch.arange(B, device=dev), logits_index]
            return net.lm_head(net.norm(x))
        return net(h, Context(input_pos=pos, kv_len=kv_len, logits_index=logits_index), start_layer=layer + 1)

    nxt = step(tokens, pos, T, lens - 1).argmax(-1)
    out = [nxt]
    cur = lens.clone()
    for i in range(1, max_new_tokens):
        nxt = step(nxt[:, None], cur.to(torch.int32)[:, None], int(cur.max()) + 1,
                   torch.zeros(B, dtype=torch.int64, device=dev)).argmax(-1)
        out.append(nxt)
        cur = cur + 1
    return torch.stack(out, 1).tolist()


def emission_sweep(model, prompts: Sequence[Sequence[int]], vectors: dict[str, torch.Tensor | None], layer: int,
                   magnitudes: Sequence[float], token_ids, *, max_new_tokens: int = 64, normalize: bool = True,
                   positions: str = "all", eos_token_id="default", progress: bool | None = None) -> dict:
    """For each vector (None: the SCALE baseline) and magnitude, greedy generations steered at the
    output of `layer`, and their emission rate of `token_ids`. -> a JSON-ready dict. progress: a
    bar over (vector, magnitude) runs (None: on a terminal, see `steerfast.progress`)."""
    from ..progress import bar
    from ..steering import Steering

    if isinstance(token_ids, dict):
        names, token_ids = dict(token_ids), list(token_ids.values())
    else:
        names = None
    result = dict(layer=layer, magnitudes=[float(m) for m in magnitudes], token_ids=[int(t) for t in token_ids],
                  token_strings=names, normalize=normalize, positions=positions, max_new_tokens=max_new_tokens,
                  n_prompts=len(prompts), series={})
    eos = (list(model.args.eos_token_ids) if eos_token_id == "default" else [] if eos_token_id is None else
           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pbar = bar(total=len(vectors) * len(magnitudes), desc="sweep", unit="run", progress=progress)
    for name, v in vectors.items():
        rows = []
        for m in magnitudes:
            pbar.set_postfix(vector=name, magnitude=f"{float(m):g}", refresh=False)
            if v is None:
                gens = [_trim(g, eos) for g in generate_scaled(model, prompts, layer, float(m), max_new_tokens,
                                                               positions)]
            else:
                u = v.float() / v.float().norm().clamp(min=1e-12) if normalize else v.float()
                gens = model.generate([list(p) for p in prompts], max_new_tokens, eos_token_id=eos_token_id,
                                      steering=Steering(u, layer, coef=float(m), positions=positions))
            rows.append(dict(magnitude=float(m), **emission_rate(gens, token_ids)))
            pbar.update(1)
        result["series"][name] = rows
    pbar.close()
    return result


def _trim(row: list[int], stops) -> list[int]:
    """Up to and including the first stop token, as Model.generate returns its rows."""
    for i, t in enumerate(row):
        if t in stops:
            return row[:i + 1]
    return row


def _token_names(result: dict) -> str:
    """The tokens a sweep counts, with their ids: `' Wait' (id 14), ' But' (id 3)`."""
    ids = result["token_ids"]
    names = result.get("token_strings") or {}
    by_id = {int(t): s for s, t in names.items()}
    return ", ".join(f"{by_id[t]!r} (id {t})" if by_id.get(t, str(t)) != str(t) else f"id {t}" for t in ids)


BASELINE_STYLES = {"random": ("--", "s"), "mean_activation": (":", "^"), SCALE: ("-.", "D")}


def sweep_figure(result: dict):
    """The sweep as a matplotlib figure: rate against magnitude, one line per series. Vectors are
    solid lines with round markers; each baseline has its own dash pattern and marker shape, and
    later lines draw thinner with smaller markers, so lines that coincide (the baselines often do:
    all at the unsteered rate) still show each one, and each is in the legend."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the sweep plot needs matplotlib: pip install 'steerfast[research]'") from None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series = list(result["series"].items())
    vector_markers = iter(["o", "v", "P", "X", "*", "h", "p", "<", ">"] * 8)
    for i, (name, rows) in enumerate(series):
        ls, marker = BASELINE_STYLES.get(name) or ("-", next(vector_markers))
        shrink = i / max(1, len(series) - 1)  # first drawn largest: a coinciding later line stays visible on top
        ax.plot([r["magnitude"] for r in rows], [r["rate"] for r in rows], linestyle=ls, marker=marker,
                markersize=9 - 4 * shrink, linewidth=2.4 - 1.2 * shrink, label=name, zorder=2 + i,
                markerfacecolor="none" if i % 2 else None)
    ax.set_xlabel("steering magnitude" + (" (added norm)" if result.get("normalize") else " (coefficient)"))
    ax.set_ylabel("rate of the chosen tokens (share of new tokens)")
    top = max((r["rate"] for _, rows in series for r in rows), default=0.0)
    ax.set_ylim(0, top * 1.15 if top > 0 else 0.05)  # a rate: never below 0, not squashed to a line when all 0
    title = f"steering after layer {result['layer']}: rate of {_token_names(result)}"
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweep(result: dict, path) -> None:
    """PNG of `sweep_figure` (needs matplotlib: the `research` extra); its title and the plotted
    series are in the PNG's metadata (Title, Description) too."""
    import matplotlib.pyplot as plt

    fig = sweep_figure(result)
    fig.savefig(str(path), dpi=120, metadata={"Title": fig.axes[0].get_title(),
                                              "Description": json.dumps(dict(
                                                  magnitudes=result["magnitudes"],
                                                  series={n: [r["rate"] for r in rows]
                                                          for n, rows in result["series"].items()}))})
    plt.close(fig)


def sweep_table(result: dict) -> str:
    """The sweep's rates as text: a header row of the magnitudes, then one row per series."""
    names = list(result["series"])
    w = max([16, *map(len, names)])
    mags = [f"{m:g}" for m in result["magnitudes"]]
    cw = max([6, *map(len, mags)])
    lines = [f"rate of {_token_names(result)} by steering magnitude",
             f"{'magnitude':>{w}}: " + " ".join(f"{m:>{cw}}" for m in mags)]
    lines += [f"{n:>{w}}: " + " ".join(f"{r['rate']:>{cw}.3f}" for r in rows) for n, rows in result["series"].items()]
    return "\n".join(lines) + "\n"


def save_sweep(result: dict, json_path, png_path=None) -> None:
    """The sweep as JSON, and as a PNG when png_path is given."""
    Path(json_path).write_text(json.dumps(result, indent=1))
    if png_path is not None:
        plot_sweep(result, png_path)
