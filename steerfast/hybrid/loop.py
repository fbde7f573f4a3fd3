"""`Hybrid`: a base model generates while a thinking model, read through a Top-K SAE, decides
which reasoning behaviour to steer toward (Venhoff et al., 2025). Semantics: docs/architecture.md,
"The hybrid loop"; steerfast.hybrid.reference is the paper's loop it must equal token for token.

How it stays cheap:
- the base model's KV cache only ever holds unsteered keys/values: a position is steered only
  while it lies in the current window, so the past never stays steered;
- layers up to `steer_layer` are the same for every candidate: their output is kept per position
  (the residual cache, d values a token), so a candidate re-runs only the later layers over its
  window; its keys/values go to a scratch row of the KV cache and its attention reads the prefix
  before the window straight from its sequence's row (Context.prefix_rows): nothing is copied;
- all candidates of a step, every coefficient and window, run as one packed batch: each window
  position is one row of the fused decode path, no padding (_pack_candidates);
- windows = [-1] with one vocabulary (the common case) runs each whole step on the device
  (step.py): candidates are extra rows of the same step, the choice is an argmax,
  no host sync, one CUDA graph per batch bucket on the GPU. Other windows use the host loop here,
  with one device->host transfer per step and the packed candidate re-run on steered steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .. import ops
from ..engine import Model, bucket_for
from ..errors import InvalidInputError, LayerIndexError, NonFiniteError, ShapeMismatchError
from ..model import Capture, Context
from ..sae import TopKSAE
from .result import HybridResult
from .step import StepSettings, fast_step, new_state, side_stream

GATES = ("thinking", "controller")


class Hybrid:
    """base, thinking: `steerfast.Model`s. sae: a TopKSAE on the thinking model's residual after
    decoder layer `sae_layer`. vectors [C, d_base]: one steering vector per category; bias [d_base]
    (or None) is added to each. Steering goes after base decoder layer `steer_layer`.

    gate="thinking" (the paper): when the thinking model's greedy token differs from the base
    model's, try every (coef, window) of `coefs` x `windows` and emit the candidate token the
    thinking model finds most probable. gate="controller": steer whenever the controller gives a
    category (its latent at or above `threshold`), with coefs[0] and windows[0], no search.
    gate=<float rate in (0, 1]>: a synthetic gate for benchmarks: steer (with the full search) at a
    fixed share of steps, whatever the models say, so throughput compares at a known share.
    windows: 0 steers every position (the prompt too), -n the last n positions.
    cat_map [n_latents] int: latent -> category (-1: none); default latent i is category i.
    tokenizers: (base_tokenizer, thinking_tokenizer) when the vocabularies differ: each base token
    is decoded and re-encoded for the thinking model, as the paper's code does.
    scratch_rows, max_packed_tokens: a steered step's candidates re-run in chunks of at most this
    many candidates (one extra base KV-cache row each) and about this many window positions
    (activation memory); only the host loop (windows other than [-1]) uses them.
    """

    def __init__(self, base: Model, thinking: Model, sae: TopKSAE, vectors: torch.Tensor, bias: torch.Tensor | None,
                 sae_layer: int, steer_layer: int, coefs: Sequence[float], windows: Sequence[int], *,
                 gate: str = "thinking", cat_map: torch.Tensor | None = None, threshold: float = float("-inf"),
                 tokenizers: tuple | None = None, scratch_rows: int = 64, max_packed_tokens: int = 8192,
                 fast: bool = True):
        if not isinstance(base, Model) or not isinstance(thinking, Model):
            raise InvalidInputError("base and thinking must be steerfast Models (steerfast.load_model)")
        if base is thinking:
            raise InvalidInputError("base and thinking are the same Model, so they would share one KV cache: "
                                    "load the checkpoint twice (two steerfast.load_model calls)")
        ab, at = base.args, thinking.args
        for name, layer, n in (("sae_layer", sae_layer, at.n_layers), ("steer_layer", steer_layer, ab.n_layers)):
            if not isinstance(layer, int) or not 0 <= layer < n:
                raise LayerIndexError(f"{name} is {layer!r}; expected an int in [0, {n})")
        if not isinstance(sae, TopKSAE) or sae.d != at.dim:
            raise ShapeMismatchError(f"sae must be a TopKSAE of width {at.dim} (the thinking model's), got "
                                     f"{getattr(sae, 'd', type(sae).__name__)}")
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[1] != ab.dim:
            raise ShapeMismatchError(f"vectors must be [n_categories, {ab.dim}] (the base model's width), got "
                                     f"{tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else vectors!r}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (ab.dim,)):
            raise ShapeMismatchError(f"bias must be [{ab.dim}] or None")
        for name, t in (("vectors", vectors), ("bias", bias)):
            if t is not None and not torch.isfinite(t).all():
                raise NonFiniteError(f"{name} holds NaN or Inf")
        cat_map = torch.arange(sae.n_latents) if cat_map is None else torch.as_tensor(cat_map)
        if cat_map.shape != (sae.n_latents,) or int(cat_map.max()) >= vectors.shape[0] or int(cat_map.min()) < -1:
            raise ShapeMismatchError(f"cat_map must map each of the SAE's {sae.n_latents} latents to a category in "
                                     f"[-1, {vectors.shape[0]}) (a row of vectors)")
        coefs, windows = [float(c) for c in coefs], list(windows)
        if not coefs or not all(torch.isfinite(torch.tensor(coefs))):
            raise InvalidInputError(f"coefs must be a non-empty list of finite numbers, got {coefs!r}")
        if not windows or not all(isinstance(w, int) and w <= 0 for w in windows):
            raise InvalidInputError(f"windows must be a non-empty list of ints <= 0 (0: all, -n: last n), got {windows!r}")
        for name, n in (("scratch_rows", scratch_rows), ("max_packed_tokens", max_packed_tokens)):
            if not isinstance(n, int) or n < 1:
                raise InvalidInputError(f"{name} must be an int >= 1, got {n!r}")
        if gate not in GATES and not (isinstance(gate, float) and 0 < gate <= 1):
            raise InvalidInputError(f"gate must be one of {GATES} or a float rate in (0, 1], got {gate!r}")
        if tokenizers is None and ab.vocab_size != at.vocab_size:
            raise InvalidInputError(f"the base and thinking vocabularies differ ({ab.vocab_size} vs {at.vocab_size}): "
                                    "pass tokenizers=(base_tokenizer, thinking_tokenizer)")
        if tokenizers is not None and _same_vocab(*tokenizers):
            tokenizers = None  # same vocabulary: pass ids through, no re-encoding
        dev = base.device
        self.base, self.thinking = base, thinking
        self.sae = sae.to(thinking.device, thinking.dtype)
        self.vectors = vectors.to(dev, base.dtype).contiguous()
        self.bias = None if bias is None else bias.to(dev, base.dtype).contiguous()
        self.cat_map = cat_map.to(thinking.device, torch.int32).contiguous()
        self.cat_coef = torch.ones(vectors.shape[0], dtype=torch.float32, device=thinking.device)  # one per category
        self.sae_layer, self.steer_layer, self.coefs, self.windows = sae_layer, steer_layer, coefs, windows
        self.gate, self.threshold, self.tokenizers = gate, float(threshold), tokenizers
        self.scratch_rows = scratch_rows  # candidates re-run at once (one base cache row each)
        self.max_packed_tokens = max_packed_tokens  # positions re-run at once (activation memory)
        self.fast = fast  # windows == [-1] with one vocabulary: whole steps on the device (step.py)
        self.settings = StepSettings(base.net, thinking.net, thinking.device, self.sae, self.cat_map, self.threshold,
                                     self.cat_coef, self.vectors, self.bias, sae_layer, steer_layer, gate,
                                     side_stream(base.device, thinking.device))
        # the fast step's graphs read both models' caches: captured by this hybrid's own runner (and
        # pool), released by either model when its cache is replaced
        self.graphs = base.graphs.sibling()
        base.share_cache(self.graphs)
        thinking.share_cache(self.graphs)

    # ------------------------------------------------------------------ helpers
    def _grid(self) -> list[tuple[float, int]]:
        """The (coef, window) candidates of a steered step: the controller gate's one, else all."""
        if self.gate == "controller":
            return [(self.coefs[0], self.windows[0])]
        return [(c, w) for c in self.coefs for w in self.windows]

    def _on_device(self, grid) -> bool:
        """Whether steps with this grid run whole on the device (step.py) rather than the host loop."""
        return self.fast and self.tokenizers is None and all(w == -1 for _, w in grid)

    def _retokenize(self, tok: int) -> list[int]:
        if self.tokenizers is None:
            return [tok]
        base_tok, think_tok = self.tokenizers
        return think_tok.encode(base_tok.decode([tok]), add_special_tokens=False)

    def _feed(self, m: Model, new: list[list[int]], lens: list[int], capture_layer: int):
        """Append each row's new tokens (several when re-encoding between tokenizers) at its length;
        last-position logits and the captured layer output at each row's last new position."""
        B, T, dev = len(new), max(map(len, new)), m.device
        tokens = torch.zeros(B, T, dtype=torch.int64, device=dev)
        pos = torch.empty(B, T, dtype=torch.int32, device=dev)
        for b, ids in enumerate(new):
            tokens[b, :len(ids)] = torch.tensor(ids, device=dev)
            pos[b] = torch.arange(lens[b], lens[b] + T, dtype=torch.int32, device=dev)  # padding runs past the end
        last = torch.tensor([len(ids) - 1 for ids in new], device=dev)
        cap = Capture(capture_layer)
        ctx = Context(input_pos=pos, kv_len=max(lens) + T, logits_index=last, edits=(cap,))
        logits = m.net(tokens, ctx)
        return logits, cap.value[torch.arange(B, device=dev), last]

    def _candidates(self, rows: list[int], cats: list[int], L: list[int], residual: torch.Tensor,
                    grid: list[tuple[float, int]], B: int) -> torch.Tensor:
        """Greedy base token of every (row, candidate) pair: [len(rows), len(grid)].

        Every candidate of every steered row, whatever its window, goes into one packed batch (per
        chunk of scratch rows): each position of each window is one row of the fused decode path,
        so windows of different lengths pack with no padding (varlen, by cumulative offsets). The
        positions of one candidate share a scratch cache row: each layer writes all their keys/values
        before any of them attends, so position p sees the window's own keys up to p (causal) and
        its sequence's unsteered prefix before the window in place (Context.prefix_rows)."""
        net, dev, la = self.base.net, self.base.device, self.steer_layer + 1
        plan = _pack_candidates(rows, cats, L, grid, B, min(self.scratch_rows, self.base.cache_rows - B),
                                self.max_packed_tokens)
        coefs = torch.tensor([c for c, _ in grid], dtype=torch.float32, device=dev)
        out = torch.empty(len(rows) * len(grid), dtype=torch.int64, device=dev)
        for idx, last, blocks in plan:  # host tensors: one transfer per chunk
            T, n = idx.shape[1], len(last)
            flat = torch.cat([idx.flatten(), last, blocks.flatten()]).to(dev)
            cand, pos, scratch, seq, first, cat, coef_j = flat[:7 * T].view(7, T).unbind(0)
            last = flat[7 * T:7 * T + n]  # [n] the row of each candidate's last position
            blocks = flat[7 * T + n:].view(-1, 2).to(torch.int32)
            x = residual[seq, pos].contiguous()  # [T, d]
            pos32, first32 = pos.to(torch.int32), first.to(torch.int32)
            ops.steer_add_(x[:, None], pos32[:, None], first32, self.vectors, cat.to(torch.int32), coefs[coef_j],
                           self.bias)
            ctx = Context(input_pos=pos32[:, None], rows=scratch, prefix_rows=seq, prefix_lens=first32,
                          seq_lens=pos32 + 1, query_blocks=blocks)
            x = net.decode_layers(x, ctx, la, len(net.layers))
            out[cand[last]] = net.decode_head(x[last], "argmax")
        return out.view(len(rows), len(grid))

    # ------------------------------------------------------------------ the device-side fast path
    def _fast_runner(self, Bb: int, n_eos: int, coefs: list[float]):
        """Fixed buffers and (on the GPU path) the captured fast step for this bucket."""
        key = (Bb, n_eos, tuple(coefs))
        if self.base.eager or self.thinking.device != self.base.device:  # a graph is one device's
            return new_state(Bb, self.base.cache_len, n_eos, coefs, self.base.device), None
        if key not in self.graphs:
            s = new_state(Bb, self.base.cache_len, n_eos, coefs, self.base.device)

            def reset():
                s.pos_b.zero_(), s.pos_t.zero_(), s.step.zero_()
            self.graphs.capture(key, lambda: fast_step(self.settings, s), s, reset=reset)
        graph, s = self.graphs.get(key)
        return s, graph

    def eager_step(self, batch: int, context: int) -> Callable[[], None] | None:
        """The device-side step (windows [-1], one vocabulary) of `batch` rows at `context` tokens on
        the buffers generate uses, set up and returned uncalled (None for the host loop): calling it
        runs the step eagerly, the kernels a replayed graph launches, for counting (bench count).
        The caches must hold `context` positions (after a generate)."""
        grid = self._grid()
        if not self._on_device(grid):
            return None
        Bb = batch if self.base.eager else bucket_for(batch)
        s, _ = self._fast_runner(Bb, 0, [c for c, _ in grid])  # eos_token_id=None: no stop ids
        s.pos_b.fill_(context - 1), s.pos_t.fill_(context - 1), s.step.zero_(), s.done.fill_(True)
        s.done[:batch] = False
        return lambda: fast_step(self.settings, s)

    def eager_candidates(self, context: int) -> Callable[[], torch.Tensor]:
        """One steered row's candidate re-runs (every coefficient x window), the host loop's packed
        batch at `context` tokens over a zero residual, returned uncalled, for counting (bench count)."""
        base = self.base
        grid = [(c, w) for c in self.coefs for w in self.windows]
        residual = torch.zeros(1, base.cache_len, base.args.dim, dtype=base.dtype, device=base.device)
        return lambda: self._candidates([0], [0], [context], residual, grid, 1)

    def _run_fast(self, run: "_Run", res: HybridResult, toks: list[int], start: int, callback, check_every=16):
        """Generate tokens start .. max_new_tokens-1 with the device-side step; record them in res."""
        s, graph, B, done = run.state, run.graph, run.B, run.done
        dev = s.tok.device
        s.tok.zero_()[:B] = torch.tensor(toks, device=dev)
        s.pos_b.zero_()[:B] = torch.tensor(run.Lb, dtype=torch.int32, device=dev)
        s.pos_t.zero_()[:B] = torch.tensor(run.Lt, dtype=torch.int32, device=dev)
        s.done.fill_(True)[:B] = torch.tensor(done, device=dev)
        s.step.fill_(start)
        s.eos.fill_(-1)[:len(run.eos)] = torch.tensor(sorted(run.eos), dtype=torch.int64, device=dev)
        end = start
        for i in range(start, run.max_new_tokens):
            graph.replay() if graph is not None else fast_step(self.settings, s)
            end = i + 1
            if callback is not None:  # waits for the device every step: only when asked for
                callback(i, s.tok[:B].tolist())
            if (i - start + 1) % check_every == 0 and bool(s.done[:B].all()):
                break
        cols = slice(start, end)
        out_tok, out_st, out_cat, out_best = (t[:B, cols].tolist() for t in
                                              (s.out_tok, s.out_steered, s.out_cat, s.out_best))
        for b in range(B):
            for tok, steered, cat, best in zip(out_tok[b], out_st[b], out_cat[b], out_best[b]):
                if done[b]:
                    break
                res.record(b, tok, steered, cat, run.grid[best])
                done[b] = tok in run.eos

    # ------------------------------------------------------------------ the host loop
    def _prepare(self, base_prompts, thinking_prompts, max_new_tokens: int, eos_token_id) -> "_Run":
        """Checks, the candidate grid, caches (growing them releases this hybrid's graphs) and, for
        the fast path, its captured step: everything before the first kernel of the run."""
        base, think = self.base, self.thinking
        base_prompts = base.check_prompts(base_prompts, max_new_tokens, "base_prompts")
        thinking_prompts = think.check_prompts(thinking_prompts, max_new_tokens, "thinking_prompts")
        B = len(base_prompts)
        if len(thinking_prompts) != B:
            raise InvalidInputError(f"{B} base prompts but {len(thinking_prompts)} thinking prompts")
        grid = self._grid()
        run = _Run(base_prompts, thinking_prompts, max_new_tokens, eos=set(base.stop_ids(eos_token_id, None, 1)[0]),
                   grid=grid, Lb=[len(p) for p in base_prompts], Lt=[len(p) for p in thinking_prompts],
                   fast=self._on_device(grid) and max_new_tokens > 1)
        Bb = B if base.eager else bucket_for(B)
        # cache rows: the batch (bucket), then scratch rows for candidates
        rows = Bb * (1 + len(grid)) if run.fast else max(Bb, B + min(self.scratch_rows, B * len(grid)))
        base.ensure_cache(rows, max(run.Lb) + max_new_tokens)
        think.ensure_cache(Bb, think.max_seq_len if self.tokenizers else max(run.Lt) + max_new_tokens)
        if run.fast:  # captured before the prefill: the dummy step's writes at position 0 get overwritten
            run.state, run.graph = self._fast_runner(Bb, len(run.eos), [c for c, _ in grid])
        run.residual = torch.empty(B, base.cache_len, base.args.dim, dtype=base.dtype, device=base.device)
        return run

    def _prefill(self, run: "_Run"):
        """Both prompts into the caches; the base residual at steer_layer kept for every position.
        Returns the base and thinking logits and the thinking residual at sae_layer (last position)."""
        logits_b, cap_b, _ = self.base.prefill(run.base_prompts, self.steer_layer)
        run.residual[:, :cap_b.shape[1]] = cap_b
        logits_t, cap_t, lens_t = self.thinking.prefill(run.thinking_prompts, self.sae_layer)
        return logits_b, logits_t, cap_t[torch.arange(run.B, device=self.thinking.device), lens_t - 1]

    def _choose(self, run: "_Run", step: int, logits_b, logits_t, a):
        """One step's decision for every row: (tokens [B] on the device, their list, the categories,
        {row: index of the chosen candidate} for the steered rows). One device->host transfer on an
        unsteered step: the gate, the categories, the tokens."""
        y0 = logits_b.argmax(-1)
        ctrl = self.sae.controller(a, self.cat_map, self.threshold, self.cat_coef)
        if self.gate == "thinking":
            steer = logits_t.argmax(-1).to(y0.device) != y0
        elif self.gate == "controller":
            steer = ctrl.category.to(y0.device) >= 0
        else:  # synthetic: steps where floor(step * rate) ticks over
            steer = torch.full_like(y0, int((step + 1) * self.gate) > int(step * self.gate), dtype=torch.bool)
        cat = ctrl.category.to(y0.device)
        steer &= cat >= 0
        flags, cats, toks = torch.stack([steer.long(), cat.long(), y0]).tolist()
        rows = [b for b, f in enumerate(flags) if f and not run.done[b]]
        tok, choice = y0.clone(), {}
        if rows:
            cand = self._candidates(rows, cats, run.Lb, run.residual, run.grid, run.B)
            if len(run.grid) > 1:  # the thinking model's logits at the candidates: a log-softmax would
                # shift each row by a constant (same choice, same ties: the first wins)
                best = logits_t[rows].to(cand.device).gather(1, cand).argmax(-1)
            else:
                best = torch.zeros(len(rows), dtype=torch.int64, device=cand.device)
            tok[rows] = cand[torch.arange(len(rows), device=cand.device), best]
            choice = dict(zip(rows, best.tolist()))
            toks = tok.tolist()
        return tok, toks, cats, choice

    def _advance(self, run: "_Run", tok, toks: list[int], logits_t, a):
        """Append the step's tokens to both sequences; the next step's logits and thinking residual."""
        base, think, B = self.base, self.thinking, run.B
        side = self.settings.side
        if self.tokenizers is None:  # same vocabulary: one token each, the graphed step, on the side
            new_t = [[t] for t in toks]  # stream (one GPU) while the base model's runs on this one
            with side.run():
                pos_t = torch.tensor(run.Lt, dtype=torch.int32, device=think.device)
                logits_t, a = think.forward_step(tok.to(think.device), pos_t, self.sae_layer)
        pos_b = torch.tensor(run.Lb, dtype=torch.int32, device=base.device)
        logits_b, cap = base.forward_step(tok, pos_b, self.steer_layer)  # a graph on the GPU
        run.residual[torch.arange(B, device=base.device), pos_b.long()] = cap
        if self.tokenizers is None:
            side.join(logits_t, a)
        else:
            new_t = [self._retokenize(t) for t in toks]
            width = max(map(len, new_t))  # _feed pads every row to this many positions
            if max(run.Lt) + width > think.cache_len:
                raise InvalidInputError("the thinking model's re-encoded text outgrew its max_seq_len")
            # a token whose text re-encodes to nothing leaves the thinking model where it was:
            # feed a placeholder (overwritten later, its length does not advance), keep its outputs
            empty = [b for b, ids in enumerate(new_t) if not ids]
            fed_logits, fed_a = self._feed(think, [ids or [0] for ids in new_t], run.Lt, self.sae_layer)
            if empty:
                fed_logits[empty], fed_a[empty] = logits_t[empty], a[empty]
            logits_t, a = fed_logits, fed_a
        run.Lb = [n + 1 for n in run.Lb]
        run.Lt = [n + len(ids) for n, ids in zip(run.Lt, new_t)]
        return logits_b, logits_t, a

    @torch.no_grad()
    def generate(self, base_prompts, thinking_prompts, max_new_tokens: int = 256,
                 eos_token_id: int | Sequence[int] | None | str = "default",
                 callback: Callable[[int, list[int]], None] | None = None) -> HybridResult:
        """callback(step, tokens): each step's token per sequence, as it is generated (a progress bar
        or a stream; it syncs with the device every step)."""
        run = self._prepare(base_prompts, thinking_prompts, max_new_tokens, eos_token_id)
        t0 = time.perf_counter()
        logits_b, logits_t, a = self._prefill(run)
        res = HybridResult.empty(run.B)
        for step in range(max_new_tokens):
            tok, toks, cats, choice = self._choose(run, step, logits_b, logits_t, a)
            for b in range(run.B):
                if not run.done[b]:
                    res.record(b, toks[b], b in choice, cats[b], run.grid[choice[b]] if b in choice else None)
                    run.done[b] = toks[b] in run.eos
            if callback is not None:
                callback(step, toks)
            if all(run.done) or step == max_new_tokens - 1:
                break
            if run.fast:  # the rest of the run on the device
                self._run_fast(run, res, toks, step + 1, callback)
                break
            logits_b, logits_t, a = self._advance(run, tok, toks, logits_t, a)
        res.elapsed_s = time.perf_counter() - t0
        return res


