"""Steering vectors by difference of means, and vector files with metadata.

Two recipes from the seed papers:
- Ward et al. 2025 (`window_diff_of_means`): the mean activation over a window of positions
  relative to each span start (default 12 to 8 tokens before it: the decision to backtrack is
  made before the " Wait" appears), minus the mean over all positions of all sequences.
- Venhoff et al. 2025 (`label_diff_of_means`): per label, the mean over spans of each span's mean
  over [start - 1, min(end - 1, start + 10)), minus the mean over traces of each trace's mean over
  its reasoning span, rescaled to the norm of that overall mean (as the paper's code does).

Files: one safetensors file, tensor "vector" [d] or "vectors" [C, d] (+ optional "bias" [d]),
metadata (model, layer, point, method, norm, names, ...) JSON-encoded per key.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from ..errors import CheckpointError, InvalidInputError, NonFiniteError
from .activations import layer_activations, span_rows
from .spans import Span

FORMAT = "steerfast.vector.v1"


def _with_bar(it, n: int, desc: str, progress):
    """Yield from `it`, ticking a bar of n sequences (steerfast.progress: on a terminal by default)."""
    from ..progress import bar

    with bar(total=n, desc=desc, unit="seq", progress=progress) as b:
        for item in it:
            yield item
            b.update(1)


def window_diff_of_means(model, ids: Sequence[Sequence[int]], starts: Sequence[Sequence[int]], layer: int,
                         offset: int = -12, width: int = 5, *, point: str = "output",
                         batch_size: int = 16, progress: bool | None = None) -> torch.Tensor:
    """Mean of the activations after `layer` at positions start+offset ... start+offset+width-1 of
    every span start (positions outside the sequence dropped; a position in two windows counts
    twice), minus the mean over all positions of all sequences. -> [d] float32 on the model's device."""
    if len(starts) != len(ids):
        raise InvalidInputError(f"starts has {len(starts)} lists for {len(ids)} sequences")
    d, dev = model.args.dim, model.device
    win, allsum = torch.zeros(d, dtype=torch.float64, device=dev), torch.zeros(d, dtype=torch.float64, device=dev)
    n_win = n_all = 0
    for i, acts in _with_bar(layer_activations(model, ids, layer, point, batch_size), len(ids),
                             f"diff of means L{layer}", progress):
        spans = [Span(int(s), int(s) + 1) for s in starts[i]]
        rows = span_rows(acts, spans, "window", offset, width)
        if rows:
            win += torch.stack([v for v, _, _ in rows]).double().sum(0)
            n_win += len(rows)
        allsum += acts.double().sum(0)
        n_all += acts.shape[0]
    if n_win == 0:
        raise InvalidInputError(f"no window position lies inside any sequence (offset={offset}, width={width})")
    return (win / n_win - allsum / n_all).float()


