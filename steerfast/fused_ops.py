"""The fused decode-step ops (project issue 11: a decode step at the memory-bandwidth floor, <= 6
kernels per decoder layer): a torch reference and a Triton kernel each, behind `backend.choose`,
registered as torch.library custom ops (opaque to torch.compile and CUDA graphs), as steerfast.ops.

    fused_linear       RMSNorm? -> x @ W.T + bias -> SwiGLU? -> + residual? -> steering?   (1 kernel)
    qkv_rope_kv_write  RMSNorm -> QKV -> RoPE on q, k -> k, v into the cache; returns q    (1 kernel)
    lm_head_argmax     final RMSNorm -> lm_head -> greedy argmax, no [M, V] logits          (2 kernels)
    decode_tail_       the greedy step's bookkeeping: emitted token, stop, positions        (1 kernel)

The references (`*_torch`) round to the model dtype exactly where steerfast.model (and so HF
transformers) rounds in eager mode; with float64 inputs they compute in float64 throughout (RMSNorm's
`x.float()` becomes float64), which the tests use as ground truth. Only "triton" and "torch" exist
(no CUDA C++ versions); float64 runs the reference only, and so do more than FUSED_MAX_M rows
unless a backend is named. Host-side checks are shape/dtype asserts:
no value checks, no host syncs.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import backend as _backend
from .ops import steer_add_torch
from .tuning import reference_wins

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# The Triton kernels are GEMVs: one program streams a slice of W once for a block of up to 64 rows;
# each further row block reads W again (from L2 when the blocks run together). At a few blocks that is
# still cheaper than leaving the fused epilogue (the hybrid's batch-16 fast step, 176 rows, ran on
# them on the H200); a packed window re-run of thousands of rows is a GEMM, so past FUSED_MAX_M rows
# the automatic choice (no backend named) is the reference: cuBLAS plus the epilogue as separate ops
# (project issue 11: "the step picks by M"). Where `steerfast tune` has timed both on this GPU
# (steerfast.tuning.reference_wins), its measurement decides instead, at every M.
FUSED_MAX_M = 256


def _implemented(dtype, M: int = 1, backend: str | None = None, reference_wins: bool | None = None
                 ) -> tuple[str, ...]:
    if dtype not in _KERNEL_DTYPES:
        return ("torch",)
    named = backend or os.environ.get("STEERFAST_BACKEND")
    fused = M <= FUSED_MAX_M if reference_wins is None else not reference_wins
    return ("triton", "torch") if fused or named else ("torch",)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm_torch(x, weight, eps, stats_dtype=torch.float32):
    """steerfast.model.RMSNorm: weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype), the statistics in
    fp32 even for float64 x, as transformers takes them (the decode path must equal the prefill path
    and HF). A float64 ground truth for the kernels' tests passes stats_dtype=torch.float64: with fp32
    statistics it would share its rounding with the same-dtype baseline and flatter it."""
    xf = x.to(stats_dtype)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _contig(*ts):
    return all(t is None or t.is_contiguous() for t in ts)


# ---------------------------------------------------------------- fused linear
def fused_linear_torch(x, W, norm_weight=None, eps=0.0, bias=None, residual=None, swiglu=False, steer=None,
                       input_pos=None, stats_dtype=torch.float32):
    """Reference of `fused_linear`, with eager PyTorch's roundings: RMSNorm (as steerfast.model's),
    F.linear, silu(gate) * up, residual + y, then steering as ops.steer_add_torch."""
    xn = x if norm_weight is None else rms_norm_torch(x, norm_weight, eps, stats_dtype)
    y = F.linear(xn, W, bias)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if residual is not None:
        y = residual + y
    if steer is not None:
        vectors, idx, coef, start, sbias = steer
        steer_add_torch(y[:, None, :], input_pos[:, None], start, vectors, idx, coef, sbias)  # y, in place
    return y


@torch.library.custom_op("steerfast::fused_linear", mutates_args=())
def _fused_linear_op(x: torch.Tensor, W: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                     bias: torch.Tensor | None, residual: torch.Tensor | None, swiglu: bool,
                     steer_vectors: torch.Tensor | None, steer_idx: torch.Tensor | None,
                     steer_coef: torch.Tensor | None, steer_start: torch.Tensor | None,
                     steer_bias: torch.Tensor | None, input_pos: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "triton":
        from .kernels.fused_linear import fused_linear as triton_fused_linear
        return triton_fused_linear(x, W, norm_weight, eps, bias, residual, swiglu, steer_vectors, steer_idx,
                                   steer_coef, steer_start, steer_bias, input_pos)
    steer = None if steer_vectors is None else (steer_vectors, steer_idx, steer_coef, steer_start, steer_bias)
    return fused_linear_torch(x, W, norm_weight, eps, bias, residual, swiglu, steer, input_pos)


@_fused_linear_op.register_fake
def _(x, W, norm_weight, eps, bias, residual, swiglu, steer_vectors, steer_idx, steer_coef, steer_start,
      steer_bias, input_pos, backend):
    N = W.shape[0] // 2 if swiglu else W.shape[0]
    return x.new_empty(x.shape[0], N)


def fused_linear(x, W, *, norm_weight=None, eps=0.0, bias=None, residual=None, swiglu=False, steer=None,
                 input_pos=None, backend=None):
    """out = [residual +] act(RMSNorm?(x) @ W.T + bias) [steered], one kernel on the Triton path.

    x [M, K] and W [N, K] contiguous, same dtype. norm_weight [K]: RMSNorm prologue with `eps`.
    bias [N]. swiglu: W is [2I, K] (gate rows then up rows), the output [M, I] is silu(gate) * up.
    residual [M, N_out]. steer = (vectors [C, N_out], idx [M] int32 (< 0: none), coef [M] fp32,
    start [M] int32, bias [N_out] or None) with input_pos [M] int32: after the residual add,
    out[m] += coef[m] * (vectors[idx[m]] + bias) where idx[m] >= 0 and input_pos[m] >= start[m]."""
    assert x.dim() == 2 and W.dim() == 2 and x.shape[1] == W.shape[1], "x [M, K], W [N, K]"
    assert W.dtype == x.dtype and _contig(x, W, norm_weight, bias, residual)
    M, K = x.shape
    N = W.shape[0]
    assert not swiglu or N % 2 == 0, "swiglu: W holds 2 * I rows (gate, then up)"
    N_out = N // 2 if swiglu else N
    assert norm_weight is None or (norm_weight.shape == (K,) and norm_weight.dtype == x.dtype)
    assert bias is None or (bias.shape == (N,) and bias.dtype == x.dtype)
    assert residual is None or (residual.shape == (M, N_out) and residual.dtype == x.dtype)
    sv = si = sc = ss = sb = None
    if steer is not None:
        sv, si, sc, ss, sb = steer
        assert sv.dim() == 2 and sv.shape[1] == N_out and sv.dtype == x.dtype and _contig(sv, sb)
        assert sb is None or (sb.shape == (N_out,) and sb.dtype == x.dtype)
        assert si.shape == sc.shape == ss.shape == (M,) and _contig(si, sc, ss)
        assert si.dtype == ss.dtype == torch.int32 and sc.dtype == torch.float32
        assert input_pos is not None and input_pos.shape == (M,) and input_pos.dtype == torch.int32
        input_pos = input_pos.contiguous()
    op = "fused_linear_swiglu" if swiglu else "fused_linear"
    tuned = None if backend else reference_wins(op, x.device, M, N_out, K, x.element_size())
    b = _backend.choose("fused_linear", x.device, _implemented(x.dtype, M, backend, tuned), backend)
    return _fused_linear_op(x, W, norm_weight, float(eps), bias, residual, bool(swiglu), sv, si, sc, ss, sb,
                            input_pos, b)


# ---------------------------------------------------------------- QKV + RoPE + KV write
def qkv_rope_kv_write_torch(x, W, norm_weight, eps, bias, cos, sin, pos, rows, k_cache, v_cache, n_heads,
                            n_kv_heads, stats_dtype=torch.float32):
    """Reference of `qkv_rope_kv_write`: steerfast.model's attention prologue for one token per row."""
    M = x.shape[0]
    H, Hkv, D = n_heads, n_kv_heads, k_cache.shape[-1]
    xn = x if norm_weight is None else rms_norm_torch(x, norm_weight, eps, stats_dtype)
    q, k, v = F.linear(xn, W, bias).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(M, H, D), k.view(M, Hkv, D), v.view(M, Hkv, D)
    p = pos.long()
    c, s = cos[p][:, None, :], sin[p][:, None, :]  # [M, 1, D]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    r = rows.long()
    k_cache[r, p] = k
    v_cache[r, p] = v
    return q


