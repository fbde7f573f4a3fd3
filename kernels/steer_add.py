"""In-place steering add on the residual stream:

    h[b, t] += coef[b] * (vectors[idx[b]] + bias)   where idx[b] >= 0 and input_pos[b, t] >= start[b]

computed in fp32 and stored in h's dtype, exactly as `steerfast.ops.steer_add_torch`. Rows that are
not steered are neither read nor written (their loads and stores are masked off), so they stay
bit-identical. Grid (B * T, cdiv(d, BLOCK_D)); no host sync.

`steer_residual_add` fuses the decoder layer's last residual add with it: out = x + y (rounded to
the dtype, as the unfused add), then steered, in one pass (`steerfast.ops.steer_residual_add_torch`).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import bf16_rtne, on_device, triton_interpret


@triton.jit
def _steering(vec_ptr, bias_ptr, idx_ptr, pos_ptr, start_ptr, coef_ptr, b, row, offs, d, HAS_BIAS: tl.constexpr):
    """Row `row` (= b * T + t): whether it is steered, the mask of its d elements to touch (empty
    when not), its coefficient and vectors[idx[b]] + bias in fp32 (zeros when not steered)."""
    idx = tl.load(idx_ptr + b)
    steered = (idx >= 0) & (tl.load(pos_ptr + row) >= tl.load(start_ptr + b))
    mask = offs < tl.where(steered, d, 0)
    v = tl.load(vec_ptr + tl.maximum(idx, 0).to(tl.int64) * d + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return steered, mask, tl.load(coef_ptr + b), v


@triton.jit
def _steer_add_kernel(
    h_ptr,  # [B, T, d] (last dim contiguous), updated in place
    pos_ptr,  # [B, T] int32, contiguous
    start_ptr,  # [B] int32
    vec_ptr,  # [V, d], contiguous
    idx_ptr,  # [B] int32: row of vectors, < 0 for no steering
    coef_ptr,  # [B] fp32
    bias_ptr,  # [d] (unused when not HAS_BIAS)
    T, d,
    stride_hb, stride_ht,
    HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERP_BF16: tl.constexpr,  # bf16 under TRITON_INTERPRET=1: round as the GPU does (bf16_rtne)
):
    row = tl.program_id(0)  # b * T + t
    b = row // T
    t = row - b * T
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    # an unsteered row touches no memory beyond the four scalars the helper reads
    steered, mask, coef, v = _steering(vec_ptr, bias_ptr, idx_ptr, pos_ptr, start_ptr, coef_ptr, b, row, offs, d,
                                       HAS_BIAS)
    h_row = h_ptr + b.to(tl.int64) * stride_hb + t.to(tl.int64) * stride_ht + offs
    x = tl.load(h_row, mask=mask, other=0.0).to(tl.float32)
    y = x + coef * v
    if INTERP_BF16:
        y = bf16_rtne(y)
    tl.store(h_row, y.to(h_ptr.dtype.element_ty), mask=mask)


def steer_add_(h, input_pos, start, vectors, idx, coef, bias=None):
    """h [B, T, d] (last dim contiguous), in place; input_pos [B, T] int32; start, idx [B] int32;
    coef [B] fp32; vectors [V, d] and bias [d] (or None) in h's dtype. See module docstring."""
    B, T, d = h.shape
    assert h.dim() == 3 and h.stride(2) == 1, "h must be [B, T, d] with a contiguous last dim"
    assert h.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert vectors.dim() == 2 and vectors.shape[1] == d and vectors.is_contiguous() and vectors.dtype == h.dtype
    assert bias is None or (bias.shape == (d,) and bias.is_contiguous() and bias.dtype == h.dtype)
    assert input_pos.shape == (B, T) and input_pos.dtype == torch.int32 and input_pos.is_contiguous()
    assert start.shape == idx.shape == coef.shape == (B,)
    assert start.dtype == idx.dtype == torch.int32 and coef.dtype == torch.float32
    assert start.is_contiguous() and idx.is_contiguous() and coef.is_contiguous()
    if B * T == 0 or d == 0:
        return h
    BLOCK_D = min(1024, triton.next_power_of_2(d))
    grid = (B * T, triton.cdiv(d, BLOCK_D))
    with on_device(h.device):
        _steer_add_kernel[grid](
            h, input_pos, start, vectors, idx, coef, vectors if bias is None else bias,
            T, d, h.stride(0), h.stride(1),
            HAS_BIAS=bias is not None, BLOCK_D=BLOCK_D,
            INTERP_BF16=h.dtype == torch.bfloat16 and triton_interpret(),
            num_warps=4 if BLOCK_D >= 512 else 1,
        )
    return h


