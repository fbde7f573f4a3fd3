"""The greedy decode step's bookkeeping in one launch (in place), per row b:

    n = tok[b] if done[b] else nxt[b]
    out[b, step[b]] = n                      (skipped when step[b] >= W: nothing is written out of bounds)
    done[b] |= any(n == stop[b, :])          (stop is -1 padded; -1 is never a token)
    tok[b] = n;  pos[b] += 1;  seq_lens[b] = pos[b] + 1;  step[b] += 1

exactly as `steerfast.fused_ops.decode_tail_torch`. Each row is read and written by one program
only (step is per row for that reason), so there is no race. Grid cdiv(B, BLOCK_B); no host sync.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import on_device, pdl_enter, pdl_launch


@triton.jit
def _decode_tail_kernel(
    nxt_ptr,  # [B] int64: this step's greedy token
    done_ptr,  # [B] bool, updated in place
    tok_ptr,  # [B] int64, updated in place: the next step's input token
    pos_ptr,  # [B] int32, updated in place: the next step's position
    seq_lens_ptr,  # [B] int32, written: the next step's attention length (pos + 1)
    step_ptr,  # [B] int64, updated in place: column of out to write
    out_ptr,  # [B, W] int64, contiguous: generated tokens
    stop_ptr,  # [B, n_stop] int64, contiguous, -1 padded
    B, W, n_stop,
    BLOCK_B: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= n_stop
    USE_PDL: tl.constexpr,  # programmatic dependent launch: see _common.pdl_enter
):
    pdl_enter(USE_PDL)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    done = tl.load(done_ptr + offs_b, mask=b_mask, other=0) != 0
    n = tl.where(done, tl.load(tok_ptr + offs_b, mask=b_mask, other=0),
                 tl.load(nxt_ptr + offs_b, mask=b_mask, other=0))  # [BLOCK_B]
    step = tl.load(step_ptr + offs_b, mask=b_mask, other=0)
    tl.store(out_ptr + offs_b.to(tl.int64) * W + step, n, mask=b_mask & (step >= 0) & (step < W))

    offs_s = tl.arange(0, BLOCK_S)
    s_mask = b_mask[:, None] & (offs_s[None, :] < n_stop)
    stop = tl.load(stop_ptr + offs_b.to(tl.int64)[:, None] * n_stop + offs_s[None, :], mask=s_mask, other=-1)
    hit = tl.sum(((stop == n[:, None]) & s_mask).to(tl.int32), axis=1) > 0  # [BLOCK_B]
    tl.store(done_ptr + offs_b, (done | hit).to(tl.int1), mask=b_mask)

    tl.store(tok_ptr + offs_b, n, mask=b_mask)
    pos = tl.load(pos_ptr + offs_b, mask=b_mask, other=0) + 1
    tl.store(pos_ptr + offs_b, pos, mask=b_mask)
    tl.store(seq_lens_ptr + offs_b, pos + 1, mask=b_mask)
    tl.store(step_ptr + offs_b, step + 1, mask=b_mask)


def decode_tail_(nxt, done, tok, pos, seq_lens, step, out, stop):
    """In place on done, tok, pos, seq_lens, step, out; see the module docstring. Shapes and dtypes
    are checked by the caller (`steerfast.fused_ops.decode_tail_`)."""
    B, W = out.shape
    n_stop = stop.shape[1]
    if B == 0:
        return
    BLOCK_B = min(1024, triton.next_power_of_2(B))
    BLOCK_S = max(1, triton.next_power_of_2(n_stop))
    with on_device(out.device):
        _decode_tail_kernel[(triton.cdiv(B, BLOCK_B),)](
            nxt, done, tok, pos, seq_lens, step, out, stop, B, W, n_stop,
            BLOCK_B=BLOCK_B, BLOCK_S=BLOCK_S, num_warps=1 if BLOCK_B <= 64 else 4, **pdl_launch(out.device),
        )
