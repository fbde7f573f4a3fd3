"""What every Triton kernel module here needs: the launch device, and bf16 rounding under the interpreter."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..backend import triton_interpret  # noqa: F401 -- re-exported: the one interpreter flag


@triton.jit
def bf16_rtne(x):
    """fp32 x rounded to the nearest bf16 (ties to even), returned as fp32 (NaN not preserved).

    Used only under TRITON_INTERPRET=1 with bf16 tensors, to make the interpreter compute what the GPU
    does: its tl.dot multiplies bf16 operands' uint16 storage as integers, and its fp32 -> bf16 cast
    truncates where the GPU rounds to nearest. So there the operands go to tl.dot as fp32 (exact) and
    every rounding to bf16 is done here, after which the truncating cast is exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def online_softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """One key block of flash attention's online softmax, base 2: scores s [M, N] (-inf: masked out)
    and values v [N, D] into the running max m_i [M], sum l_i [M] and unnormalised output acc [M, D].
    A row with no key yet stays neutral (m = -inf, l = 0, acc = 0)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if INTERP_BF16:
        p_v = bf16_rtne(p)
        v = v.to(tl.float32)
    else:
        p_v = p.to(v.dtype)  # 16-bit probabilities for the tensor-core product, as flash-attn does
    acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """Programmatic dependent launch (Hopper+; the kernel launched with launch_pdl=True): wait until
    the previous kernel on the stream has finished and its writes are visible, then let the next one
    launch, which waits here likewise. A decode step's kernels are a few microseconds each, about as
    long as a launch: this overlaps each launch and prologue with the previous kernel. Called before
    any memory access of the kernel (earlier accesses could race with the previous kernel)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_launch(device: torch.device) -> dict:
    """Launch keywords for a kernel that calls pdl_enter: programmatic dependent launch on a CUDA
    device of compute capability >= 9 when STEERFAST_PDL=1 (off by default until measured on the GPU:
    `python -m bench decode --variants default,pdl`), never under the interpreter."""
    on = (os.environ.get("STEERFAST_PDL") == "1" and device.type == "cuda" and not triton_interpret()
          and _capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9)
    return dict(USE_PDL=True, launch_pdl=True) if on else dict(USE_PDL=False)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (4 for the interpreter, which runs programs one by one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
