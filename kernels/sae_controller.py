"""The hybrid's controller in one fused kernel: per row, the argmax latent of
z = (x - b_dec) W_enc + b_enc (fp32; the lowest latent among equal maxima), its category
cat_map[latent] (-1 when the value is below `threshold`, or where cat_map says -1) and
cat_coef[category] (0 where the category is -1), exactly as `steerfast.ops.sae_controller_torch`.

Grid (cdiv(B, BLOCK_M),): a program owns BLOCK_M <= 4 rows and walks all n latents in chunks of
BLOCK_N (one chunk for the hybrid's 5-50-latent SAEs), each chunk's z computed in registers by fp32
FMAs over d in BLOCK_D steps ("GEMV" form: x - b_dec in fp32, W_enc upcast to fp32, so fp32
semantics exactly, no tensor-core rounding), keeping a running (max, argmax) per row as one packed
int64 key (see `kernels/topk_sae_encode.py`: the value's order-preserving bits above
0x7FFFFFFF - latent, so one integer max gives the value and the lowest-index tie-break). Nothing but
the four [B] outputs is written; no host sync. Reads W_enc once per program: meant for small n (up to
a few thousand); a large-n SAE at batch 1 runs on one program (use `topk_sae_encode` with k = 1 there).

cat_coef entries past its length read as 0 (the torch reference would raise); cat_map values are
not range-checked (a precondition, as for the reference's indexing).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import on_device

from .topk_sae_encode import _EMPTY, _pack_keys, _sae_preact_tile, _unpack_keys

_MAX_ROWS = 4


@triton.jit
def _sae_controller_kernel(
    x_ptr,  # [B, d]
    w_ptr,  # [d, n], row-major
    b_enc_ptr,  # [n]
    b_dec_ptr,  # [d]
    cat_map_ptr,  # [n] int32
    cat_coef_ptr,  # [n_coef] fp32
    category_ptr,  # [B] int32 out
    coef_ptr,  # [B] fp32 out
    latent_ptr,  # [B] int64 out
    value_ptr,  # [B] fp32 out
    threshold,  # fp32
    B, d, n, n_coef,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    best = tl.full([BLOCK_M], _EMPTY, dtype=tl.int64)
    for n0 in range(0, n, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        z = _sae_preact_tile(x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, rows, cols, B, d, n,
                             BLOCK_M, BLOCK_N, BLOCK_D, False, "ieee", False, False)
        keys = tl.where((cols < n)[None, :], _pack_keys(z, cols[None, :]), _EMPTY)
        best = tl.maximum(best, tl.max(keys, axis=1))
    value, latent = _unpack_keys(best)
    cat = tl.load(cat_map_ptr + latent, mask=row_mask, other=-1)
    category = tl.where(value >= threshold, cat, -1)  # NaN: no steering
    has = row_mask & (category >= 0) & (category < n_coef)
    coef = tl.load(cat_coef_ptr + tl.maximum(category, 0), mask=has, other=0.0)
    tl.store(category_ptr + rows, category, mask=row_mask)
    tl.store(coef_ptr + rows, coef, mask=row_mask)
    tl.store(latent_ptr + rows, latent, mask=row_mask)
    tl.store(value_ptr + rows, value, mask=row_mask)


def plan(B: int, n: int) -> dict:
    """Block sizes from shapes (host-side), as the GEMV form of `topk_sae_encode`: W_enc tiles of 4096
    elements (two in flight), an fp32 accumulator of <= 8192 (~140 registers a thread at 8 warps)."""
    block_m = min(_MAX_ROWS, triton.next_power_of_2(max(B, 1)))
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_d = max(1, min(4096 // block_n, 8192 // (block_m * block_n)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=8)


def sae_controller(x, W_enc, b_enc, b_dec, cat_map, threshold, cat_coef):
    """(category int32 [B], coef fp32 [B], latent int64 [B], value fp32 [B]); see the module docstring.
    x [B, d]; W_enc [d, n]; b_enc [n]; b_dec [d] (one dtype: fp32/fp16/bf16); cat_map int32 [n];
    cat_coef fp32 [C]."""
    assert x.dim() == 2 and W_enc.dim() == 2 and x.shape[1] == W_enc.shape[0], "x [B, d], W_enc [d, n]"
    B, d = x.shape
    n = W_enc.shape[1]
    assert n >= 1 and b_enc.shape == (n,) and b_dec.shape == (d,), "b_enc [n], b_dec [d], n >= 1"
    assert x.dtype == W_enc.dtype == b_enc.dtype == b_dec.dtype and x.dtype in (
        torch.float32, torch.float16, torch.bfloat16)
    assert x.is_contiguous() and W_enc.is_contiguous() and b_enc.is_contiguous() and b_dec.is_contiguous()
    assert cat_map.shape == (n,) and cat_map.dtype == torch.int32 and cat_map.is_contiguous()
    assert cat_coef.dim() == 1 and cat_coef.dtype == torch.float32 and cat_coef.is_contiguous()
    assert n < 2 ** 31 - 1
    dev = x.device
    category = torch.empty(B, dtype=torch.int32, device=dev)
    coef = torch.empty(B, dtype=torch.float32, device=dev)
    latent = torch.empty(B, dtype=torch.int64, device=dev)
    value = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return category, coef, latent, value
    p = plan(B, n)
    with on_device(dev):
        _sae_controller_kernel[(triton.cdiv(B, p["BLOCK_M"]),)](
            x, W_enc, b_enc, b_dec, cat_map, cat_coef, category, coef, latent, value,
            float(threshold), B, d, n, cat_coef.shape[0],
            BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_D=p["BLOCK_D"],
            num_warps=p["num_warps"], num_stages=3,
        )
    return category, coef, latent, value
