"""A small-M linear layer (decode: M <= 64 rows) with everything around it fused, in one launch:

    xn  = RMSNorm(x) (optional prologue: norm_weight * (x * rstd).to(dtype), as steerfast.model.RMSNorm)
    y   = xn @ W.T + bias                      (fp32 accumulation, rounded once to the dtype)
    y   = silu(gate) * up                      (SWIGLU: W holds the gate rows, then the up rows)
    out = residual + y                         (optional)
    out[m] += coef[m] * (vectors[idx[m]] + b)  (optional steering, exactly ops.steer_add_torch's numerics)

`steerfast.fused_ops.fused_linear_torch` is the reference; every rounding to the dtype happens where
eager PyTorch rounds.

GEMV layout: grid (cdiv(N_out, BLOCK_N), cdiv(M, BLOCK_M)). A program owns BLOCK_N output columns and
BLOCK_M rows (M padded to 16..64 for tl.dot), streams its W rows ([BLOCK_N, K], K contiguous) once
and serves all its rows with them: for M <= 64 there is one row block, so every weight byte is read
from HBM exactly once per call. SWIGLU programs read gate rows n and up rows N_out + n together, so
silu(gate) * up is formed in registers. Each program computes the rstd of its x rows itself (x is
M * K * 2 bytes, an L2 hit after the first program): no separate norm kernel, no xn in HBM.

Split-K (SPLIT_K > 1, opt-in: split_k_for): programs per tile each reduce a slice of K; the last
to arrive sums the slices in order (split_k_sum, also used by kernels/qkv_rope.py) and runs the
epilogue. For layers whose tiles leave SMs idle at batch 1.

`lm_head_argmax` reuses the kernel with an ARGMAX epilogue: each program writes its columns' (max,
first argmax) per row to a [M, n_blocks] fp32/int32 workspace (logits never reach HBM), and
`_argmax_reduce_kernel` picks each row's winner (ties: the lowest index, as torch.argmax).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..tuning import lookup
from ._common import bf16_rtne, num_sms, on_device, pdl_enter, pdl_launch, triton_interpret

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_M = 64


@triton.jit
def _round(v, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 v rounded to `dtype` (to nearest even, as eager PyTorch stores it), returned as fp32."""
    if INTERP_BF16:
        v = bf16_rtne(v)  # the interpreter's own cast truncates
    return v.to(dtype).to(tl.float32)


