"""Count the kernels a piece of code launches, without a GPU: the decode step's launch budget.

Inside a CUDA graph every kernel node costs ~2 us however little it reads (docs/architecture.md,
"The decode step"), so the number of kernels per decode step is a budget that CI can hold without a GPU: aten ops
that do work (views, allocations and our own custom-op wrappers excluded) are counted through a
TorchDispatchMode, Triton launches by wrapping the launch itself, and whatever runs inside a Triton
launch (the interpreter's own tensor traffic) is not counted again.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

from torch.utils._python_dispatch import TorchDispatchMode

# allocation and metadata: no kernel runs
_FREE = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "_local_scalar_dense", "sym_size",
         "sym_stride", "sym_numel", "is_contiguous", "set_", "resize_", "_unsafe_view"}


@dataclass
class Launches:
    aten: Counter = field(default_factory=Counter)
    triton: Counter = field(default_factory=Counter)
    syncs: int = 0  # device->host reads (.item(), .tolist(), bool(tensor)): none belong in a step

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
            elif ns == "aten" and name not in _FREE and not _is_view(func):
                self.out.aten[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches():
    """with count_launches() as n: ... -> n.total, n.aten, n.triton, n.syncs."""
    out = Launches()
    mode = _AtenCounter(out)
    patched = []
    try:
        from triton.runtime import interpreter, jit

        for cls in (interpreter.InterpretedFunction, jit.JITFunction):
            original = cls.run

            def run(self, *args, _original=original, **kwargs):
                if not kwargs.get("warmup", False):
                    out.triton[getattr(self.fn, "__name__", None) or self.__name__] += 1
                mode.paused += 1
                try:
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