@dataclass
class _Run:
    """One generate call's host-side state."""
    base_prompts: list[list[int]]
    thinking_prompts: list[list[int]]
    max_new_tokens: int
    eos: set[int]
    grid: list[tuple[float, int]]  # (coefficient, window) candidates
    Lb: list[int]  # each base sequence's length so far
    Lt: list[int]  # each thinking sequence's length so far
    fast: bool
    state: object = None  # the fast path's StepState and graph
    graph: object = None
    residual: torch.Tensor | None = None  # [B, S, d]: the base residual after steer_layer, per position
    done: list[bool] = field(default_factory=list)

    def __post_init__(self):
        self.done = [False] * len(self.base_prompts)

    @property
    def B(self) -> int:
        return len(self.base_prompts)


def _pack_candidates(rows: list[int], cats: list[int], L: list[int], grid: list[tuple[float, int]], B: int,
                     scratch: int, max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The packed layout of one step's candidates (row r, grid entry j: candidate r * len(grid) + j),
    in chunks of at most `scratch` candidates (one scratch cache row each) and about `max_tokens`
    positions (at least one candidate). Per chunk three host tensors: [7, T] int64, a column per
    position (candidate, position, scratch cache row, sequence row, window start, category, grid
    entry); [n] int64, the column of each candidate's last position; [nb, 2] int32, the attention's
    query blocks (ops.window_query_blocks). Built with vectorised host ops: one transfer per chunk,
    not one index tensor per window, and no device->host read."""
    assert scratch >= 1, "the base cache needs scratch rows past the batch"
    ng = len(grid)
    seq = torch.tensor(rows).repeat_interleave(ng)  # [n]
    n_len = torch.tensor(L)[seq]
    w = torch.tensor([abs(gw) for _, gw in grid]).repeat(len(rows))
    first = torch.where(w == 0, 0, (n_len - w).clamp(min=0))
    width = n_len - first
    cat = torch.tensor(cats)[seq]
    j = torch.arange(ng).repeat(len(rows))
    chunks, start, ends = [], 0, width.cumsum(0).tolist()
    while start < len(seq):
        base = ends[start - 1] if start else 0
        stop = start + 1
        while stop < min(len(seq), start + scratch) and ends[stop] - base <= max_tokens:
            stop += 1
        c = torch.arange(start, stop)
        wc = width[c]
        cand = c.repeat_interleave(wc)
        offset = torch.arange(ends[stop - 1] - base) - (wc.cumsum(0) - wc).repeat_interleave(wc)
        idx = torch.stack([cand, first[cand] + offset, B + cand - start, seq[cand], first[cand], cat[cand], j[cand]])
        chunks.append((idx, wc.cumsum(0) - 1, ops.window_query_blocks(wc)))
        start = stop
    return chunks


def _same_vocab(base_tok, think_tok) -> bool:
    try:
        return base_tok.get_vocab() == think_tok.get_vocab()
    except AttributeError:
        return base_tok is think_tok
