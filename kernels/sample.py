"""Temperature / top-k / top-p sampling by Gumbel-max in one kernel, without sorting the vocabulary.

One program per row. The torch reference (steerfast.sampling.sample_torch) sorts [B, V] to find
the nucleus and writes a [B, V] int64 hash per step for the noise; here the row is read a few
times instead and nothing of size V is written:
  1. the greedy token (first maximal logit) and the maximum of x = logits / temperature;
  2. (FILTER) the softmax denominator Z = sum exp(x - max);
  3. (FILTER) the tokens that can be in the nucleus, compacted into scratch slots (see below);
  4. (FILTER) the nucleus threshold by radix selection over the 32-bit order-preserving keys of x,
     4 bits per pass (8 passes, 16 trial thresholds each), over those candidates when they fit;
  5. argmax over the kept tokens of x + Gumbel noise, the noise the same counter-based hash of
     (seed, position, token id) as steerfast.sampling.uniform_noise.

Nucleus (tie-inclusive, as the reference): token i is kept iff fewer than top_k tokens have a
larger x and their probability mass is below top_p. That holds for every x from some threshold
up, so the kept set is {key(x) >= R}, R the smallest key whose strictly larger keys pass: digit by
digit from the top, R takes the number of trial digits that fail (the test is monotone).
A token less likely than (1 - top_p) / (2 V) cannot be kept: all of them together hold under
(1 - top_p) / 2, so the mass above any of them exceeds top_p. Real next-token distributions leave
a few thousand of 152k tokens above that, so the 8 selection passes read those, not the row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import on_device

CANDIDATE_SLOTS = 16384  # per row: the nucleus's candidates when they fit (64 rows: 8 MiB of scratch)


@triton.jit
def _mix32(x):
    """murmur3's 32-bit finaliser on int64 values < 2**32 (as sampling._mix32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _order_key(x):
    """int64 in [0, 2**32): the float32 x's order as an unsigned key (x + 0.0: -0.0 ties +0.0)."""
    u = (x + 0.0).to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(u >= 0x80000000, 0xFFFFFFFF - u, u + 0x80000000)


@triton.jit
def _kth_largest_key(keys, k):
    """The k-th largest of the int64 keys [N] (values in [0, 2**32), 1 <= k <= N), by radix
    selection: per 4-bit digit from the top, the largest digit that still leaves k keys at or above."""
    digits = tl.arange(0, 16).to(tl.int64)
    R = tl.zeros([], tl.int64)
    for level in tl.static_range(8):
        shift = 28 - 4 * level
        at_least = tl.sum((keys[:, None] >= (R | (digits << shift))[None, :]).to(tl.int32), axis=0)  # [16]
        R = R | ((tl.sum((at_least >= k).to(tl.int64), axis=0) - 1) << shift)
    return R