@triton.jit
def _steer_residual_add_kernel(
    out_ptr,  # [B, T, d], contiguous
    x_ptr,  # [B, T, d], contiguous
    y_ptr,  # [B, T, d], contiguous
    pos_ptr,  # [B, T] int32, contiguous
    start_ptr,  # [B] int32
    vec_ptr,  # [V, d], contiguous
    idx_ptr,  # [B] int32: row of vectors, < 0 for no steering
    coef_ptr,  # [B] fp32
    bias_ptr,  # [d] (unused when not HAS_BIAS)
    T, d,
    HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERP_BF16: tl.constexpr,  # bf16 under TRITON_INTERPRET=1: round as the GPU does (bf16_rtne)
):
    row = tl.program_id(0)  # b * T + t
    b = row // T
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs < d
    row_off = row.to(tl.int64) * d + offs

    x = tl.load(x_ptr + row_off, mask=d_mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row_off, mask=d_mask, other=0.0).to(tl.float32)
    s = x + y
    if INTERP_BF16:
        s = bf16_rtne(s)
    s = s.to(out_ptr.dtype.element_ty)  # rounded as the unfused `x + y` is: unsteered rows match it exactly

    # an unsteered row reads no vector
    steered, _, coef, v = _steering(vec_ptr, bias_ptr, idx_ptr, pos_ptr, start_ptr, coef_ptr, b, row, offs, d,
                                    HAS_BIAS)
    r = s.to(tl.float32) + coef * v
    if INTERP_BF16:
        r = bf16_rtne(r)
    tl.store(out_ptr + row_off, tl.where(steered, r.to(out_ptr.dtype.element_ty), s), mask=d_mask)


def steer_residual_add(x, y, input_pos, start, vectors, idx, coef, bias=None):
    """x + y (rounded to x's dtype, as the unfused add), then steered as `steer_add_` does; one pass
    over the residual stream. x, y contiguous [B, T, d], same dtype. Returns a new tensor."""
    B, T, d = x.shape
    assert x.dim() == 3 and y.shape == x.shape and y.dtype == x.dtype and x.is_contiguous() and y.is_contiguous()
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert vectors.dim() == 2 and vectors.shape[1] == d and vectors.is_contiguous() and vectors.dtype == x.dtype
    assert bias is None or (bias.shape == (d,) and bias.is_contiguous() and bias.dtype == x.dtype)
    assert input_pos.shape == (B, T) and input_pos.dtype == torch.int32 and input_pos.is_contiguous()
    assert start.shape == idx.shape == coef.shape == (B,)
    assert start.dtype == idx.dtype == torch.int32 and coef.dtype == torch.float32
    assert start.is_contiguous() and idx.is_contiguous() and coef.is_contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B * T == 0 or d == 0:
        return out
    BLOCK_D = min(1024, triton.next_power_of_2(d))
    grid = (B * T, triton.cdiv(d, BLOCK_D))
    with on_device(x.device):
        _steer_residual_add_kernel[grid](
            out, x, y, input_pos, start, vectors, idx, coef, vectors if bias is None else bias,
            T, d,
            HAS_BIAS=bias is not None, BLOCK_D=BLOCK_D,
            INTERP_BF16=x.dtype == torch.bfloat16 and triton_interpret(),
            num_warps=4 if BLOCK_D >= 512 else 1,
        )
    return out
