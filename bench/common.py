"""Helpers shared by the benchmarks: synchronised timing, measured copy bandwidth, percentiles,
the environment record, plain-text tables, JSON output."""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------- argparse helpers
def int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None) -> torch.device:
    """--device as a torch.device with an index on CUDA ("cuda" -> the current one: set_device,
    events and memory queries refuse an index-less CUDA device), made the current device: CUDA
    events, torch.cuda._sleep and the copy-bandwidth probe run on the current device."""
    device = torch.device(name or default_device())
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def error_record(e: BaseException) -> dict:
    """An exception as a bench records it: the one-line error, and the traceback for the JSON."""
    import traceback

    return dict(error=f"{type(e).__name__}: {e}".strip(), traceback=traceback.format_exc(limit=12))


# ---------------------------------------------------------------- cases that survive a lost context
def add_case_arguments(p) -> None:
    import argparse

    p.add_argument("--resume", type=int, default=0, help=argparse.SUPPRESS)  # skip cases before this one
    p.add_argument("--fault-case", type=int, default=None, help=argparse.SUPPRESS)  # tests: this case faults


def context_lost(device) -> str | None:
    """After an exception: None if this process can still use `device`, else the error. A kernel
    fault (an illegal address, a device-side assert) is sticky: every later CUDA call fails with it."""
    if torch.device(device).type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


class Cases:
    """A bench's cases, numbered in the order it runs them. After a case's error that lost the CUDA
    context, no later case runs here: `rest_in_fresh_process` runs them from the next number in a
    new process of the same command (`--resume`), so an earlier case cannot break a later one even
    then. `--fault-case N` makes case N fail as a lost context would (the tests' way to get one)."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.n, self.lost_at = 0, None

    def runs_any(self, count: int) -> bool:
        """Whether any of the next `count` cases runs here (so what they share must be built); when
        none does, they are counted as passed over."""
        if self.lost_at is None and self.n + count > self.args.resume:
            return True
        self.n += count
        return False

    def start(self) -> bool:
        """Count the next case; True if it runs in this process."""
        i, self.n = self.n, self.n + 1
        return i >= self.args.resume and self.lost_at is None

    def inject(self) -> None:
        """Inside the case: the --fault-case fault, a lost context's stand-in."""
        if self.n - 1 == self.args.fault_case:
            self.lost_at = self.n - 1
            raise RuntimeError(f"injected fault in case {self.n - 1} (--fault-case): the CUDA context is lost")

    def failed(self) -> None:
        """After a case's error: stop here if the context is lost."""
        if self.lost_at is None and context_lost(self.device) is not None:
            self.lost_at = self.n - 1

    def rest_in_fresh_process(self) -> dict | None:
        """The JSON of a new process running the cases after the lost one, or None (nothing lost,
        nothing left, or the process wrote nothing: then its error is the record)."""
        if self.lost_at is None or self.lost_at + 1 >= self.n:
            return None
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench-resume-") as d:
            out = Path(d) / "rest.json"
            argv = list(getattr(self.args, "argv", []))
            cmd = [sys.executable, "-m", "bench", *argv, "--resume", str(self.lost_at + 1), "--out", str(out)]
            print(f"\nthe CUDA context is lost (case {self.lost_at}): cases {self.lost_at + 1}.. run in a fresh "
                  "process", flush=True)
            r = subprocess.run(cmd, cwd=REPO_ROOT)
            try:
                return json.loads(out.read_text())
            except (OSError, ValueError):
                return dict(error=f"the fresh process for cases {self.lost_at + 1}.. wrote no result "
                                  f"(exit {r.returncode})")


# ---------------------------------------------------------------- timing
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device) -> tuple[Any, float]:
    """(fn(), wall seconds), with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def copy_bandwidth(device, nbytes: int | None = None, repeats: int = 10) -> dict:
    """Measured device memory bandwidth: best of `repeats` device-to-device copies of `nbytes`
    (default 1 GiB on a GPU, 256 MiB on CPU), counting bytes read + bytes written."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if nbytes is None:
        nbytes = (1 << 30) if cuda else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: touch every page, load the copy kernel
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    free_memory(device)
    best = min(times)
    return dict(bytes_copied=nbytes, bytes_moved=2 * nbytes, repeats=repeats, best_s=best,
                median_s=percentile(times, 50), bytes_per_s=2 * nbytes / best,
                method="torch Tensor.copy_ between two uint8 device buffers; (read + written bytes) / best time")


def matmul_peak(device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> dict:
    """Measured dense matmul throughput: best of `repeats` [n, n] @ [n, n] products in `dtype`
    (n 8192 on a GPU, 256 on CPU), 2 n^3 FLOPs each: the compute side of a floor."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 256)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    times = [timed(lambda: a @ b, device)[1] for _ in range(repeats + 1)][1:]  # the first: cuBLAS warm-up
    a = b = None
    free_memory(device)
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), repeats=repeats, best_s=min(times),
                flops_per_s=2 * n ** 3 / min(times), method="torch.matmul of two [n, n] random matrices; 2 n^3 / best")


def free_memory(device=None) -> None:
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- environment
def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: record that rather than fail the bench
        return None


def _git(*cmd: str) -> str | None:
    try:
        r = subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def environment(device, dtype: torch.dtype, argv: Sequence[str]) -> dict:
    """What a result needs to be reproduced and compared: machine, versions, commit, command."""
    device = torch.device(device)
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join([Path(sys.executable).name, "-m", "bench", *argv]),
        cwd=os.getcwd(),
        device=str(device),
        device_name=device_name(device),
        dtype=str(dtype).replace("torch.", ""),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=_version("triton"),
        transformers=_version("transformers"),
        flash_attn=_version("flash_attn"),
        steerfast=_version("steerfast"),
        git_commit=_git("rev-parse", "HEAD"),
        git_dirty=None if status is None else bool(status),
        env_vars={k: v for k, v in os.environ.items()
                  if k.startswith("STEERFAST_") or k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")},
    )
    if device.type == "cuda":
        from steerfast import tuning

        p = torch.cuda.get_device_properties(device)
        tuned = tuning.cache_path(tuning.device_slug(device))  # `steerfast tune`'s configs change the kernels' times
        env.update(gpu_memory_bytes=p.total_memory, gpu_capability=f"{p.major}.{p.minor}",
                   gpu_sm_count=p.multi_processor_count,
                   tuned_configs=str(tuned) if tuned.exists() and os.environ.get(tuning.OFF_ENV) != "0" else None)
    return env


# ---------------------------------------------------------------- output
def fmt(v) -> str:
    """A table cell: floats to about 3 significant digits, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 else f"{v:.3g}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """rows: dicts; columns: (key, header) pairs. First column left-aligned, the rest right."""
    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]

    def line(xs):
        return "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths)))

    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a process killed mid-write leaves the last whole file
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path


def save_bar_chart(path: str | Path, groups: Sequence[str], series: dict[str, Sequence[float | None]], title: str,
                   ylabel: str = "tokens/s") -> Path | None:
    """Grouped bars (one group per case, one bar per series, log scale: a floor and a hooks loop differ
    by orders of magnitude), as a PNG beside the JSON. None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g, v in enumerate(values) if v]
        ys = [v for v in values if v]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=[fmt(float(v)) for v in ys], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