@triton.jit
def _row_rstd(x_ptr, offs_m, m_mask, K, eps, BLOCK_K: tl.constexpr):
    """[BLOCK_M] fp32: 1 / sqrt(mean(x[m]**2) + eps) of rows offs_m of x [M, K] (contiguous); wide
    blocks (8192 // BLOCK_M columns): few dependent L2 round trips before the main loop starts."""
    offs_k = tl.arange(0, BLOCK_K)
    ss = tl.zeros([offs_m.shape[0]], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xk = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * K + kk[None, :],
                     mask=m_mask[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        ss += tl.sum(xk * xk, axis=1)
    # IEEE-rounded division and square root, once per row: the GPU's default approximate ones (the
    # interpreter's are exact) lost the fp32 tests' 2x rule against eager PyTorch now and then
    mean = tl.math.div_rn(ss, tl.zeros_like(ss) + K)
    return tl.math.div_rn(tl.zeros_like(ss) + 1.0, tl.sqrt_rn(mean + eps))


@triton.jit
def _x_tile(x_ptr, norm_ptr, rstd, offs_m, m_mask, kk, k_mask, K, HAS_NORM: tl.constexpr,
            INTERP_BF16: tl.constexpr):
    """[BLOCK_M, BLOCK_K] operand tile of xn (RMSNorm'd x when HAS_NORM) in x's dtype (fp32 holding
    bf16 values when INTERP_BF16: the interpreter's bf16 tl.dot is wrong)."""
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * K + kk[None, :],
                mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    if HAS_NORM:
        xn = _round(x.to(tl.float32) * rstd[:, None], dtype, INTERP_BF16)  # (x * rstd).to(dtype)
        nw = tl.load(norm_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        x = _round(nw[None, :] * xn, dtype, INTERP_BF16)  # weight * xn, in the dtype
        if not INTERP_BF16:
            x = x.to(dtype)
    elif INTERP_BF16:
        x = x.to(tl.float32)
    return x


@triton.jit
def _w_tile(w_ptr, rows, r_mask, kk, k_mask, K, INTERP_BF16: tl.constexpr):
    """[BLOCK_N, BLOCK_K] tile of W [N, K] (rows `rows`, K contiguous)."""
    w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * K + kk[None, :], mask=r_mask[:, None] & k_mask[None, :],
                other=0.0)
    if INTERP_BF16:
        w = w.to(tl.float32)
    return w


@triton.jit
def _fused_linear_kernel(
    x_ptr,  # [M, K], contiguous
    w_ptr,  # [N, K], contiguous (SWIGLU: N = 2 * N_out, gate rows then up rows)
    norm_ptr,  # [K] (HAS_NORM)
    bias_ptr,  # [N] (HAS_BIAS)
    res_ptr,  # [M, N_out], contiguous (HAS_RESIDUAL)
    vec_ptr,  # [C, N_out], contiguous (HAS_STEER)
    idx_ptr,  # [M] int32 (HAS_STEER): row of vectors, < 0: not steered
    coef_ptr,  # [M] fp32 (HAS_STEER)
    start_ptr,  # [M] int32 (HAS_STEER)
    pos_ptr,  # [M] int32 (HAS_STEER): steered only where pos >= start
    sbias_ptr,  # [N_out] (HAS_STEER_BIAS)
    out_ptr,  # [M, N_out], contiguous (ARGMAX: [M, n_blocks] fp32 partial maxima)
    out_idx_ptr,  # [M, n_blocks] int32 (ARGMAX): their columns
    ws_ptr,  # [SPLIT_K, M, N] fp32 (SPLIT_K > 1): each K split's partial sums
    cnt_ptr,  # [n_tiles] int32 (SPLIT_K > 1): splits arrived per output tile, zeroed by the launcher
    M, N_out, K, eps, K_SPLIT,  # K_SPLIT: columns of K per split, a multiple of BLOCK_K
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SWIGLU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_STEER: tl.constexpr,
    HAS_STEER_BIAS: tl.constexpr,
    ARGMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,  # bf16 under TRITON_INTERPRET=1: see _common.bf16_rtne
    USE_PDL: tl.constexpr,  # programmatic dependent launch: see _common.pdl_enter
    SPLIT_K: tl.constexpr,  # programs per output tile, each over K_SPLIT columns of K
):
    pdl_enter(USE_PDL)
    dtype = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N_out

    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_NORM:
        rstd = _row_rstd(x_ptr, offs_m, m_mask, K, eps, 8192 // BLOCK_M)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # SWIGLU only
    k_lo = tl.program_id(2) * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        x = _x_tile(x_ptr, norm_ptr, rstd, offs_m, m_mask, kk, k_mask, K, HAS_NORM, INTERP_BF16)
        w = _w_tile(w_ptr, offs_n, n_mask, kk, k_mask, K, INTERP_BF16)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if SWIGLU:
            w_up = _w_tile(w_ptr, N_out + offs_n, n_mask, kk, k_mask, K, INTERP_BF16)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=DOT_PRECISION)

    last = True  # where the program finishes the tile: with SPLIT_K, only in the last split to arrive
    if SPLIT_K > 1:
        acc, acc_up, last = split_k_sum(acc, acc_up, ws_ptr, cnt_ptr, offs_m, offs_n, m_mask[:, None] & n_mask[None, :],
                                        M, 2 * N_out if SWIGLU else N_out, N_out, tl.program_id(2),
                                        tl.program_id(1) * tl.num_programs(0) + pid_n, SWIGLU, SPLIT_K)

    # epilogue, in fp32 holding dtype values: each rounding where eager torch rounds
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = _round(acc, dtype, INTERP_BF16)  # [BLOCK_M, BLOCK_N]: the linear's output
    if SWIGLU:
        if HAS_BIAS:
            acc_up += tl.load(bias_ptr + N_out + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        up = _round(acc_up, dtype, INTERP_BF16)
        gate = _round(tl.math.div_rn(y, 1.0 + tl.exp(-y)), dtype, INTERP_BF16)  # F.silu
        y = _round(gate * up, dtype, INTERP_BF16)

    if ARGMAX:  # per row: the block's max and its first column; logits stay in registers
        y = tl.where(n_mask[None, :], y, float("-inf"))
        best = tl.max(y, axis=1)  # [BLOCK_M]
        first = tl.min(tl.where(y == best[:, None], offs_n[None, :], 2147483647), axis=1)  # [BLOCK_M]
        n_blocks = tl.num_programs(0)
        tl.store(out_ptr + offs_m.to(tl.int64) * n_blocks + pid_n, best, mask=m_mask & last)
        tl.store(out_idx_ptr + offs_m.to(tl.int64) * n_blocks + pid_n, first, mask=m_mask & last)
    else:
        tile = offs_m.to(tl.int64)[:, None] * N_out + offs_n[None, :]
        mn_mask = m_mask[:, None] & n_mask[None, :]
        if HAS_RESIDUAL:
            y = _round(tl.load(res_ptr + tile, mask=mn_mask, other=0.0).to(tl.float32) + y, dtype, INTERP_BF16)
        if HAS_STEER:
            idx = tl.load(idx_ptr + offs_m, mask=m_mask, other=-1)
            steered = m_mask & (idx >= 0) & (tl.load(pos_ptr + offs_m, mask=m_mask, other=0)
                                             >= tl.load(start_ptr + offs_m, mask=m_mask, other=0))
            v_mask = steered[:, None] & n_mask[None, :]  # an unsteered row reads no vector
            v = tl.load(vec_ptr + tl.maximum(idx, 0).to(tl.int64)[:, None] * N_out + offs_n[None, :],
                        mask=v_mask, other=0.0).to(tl.float32)
            if HAS_STEER_BIAS:
                v += tl.load(sbias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            coef = tl.load(coef_ptr + offs_m, mask=m_mask, other=0.0)
            y = tl.where(steered[:, None], _round(y + coef[:, None] * v, dtype, INTERP_BF16), y)
        tl.store(out_ptr + tile, y.to(dtype), mask=mn_mask & last)


@triton.jit
def split_k_sum(acc, acc2, ws_ptr, cnt_ptr, offs_m, cols, mc_mask, M, WS_COLS, second, split, tile,
                TWO: tl.constexpr, SPLIT_K: tl.constexpr):
    """Split-K without atomics on the data, deterministic: each split stores its partial sums (acc at
    columns `cols` of its slice of ws [SPLIT_K, M, WS_COLS], acc2 when TWO at cols + second), then
    counts itself in on the tile's counter (an acq_rel atomic: its stores are visible to whoever
    counts after it). The last to arrive adds the SPLIT_K slices in split order (the same sum every
    run, whichever split came last) and finishes the tile: returns (acc, acc2, last [same shape])."""
    slice_off = offs_m.to(tl.int64)[:, None] * WS_COLS + cols[None, :]
    mine = ws_ptr + split.to(tl.int64) * M * WS_COLS + slice_off
    tl.store(mine, acc, mask=mc_mask)
    if TWO:
        tl.store(mine + second, acc2, mask=mc_mask)
    # every thread's stores before the count: the atomic is one thread's, and its release orders only
    # that thread's writes (the compiler's own barriers happen to cover bf16, not fp32)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + tile, 1)  # splits before this one
    last = (tl.zeros_like(acc).to(tl.int32) + arrived) == SPLIT_K - 1  # all equal (a tensor: see the tests)
    sum_mask = mc_mask & last
    acc = tl.zeros_like(acc)
    acc2 = tl.zeros_like(acc2)
    for s in range(SPLIT_K):  # volatile: from L2, never a stale L1 line
        part = ws_ptr + s * tl.cast(M, tl.int64) * WS_COLS + slice_off  # M = 1 arrives as a constexpr int
        acc += tl.load(part, mask=sum_mask, other=0.0, volatile=True)
        if TWO:
            acc2 += tl.load(part + second, mask=sum_mask, other=0.0, volatile=True)
    return acc, acc2, last


@triton.jit
def _argmax_reduce_kernel(
    val_ptr,  # [M, n_blocks] fp32: per-block maxima
    idx_ptr,  # [M, n_blocks] int32: their columns
    out_ptr,  # [M] int64
    n_blocks,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    for b0 in range(0, n_blocks, BLOCK):  # blocks in column order: a strict > keeps the first maximum
        mask = b0 + offs < n_blocks
        v = tl.load(val_ptr + m * n_blocks + b0 + offs, mask=mask, other=float("-inf"))
        i = tl.load(idx_ptr + m * n_blocks + b0 + offs, mask=mask, other=2147483647)
        cmax = tl.max(v, axis=0)
        cidx = tl.min(tl.where(mask & (v == cmax), i, 2147483647), axis=0)
        take = cmax > best
        best_idx = tl.where(take, cidx, best_idx)
        best = tl.where(take, cmax, best)
    tl.store(out_ptr + m, best_idx.to(tl.int64))


# interpreter: one small config
_INTERP_CONFIG = dict(BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=1)


def gpu_config(M: int, N_out: int, K: int, swiglu: bool = False, argmax: bool = False, elt: int = 2,
               n_sms: int = 132, device: torch.device | None = None) -> dict:
    """Block sizes for a real GPU, for elements of `elt` bytes: what `steerfast tune` measured best on
    `device`'s GPU model (steerfast.tuning), else the table (_gpu_config_16bit; fp32: half the BLOCK_K,
    the same shared memory per pipeline stage). SPLIT_K: tuned, unless STEERFAST_SPLIT_K is set (split_k_for)."""
    op = "lm_head_argmax" if argmax else "fused_linear_swiglu" if swiglu else "fused_linear"
    tuned = None if device is None else lookup(op, device, M, N_out, K, elt)
    if tuned is not None:
        if not argmax and os.environ.get("STEERFAST_SPLIT_K"):
            programs = triton.cdiv(N_out, tuned["BLOCK_N"]) * triton.cdiv(M, block_m(M))
            tuned["SPLIT_K"] = split_k_for(programs, K, tuned["BLOCK_K"], n_sms)
        return tuned
    cfg = _gpu_config_16bit(M, N_out, K, swiglu, argmax)
    cfg = cfg | dict(BLOCK_K=cfg["BLOCK_K"] * 2 // elt)
    programs = triton.cdiv(N_out, cfg["BLOCK_N"]) * triton.cdiv(M, block_m(M))
    return cfg if argmax else cfg | dict(SPLIT_K=split_k_for(programs, K, cfg["BLOCK_K"], n_sms))


def split_k_for(programs: int, K: int, block_k: int, n_sms: int, mode: str | None = None) -> int:
    """Programs per output tile. The table's tiles leave a 1.5B model's layers with fewer programs
    than SMs (Qwen2.5-1.5B at M = 1: 32 for QKV, 70 for gate/up, 96 for down, on 132 SMs), so some
    SMs read nothing; splitting K fills them. mode (default STEERFAST_SPLIT_K): unset or "1" one split (the
    measured default until split-K is measured on the GPU), "auto" enough splits for about one
    program per SM with at least two BLOCK_K steps each, an integer that many (capped the same)."""
    mode = os.environ.get("STEERFAST_SPLIT_K", "1") if mode is None else mode
    cap = max(1, K // (2 * block_k))
    if mode == "auto":
        want = 1 if programs >= n_sms else triton.next_power_of_2(triton.cdiv(n_sms, programs))
    else:
        want = int(mode)
    return max(1, min(want, cap))


def _gpu_config_16bit(M, N_out, K, swiglu, argmax):
    """Block sizes for a real GPU: a fixed table, not triton.autotune (no benchmarking on a first call
    that could land inside a CUDA graph capture; the argmax workspace depends on BLOCK_N). Picked from
    a sweep on an H200 (bf16; Qwen2.5-1.5B and Llama-3-8B shapes, M = 1 and 64). With 64 rows the x
    tiles each program re-reads (and re-normalises) from L2 cost as much as its W tile, so the
    normed ops take wide column blocks there."""
    if block_m(M) == 16:
        if argmax:
            return dict(BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)
        if swiglu:
            return dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
        if N_out >= 4096:
            return dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)
        return dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=3)  # d = 1536: 96 programs
    if argmax:
        return dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)
    if swiglu:
        return dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if N_out >= 4096:
        return dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)
    return dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=4)


def block_m(M: int) -> int:
    """Rows per program: M padded to a power of two in [16, 64] (tl.dot's minimum is 16; measured on
    an H200, the padded tensor-core GEMV beat a CUDA-core FMA one even at M = 1). M > 64 adds row
    blocks (grid axis 1), each reading W again (from L2 mostly)."""
    return min(MAX_BLOCK_M, max(16, triton.next_power_of_2(M)))


def _split_args(x, split: int, block_k: int, M: int, N: int, K: int, n_tiles: int) -> tuple:
    """(ws, cnt, K_SPLIT) for the launch: `split` programs per tile over K_SPLIT columns each."""
    k_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    if split == 1:
        return x, x, k_split
    # per call, not cached: a graph keeps its own (its pool), two streams never share one, and the
    # counters' zeroing is one small memset node, the price of split-K
    ws = torch.empty(split * M * N, dtype=torch.float32, device=x.device)
    cnt = torch.zeros(n_tiles, dtype=torch.int32, device=x.device)
    return ws, cnt, k_split


def _flags(x):
    return dict(DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,  # fp32: no tf32 rounding
                INTERP_BF16=x.dtype == torch.bfloat16 and triton_interpret())


def fused_linear(x, W, norm_weight=None, eps=0.0, bias=None, residual=None, swiglu=False, steer_vectors=None,
                 steer_idx=None, steer_coef=None, steer_start=None, steer_bias=None, input_pos=None, config=None):
    """See the module docstring; arguments as `steerfast.fused_ops.fused_linear` (which checks them),
    steering unpacked; `config` (BLOCK_N, BLOCK_K, num_warps, num_stages) overrides the table (for
    benchmarks). Returns out [M, N_out] in x's dtype."""
    M, K = x.shape
    N = W.shape[0]
    N_out = N // 2 if swiglu else N
    assert x.dtype in DTYPES and x.is_contiguous() and W.is_contiguous()
    out = torch.empty((M, N_out), dtype=x.dtype, device=x.device)
    if M == 0 or N_out == 0:
        return out
    has_steer = steer_vectors is not None
    BLOCK_M = block_m(M)
    args = (x, W, norm_weight if norm_weight is not None else x, bias if bias is not None else x,
            residual if residual is not None else x, steer_vectors if has_steer else x,
            steer_idx if has_steer else x, steer_coef if has_steer else x, steer_start if has_steer else x,
            input_pos if has_steer else x, steer_bias if steer_bias is not None else x, out, out,
            M, N_out, K, float(eps))
    flags = dict(HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None, SWIGLU=bool(swiglu),
                 HAS_RESIDUAL=residual is not None, HAS_STEER=has_steer,
                 HAS_STEER_BIAS=has_steer and steer_bias is not None, ARGMAX=False, BLOCK_M=BLOCK_M, **_flags(x))
    cfg = dict(config or (_INTERP_CONFIG if triton_interpret() else gpu_config(
        M, N_out, K, swiglu, elt=x.element_size(), n_sms=num_sms(x.device), device=x.device)))
    split = cfg.pop("SPLIT_K", 1)
    grid = (triton.cdiv(N_out, cfg["BLOCK_N"]), triton.cdiv(M, BLOCK_M), split)
    ws, cnt, k_split = _split_args(x, split, cfg["BLOCK_K"], M, N, K, grid[0] * grid[1])
    with on_device(x.device):
        _fused_linear_kernel[grid](*args[:13], ws, cnt, *args[13:], k_split, **flags, **cfg, SPLIT_K=split,
                                   **pdl_launch(x.device))
    return out


def lm_head_argmax(x, W, norm_weight=None, eps=0.0, config=None):
    """argmax over V of RMSNorm(x) @ W.T (rounded to x's dtype), [M] int64, in two launches; the
    [M, V] logits are never written. Ties go to the lowest column."""
    M, K = x.shape
    V = W.shape[0]
    assert x.dtype in DTYPES and x.is_contiguous() and W.is_contiguous()
    ids = torch.empty((M,), dtype=torch.int64, device=x.device)  # every row written: no fill kernel
    if M == 0 or V == 0:
        return ids.zero_()
    cfg = config or (_INTERP_CONFIG if triton_interpret() else
                     gpu_config(M, V, K, argmax=True, elt=x.element_size(), device=x.device))
    BLOCK_M = block_m(M)
    n_blocks = triton.cdiv(V, cfg["BLOCK_N"])
    part_val = torch.empty((M, n_blocks), dtype=torch.float32, device=x.device)
    part_idx = torch.empty((M, n_blocks), dtype=torch.int32, device=x.device)
    with on_device(x.device):
        _fused_linear_kernel[(n_blocks, triton.cdiv(M, BLOCK_M), 1)](
            x, W, norm_weight if norm_weight is not None else x, x, x, x, x, x, x, x, x, part_val, part_idx, x, x,
            M, V, K, float(eps), K,
            HAS_NORM=norm_weight is not None, HAS_BIAS=False, SWIGLU=False, HAS_RESIDUAL=False, HAS_STEER=False,
            HAS_STEER_BIAS=False, ARGMAX=True, BLOCK_M=BLOCK_M, **_flags(x), **cfg, SPLIT_K=1,
            **pdl_launch(x.device))
        _argmax_reduce_kernel[(M,)](part_val, part_idx, ids, n_blocks,
                                    BLOCK=min(1024, triton.next_power_of_2(n_blocks)), num_warps=4,
                                    **pdl_launch(x.device))
    return ids
