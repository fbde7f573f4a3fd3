"""Count the kernels a piece of code launches, and the bytes they read, without a GPU: the decode
step's launch budget and its memory traffic.

Inside a CUDA graph every kernel node costs ~2 us however little it reads (docs/architecture.md,
"The decode step"), so the number of kernels per decode step is a budget that CI can hold without a GPU: aten ops
that do work (views, allocations and our own custom-op wrappers excluded) are counted through a
TorchDispatchMode, Triton launches by wrapping the launch itself, and whatever runs inside a Triton
launch (the interpreter's own tensor traffic) is not counted again.

Bytes read: each launch's distinct input buffers, whole, except where a kernel is known to read part
of one or only write it (_TRITON_ACCESS: the KV cache up to each row's length, the RoPE tables at the
rows' positions, outputs and workspaces written) and aten's gathers (the rows gathered). Counting on
the CPU what a GPU step must move: bench decode sets it beside the weight bytes.
"""
from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# allocation and metadata: no kernel runs
_FREE = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "_local_scalar_dense", "sym_size",
         "sym_stride", "sym_numel", "is_contiguous", "set_", "resize_", "_unsafe_view"}


# per Triton kernel: pointer arguments only written, read at some rows (by a length or index argument)
# or, for KV caches, up to each row's sequence length
_TRITON_ACCESS = {
    "_fused_linear_kernel": dict(write={"out_ptr", "out_idx_ptr"}),
    "_argmax_reduce_kernel": dict(write={"out_ptr"}),
    "_qkv_rope_kernel": dict(write={"q_ptr", "k_cache_ptr", "v_cache_ptr"}, rows=({"cos_ptr", "sin_ptr"}, "pos_ptr")),
    "_decode_attention_kernel": dict(write={"out_ptr", "m_ptr", "l_ptr", "acc_ptr"},
                                     kv=({"k_ptr", "v_ptr"}, "seq_lens_ptr")),
    "_decode_attention_combine_kernel": dict(write={"out_ptr"}),
    "_decode_tail_kernel": dict(write={"out_ptr"}),
    # one program per query block: the block's keys once, up to its longest row (the last)
    "_window_attention_kernel": dict(write={"out_ptr"}, kv=({"k_ptr", "v_ptr"}, "seq_lens_ptr"),
                                     blocks="blocks_ptr"),
    # its later passes over a row (or its candidates): from L2, counted once
    "_sample_kernel": dict(write={"out_ptr", "keep_from_ptr", "cand_x_ptr", "cand_e_ptr"}),
}
_ATEN_GATHERS = {"embedding", "index", "index_select", "gather", "take"}  # read what they return


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _triton_bytes(name: str, params: list[str], args: tuple, kwargs: dict) -> int:
    bound = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
    acc = _TRITON_ACCESS.get(name, {})
    rows_args, rows_by = acc.get("rows", ((), None))
    kv_args, kv_by = acc.get("kv", ((), None))
    seen, total = set(), 0
    for arg, t in bound.items():
        if not isinstance(t, torch.Tensor) or arg in acc.get("write", ()) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if arg in rows_args:  # [S, D] tables read at each row's position
            total += bound[rows_by].numel() * t.shape[-1] * t.element_size()
        elif arg in kv_args:  # [Bc, S, Hkv, D] caches read up to each row's length
            lens = bound[kv_by].clamp(max=t.shape[1])
            if "blocks" in acc:  # ... or each query block's last row's
                first, n = bound[acc["blocks"]].long().unbind(1)
                lens = lens[first + n - 1]
            total += int(lens.sum()) * t.shape[2] * t.shape[3] * t.element_size()
        else:
            total += _nbytes(t)
    return total


@dataclass
class Launches:
    aten: Counter = field(default_factory=Counter)
    triton: Counter = field(default_factory=Counter)
    syncs: int = 0  # device->host reads (.item(), .tolist(), bool(tensor)): none belong in a step
    bytes_read: Counter = field(default_factory=Counter)  # per kernel name

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_read.values())

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())

    def __str__(self) -> str:
        parts = [f"{n} x {k}" for k, n in (self.aten + self.triton).most_common()]
        return f"{self.total} kernels ({', '.join(parts)}); {self.syncs} syncs"


def _is_view(func) -> bool:
    """Returns an alias it does not write (a view); in-place ops return their written input."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, out: Launches):
        super().__init__()
        self.out, self.paused = out, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            ns, name = func.namespace, func._schema.name.split("::")[-1]
            if name == "_local_scalar_dense":
                self.out.syncs += 1
            elif ns == "steerfast" and (body := _custom_op_body(func)) is not None:
                # our custom ops: run their body here, so that what it launches (Triton or aten) is seen
                with self:
                    return body(*args, **(kwargs or {}))
            elif ns == "aten" and name not in _FREE and not _is_view(func):
                self.out.aten[name] += 1
                out = func(*args, **(kwargs or {}))
                read = out if name in _ATEN_GATHERS else (*args, *(kwargs or {}).values())
                self.out.bytes_read[name] += _tensor_bytes(read)
                return out
        return func(*args, **(kwargs or {}))


def _custom_op_body(func):
    """The Python function a torch.library.custom_op was made from (None if not one)."""
    from torch._library.custom_ops import OPDEFS  # private: a counting tool may lean on it

    opdef = OPDEFS.get(func._schema.name)
    return None if opdef is None else opdef._init_fn


def _tensor_bytes(obj) -> int:
    seen, total = set(), 0
    for t in tree_leaves(obj):
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += _nbytes(t)
    return total


@contextlib.contextmanager
def count_launches():
    """with count_launches() as n: ... -> n.total, n.aten, n.triton, n.syncs, n.bytes_read, n.total_bytes."""
    out = Launches()
    mode = _AtenCounter(out)
    patched = []
    try:
        from triton.runtime import interpreter, jit

        for cls in (interpreter.InterpretedFunction, jit.JITFunction):
            original = cls.run

            def run(self, *args, _original=original, **kwargs):
                mode.paused += 1
                try:
                    if not kwargs.get("warmup", False):
                        name = getattr(self.fn, "__name__", None) or self.__name__
                        out.triton[name] += 1
                        params = list(inspect.signature(self.fn).parameters)
                        out.bytes_read[name] += _triton_bytes(name, params, args, kwargs)
                    return _original(self, *args, **kwargs)
                finally:
                    mode.paused -= 1
            cls.run = run
            patched.append((cls, original))
    except ImportError:  # no triton: only aten ops can run
        pass
    try:
        with mode:
            yield out
    finally:
        for cls, original in patched:
            cls.run = original
