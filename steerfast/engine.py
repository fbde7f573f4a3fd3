"""`Model`: the decode loop around the lean Transformer.

A ragged batch is prefilled once (right-padded, each row at its own positions), then every decode
step is the same fixed-shape computation on fixed buffers: on a GPU one CUDA graph per
batch-size bucket, owned (with its memory pool) by the model's `GraphRunner`, replayed with no
host sync inside a step. The host looks at the device only every `check_every` steps, to stop early
when every row has finished (and to see whether steering drove the activations non-finite).
"""
from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import fused_ops
from .errors import (InsufficientMemoryError, InvalidInputError, NonFiniteError, SequenceTooLongError,
                     TokenOutOfRangeError)
from .graphs import GraphRunner
from .inputs import as_token_lists
from .progress import bar as progress_bar
from .model import Capture, Context, LayerwiseKVCache, Steer, Transformer
from .sampling import sample
from .steering import Steering

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def bucket_for(batch: int) -> int:
    return next((b for b in BUCKETS if b >= batch), batch)


def right_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ragged batch as the model takes it: tokens [B, T] int64 right-padded with 0, positions
    [B, T] int32 (row b's tokens at 0..lens[b]-1; padding runs on past them), lens [B] int64."""
    B, T = len(prompts), max(map(len, prompts))
    tokens = torch.zeros(B, T, dtype=torch.int64, device=device)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p, device=device)
    pos = torch.arange(T, dtype=torch.int32, device=device)[None].expand(B, T).contiguous()
    return tokens, pos, torch.tensor([len(p) for p in prompts], device=device)


@dataclass
class StepBuffers:
    """Everything one decode step reads and writes; graphs capture these addresses."""
    tok: torch.Tensor  # [Bb] int64, the token fed this step
    pos: torch.Tensor  # [Bb] int32, its position
    seq_lens: torch.Tensor  # [Bb] int32, pos + 1: the keys it attends
    rows: torch.Tensor  # [Bb] int64, its KV-cache row
    done: torch.Tensor  # [Bb] bool
    step: torch.Tensor  # [Bb] int64, column of `out` written this step (per row: one kernel updates it)
    out: torch.Tensor  # [Bb, max_new] int64
    stop: torch.Tensor  # [Bb, n_stop] int64, -1 padded
    temperature: torch.Tensor  # [Bb] float32
    top_k: torch.Tensor  # [Bb] int64
    top_p: torch.Tensor  # [Bb] float32
    seed: torch.Tensor  # [Bb] int64
    steer: Steer | None
    finite: torch.Tensor  # [Bb] bool, cleared when a steered row's residual stream overflows (norm_is_finite)


