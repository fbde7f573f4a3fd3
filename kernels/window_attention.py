"""Causal attention for the hybrid's packed candidate windows, flash-attention style.

A candidate re-runs the upper layers over its window: its positions are consecutive rows of one
packed batch (one query each), all keeping their keys in one scratch cache row over their sequence's
unsteered prefix, read in place (see decode_attention's HAS_PREFIX). Served by the decode-attention
kernel, every row reads all its keys: a window of W positions reads the prefix W times, and window 0
(the whole context) reads O(context^2) keys per candidate. Here one program serves a *query block*
(up to BLOCK_Q consecutive rows of one window) times the query heads of one KV group, so each key
block is read once per query block and the scores are a [BLOCK_Q * GROUP_PAD, BLOCK_N] tensor-core
product: the compute-bound batched prefill the window-0 candidate needs.

The block table ([nb, 2] int32: first row, rows) is built on the host with the packed layout (one
transfer per chunk; `window_query_blocks`). Precondition (not checked: it would need a host read):
the rows of a block share rows / prefix_rows / prefix_lens (one candidate) and their seq_lens are
>= 1. Row r attends keys 0 .. seq_lens[r]-1, so causality inside the window comes from seq_lens.
Softmax is online, in fp32, in base 2, as in decode_attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import bf16_rtne, on_device, online_softmax_step, pdl_enter, pdl_launch, triton_interpret
from .decode_attention import check_attention_inputs

_LOG2E = 1.4426950408889634
BLOCK_Q = 16  # window positions per program; times the padded KV group: the rows of each tl.dot


@triton.jit
def _window_attention_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [Bc, S, Hkv, D]
    v_ptr,  # [Bc, S, Hkv, D]
    seq_lens_ptr,  # [T] int32 or int64: keys each row attends
    rows_ptr,  # [T] int64: cache row of the window's own keys
    prefix_rows_ptr,  # [T] int64: cache row its first keys come from
    prefix_lens_ptr,  # [T] int32 or int64: how many keys come from there
    blocks_ptr,  # [nb, 2] int32: first row and number of rows (<= BLOCK_Q) of each query block
    out_ptr,  # [T, H, D]
    qk_scale,  # softmax scale * log2(e)
    S,  # cache length: a bound on top of seq_lens, for memory safety only
    stride_qt, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ot, stride_oh,
    D: tl.constexpr,
    GROUP: tl.constexpr,  # H // Hkv
    GROUP_PAD: tl.constexpr,  # next power of two >= GROUP
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D
    DOT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,  # bf16 under TRITON_INTERPRET=1: see bf16_rtne
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    blk = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    first = tl.load(blocks_ptr + 2 * blk).to(tl.int64)
    count = tl.load(blocks_ptr + 2 * blk + 1)

    # row m of the product: window position m // GROUP_PAD, query head kvh * GROUP + m % GROUP_PAD
    offs_m = tl.arange(0, BLOCK_Q * GROUP_PAD)
    qi = offs_m // GROUP_PAD
    g = offs_m % GROUP_PAD
    q_valid = qi < count
    m_mask = q_valid & (g < GROUP)
    t = first + qi  # [BLOCK_M] packed row
    heads = kvh * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < D

    q = tl.load(q_ptr + t[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if INTERP_BF16:
        q = q.to(tl.float32)
    row_len = tl.minimum(tl.load(seq_lens_ptr + t, mask=q_valid, other=0), S)  # [BLOCK_M]
    hi = tl.max(row_len, axis=0)
    own_row = tl.load(rows_ptr + first).to(tl.int64)
    prefix_row = tl.load(prefix_rows_ptr + first).to(tl.int64)
    prefix_len = tl.load(prefix_lens_ptr + first)

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for start in range(0, hi, BLOCK_N):
        n = start + offs_n
        kv_mask = (n < hi)[:, None] & d_mask[None, :]
        row = tl.where(n < prefix_len, prefix_row, own_row)[:, None]  # [BLOCK_N, 1]
        k = tl.load(k_ptr + row * stride_kb + kvh * stride_kh + n[:, None] * stride_kn + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + row * stride_vb + kvh * stride_vh + n[:, None] * stride_vn + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        if INTERP_BF16:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(n[None, :] < row_len[:, None], s, float("-inf"))  # causal, and the block's end
        # rows with no key in this block yet (padding, shorter rows) stay neutral
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION, INTERP_BF16)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if INTERP_BF16:
        out = bf16_rtne(out)
    tl.store(out_ptr + t[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def window_query_blocks(widths: torch.Tensor) -> torch.Tensor:
    """[nb, 2] int32 (first row, rows) for windows of `widths` rows packed back to back: each window
    cut into blocks of at most BLOCK_Q rows, so no block spans two windows. Host tensors in and out."""
    widths, block_q = widths.to(torch.int64), BLOCK_Q
    nblk = (widths + block_q - 1) // block_q
    win = torch.repeat_interleave(torch.arange(len(widths)), nblk)
    k = torch.arange(len(win)) - torch.repeat_interleave(nblk.cumsum(0) - nblk, nblk)
    first = (widths.cumsum(0) - widths)[win] + block_q * k
    rows = (widths[win] - block_q * k).clamp(max=block_q)
    return torch.stack([first, rows], dim=1).to(torch.int32)


def window_attention(q, k_cache, v_cache, seq_lens, scale, rows, prefix_rows, prefix_lens, query_blocks):
    """q [T, H, D]; k_cache, v_cache [Bc, S, Hkv, D]; seq_lens, rows, prefix_rows, prefix_lens [T];
    query_blocks [nb, 2] int32 (window_query_blocks: blocks of <= BLOCK_Q rows). Returns [T, H, D] in
    q.dtype, equal to decode_attention with the same prefix arguments: key j of row r from cache row
    prefix_rows[r] when j < prefix_lens[r], else from rows[r], over keys 0 .. seq_lens[r]-1. Rows in
    no block are not written."""
    check_attention_inputs(q, k_cache, v_cache)
    T, H, D = q.shape
    _, S, Hkv, _ = k_cache.shape
    assert seq_lens.shape == rows.shape == prefix_rows.shape == prefix_lens.shape == (T,)
    assert query_blocks.dim() == 2 and query_blocks.shape[1] == 2 and query_blocks.dtype == torch.int32
    assert all(t.is_contiguous() for t in (seq_lens, rows, prefix_rows, prefix_lens, query_blocks))
    assert q.device == k_cache.device == seq_lens.device == rows.device == query_blocks.device
    rows, prefix_rows = rows.to(torch.int64), prefix_rows.to(torch.int64)
    group = H // Hkv
    group_pad = triton.next_power_of_2(group)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    nb = query_blocks.shape[0]
    if nb == 0:
        return out
    with on_device(q.device):
        _window_attention_kernel[(nb, Hkv)](
            q, k_cache, v_cache, seq_lens, rows, prefix_rows, prefix_lens, query_blocks, out,
            float(scale) * _LOG2E, S,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1),
            D=D, GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=BLOCK_Q, BLOCK_N=64, BLOCK_D=BLOCK_D,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
            INTERP_BF16=q.dtype == torch.bfloat16 and triton_interpret(),
            num_warps=4 if BLOCK_Q * group_pad <= 64 else 8, num_stages=2, **pdl_launch(q.device),
        )
    return out
