"""Decode attention (one new query per row) over a flash-attn-layout KV cache, flash-decoding style.

Grid (B, Hkv, num_splits): each program owns one KV head of one row and one slice of that row's
keys, and serves every query head of the KV group at once (the group is padded to 16 rows for
`tl.dot`), so each K/V block is read once per group. A row reads keys 0 .. seq_lens[b]-1 only: the
slice boundaries are computed on the device from the row's own length, so every split of a row
gets an even share of *its* keys, and a split whose share is empty writes a neutral partial
(m = -inf, l = 0, acc = 0). With num_splits > 1 the partials (fp32 workspace) are merged by
`_decode_attention_combine_kernel`; with num_splits == 1 the first kernel writes the output itself.

Softmax is online, in fp32, in base 2 (scale * log2(e) folded into the scores).
Precondition (not checked: that would need a host sync): 1 <= seq_lens[b] <= S. Outside it nothing
is read out of bounds: a length above S is taken as S, and a row of length 0 gets zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import bf16_rtne, num_sms, on_device, online_softmax_step, pdl_enter, pdl_launch, triton_interpret

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64
_MIN_KEYS_PER_SPLIT = 128


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [Bc, S, Hkv, D]
    v_ptr,  # [Bc, S, Hkv, D]
    seq_lens_ptr,  # [B] int32 or int64
    rows_ptr,  # [B] int64 (HAS_PREFIX): cache row of row b's own keys
    prefix_rows_ptr,  # [B] int64 (HAS_PREFIX): cache row its first keys come from
    prefix_lens_ptr,  # [B] int32 or int64 (HAS_PREFIX): how many keys come from there
    out_ptr,  # [B, H, D]             (written when not SPLIT)
    m_ptr,  # [B, H, num_splits] fp32   (written when SPLIT): running max, base 2
    l_ptr,  # [B, H, num_splits] fp32   (written when SPLIT): sum of exp2(s - m)
    acc_ptr,  # [B, H, num_splits, D] fp32 (written when SPLIT): unnormalised output
    qk_scale,  # softmax scale * log2(e)
    S,  # cache length: a bound on top of seq_lens, for memory safety only
    num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_oh,
    stride_wb, stride_wh,  # strides of m/l; acc's are these times D
    D: tl.constexpr,
    GROUP: tl.constexpr,  # H // Hkv
    BLOCK_G: tl.constexpr,  # >= max(16, GROUP), power of two
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D
    SPLIT: tl.constexpr,
    HAS_PREFIX: tl.constexpr,  # keys j < prefix_len from another row (the hybrid's candidate rows)
    DOT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,  # bf16 under TRITON_INTERPRET=1: see bf16_rtne
    USE_PDL: tl.constexpr,  # programmatic dependent launch: see _common.pdl_enter
):
    pdl_enter(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    seq_len = tl.minimum(tl.load(seq_lens_ptr + b), S)
    # this split's share of the row's own keys, rounded to whole blocks
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < D
    heads = kvh * GROUP + offs_g  # [BLOCK_G] query heads of this KV group

    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if INTERP_BF16:
        q = q.to(tl.float32)

    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    if HAS_PREFIX:
        own_row = tl.load(rows_ptr + b).to(tl.int64)
        prefix_row = tl.load(prefix_rows_ptr + b).to(tl.int64)
        prefix_len = tl.load(prefix_lens_ptr + b)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_mask = n < hi
        kv_mask = n_mask[:, None] & d_mask[None, :]
        if HAS_PREFIX:  # each key's row: the sequence's own for j < prefix_len, else this row's
            row = tl.where(n < prefix_len, prefix_row, own_row)[:, None]  # [BLOCK_N, 1]
            k = tl.load(k_ptr + row * stride_kb + kvh * stride_kh + n[:, None] * stride_kn + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_ptr + row * stride_vb + kvh * stride_vh + n[:, None] * stride_vn + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        else:
            k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        if INTERP_BF16:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION, INTERP_BF16)

    if SPLIT:
        w_off = b * stride_wb + heads * stride_wh + split  # [BLOCK_G]
        tl.store(m_ptr + w_off, m_i, mask=g_mask)
        tl.store(l_ptr + w_off, l_i, mask=g_mask)
        tl.store(acc_ptr + w_off[:, None] * D + offs_d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        if INTERP_BF16:
            out = bf16_rtne(out)
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_attention_combine_kernel(
    m_ptr,  # [B, H, num_splits] fp32
    l_ptr,  # [B, H, num_splits] fp32
    acc_ptr,  # [B, H, num_splits, D] fp32
    out_ptr,  # [B, H, D]
    num_splits,
    stride_wb, stride_wh,
    stride_ob, stride_oh,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= num_splits
    BLOCK_D: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < D
    w_off = b * stride_wb + h * stride_wh + offs_s  # [BLOCK_S]

    m = tl.load(m_ptr + w_off, mask=s_mask, other=float("-inf"))  # [BLOCK_S]
    l = tl.load(l_ptr + w_off, mask=s_mask, other=0.0)  # [BLOCK_S]
    acc = tl.load(acc_ptr + w_off[:, None] * D + offs_d[None, :],
                  mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]

    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty (seq_len 0): zeros out
    w = tl.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
    l_sum = tl.sum(l * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(l_sum > 0.0, l_sum, 1.0)  # [BLOCK_D]
    if INTERP_BF16:
        out = bf16_rtne(out)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def choose_num_splits(B: int, Hkv: int, S: int, device: torch.device) -> int:
    """Splits of the key axis so that B * Hkv * splits programs fill the GPU about twice, each
    with at least _MIN_KEYS_PER_SPLIT keys of a full-length row. Host-side, from shapes only."""
    programs = B * Hkv
    target = triton.cdiv(2 * num_sms(device), programs)
    return max(1, min(target, triton.cdiv(S, _MIN_KEYS_PER_SPLIT), _MAX_SPLITS))


def check_attention_inputs(q, k_cache, v_cache):
    """The query and cache shapes, dtypes and layouts both attention kernels take."""
    assert q.dim() == 3 and k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "q [B,H,D], caches [Bc,S,Hkv,D]"
    assert k_cache.shape[3] == q.shape[2] and q.shape[1] % k_cache.shape[2] == 0, \
        "need matching head_dim, H a multiple of Hkv"
    assert q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "last dim must be contiguous"
    assert q.device == k_cache.device == v_cache.device


def decode_attention(q, k_cache, v_cache, seq_lens, scale, num_splits=None, rows=None, prefix_rows=None,
                     prefix_lens=None):
    """q [B, H, D]; k_cache, v_cache [Bc >= B, S, Hkv, D]; seq_lens [B] int (1 <= seq_lens[b] <= S).
    Returns [B, H, D] in q.dtype: softmax(scale * q k^T) v over keys 0 .. seq_lens[b]-1 of row b.
    With rows, prefix_rows, prefix_lens [B] (all or none): key j of query row b is read from cache
    row prefix_rows[b] when j < prefix_lens[b], else from cache row rows[b]."""
    check_attention_inputs(q, k_cache, v_cache)
    B, H, D = q.shape
    Bc, S, Hkv, _ = k_cache.shape
    assert seq_lens.shape == (B,) and seq_lens.dtype in (torch.int32, torch.int64), "seq_lens: int32 or int64 [B]"
    assert seq_lens.device == q.device
    has_prefix = prefix_rows is not None
    assert (rows is None) == (prefix_lens is None) == (not has_prefix), "rows, prefix_rows, prefix_lens: all or none"
    if has_prefix:
        assert rows.shape == prefix_rows.shape == prefix_lens.shape == (B,)
        rows, prefix_rows = rows.to(torch.int64), prefix_rows.to(torch.int64)
    else:
        assert Bc >= B
        rows = prefix_rows = prefix_lens = seq_lens  # unused
    group = H // Hkv
    BLOCK_G = max(16, triton.next_power_of_2(group))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = 64
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv, S, q.device)
    assert 1 <= num_splits
    interp_bf16 = q.dtype == torch.bfloat16 and triton_interpret()
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32: no tf32 rounding; 16-bit: the default

    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    split = num_splits > 1
    if split:
        ws_m = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
        ws_l = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
        ws_acc = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
    else:
        ws_m = ws_l = ws_acc = out  # unused
    if B == 0:
        return out
    with on_device(q.device):
        _decode_attention_kernel[(B, Hkv, num_splits)](
            q, k_cache, v_cache, seq_lens, rows, prefix_rows, prefix_lens, out, ws_m, ws_l, ws_acc,
            float(scale) * _LOG2E, S, num_splits,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1),
            H * num_splits, num_splits,
            D=D, GROUP=group, BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, SPLIT=split, HAS_PREFIX=has_prefix,
            DOT_PRECISION=precision, INTERP_BF16=interp_bf16, num_warps=4, num_stages=2, **pdl_launch(q.device),
        )
        if split:
            _decode_attention_combine_kernel[(B, H)](
                ws_m, ws_l, ws_acc, out, num_splits,
                H * num_splits, num_splits,
                out.stride(0), out.stride(1),
                D=D, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D, INTERP_BF16=interp_bf16,
                num_warps=4, **pdl_launch(q.device),
            )
    return out
