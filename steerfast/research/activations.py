"""Residual-stream activations through the lean decoder, batched, and written to safetensors shards.

"output" of layer L is the residual stream after decoder layer L (HF hidden_states[L + 1]).
"input" of layer L is the output of layer L - 1; for L = 0 it is the token embedding, read from
the embedding table directly (the decoder has no hook before its first layer, and none is needed).

Extraction is resumable: shard i holds records [i * shard_size, (i + 1) * shard_size), written to a
temporary name and renamed into place, so a shard that exists is complete; a rerun with the same
inputs and settings skips those and goes on (a run with different ones is refused, not mixed in).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..errors import InvalidInputError, LayerIndexError, SequenceTooLongError, TokenOutOfRangeError
from ..engine import right_pad
from ..model import Capture, Context
from .spans import Record

POINTS = ("output", "input")
MODES = ("sentence", "window", "all")
FORMAT = "steerfast.activations.v1"


def check_layer(model, layer: int, point: str = "output") -> None:
    n = model.args.n_layers
    if point not in POINTS:
        raise InvalidInputError(f"point must be one of {POINTS}, got {point!r}")
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise LayerIndexError(f"layer is {layer!r}; expected an int in [0, {n})")


def check_ids(model, ids: Sequence[Sequence[int]]) -> list[list[int]]:
    V, out = model.args.vocab_size, []
    if not isinstance(ids, (list, tuple)) or not ids:
        raise InvalidInputError("ids must be a non-empty list of token-id lists")
    for i, seq in enumerate(ids):
        seq = seq.tolist() if isinstance(seq, torch.Tensor) else list(seq)
        if not seq:
            raise InvalidInputError(f"ids[{i}] is empty")
        bad = [t for t in seq if not 0 <= int(t) < V]
        if bad:
            raise TokenOutOfRangeError(f"ids[{i}] holds token id {bad[0]}, outside the vocabulary [0, {V})")
        if len(seq) > model.max_seq_len:
            raise SequenceTooLongError(f"ids[{i}] has {len(seq)} tokens > max_seq_len={model.max_seq_len}")
        out.append([int(t) for t in seq])
    return out


@torch.no_grad()
def layer_activations(model, ids: Sequence[Sequence[int]], layer: int, point: str = "output",
                      batch_size: int = 16) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (i, activations [len(ids[i]), d]) for every sequence, in the model's dtype and device.

    Batched: sequences sorted by length (less padding), right-padded, each row at positions 0..n-1,
    so padding never reaches a real token (causal attention). Order of the yields is batch order."""
    check_layer(model, layer, point)
    ids = check_ids(model, ids)
    net, dev = model.net, model.device
    capture = layer if point == "output" else layer - 1  # -1: the embeddings
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for b0 in range(0, len(order), batch_size):
        rows = order[b0:b0 + batch_size]
        tokens, pos, _ = right_pad([ids[i] for i in rows], dev)
        B, T = tokens.shape
        if capture < 0:
            acts = net.tok_embeddings(tokens)
        else:
            model.ensure_cache(B, T)
            # logits at one position only: the [B, T, vocab] logits would cost more than the layers
            cap = Capture(capture)
            net(tokens, Context(input_pos=pos, kv_len=T, logits_index=torch.zeros(B, dtype=torch.int64, device=dev),
                                edits=(cap,)))
            acts = cap.value
        for r, i in enumerate(rows):
            yield i, acts[r, :len(ids[i])]


def span_rows(acts: torch.Tensor, spans, mode: str, offset: int = -12, width: int = 5):
    """Rows to keep from one sequence's activations [T, d]: list of (vector, span index, position).

    sentence: per span, the mean over tokens [start - 1, end) (start - 1: the token before the
    sentence already carries it, Venhoff et al.), clipped at 0; position = start.
    window: per span, each position start + offset ... start + offset + width - 1 that lies in
    [0, T) (Ward et al.; positions before the sequence are dropped, not clamped onto token 0).
    all: every position (span index -1)."""
    T = acts.shape[0]
    if mode == "all":
        return [(acts[p], -1, p) for p in range(T)]
    out = []
    for j, s in enumerate(spans):
        if mode == "sentence":
            out.append((acts[max(0, s.start - 1):s.end].float().mean(0), j, s.start))
        elif mode == "window":
            out += [(acts[p], j, p) for p in range(s.start + offset, s.start + offset + width) if 0 <= p < T]
        else:
            raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
    return out


def _fingerprint(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.ids, [(s.start, s.end, s.label) for s in r.spans]]).encode())
    return h.hexdigest()