class Model:
    """A loaded checkpoint ready to generate. Build it with `steerfast.load_model`."""

    def __init__(self, net: Transformer, max_seq_len: int | None = None, eager: bool | None = None,
                 check_every: int = 16, graph_backend=None):
        self.net = net
        self.args = net.args
        p = net.tok_embeddings.weight
        self.device, self.dtype = p.device, p.dtype
        self.max_seq_len = max_seq_len or self.args.max_position_embeddings
        self.eager = self.device.type != "cuda" if eager is None else eager
        self.check_every = check_every
        self.graphs = GraphRunner(self.device, graph_backend)  # step graphs, their buffers and pool
        self._cache_readers: weakref.WeakSet[GraphRunner] = weakref.WeakSet()  # see share_cache

    @property
    def cache_len(self) -> int:
        """Positions the KV cache holds now (0 before the first generate)."""
        return 0 if self.net.kv is None else self.net.kv.max_seq_len

    @property
    def cache_rows(self) -> int:
        """Sequences the KV cache holds now (0 before the first generate)."""
        return 0 if self.net.kv is None else self.net.kv.max_batch

    def share_cache(self, runner: GraphRunner):
        """Mark another owner's graphs (a Hybrid's) as reading this model's KV cache: they are
        released with the model's own whenever the cache is replaced or freed, so no graph outlives
        the addresses it captured and no stale pool holds memory the new cache needs."""
        self._cache_readers.add(runner)

    def _release_graphs(self):
        self.graphs.release()
        for runner in list(self._cache_readers):
            runner.release()

    @contextmanager
    def autograd_cache(self, batch: int, seq_len: int):
        """Inside: forwards write a fresh per-layer cache that autograd can differentiate through
        (research code training vectors); outside, the model's own cache is back, untouched."""
        self.ensure_cache(batch, seq_len)  # RoPE tables for seq_len positions
        a, saved = self.args, self.net.kv
        self.net.kv = LayerwiseKVCache(a.n_layers, batch, seq_len, a.n_kv_heads, a.head_dim, self.dtype, self.device)
        try:
            yield
        finally:
            self.net.kv = saved

    def release(self):
        """Free the step graphs and the KV cache (the next generate makes them again)."""
        self._release_graphs()
        self.net.kv = None

    # ------------------------------------------------------------------ checks
    def check_prompts(self, prompts, max_new_tokens: int, name: str = "prompts") -> list[list[int]]:
        """Prompts in any form steerfast.inputs accepts, checked against this model: list[list[int]]."""
        prompts = as_token_lists(prompts, name)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        V, out = self.args.vocab_size, []
        for i, p in enumerate(prompts):
            bad = [t for t in p if not 0 <= t < V]
            if bad:
                raise TokenOutOfRangeError(f"{name}[{i}] holds token id {bad[0]}, outside the vocabulary [0, {V})")
            if len(p) + max_new_tokens > self.max_seq_len:
                raise SequenceTooLongError(
                    f"{name}[{i}] has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                    f"{len(p) + max_new_tokens} > max_seq_len={self.max_seq_len} (set at load_model)")
            out.append(list(p))
        return out

    def stop_ids(self, eos_token_id="default", stop_ids=None, B: int = 1) -> list[list[int]]:
        """Per sequence, the ids that end it: the checkpoint's EOS ids (eos_token_id="default"), the
        given ones, or none (None), plus `stop_ids` (one list, or one per sequence)."""
        eos = list(self.args.eos_token_ids) if eos_token_id == "default" else (
            [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        per_seq = stop_ids if stop_ids and isinstance(stop_ids[0], (list, tuple)) else [stop_ids or []] * B
        if len(per_seq) != B:
            raise InvalidInputError(f"stop_ids has {len(per_seq)} lists for {B} prompts")
        return [eos + list(s) for s in per_seq]

    # ------------------------------------------------------------------ memory
    def ensure_cache(self, batch: int, seq_len: int):
        """Make the KV cache hold `batch` rows x `seq_len` positions, growing it if needed."""
        kv = self.net.kv
        if kv is not None and kv.max_batch >= batch and kv.max_seq_len >= seq_len:
            return
        rows = max(batch, kv.max_batch if kv else 0)
        seq = min(self.max_seq_len, max(-(-seq_len // 256) * 256, kv.max_seq_len if kv else 0))
        a = self.args
        per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * self.dtype.itemsize
        self._release_graphs()  # graphs hold the old cache's addresses
        if self.device.type == "cuda":
            # the released graphs' pools (and other cached blocks) back to the driver, whose free
            # memory is what a new cache can have, with the old cache's (rare: growth only)
            gc.collect()
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(self.device)[0] + (kv.k.numel() * 2 * kv.k.element_size() if kv else 0)
            budget = int(free * 0.9)  # leave room for activations and graphs
            if rows * seq * per_token > budget:
                raise InsufficientMemoryError(
                    f"a KV cache of batch {rows} x {seq} positions needs {rows * seq * per_token / 2**30:.2f} GiB, "
                    f"{budget / 2**30:.2f} GiB is free: at this length a batch of {budget // (seq * per_token)} fits, "
                    f"at this batch {budget // (rows * per_token)} positions")
        del kv  # the old cache goes before the new one is allocated, not after
        self.net.setup_cache(rows, seq)

    def prefill(self, prompts: Sequence[Sequence[int]], capture_layer: int | None = None):
        """Run a ragged batch of prompts into the KV cache (rows 0..B-1), which must be large enough
        (ensure_cache). Returns the last position's logits [B, V], the output of `capture_layer` at
        every position [B, T, d] (or None) and the lengths [B] int64."""
        tokens, pos, lens = right_pad(prompts, self.device)
        cap = Capture(capture_layer)
        ctx = Context(input_pos=pos, kv_len=tokens.shape[1], logits_index=lens - 1,
                      edits=() if capture_layer is None else (cap,))
        logits = self.net(tokens, ctx)
        return logits, cap.value, lens

    # ------------------------------------------------------------------ one decode step
    def _decode_step(self, s: StepBuffers, mode: str):
        """One token for every row of `s`: greedy is the decoder's fused kernels plus an argmax head
        and one bookkeeping kernel; sampling reads the logits."""
        cap = None if s.steer is None else Capture(s.steer.layer)  # its output: the overflow check
        ctx = Context(input_pos=s.pos[:, None], edits=() if cap is None else (s.steer, cap), rows=s.rows,
                      seq_lens=s.seq_lens)
        if mode == "greedy":
            nxt = self.net(s.tok[:, None], ctx, head="argmax")
        else:
            logits = self.net(s.tok[:, None], ctx)[:, 0]
            nxt = sample(logits, s.temperature, s.top_k, s.top_p, s.seed, s.pos + 1, mode)
        if s.steer is not None:
            s.finite &= norm_is_finite(cap.value[:, 0])
        # finished rows stand still (trimmed on the host); record, stop, advance
        fused_ops.decode_tail_(nxt, s.done, s.tok, s.pos, s.seq_lens, s.step, s.out, s.stop)

    def _buffers(self, Bb, n_stop, steer_layer) -> StepBuffers:
        dev = self.device
        z = lambda dtype, *shape: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        steer = None
        if steer_layer is not None:
            steer = Steer(layer=steer_layer, vectors=z(self.dtype, Bb, self.args.dim),
                          idx=torch.arange(Bb, dtype=torch.int32, device=dev), coef=z(torch.float32, Bb),
                          start=z(torch.int32, Bb))
        return StepBuffers(tok=z(torch.int64, Bb), pos=z(torch.int32, Bb), seq_lens=z(torch.int32, Bb) + 1,
                           rows=torch.arange(Bb, device=dev), done=torch.ones(Bb, dtype=torch.bool, device=dev),
                           step=z(torch.int64, Bb), out=z(torch.int64, Bb, self.net.kv.max_seq_len), stop=z(torch.int64, Bb, n_stop) - 1,
                           temperature=z(torch.float32, Bb), top_k=z(torch.int64, Bb), top_p=z(torch.float32, Bb),
                           seed=z(torch.int64, Bb), steer=steer,
                           finite=torch.ones(Bb, dtype=torch.bool, device=dev))

    def _runner(self, Bb, n_stop, steer_layer, mode):
        """Fixed buffers for this shape, and (on the GPU path) the captured step graph. `out` is
        as wide as the cache, so one graph serves every max_new_tokens."""
        key = ("decode", Bb, n_stop, steer_layer, mode)
        if self.eager:
            return None, self._buffers(Bb, n_stop, steer_layer)
        if key not in self.graphs:
            # dummy state: rows done, at position 0, whose KV writes the prefill that follows overwrites
            s = self._buffers(Bb, n_stop, steer_layer)
            self.graphs.capture(key, lambda: self._decode_step(s, mode), s,
                                reset=lambda: (s.pos.zero_(), s.seq_lens.fill_(1), s.step.zero_()))
        return self.graphs.get(key)

    def eager_step(self, batch: int, context: int) -> Callable[[], None]:
        """One greedy decode step of `batch` rows at `context` tokens on the fixed buffers generate
        uses, set up (cache, buffers, graph) and returned uncalled: calling it runs the step eagerly,
        the kernels a replayed graph launches, for counting kernels and bytes (steerfast.launch_count,
        bench count). The tokens it writes at position context - 1 are scratch."""
        Bb = batch if self.eager else bucket_for(batch)
        self.ensure_cache(Bb, context)
        _, s = self._runner(Bb, 4, None, "greedy")  # generate's key for eos_token_id=None (stop lists padded to 4)
        s.pos.fill_(context - 1), s.seq_lens.fill_(context), s.step.zero_(), s.done.zero_()
        s.done[batch:] = True
        return lambda: self._decode_step(s, "greedy")

    def forward_step(self, tok: torch.Tensor, pos: torch.Tensor, capture_layer: int | None = None):
        """One token per row: tok [B] int64 at positions pos [B] int32 -> (last logits [B, V], the
        output of `capture_layer` [B, d] or None). Replays a CUDA graph per batch bucket on the GPU
        path. Used by the hybrid. Bucket padding rows write position 0 of cache rows B..bucket-1:
        callers own those rows."""
        def run(tok, pos):
            cap = Capture(capture_layer)
            edits = () if capture_layer is None else (cap,)
            logits = self.net(tok[:, None], Context(input_pos=pos[:, None], edits=edits))[:, 0]
            return logits, None if capture_layer is None else cap.value[:, 0]

        if self.eager:
            return run(tok, pos)
        B, Bb = tok.shape[0], bucket_for(tok.shape[0])
        key = ("step", Bb, capture_layer)
        if key not in self.graphs:
            bufs = dict(tok=torch.zeros(Bb, dtype=torch.int64, device=self.device),
                        pos=torch.zeros(Bb, dtype=torch.int32, device=self.device))

            def step():
                bufs["logits"], bufs["captured"] = run(bufs["tok"], bufs["pos"])
            # the capture's warm-up runs the step for real, writing token 0's keys at position 0 of
            # rows [0, Bb): live sequences when the caller is mid-run (the hybrid's host loop), so
            # those entries are put back
            k, v = self.net.kv.k, self.net.kv.v
            saved = k[:, :Bb, 0].clone(), v[:, :Bb, 0].clone()
            self.graphs.capture(key, step, bufs)
            k[:, :Bb, 0].copy_(saved[0])
            v[:, :Bb, 0].copy_(saved[1])
        g, bufs = self.graphs.get(key)
        bufs["tok"].zero_()[:B] = tok
        bufs["pos"].zero_()[:B] = pos
        g.replay()
        return bufs["logits"][:B], None if capture_layer is None else bufs["captured"][:B]

    # ------------------------------------------------------------------ generate
    @torch.no_grad()  # not inference_mode: its tensors could not be updated in place outside it
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 256, *,
                 temperature: float | Sequence[float] = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, eos_token_id: int | Sequence[int] | None | str = "default",
                 stop_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
                 steering: Steering | None = None,
                 callback: Callable[[int, list[int]], None] | None = None,
                 progress: bool | None = None) -> list[list[int]]:
        """Generate up to `max_new_tokens` for each prompt; return each one's new tokens, up to and
        including its first stop token (EOS by default, plus `stop_ids`, per sequence if nested).

        temperature 0 is greedy; > 0 samples (with top_k / top_p if given), reproducibly: a
        sequence's samples depend only on `seed`, its index in `prompts` and its positions.
        callback(step, tokens) streams each step's token per sequence (it syncs every step).
        progress: a bar of steps (default: on a terminal, for 256 new tokens or more; STEERFAST_QUIET
        silences it). It never syncs: it shows steps enqueued, which the stop checks keep honest.
        """
        prompts = self.check_prompts(prompts, max_new_tokens)
        B, dev, a = len(prompts), self.device, self.args
        temps = [float(t) for t in (temperature if isinstance(temperature, (list, tuple)) else [temperature] * B)]
        if len(temps) != B or any(t < 0 or t != t for t in temps):
            raise InvalidInputError(f"temperature must be >= 0, one value or one per prompt; got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise InvalidInputError(f"top_k must be an int >= 1, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {top_p!r}")
        steer_vecs = steering.check(a.dim, a.n_layers, B) if steering is not None else None
        stops = self.stop_ids(eos_token_id, stop_ids, B)
        mode = "greedy" if max(temps) == 0 else "filter" if (top_k or top_p) else "sample"

        lens = [len(p) for p in prompts]
        Bb = bucket_for(B) if not self.eager else B
        self.ensure_cache(Bb, max(lens) + max_new_tokens)
        n_stop = -(-max(1, max(len(s) for s in stops)) // 4) * 4  # padded: fewer graph variants
        graph, s = self._runner(Bb, n_stop, steering.layer if steering else None, mode)

        # the request's state, copied into the fixed buffers (rows >= B are idle padding)
        T = max(lens)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
        s.temperature.zero_()[:B] = torch.tensor(temps, device=dev)
        s.top_k.fill_(a.vocab_size)[:B] = top_k or a.vocab_size
        s.top_p.fill_(1.0)[:B] = top_p or 1.0
        s.seed[:B] = torch.tensor([(seed * 1_000_003 + i) & 0x7FFFFFFF for i in range(B)], device=dev)
        s.stop.fill_(-1)[:B] = torch.tensor([st + [-1] * (n_stop - len(st)) for st in stops], dtype=torch.int64, device=dev)
        if s.steer is not None:
            s.steer.vectors.zero_()[:B] = steer_vecs.to(dev, self.dtype)
            s.steer.coef.zero_()[:B] = float(steering.coef)
            s.steer.start.zero_()[:B] = lens_t if steering.positions == "generated" else 0

        tokens, pos, _ = right_pad(prompts, dev)  # row b's tokens sit at positions 0..lens[b]-1
        steer = None
        if s.steer is not None:
            st = s.steer
            steer = Steer(st.layer, st.vectors[:B], st.idx[:B], st.coef[:B], st.start[:B])
        cap = None if steer is None else Capture(steer.layer)
        ctx = Context(input_pos=pos, kv_len=T, logits_index=(lens_t - 1).long(),
                      edits=() if steer is None else (steer, cap))
        logits = self.net(tokens, ctx)
        first = sample(logits, s.temperature[:B], s.top_k[:B], s.top_p[:B], s.seed[:B], lens_t, mode)

        s.tok.zero_()[:B] = first
        s.pos.zero_()[:B] = lens_t
        torch.add(s.pos, 1, out=s.seq_lens)
        s.out.zero_()[:B, 0] = first
        s.done.fill_(True)[:B] = (first[:, None] == s.stop[:B]).any(-1)
        s.finite.fill_(True)
        if s.steer is not None:
            s.finite[:B] = norm_is_finite(cap.value).all(-1)
        s.step.fill_(1)
        if callback is not None:
            callback(0, first.tolist())
        n_out = 1
        bar = progress_bar(total=max_new_tokens, initial=1, unit="tok", desc=f"generate (batch {B})", leave=False,
                           progress=progress if progress is not None else (None if max_new_tokens >= 256 else False))
        for step in range(1, max_new_tokens):
            bar.update()
            n_out = step + 1
            if graph is not None:
                graph.replay()
            else:
                self._decode_step(s, mode)
            if callback is not None:
                callback(step, s.tok[:B].tolist())
            if step % self.check_every == 0:
                all_done, finite = torch.stack([s.done[:B].all(), s.finite[:B].all()]).tolist()
                if all_done or not finite:
                    break
        bar.close()
        if s.steer is not None and not bool(s.finite[:B].all()):
            rows = (~s.finite[:B]).nonzero()[:, 0].tolist()
            raise NonFiniteError(
                f"the activations of sequence(s) {rows} became NaN/Inf after steering at layer {steering.layer} "
                f"(coef {steering.coef} x vector norm {steer_vecs.float().norm(dim=-1).max().item():.3g}): "
                "the vector is too large for this model's residual stream")
        out = s.out[:B, :n_out].tolist()
        return [_trim(row, set(st)) for row, st in zip(out, stops)]


def norm_is_finite(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [...] bool: the next RMSNorm's sum of squares is finite. A steering vector that is
    finite on its own can still overflow it, and the norm then turns the row into zeros (or NaN):
    garbage tokens with finite logits. (One reduction and one compare: it runs in the decode step.)"""
    x = x.float() if x.dtype == torch.float64 else x  # RMSNorm's statistics are fp32 for every model dtype
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32) <= torch.finfo(torch.float32).max


def _trim(row: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[:i + 1]
    return row