@triton.jit
def _sample_kernel(
    logits_ptr,  # [B, V]
    temperature_ptr,  # [B] fp32: 0 = greedy
    top_k_ptr,  # [B] int64 (V: off)
    top_p_ptr,  # [B] fp32 (1: off)
    seed_ptr,  # [B] int64
    pos_ptr,  # [B] int32 or int64: the position the chosen token will take
    out_ptr,  # [B] int64
    keep_from_ptr,  # [B] int64: the smallest kept key, R (0: every token)
    cand_x_ptr,  # [B, cap] fp32 scratch (FILTER): the candidates' x
    cand_e_ptr,  # [B, cap] fp32 scratch (FILTER): their exp(x - max x)
    V,
    stride_b,
    cap,  # candidate slots per row
    FILTER: tl.constexpr,  # top-k / top-p
    BLOCK_V: tl.constexpr,  # the streaming passes' block
    BLOCK_S: tl.constexpr,  # the selection passes' block (x 16 trial thresholds)
):
    b = tl.program_id(0).to(tl.int64)
    row = logits_ptr + b * stride_b
    temp = tl.load(temperature_ptr + b)
    t = tl.maximum(temp, 1e-6)
    offs = tl.arange(0, BLOCK_V)

    # 1. greedy: per lane the first maximal logit, then the lowest index among the lanes' maxima
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK_V], V, tl.int32)
    for start in range(0, V, BLOCK_V):
        i = start + offs
        v = tl.load(row + i, mask=i < V, other=float("-inf")).to(tl.float32)
        upd = v > best
        best_i = tl.where(upd, i, best_i)
        best = tl.where(upd, v, best)
    top = tl.max(best, axis=0)
    greedy = tl.min(tl.where(best == top, best_i, V), axis=0)
    x_max = tl.math.div_rn(top, t)  # division by t > 0 is monotone: the max of x

    seed_mix = _mix32((tl.load(seed_ptr + b) * 0x9E3779B1) & 0xFFFFFFFF) \
        ^ _mix32((tl.load(pos_ptr + b).to(tl.int64) * 0x7FEB352D + 0x165667B1) & 0xFFFFFFFF)

    R = tl.zeros([], tl.int64)  # keep every token
    if FILTER:
        k = tl.load(top_k_ptr + b)
        top_p = tl.load(top_p_ptr + b)
        # rows that filter nothing (and greedy rows: bucket padding too) skip the selection
        if (temp > 0) & ((k < V) | (top_p < 1.0)):
            # 2. softmax denominator
            z = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                i = start + offs
                v = tl.load(row + i, mask=i < V, other=float("-inf")).to(tl.float32)
                z += tl.exp(tl.math.div_rn(v, t) - x_max)
            z_sum = tl.sum(z, axis=0)
            mass_limit = tl.where(top_p >= 1.0, float("inf"), top_p * z_sum)  # 1: no nucleus
            # 3. the candidates, compacted into the row's scratch slots when they fit
            # top-p: a token less likely than (1 - top_p) / (2 V) is never kept (all such tokens hold
            # under half of 1 - top_p); top-k: the lanes' maxima are `best`'s, maxima of disjoint
            # sets, so at least k tokens reach the k-th largest of them and none below it is kept
            tau = tl.where(top_p <= 0.999, (1.0 - top_p) / (2.0 * V) * z_sum, -1.0)
            key_k = tl.where(k <= BLOCK_V, _kth_largest_key(_order_key(best), k), 0)  # 0: no top-k cut
            n_cand = V + 1
            if (tau >= 0.0) | (key_k > 0):
                n_cand = 0
                for start in range(0, V, BLOCK_V):
                    i = start + offs
                    v = tl.load(row + i, mask=i < V, other=float("-inf")).to(tl.float32)
                    x = tl.math.div_rn(v, t)
                    e = tl.exp(x - x_max)
                    keep = (i < V) & (e >= tau) & (_order_key(v) >= key_k)
                    slot = n_cand + tl.cumsum(keep.to(tl.int32), axis=0) - 1
                    ok = keep & (slot < cap)
                    tl.store(cand_x_ptr + b * cap + slot, x, mask=ok)
                    tl.store(cand_e_ptr + b * cap + slot, e, mask=ok)
                    n_cand += tl.sum(keep.to(tl.int32), axis=0)
                tl.debug_barrier()  # the slots are read back by other threads
            compact = n_cand <= cap
            n_src = tl.where(compact, n_cand, V)
            # 4. the threshold key, 4 bits per pass, over the candidates (or the row)
            offs_s = tl.arange(0, BLOCK_S)
            digits = tl.arange(0, 16).to(tl.int64)
            for level in tl.static_range(8):
                shift = 28 - 4 * level
                trial = R | (digits << shift) | ((1 << shift) - 1)  # [16] the largest key of each digit
                cnt = tl.zeros([16], tl.int32)
                mass = tl.zeros([16], tl.float32)
                for start in range(0, n_src, BLOCK_S):
                    j = start + offs_s
                    valid = j < n_src
                    if compact:
                        x = tl.load(cand_x_ptr + b * cap + j, mask=valid, other=0.0)
                        e = tl.load(cand_e_ptr + b * cap + j, mask=valid, other=0.0)
                    else:
                        x = tl.math.div_rn(tl.load(row + j, mask=valid, other=float("-inf")).to(tl.float32), t)
                        e = tl.exp(x - x_max)
                    key = tl.where(valid, _order_key(x), 0)
                    e = tl.where(valid, e, 0.0)
                    above = key[:, None] > trial[None, :]  # [BLOCK_S, 16]
                    cnt += tl.sum(above.to(tl.int32), axis=0)
                    mass += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
                fails = (cnt >= k) | (mass >= mass_limit)
                R = R | (tl.sum(fails.to(tl.int64), axis=0) << shift)
            R = tl.minimum(R, _order_key(x_max))  # the top token always stays (top_k < 1, top_p ~ 0)
    tl.store(keep_from_ptr + b, R)

    # 5. Gumbel-max over the kept tokens
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK_V], V, tl.int32)
    for start in range(0, V, BLOCK_V):
        i = start + offs
        valid = i < V
        v = tl.load(row + i, mask=valid, other=float("-inf")).to(tl.float32)
        x = tl.math.div_rn(v, t)
        h = _mix32(seed_mix ^ ((i.to(tl.int64) * 0x27D4EB2F) & 0xFFFFFFFF))
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / (1 << 23))  # in (0, 1), exactly
        score = x - tl.log(-tl.log(u))
        score = tl.where(valid & (_order_key(x) >= R), score, float("-inf"))
        upd = score > best
        best_i = tl.where(upd, i, best_i)
        best = tl.where(upd, score, best)
    top = tl.max(best, axis=0)
    choice = tl.min(tl.where(best == top, best_i, V), axis=0)
    tl.store(out_ptr + b, tl.where(temp > 0, choice, greedy).to(tl.int64))


def sample(logits, temperature, top_k, top_p, seed, pos, filter: bool, cap: int = CANDIDATE_SLOTS,
           return_keep_from: bool = False):
    """Token ids [B] int64: logits [B, V] (contiguous rows); temperature, top_p fp32 [B]; top_k,
    seed int64 [B]; pos int [B]. Rows with temperature 0 take the first maximal logit. cap: scratch
    slots per row for the nucleus's candidates (a row with more reads its logits instead).
    return_keep_from: also the smallest kept order key per row (0: all kept), for tests."""
    B, V = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    assert temperature.dtype == top_p.dtype == torch.float32 and top_k.dtype == seed.dtype == torch.int64
    assert temperature.shape == top_k.shape == top_p.shape == seed.shape == pos.shape == (B,)
    assert all(a.is_contiguous() for a in (temperature, top_k, top_p, seed, pos))
    assert V < 2**31 - 1
    out, keep_from = (torch.empty(B, dtype=torch.int64, device=logits.device) for _ in range(2))
    if B == 0:
        return (out, keep_from) if return_keep_from else out
    cap = max(1, min(cap, V)) if filter else 1
    cand_x, cand_e = (torch.empty(B, cap, dtype=torch.float32, device=logits.device) for _ in range(2))
    with on_device(logits.device):
        _sample_kernel[(B,)](logits, temperature, top_k, top_p, seed, pos, out, keep_from, cand_x, cand_e, V,
                             logits.stride(0), cap, FILTER=filter, BLOCK_V=1024, BLOCK_S=256, num_warps=8)
    return (out, keep_from) if return_keep_from else out