def _write_shard(path: Path, tensors: dict, labels: list, texts: list) -> None:
    """Write to a temporary name, then rename: a shard that exists is a complete shard."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=dict(format=FORMAT, labels=json.dumps(labels), texts=json.dumps(texts)))
    os.replace(tmp, path)


def extract_activations(model, records: Sequence[Record], layer: int, out_dir, *, mode: str = "sentence",
                        point: str = "output", offset: int = -12, width: int = 5, shard_size: int = 256,
                        batch_size: int = 16, progress: bool | None = None, model_name: str | None = None) -> Path:
    """Capture activations of `records` after (point="output") or before ("input") decoder `layer`
    and write them to `out_dir` as safetensors shards (see `span_rows` for `mode`). Resumes an
    interrupted run in the same directory; returns the directory. Read back with `load_activations`.
    progress: a bar of sequences (None: on a terminal, see `steerfast.progress`)."""
    from ..progress import bar as progress_bar

    check_layer(model, layer, point)
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
    if not records:
        raise InvalidInputError("records is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(format=FORMAT, layer=layer, point=point, mode=mode, offset=offset, width=width,
                shard_size=shard_size, n_records=len(records), d=model.args.dim, model=model_name,
                inputs=_fingerprint(records))
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta:
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            raise InvalidInputError(f"{out} holds a run with other settings or inputs (differs in {diff}); "
                                    "use a new directory")
    else:
        meta_path.write_text(json.dumps(meta, indent=1))
    n_shards = -(-len(records) // shard_size)
    todo = [i for i in range(n_shards) if not (out / f"shard-{i:05d}.safetensors").exists()]
    n_done = len(records) - sum(len(records[i * shard_size:(i + 1) * shard_size]) for i in todo)
    bar = progress_bar(total=len(records), initial=n_done, desc=f"activations L{layer} {point}", unit="seq",
                       progress=progress)
    for i in todo:
        recs = records[i * shard_size:(i + 1) * shard_size]
        per_rec = {}
        for j, acts in layer_activations(model, [r.ids for r in recs], layer, point, batch_size):
            per_rec[j] = [(v.float().cpu(), s, p) for v, s, p in span_rows(acts, recs[j].spans, mode, offset, width)]
            bar.update(1)
        rows = [(j, *row) for j in range(len(recs)) for row in per_rec[j]]  # record order, not batch order
        d = model.args.dim
        tensors = dict(acts=torch.stack([v for _, v, _, _ in rows]) if rows else torch.zeros(0, d),
                       record=torch.tensor([i * shard_size + j for j, _, _, _ in rows], dtype=torch.int64),
                       span=torch.tensor([s for _, _, s, _ in rows], dtype=torch.int64),
                       pos=torch.tensor([p for _, _, _, p in rows], dtype=torch.int64))
        labels = [None if s < 0 else recs[j].spans[s].label for j, _, s, _ in rows]
        texts = [None if s < 0 else recs[j].spans[s].text for j, _, s, _ in rows]
        _write_shard(out / f"shard-{i:05d}.safetensors", tensors, labels, texts)
    bar.close()
    return out


@dataclass
class Activations:
    acts: torch.Tensor  # [N, d] float32
    record: torch.Tensor  # [N] index of the record
    span: torch.Tensor  # [N] index of the span in its record (-1: mode "all")
    pos: torch.Tensor  # [N] token position (sentence mode: the span's start)
    labels: list  # [N] the span's label (None: unlabelled)
    texts: list  # [N] the span's text where the record had text (example sentences), else None
    meta: dict


def load_activations(out_dir) -> Activations:
    """Concatenate the shards of a (complete) extraction run."""
    from safetensors import safe_open

    out = Path(out_dir)
    meta = json.loads((out / "meta.json").read_text())
    n_shards = -(-meta["n_records"] // meta["shard_size"])
    missing = [i for i in range(n_shards) if not (out / f"shard-{i:05d}.safetensors").exists()]
    if missing:
        raise InvalidInputError(f"{out}: shards {missing} are missing: the run did not finish (rerun it to resume)")
    parts, labels, texts = {k: [] for k in ("acts", "record", "span", "pos")}, [], []
    for i in range(n_shards):
        with safe_open(str(out / f"shard-{i:05d}.safetensors"), framework="pt") as fh:
            for k in parts:
                parts[k].append(fh.get_tensor(k))
            labels += json.loads(fh.metadata()["labels"])
            texts += json.loads(fh.metadata()["texts"])
    return Activations(**{k: torch.cat(v) for k, v in parts.items()}, labels=labels, texts=texts, meta=meta)