def label_diff_of_means(model, ids: Sequence[Sequence[int]], spans: Sequence[Sequence], layer: int, *,
                        point: str = "output", max_tokens: int = 10, reasoning: Sequence[tuple[int, int]] | None = None,
                        rescale: bool = True, batch_size: int = 16,
                        progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Venhoff et al.'s per-label vectors. spans[i]: Span objects or (start, end, label) tuples of
    sequence i (unlabelled ones only count toward the reasoning span). reasoning[i]: that trace's
    reasoning span [start, end) (default: first span start to last span end). -> {label: [d]}."""
    spans = [[s if isinstance(s, Span) else Span(int(s[0]), int(s[1]), s[2] if len(s) > 2 else None) for s in seq]
             for seq in spans]
    if len(spans) != len(ids):
        raise InvalidInputError(f"spans has {len(spans)} lists for {len(ids)} sequences")
    sums: dict[str, torch.Tensor] = defaultdict(lambda: 0)
    counts: dict[str, int] = defaultdict(int)
    overall, n_traces = 0, 0
    for i, acts in _with_bar(layer_activations(model, ids, layer, point, batch_size), len(ids),
                             f"diff of means L{layer}", progress):
        if reasoning is not None:
            r0, r1 = reasoning[i]
        elif spans[i]:
            r0, r1 = min(s.start for s in spans[i]), max(s.end for s in spans[i])
        else:
            continue
        overall = overall + acts[r0:r1].double().mean(0)
        n_traces += 1
        for s in spans[i]:
            lo, hi = max(0, s.start - 1), min(s.end - 1, s.start + max_tokens)
            if s.label is None or hi <= lo:  # a one-token span has an empty window in the paper's code
                continue
            sums[s.label] = sums[s.label] + acts[lo:hi].double().mean(0)
            counts[s.label] += 1
    if n_traces == 0 or not counts:
        raise InvalidInputError("no labelled span to average over")
    mean = overall / n_traces
    out = {}
    for label in sorted(counts):
        v = sums[label] / counts[label] - mean
        out[label] = (v * (mean.norm() / v.norm().clamp(min=1e-30)) if rescale else v).float()
    return out


# ---------------------------------------------------------------------- files
def _meta(tensors: dict, metadata: dict) -> dict[str, str]:
    v = tensors.get("vector", tensors.get("vectors"))
    meta = dict(metadata)
    meta.setdefault("norm", v.float().norm(dim=-1).tolist())
    return {"format": FORMAT, **{k: json.dumps(val) for k, val in meta.items()}}


def _check(name: str, t: torch.Tensor, dims: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != dims:
        raise InvalidInputError(f"{name} must be a floating-point tensor of {dims} dimension(s)")
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"{name} holds NaN or Inf")
    return t.detach().float().cpu().contiguous()


def save_vector(path, vector: torch.Tensor, **metadata) -> None:
    """One vector [d] with metadata (say model=, layer=, point=, method=; norm is added)."""
    from safetensors.torch import save_file

    tensors = dict(vector=_check("vector", vector, 1))
    save_file(tensors, str(path), metadata=_meta(tensors, metadata))


def save_vector_set(path, vectors: dict[str, torch.Tensor], bias: torch.Tensor | None = None, **metadata) -> None:
    """Category vectors (names in this order become rows of "vectors") and an optional bias: what
    `sf.Hybrid` takes (see `hybrid_vectors`)."""
    from safetensors.torch import save_file

    if not vectors:
        raise InvalidInputError("vectors is empty")
    tensors = dict(vectors=_check("vectors", torch.stack([v.detach().float().cpu() for v in vectors.values()]), 2))
    if bias is not None:
        tensors["bias"] = _check("bias", bias, 1)
    save_file(tensors, str(path), metadata=_meta(tensors, dict(metadata, names=list(vectors))))


def _read(path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors, raw = {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if raw.pop("format", None) != FORMAT:
        raise CheckpointError(f"{path}: not a steerfast vector file")
    return tensors, {k: json.loads(v) for k, v in raw.items()}


def load_vector(path) -> tuple[torch.Tensor, dict]:
    """(vector [d], or vectors [C, d] for a set, metadata); a set's bias is metadata["bias"]."""
    tensors, meta = _read(path)
    if "bias" in tensors:
        meta["bias"] = tensors["bias"]
    return tensors.get("vector", tensors.get("vectors")), meta


def steering_layer(layer: int, point: str) -> int:
    """The decoder layer whose output `sf.Steering` / `sf.Hybrid` add to, for a vector trained or
    measured at (layer, point): the input of layer L is the output of layer L - 1."""
    if point == "output":
        return layer
    if point == "input" and layer >= 1:
        return layer - 1
    raise InvalidInputError(f"cannot steer at the {point} of layer {layer}: steering adds to a layer's output "
                            "(the input of layer 0, the embeddings, has no steering point)")


def load_steering(path, coef: float = 1.0, positions: str = "all", name: str | int | None = None):
    """A `steerfast.Steering` from a vector file, at the layer its metadata names (a set: pick `name`)."""
    from ..steering import Steering

    v, meta = load_vector(path)
    if v.dim() == 2:
        if name is None:
            raise InvalidInputError(f"{path} holds {v.shape[0]} vectors {meta.get('names')}; pass name=")
        v = v[meta["names"].index(name) if isinstance(name, str) else name]
    if "layer" not in meta:
        raise CheckpointError(f"{path}: its metadata names no layer")
    return Steering(v, layer=steering_layer(int(meta["layer"]), meta.get("point", "output")), coef=coef,
                    positions=positions)


LAYER_CONVENTIONS = ("paper", "exact")


def hybrid_vectors(path, layer_convention: str = "paper") -> dict:
    """Keyword arguments for `steerfast.Hybrid` from a vector set: vectors, bias, steer_layer.

    layer_convention "paper" (default): steer the output of the layer index the vector was trained
    for, whatever its point, as the authors' hybrid does (needed to reproduce their numbers).
    "exact": steer where the vector was measured (`steering_layer`: the input of layer L is the
    output of layer L - 1)."""
    if layer_convention not in LAYER_CONVENTIONS:
        raise InvalidInputError(f"layer_convention must be one of {LAYER_CONVENTIONS}, got {layer_convention!r}")
    v, meta = load_vector(path)
    if v.dim() != 2:
        v = v[None]
    if "layer" not in meta:
        raise CheckpointError(f"{path}: its metadata names no layer")
    layer = int(meta["layer"])
    return dict(vectors=v, bias=meta.get("bias"),
                steer_layer=layer if layer_convention == "paper" else steering_layer(layer, meta.get("point", "output")))


def load_vectors(paths: Sequence[str | Path], unique: bool = False) -> dict[str, torch.Tensor]:
    """{name: vector} from several files (a set contributes each named row). A later file's vector
    of the same name replaces an earlier one, unless unique=True: then every name that two files
    share is keyed "<file>:<name>" (<file> the file's stem, or its path where stems repeat too)."""
    found = []  # (path, name, vector) in file order
    for p in paths:
        v, meta = load_vector(p)
        if v.dim() == 1:
            found.append((p, str(meta.get("name", Path(p).stem)), v))
        else:
            found += [(p, str(n), row) for n, row in zip(meta.get("names", range(v.shape[0])), v)]
    if not unique:
        return {n: v for _, n, v in found}
    files_of: dict[str, set] = defaultdict(set)
    for p, n, _ in found:
        files_of[n].add(str(p))
    stems = [Path(p).stem for p in dict.fromkeys(str(p) for p, _, _ in found)]
    by_path = len(set(stems)) < len(stems)
    out = {}
    for p, n, v in found:
        out[f"{p if by_path else Path(p).stem}:{n}" if len(files_of[n]) > 1 else n] = v
    return out
