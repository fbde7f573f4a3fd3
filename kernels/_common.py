"""What every Triton kernel module here needs: the launch device, and bf16 rounding under the interpreter."""
from __future__ import annotations

import contextlib

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


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
