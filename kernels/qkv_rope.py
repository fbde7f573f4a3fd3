"""The attention block's first kernel for a decode step (one token per row), in one launch:

    xn = RMSNorm(x);  qkv = xn @ W.T + bias;  q, k = RoPE(q), RoPE(k)  (HF: t * cos + rotate_half(t) * sin)
    k_cache[rows[m], pos[m]] = k;  v_cache[rows[m], pos[m]] = v;  returns q [M, H, D]

exactly as `steerfast.fused_ops.qkv_rope_kv_write_torch` (every rounding to the dtype where eager
steerfast.model rounds: the linear's output, each RoPE product and their sum).

Grid (H + 2 Hkv, cdiv(D/2, BLOCK_J), cdiv(M, BLOCK_M)). A program owns output dims j and j + D/2
(j in its BLOCK_J slice) of one head: the two halves RoPE mixes, so the rotation happens in
registers. It reads those 2 * BLOCK_J rows of W once and serves all its rows (M padded to 16..64
for tl.dot; the RMSNorm prologue and GEMV loop are kernels/fused_linear.py's). q programs write q,
k programs write the roped keys into the cache, v programs write the values unroped.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..tuning import lookup
from ._common import num_sms, on_device, pdl_enter, pdl_launch, triton_interpret
from .fused_linear import DTYPES, _round, _row_rstd, _split_args, _w_tile, _x_tile, block_m, split_k_for, split_k_sum


@triton.jit
def _qkv_rope_kernel(
    x_ptr,  # [M, K], contiguous
    w_ptr,  # [(H + 2 Hkv) * D, K], contiguous: q heads, k heads, v heads
    norm_ptr,  # [K] (HAS_NORM)
    bias_ptr,  # [(H + 2 Hkv) * D] (HAS_BIAS)
    cos_ptr,  # [S, D], contiguous
    sin_ptr,  # [S, D], contiguous
    pos_ptr,  # [M] int32 or int64: position of row m (RoPE row, cache slot)
    rows_ptr,  # [M] int64: cache row of row m
    q_ptr,  # [M, H, D], contiguous (written)
    k_cache_ptr,  # [Bc, S, Hkv, D], last dim contiguous (written at [rows[m], pos[m]])
    v_cache_ptr,  # [Bc, S, Hkv, D], last dim contiguous (written at [rows[m], pos[m]])
    ws_ptr,  # [SPLIT_K, M, (H + 2 Hkv) * D] fp32 (SPLIT_K > 1): each K split's partial sums
    cnt_ptr,  # [n_tiles] int32 (SPLIT_K > 1): splits arrived per tile, zeroed by the launcher
    M, K, eps, H, Hkv, K_SPLIT,  # K_SPLIT: columns of K per split, a multiple of BLOCK_K
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    D: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,  # bf16 under TRITON_INTERPRET=1: see _common.bf16_rtne
    USE_PDL: tl.constexpr,  # programmatic dependent launch: see _common.pdl_enter
    SPLIT_K: tl.constexpr,  # programs per tile (axis 1 holds j blocks x splits), each over K_SPLIT of K
):
    pdl_enter(USE_PDL)
    HALF: tl.constexpr = D // 2
    dtype = x_ptr.dtype.element_ty
    head = tl.program_id(0)  # 0 .. H-1: q, H .. H+Hkv-1: k, then v
    j_block = tl.program_id(1) // SPLIT_K
    split = tl.program_id(1) % SPLIT_K
    offs_j = j_block * BLOCK_J + tl.arange(0, BLOCK_J)  # dims j; their partners are j + HALF
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    j_mask = offs_j < HALF
    m_mask = offs_m < M
    rows1 = head * D + offs_j  # W rows of the first-half dims
    rows2 = rows1 + HALF  # and of their partners

    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_NORM:
        rstd = _row_rstd(x_ptr, offs_m, m_mask, K, eps, 8192 // BLOCK_M)
    acc1 = tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.float32)
    k_lo = split * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        x = _x_tile(x_ptr, norm_ptr, rstd, offs_m, m_mask, kk, k_mask, K, HAS_NORM, INTERP_BF16)
        acc1 = tl.dot(x, tl.trans(_w_tile(w_ptr, rows1, j_mask, kk, k_mask, K, INTERP_BF16)), acc1,
                      input_precision=DOT_PRECISION)
        acc2 = tl.dot(x, tl.trans(_w_tile(w_ptr, rows2, j_mask, kk, k_mask, K, INTERP_BF16)), acc2,
                      input_precision=DOT_PRECISION)
    last = True  # where the program finishes the tile: with SPLIT_K, only in the last split to arrive
    if SPLIT_K > 1:
        n_j = tl.num_programs(1) // SPLIT_K
        tile = (tl.program_id(2) * n_j + j_block) * tl.num_programs(0) + head
        acc1, acc2, last = split_k_sum(acc1, acc2, ws_ptr, cnt_ptr, offs_m, rows1, m_mask[:, None] & j_mask[None, :],
                                       M, (H + 2 * Hkv) * D, HALF, split, tile, True, SPLIT_K)
    if HAS_BIAS:
        acc1 += tl.load(bias_ptr + rows1, mask=j_mask, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(bias_ptr + rows2, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    t1 = _round(acc1, dtype, INTERP_BF16)  # [BLOCK_M, BLOCK_J]: the projection, in the dtype
    t2 = _round(acc2, dtype, INTERP_BF16)

    pos = tl.load(pos_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)  # [BLOCK_M]
    mj_mask = m_mask[:, None] & j_mask[None, :] & last  # stores: the tile's finishing program only
    if head < H + Hkv:  # q or k: RoPE, out1 = t1 * c1 - t2 * s1, out2 = t2 * c2 + t1 * s2
        tab = pos[:, None] * D + offs_j[None, :]
        c1 = tl.load(cos_ptr + tab, mask=mj_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + tab + HALF, mask=mj_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + tab, mask=mj_mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + tab + HALF, mask=mj_mask, other=0.0).to(tl.float32)
        o1 = _round(_round(t1 * c1, dtype, INTERP_BF16) + _round(-t2 * s1, dtype, INTERP_BF16), dtype, INTERP_BF16)
        o2 = _round(_round(t2 * c2, dtype, INTERP_BF16) + _round(t1 * s2, dtype, INTERP_BF16), dtype, INTERP_BF16)
        if head < H:
            dst = q_ptr + offs_m.to(tl.int64)[:, None] * (H * D) + head * D + offs_j[None, :]
        else:
            row = tl.load(rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
            dst = (k_cache_ptr + row[:, None] * stride_kb + pos[:, None] * stride_ks + (head - H) * stride_kh
                   + offs_j[None, :])
        tl.store(dst, o1.to(dtype), mask=mj_mask)
        tl.store(dst + HALF, o2.to(dtype), mask=mj_mask)
    else:  # v: into the cache as projected
        row = tl.load(rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        dst = (v_cache_ptr + row[:, None] * stride_vb + pos[:, None] * stride_vs + (head - H - Hkv) * stride_vh
               + offs_j[None, :])
        tl.store(dst, t1.to(dtype), mask=mj_mask)
        tl.store(dst + HALF, t2.to(dtype), mask=mj_mask)


def _config(M: int, interpret: bool, elt: int = 2, N: int = 0, K: int = 0, device: torch.device | None = None) -> dict:
    """What `steerfast tune` measured best for W [N, K] on `device`'s GPU model (steerfast.tuning; its
    SPLIT_K unless STEERFAST_SPLIT_K is set), else the table. The table, from an H200 sweep: 32
    RoPE pairs (64 W rows) per program, so a 1.5B model (16 heads of D = 128) has only 32 programs per
    row block: the one op here that stays well under the bandwidth floor (see the module docstring)."""
    if interpret:
        return dict(BLOCK_J=16, BLOCK_K=64, num_warps=4, num_stages=1)
    tuned = None if device is None else lookup("qkv_rope", device, M, N, K, elt)
    if tuned is not None:
        if os.environ.get("STEERFAST_SPLIT_K"):
            tuned.pop("SPLIT_K", None)  # the launcher's split_k_for decides
        return tuned
    BLOCK_K = (256 if block_m(M) == 16 else 128) * 2 // elt  # fp32: the same bytes per stage
    return dict(BLOCK_J=32, BLOCK_K=BLOCK_K, num_warps=4, num_stages=4)


def qkv_rope_kv_write(x, W, norm_weight, eps, bias, cos, sin, pos, rows, k_cache, v_cache, n_heads, n_kv_heads,
                      config=None):
    """See the module docstring; arguments as `steerfast.fused_ops.qkv_rope_kv_write` (which checks
    them). Returns q [M, n_heads, D]."""
    M, K = x.shape
    H, Hkv, D = n_heads, n_kv_heads, k_cache.shape[3]
    assert x.dtype in DTYPES and x.is_contiguous() and W.is_contiguous() and cos.is_contiguous()
    assert sin.is_contiguous() and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    q = torch.empty((M, H, D), dtype=x.dtype, device=x.device)
    if M == 0:
        return q
    cfg = dict(config or _config(M, triton_interpret(), x.element_size(), W.shape[0], K, x.device))
    BLOCK_M = block_m(M)
    n_j, n_m = triton.cdiv(D // 2, cfg["BLOCK_J"]), triton.cdiv(M, BLOCK_M)
    split = cfg.pop("SPLIT_K", None)
    if split is None:  # STEERFAST_SPLIT_K: the 1.5B model's 16 heads give 32 programs at M = 1
        split = 1 if triton_interpret() else split_k_for((H + 2 * Hkv) * n_j * n_m, K, cfg["BLOCK_K"],
                                                           num_sms(x.device))
    grid = (H + 2 * Hkv, n_j * split, n_m)
    ws, cnt, k_split = _split_args(x, split, cfg["BLOCK_K"], M, (H + 2 * Hkv) * D, K, grid[0] * n_j * n_m)
    with on_device(x.device):
        _qkv_rope_kernel[grid](
            x, W, norm_weight if norm_weight is not None else x, bias if bias is not None else x, cos, sin, pos, rows,
            q, k_cache, v_cache, ws, cnt, M, K, float(eps), H, Hkv, k_split,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            D=D, HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
            INTERP_BF16=x.dtype == torch.bfloat16 and triton_interpret(), SPLIT_K=split, **cfg,
            **pdl_launch(x.device))
    return q
