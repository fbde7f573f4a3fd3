"""Optimised steering vectors (Venhoff et al. 2025, the hybrid paper): a vector added to the
residual stream at one layer, trained by Adam with a cosine schedule and early stopping to
minimise the cross-entropy of target sentences given their prefix; the bias vector is trained
first on whole traces and held fixed while each category vector trains on top of it.

Where it goes: point="output" (default) adds to the output of decoder layer L, where
`sf.Steering` and `sf.Hybrid(steer_layer=L)` add; point="input" adds to the input of layer L
(the paper's code uses a forward pre-hook there), i.e. the output of layer L - 1.
Which positions: those whose logits predict target tokens (the last prefix token through the
second-to-last target token): the hybrid steers the position whose logits choose the next token.
The paper's code steers the target tokens' own positions instead (one to the right).

Runs the torch reference path with autograd: a `model.Add` edit is a plain add. The shared KV
cache cannot carry autograd (each layer's write bumps the version of one buffer that earlier
layers' saved views share), so training forwards run in `Model.autograd_cache`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from ..model import Add, Context
from .activations import check_ids, check_layer
from .spans import Example
from .vectors import steering_layer


def _batch(model, examples: Sequence[Example]):
    """Right-padded tokens, the positions that predict target tokens (mask) and their targets."""
    seqs = [e.prefix + e.target for e in examples]
    B, T, dev = len(seqs), max(map(len, seqs)), model.device
    tokens = torch.zeros(B, T, dtype=torch.int64, device=dev)
    labels = torch.full((B, T), -100, dtype=torch.int64, device=dev)  # cross_entropy's ignore_index
    for b, (e, s) in enumerate(zip(examples, seqs)):
        tokens[b, :len(s)] = torch.tensor(s, device=dev)
        p = len(e.prefix)
        labels[b, p - 1:len(s) - 1] = torch.tensor(e.target, device=dev)
    return tokens, labels, labels >= 0


def example_loss(model, examples: Sequence[Example], layer: int, vector: torch.Tensor | None, *,
                 point: str = "output", reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of the targets with `vector` added at (layer, point) on the positions that
    predict them; differentiable in `vector`. reduction "sum" (over target tokens) or "mean"."""
    tokens, labels, mask = _batch(model, examples)
    B, T = tokens.shape
    edits = ()
    if vector is not None:
        edits = (Add(steering_layer(layer, point), mask[..., None].to(model.dtype) * vector.to(model.dtype)),)
    with model.autograd_cache(B, T):
        pos = torch.arange(T, dtype=torch.int32, device=model.device)[None].expand(B, T).contiguous()
        logits = model.net(tokens, Context(input_pos=pos, kv_len=T, edits=edits))
    logits = logits if logits.dtype == torch.float64 else logits.float()  # fp32 loss for half models
    return F.cross_entropy(logits.reshape(B * T, -1), labels.reshape(-1), reduction=reduction)


@torch.no_grad()
def eval_loss(model, examples: Sequence[Example], layer: int, vector: torch.Tensor | None, *,
              point: str = "output", batch_size: int = 8) -> float:
    """Mean cross-entropy per target token over `examples`."""
    total = sum(float(example_loss(model, examples[i:i + batch_size], layer, vector, point=point))
                for i in range(0, len(examples), batch_size))
    return total / sum(len(e.target) for e in examples)


@dataclass
class TrainResult:
    vector: torch.Tensor  # [d] float32: the best (lowest held-out loss) vector, bias not included
    baseline_loss: float  # held-out loss with the bias alone (no bias: unsteered)
    best_loss: float
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, eval_loss, lr


def train_vector(model, examples: Sequence[Example], layer: int, *, point: str = "output",
                 bias: torch.Tensor | None = None, eval_examples: Sequence[Example] | None = None,
                 lr: float = 1e-2, epochs: int = 20, batch_size: int = 8, patience: int = 3,
                 min_delta: float = 1e-4, init_norm: float = 1.0, seed: int = 0,
                 progress: bool | None = None) -> TrainResult:
    """Train one vector (added as bias + vector, the bias held fixed). Early stopping watches the
    held-out loss on `eval_examples` (default: the training examples) once per epoch. progress: a
    bar of batches with the losses (None: on a terminal, see `steerfast.progress`)."""
    from ..progress import bar

    check_layer(model, layer, point)
    steering_layer(layer, point)  # refuses the input of layer 0 before any work
    if not examples:
        raise InvalidInputError("examples is empty")
    for e in examples:
        check_ids(model, [e.prefix + e.target])
        if not e.prefix or not e.target:
            raise InvalidInputError("every example needs a non-empty prefix and target")
    eval_examples = list(eval_examples or examples)
    g = torch.Generator().manual_seed(seed)
    d, dev = model.args.dim, model.device
    vec = (torch.randn(d, generator=g) * init_norm / math.sqrt(d)).to(dev).requires_grad_(True)
    fixed = torch.zeros(d, device=dev) if bias is None else bias.detach().float().to(dev)
    opt = torch.optim.Adam([vec], lr=lr)
    n_batches = -(-len(examples) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, epochs * n_batches) / (epochs * n_batches))))
    baseline = eval_loss(model, eval_examples, layer, fixed if bias is not None else None, point=point)
    best, best_vec, stale, history = float("inf"), vec.detach().clone(), 0, []
    pbar = bar(total=epochs * n_batches, desc=f"vector L{layer}", unit="batch", progress=progress)
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=g).tolist()
        total, n_tok = 0.0, 0
        for i in range(0, len(order), batch_size):
            batch = [examples[j] for j in order[i:i + batch_size]]
            with torch.enable_grad():
                loss = example_loss(model, batch, layer, fixed + vec, point=point)
                n = sum(len(e.target) for e in batch)
                opt.zero_grad()
                (loss / n).backward()
            opt.step()
            sched.step()
            total, n_tok = total + float(loss.detach()), n_tok + n
            pbar.update(1)
        ev = eval_loss(model, eval_examples, layer, fixed + vec.detach(), point=point)
        history.append(dict(epoch=epoch, train_loss=total / n_tok, eval_loss=ev, lr=sched.get_last_lr()[0]))
        pbar.set_postfix(epoch=epoch + 1, train=f"{total / n_tok:.4f}", held_out=f"{ev:.4f}")
        if ev < best - min_delta:
            best, best_vec, stale = ev, vec.detach().clone(), 0
        else:
            stale += 1
            if stale >= patience:
                break
    pbar.close()
    return TrainResult(best_vec.float(), baseline, best, history)


def train_bias_and_categories(model, traces: Sequence[Example], examples: dict[str, Sequence[Example]], layer: int,
                              *, eval_traces: Sequence[Example] | None = None,
                              eval_examples: dict[str, Sequence[Example]] | None = None, **kw):
    """The paper's order: the bias vector on whole traces first, then each category's vector with
    that bias held fixed. -> (bias [d], {label: vector [d]}, {"bias" | label: TrainResult})."""
    results = {"bias": train_vector(model, traces, layer, eval_examples=eval_traces, **kw)}
    bias = results["bias"].vector
    for label, exs in examples.items():
        results[label] = train_vector(model, exs, layer, bias=bias,
                                      eval_examples=(eval_examples or {}).get(label), **kw)
    return bias, {label: results[label].vector for label in examples}, results
