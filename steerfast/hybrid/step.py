"""The hybrid's fast path (windows = [-1], one vocabulary): a whole step on the device.

Both models take the last token, the controller names a category, the gate decides, and every
coefficient's candidate is an extra row of the same step: the base residual after `steer_layer`
at the current position, steered, run through the later layers together with the unsteered row
(one pass: the upper layers' weights and the lm_head are read once) against its sequence's
unsteered KV prefix (Context.prefix_rows). The thinking model's logits at the candidate tokens pick
the candidate, and the token, record and stop flags are written into fixed buffers. No host sync: on the GPU the step is
one CUDA graph per batch bucket, replayed once per token.

Two streams (both models on one GPU): the thinking model runs on a side stream while the base model
runs on the current one. The base's upper layers need only the controller's category (thinking
layers up to sae_layer), the choice needs the thinking logits, so the critical path is about
max(thinking lower, base lower) + max(base upper, thinking upper) layers rather than their sum; at
small batch each kernel fills a fraction of the GPU and the two streams' kernels run side by side.
Captured into the graph as a fork and a join; on the CPU everything runs in order.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .. import ops
from ..model import Context


@dataclass(frozen=True)
class StepSettings:
    """What the step reads besides its buffers: the two decoders, the controller and the steering."""
    base: object  # model.Transformer
    thinking: object  # model.Transformer
    thinking_device: torch.device
    sae: object  # TopKSAE, on the thinking model's device
    cat_map: torch.Tensor  # [n_latents] int32
    threshold: float
    cat_coef: torch.Tensor  # [C] fp32
    vectors: torch.Tensor  # [C, d_base]
    bias: torch.Tensor | None  # [d_base]
    sae_layer: int
    steer_layer: int
    gate: str | float
    side: "SideStream | InOrder"  # the thinking model's stream (both models on one GPU)


class SideStream:
    """The thinking model's CUDA stream: work issued under `run()` starts after everything the current
    stream had issued when it began; `mark()` notes a point in it, `join()` makes the current stream
    wait for the side (up to a mark)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def run(self):
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield

    def mark(self) -> torch.cuda.Event:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def join(self, *made_here: torch.Tensor, event: torch.cuda.Event | None = None):
        """Tensors the side allocated and the current stream reads are recorded as used there (in
        eager mode the allocator would otherwise hand their memory out again too early)."""
        cur = torch.cuda.current_stream(self.stream.device)
        cur.wait_event(event) if event is not None else cur.wait_stream(self.stream)
        if not torch.cuda.is_current_stream_capturing():  # a graph's pool keeps its blocks anyway
            for t in made_here:
                t.record_stream(cur)


class InOrder:
    """No second stream (the CPU, two devices, STEERFAST_TWO_STREAMS=0): SideStream's calls, everything
    issued in order on the current stream."""

    def run(self):
        return contextlib.nullcontext()

    def mark(self):
        return None

    def join(self, *made_here, event=None):
        pass


def side_stream(base_device: torch.device, thinking_device: torch.device) -> SideStream | InOrder:
    """The thinking model's stream when both models are on one GPU, unless STEERFAST_TWO_STREAMS=0 (the
    A/B switch for measuring the overlap)."""
    same = base_device.type == "cuda" and torch.device(thinking_device) == torch.device(base_device)
    return SideStream(base_device) if same and os.environ.get("STEERFAST_TWO_STREAMS", "1") != "0" else InOrder()


@dataclass
class StepState:
    """The fixed buffers one fast step reads and writes (rows: the batch bucket)."""
    tok: torch.Tensor  # [Bb] int64, last emitted token, fed to both models
    pos_b: torch.Tensor  # [Bb] int32, its position in the base sequence
    pos_t: torch.Tensor  # [Bb] int32, its position in the thinking sequence
    done: torch.Tensor  # [Bb] bool
    step: torch.Tensor  # [1] int64, generated-token index of the token this step emits
    eos: torch.Tensor  # [n_eos] int64 (-1 padded)
    out_tok: torch.Tensor  # [Bb, W] int64, by step
    out_steered: torch.Tensor  # [Bb, W] bool
    out_cat: torch.Tensor  # [Bb, W] int32
    out_best: torch.Tensor  # [Bb, W] int64, index of the chosen coefficient
    coef_rows: torch.Tensor  # [nc*Bb] fp32, the coefficient of each candidate row
    rows: torch.Tensor  # [(nc+1)*Bb] int64, cache row of each row of the step: the sequences', then scratch
    prefix_rows: torch.Tensor  # [(nc+1)*Bb] int64, the sequence row each row reads its prefix from
    zeros: torch.Tensor  # [nc*Bb] int32


