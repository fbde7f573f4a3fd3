"""What both kernel test files need: which backends can run here, as pytest params."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_skip_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not (HAS_CUDA or INTERPRET):
        return "no CUDA device and TRITON_INTERPRET is not 1: Triton cannot run here"
    return None


TRITON_SKIP = _triton_skip_reason()
# tests that run Triton kernels on CPU tensors (no GPU needed): only the interpreter takes those
CPU_TRITON_SKIP = TRITON_SKIP or (None if INTERPRET else "Triton kernels on CPU tensors need TRITON_INTERPRET=1")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

# on a GPU machine the Triton kernels run compiled for it: GPU tests too (`-m gpu`, bench check)
TRITON_MARKS = [pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP)),
                *([pytest.mark.gpu] if HAS_CUDA else [])]
TRITON = pytest.param("triton", marks=TRITON_MARKS)


def triton_only(test):
    """A test of the Triton kernels alone, on DEVICE's tensors."""
    for mark in TRITON_MARKS:
        test = mark(test)
    return test

BACKENDS = ["torch", TRITON, pytest.param("cuda", marks=GPU)]

# (dtype, atol, rtol) for assert_close against the float64 reference; FLOOR is the 2x rule's floor
DTYPES = [
    pytest.param((torch.float32, 1e-5, 1e-5), id="fp32"),
    pytest.param((torch.float16, 3e-3, 3e-3), id="fp16"),
    pytest.param((torch.bfloat16, 2e-2, 2e-2), id="bf16"),
]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def check_2x(out, ref, base, atol, rtol, floor, what):
    """The 2x rule: out (an implementation) erring at most twice as much as base (plain torch in the
    same dtype) against the float64 ref, plus a floor; then within (atol, rtol) of it."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    base_err = (base.double() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base_err + floor, (
        f"{what}: max error {err:.3g} > 2 x same-dtype torch error {base_err:.3g} + {floor:g}")
    # elementwise too, but never tighter than torch's own same-dtype error (an output near zero after a
    # rounded intermediate errs by that intermediate's ulp in any implementation)
    atol = max(atol, 2 * base_err + floor)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m} (same-dtype torch error {base_err:.3g})")
