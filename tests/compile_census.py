"""How many Triton kernels would the test suite compile on a GPU? A pytest plugin, for the suite's
time budget on a GPU machine (issue 10: the whole suite in 4 minutes), counted on the CPU.

    PYTHONPATH=tests TRITON_INTERPRET=1 python -m pytest -q -p compile_census tests [-n 2]

Under the interpreter nothing compiles, so each launch is keyed as a GPU launch would be: Triton's
own binder gives the signature with its specialisations (an integer equal to 1 becomes a constexpr,
16-divisible pointers and integers are marked), plus the constexprs and launch options. Distinct
keys are distinct compiles (a few more or less from run to run: the tests draw fresh inputs). Tests that run Triton on CPU tensors only (backends.CPU_TRITON_SKIP:
test_tuning, test_launch_budget) are left out, as a GPU run skips them. At the end it prints the
distinct compiles per kernel and per test file; tests/sm90_compile.py times compiles for sm_90.
"""
from __future__ import annotations

import collections
import json
import os
import tempfile
from pathlib import Path

CPU_ONLY = ("tests/test_tuning.py", "tests/test_launch_budget.py")
_dir = Path(os.environ.get("COMPILE_CENSUS_DIR") or Path(tempfile.gettempdir()) / "steerfast-compile-census")


def pytest_configure(config):
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:  # the controller (or a run without xdist): a fresh directory
        _dir.mkdir(parents=True, exist_ok=True)
        for f in _dir.glob("*.jsonl"):
            f.unlink()
    backend, jits = CUDABackend(GPUTarget("cuda", 90, 32)), {}
    out = open(_dir / f"{worker or 'main'}.jsonl", "a")
    config.add_cleanup(out.close)
    run = InterpretedFunction.run

    def census_run(self, *args, grid, warmup, **kwargs):
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        if not test.startswith(CPU_ONLY):
            j = jits.get(self.fn) or jits.setdefault(self.fn, JITFunction(
                self.fn, do_not_specialize=self.kwargs.get("do_not_specialize")))
            _, spec, _ = create_function_from_signature(j.signature, j.params, backend)(*args, **kwargs)
            plain = sorted((k, v) for k, v in kwargs.items() if isinstance(v, (int, float, str, bool)))
            out.write(json.dumps(dict(key=[self.fn.__name__, repr(spec), repr(plain)], test=test)) + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = census_run


def pytest_unconfigure(config):
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        return
    recs = [json.loads(line) for f in sorted(_dir.glob("*.jsonl")) for line in f.read_text().splitlines()]
    keys = {tuple(r["key"]) for r in recs}
    by_file = collections.defaultdict(set)
    for r in recs:
        by_file[r["test"].split("::")[0]].add(tuple(r["key"]))
    print(f"\ncompile census: {len(recs)} launches, {len(keys)} distinct compiles on a GPU")
    for kernel, n in collections.Counter(k[0] for k in keys).most_common():
        print(f"  {n:4d}  {kernel}")
    for f, ks in sorted(by_file.items(), key=lambda x: -len(x[1])):
        print(f"  {len(ks):4d}  {f}")