def new_state(Bb: int, width: int, n_eos: int, coefs: list[float], device) -> StepState:
    z = lambda dtype, *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
    nc = len(coefs)
    return StepState(coef_rows=torch.tensor(coefs, dtype=torch.float32, device=device).repeat_interleave(Bb),
                     rows=torch.arange((nc + 1) * Bb, device=device),
                     prefix_rows=torch.arange(Bb, device=device).repeat(nc + 1), zeros=z(torch.int32, nc * Bb),
                     tok=z(torch.int64, Bb), pos_b=z(torch.int32, Bb), pos_t=z(torch.int32, Bb),
                     done=torch.ones(Bb, dtype=torch.bool, device=device), step=z(torch.int64, 1),
                     eos=z(torch.int64, max(n_eos, 1)) - 1, out_tok=z(torch.int64, Bb, width),
                     out_steered=z(torch.bool, Bb, width), out_cat=z(torch.int32, Bb, width),
                     out_best=z(torch.int64, Bb, width))


def fast_step(h: StepSettings, s: StepState) -> None:
    """One generated token for every row of `s`, all on the device."""
    base, think = h.base, h.thinking
    Bb, dev = s.tok.shape[0], s.tok.device
    nc = s.coef_rows.shape[0] // Bb
    la = h.steer_layer + 1
    # the thinking model, on the side stream: its layers up to sae_layer and the controller, then the
    # rest and its logits; meanwhile the base rows run up to steer_layer, where the candidates branch off
    with h.side.run():
        ctx_t = Context(input_pos=s.pos_t[:, None])
        tok_t = s.tok.to(h.thinking_device)
        a = think.decode_layers(think.tok_embeddings(tok_t), ctx_t, 0, h.sae_layer + 1)
        cat = h.sae.controller(a, h.cat_map, h.threshold, h.cat_coef).category.to(dev)
        cat_ready = h.side.mark()
        xt = think.decode_layers(a, ctx_t, h.sae_layer + 1, len(think.layers))
        logits_t = think.decode_head(xt, "logits")  # [Bb, V]
    ctx_b = Context(input_pos=s.pos_b[:, None])
    x = base.decode_layers(base.tok_embeddings(s.tok), ctx_b, 0, la)  # [Bb, d], unsteered
    h.side.join(cat, event=cat_ready)

    # rows c * Bb + b (c >= 1): coefficient c - 1 for sequence b, steered at the same position; row b
    # (c = 0) is the sequence itself. One pass of the upper layers reads their weights once for all
    # rows; candidate rows write their keys/values to scratch cache rows and read their sequence's
    # prefix in place (Context.prefix_rows); for the sequence's own row that is its own row.
    pos = s.pos_b.repeat(nc + 1)[:, None]  # [(nc+1)*Bb, 1]
    xs = x.repeat(nc + 1, 1)  # [(nc+1)*Bb, d]
    ops.steer_add_(xs[Bb:, None], pos[Bb:], s.zeros, h.vectors, cat.to(torch.int32).repeat(nc), s.coef_rows, h.bias)
    ctx_c = Context(input_pos=pos, rows=s.rows, prefix_rows=s.prefix_rows, prefix_lens=pos[:, 0])
    y = base.decode_head(base.decode_layers(xs, ctx_c, la, len(base.layers)), "argmax")  # [(nc+1)*Bb]
    h.side.join(logits_t)
    y = y.view(nc + 1, Bb).T  # [Bb, nc+1]
    y0, y_c = y[:, 0], y[:, 1:]
    if h.gate == "thinking":
        gate = logits_t.argmax(-1).to(dev) != y0
    elif h.gate == "controller":
        gate = torch.ones_like(y0, dtype=torch.bool)
    else:  # synthetic: steps where floor(step * rate) ticks over, as the host-side loop counts them
        t = s.step.double()
        gate = (((t + 1) * h.gate).floor() > (t * h.gate).floor()).expand(Bb)
    gate = gate & (cat >= 0) & ~s.done
    # the thinking model's favourite candidate: its logits gathered at the candidate tokens (a
    # log-softmax is a per-row shift: the same choice and the same ties, first wins)
    best = logits_t.to(dev).gather(1, y_c).argmax(-1) if nc > 1 else torch.zeros_like(y0)
    nxt = torch.where(gate, y_c.gather(1, best[:, None])[:, 0], y0)
    nxt = torch.where(s.done, s.tok, nxt)

    col = s.step.expand(Bb, 1)
    s.out_tok.scatter_(1, col, nxt[:, None])
    s.out_steered.scatter_(1, col, gate[:, None])
    s.out_cat.scatter_(1, col, cat.to(torch.int32)[:, None])
    s.out_best.scatter_(1, col, best[:, None])
    s.done |= (nxt[:, None] == s.eos).any(-1)
    s.tok.copy_(nxt)
    s.pos_b.add_(1)
    s.pos_t.add_(1)
    s.step.add_(1)