@torch.library.custom_op("steerfast::qkv_rope_kv_write", mutates_args=("k_cache", "v_cache"))
def _qkv_rope_kv_write_op(x: torch.Tensor, W: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                          bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                          rows: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int,
                          n_kv_heads: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        from .kernels.qkv_rope import qkv_rope_kv_write as triton_qkv_rope_kv_write
        return triton_qkv_rope_kv_write(x, W, norm_weight, eps, bias, cos, sin, pos, rows, k_cache, v_cache,
                                        n_heads, n_kv_heads)
    return qkv_rope_kv_write_torch(x, W, norm_weight, eps, bias, cos, sin, pos, rows, k_cache, v_cache, n_heads,
                                   n_kv_heads)


@_qkv_rope_kv_write_op.register_fake
def _(x, W, norm_weight, eps, bias, cos, sin, pos, rows, k_cache, v_cache, n_heads, n_kv_heads, backend):
    return x.new_empty(x.shape[0], n_heads, k_cache.shape[-1])


def qkv_rope_kv_write(x, W, norm_weight, eps, bias, cos, sin, pos, rows, k_cache, v_cache, n_heads, n_kv_heads,
                      backend=None):
    """RMSNorm(x) -> QKV projection -> RoPE on q and k -> k, v written to k_cache/v_cache[rows[m], pos[m]];
    returns q (roped) [M, n_heads, D]. One kernel on the Triton path.

    x [M, K]; W [(H + 2 Hkv) D, K] (q heads, k heads, v heads; each head D rows); norm_weight [K] (or
    None: no norm); bias [(H + 2 Hkv) D] or None; cos, sin [S, D] RoPE tables (halves duplicated) in
    x's dtype; pos [M] int32/int64 positions; rows [M] int64 cache rows; k_cache, v_cache [Bc, S, Hkv, D]
    (one layer's, last dim contiguous), written in place. (rows[m], pos[m]) pairs must be distinct."""
    H, Hkv = int(n_heads), int(n_kv_heads)
    assert x.dim() == 2 and W.dim() == 2 and x.shape[1] == W.shape[1], "x [M, K], W [N, K]"
    M, K = x.shape
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[2] == Hkv
    D = k_cache.shape[3]
    assert D % 2 == 0 and H % Hkv == 0 and W.shape[0] == (H + 2 * Hkv) * D
    assert x.dtype == W.dtype == cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype
    assert norm_weight is None or (norm_weight.shape == (K,) and norm_weight.dtype == x.dtype)
    assert bias is None or (bias.shape == (W.shape[0],) and bias.dtype == x.dtype)
    assert cos.dim() == 2 and cos.shape == sin.shape and cos.shape[1] == D
    assert pos.shape == rows.shape == (M,) and pos.dtype in (torch.int32, torch.int64) and rows.dtype == torch.int64
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert _contig(x, W, norm_weight, bias, cos, sin, pos, rows)
    tuned = None if backend else reference_wins("qkv_rope", x.device, M, W.shape[0], K, x.element_size())
    b = _backend.choose("qkv_rope_kv_write", x.device, _implemented(x.dtype, M, backend, tuned), backend)
    return _qkv_rope_kv_write_op(x, W, norm_weight, float(eps), bias, cos, sin, pos, rows, k_cache, v_cache, H,
                                 Hkv, b)


# ---------------------------------------------------------------- lm_head + argmax
def lm_head_argmax_torch(x, W, norm_weight, eps):
    """(RMSNorm(x) @ W.T).argmax(-1): logits rounded to the dtype as eager computes them, then the
    first maximal index."""
    xn = x if norm_weight is None else rms_norm_torch(x, norm_weight, eps)
    return F.linear(xn, W).argmax(dim=-1)


@torch.library.custom_op("steerfast::lm_head_argmax", mutates_args=())
def _lm_head_argmax_op(x: torch.Tensor, W: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                       backend: str) -> torch.Tensor:
    if backend == "triton":
        from .kernels.fused_linear import lm_head_argmax as triton_lm_head_argmax
        return triton_lm_head_argmax(x, W, norm_weight, eps)
    return lm_head_argmax_torch(x, W, norm_weight, eps)


@_lm_head_argmax_op.register_fake
def _(x, W, norm_weight, eps, backend):
    return x.new_empty(x.shape[0], dtype=torch.int64)


def lm_head_argmax(x, W, norm_weight, eps, backend=None):
    """Greedy token ids [M] int64 of RMSNorm(x) @ W.T without writing the [M, V] logits (Triton: two
    kernels). x [M, K], W [V, K] contiguous; norm_weight [K] or None. Ties: the lowest id."""
    assert x.dim() == 2 and W.dim() == 2 and x.shape[1] == W.shape[1], "x [M, K], W [V, K]"
    assert W.dtype == x.dtype and _contig(x, W, norm_weight)
    assert norm_weight is None or (norm_weight.shape == (x.shape[1],) and norm_weight.dtype == x.dtype)
    M, K = x.shape
    tuned = None if backend else reference_wins("lm_head_argmax", x.device, M, W.shape[0], K, x.element_size())
    b = _backend.choose("lm_head_argmax", x.device, _implemented(x.dtype, M, backend, tuned), backend)
    return _lm_head_argmax_op(x, W, norm_weight, float(eps), b)


# ---------------------------------------------------------------- decode step tail
def decode_tail_torch(nxt, done, tok, pos, seq_lens, step, out, stop):
    """In place, per row b: n = tok[b] if done[b] else nxt[b]; out[b, step[b]] = n (only where
    0 <= step[b] < out.shape[1]); done[b] |= n in stop[b]; tok[b] = n; pos[b] += 1;
    seq_lens[b] = pos[b] + 1; step[b] += 1."""
    n = torch.where(done, tok, nxt)
    W = out.shape[1]
    if W > 0:
        ok = (step >= 0) & (step < W)
        col = step.clamp(0, W - 1)[:, None]
        out.scatter_(1, col, torch.where(ok, n, out.gather(1, col)[:, 0])[:, None])
    done |= (n[:, None] == stop).any(dim=1)
    tok.copy_(n)
    pos += 1
    seq_lens.copy_(pos + 1)
    step += 1


@torch.library.custom_op("steerfast::decode_tail_",
                         mutates_args=("done", "tok", "pos", "seq_lens", "step", "out"))
def _decode_tail_op(nxt: torch.Tensor, done: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor,
                    seq_lens: torch.Tensor, step: torch.Tensor, out: torch.Tensor, stop: torch.Tensor,
                    backend: str) -> None:
    if backend == "triton":
        from .kernels.decode_tail import decode_tail_ as triton_decode_tail_
        triton_decode_tail_(nxt, done, tok, pos, seq_lens, step, out, stop)
    else:
        decode_tail_torch(nxt, done, tok, pos, seq_lens, step, out, stop)


@_decode_tail_op.register_fake
def _(nxt, done, tok, pos, seq_lens, step, out, stop, backend):
    return None


def decode_tail_(nxt, done, tok, pos, seq_lens, step, out, stop, backend=None):
    """The greedy decode step's bookkeeping in place (see `decode_tail_torch`), one kernel on the
    Triton path. nxt, tok [B] int64; done [B] bool; pos, seq_lens [B] int32; step [B] int64;
    out [B, W] int64; stop [B, n_stop] int64 (-1 padded). All contiguous."""
    B = nxt.shape[0]
    assert nxt.shape == done.shape == tok.shape == pos.shape == seq_lens.shape == step.shape == (B,)
    assert out.dim() == 2 and out.shape[0] == B and stop.dim() == 2 and stop.shape[0] == B
    assert nxt.dtype == tok.dtype == step.dtype == out.dtype == stop.dtype == torch.int64
    assert done.dtype == torch.bool and pos.dtype == seq_lens.dtype == torch.int32
    assert _contig(nxt, done, tok, pos, seq_lens, step, out, stop)
    b = _backend.choose("decode_tail", nxt.device, ("triton", "torch"), backend)
    _decode_tail_op(nxt, done, tok, pos, seq_lens, step, out, stop, b)
