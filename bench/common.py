"""Helpers shared by the benchmarks: synchronised timing, measured copy bandwidth, percentiles,
the environment record, plain-text tables, JSON output."""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import shlex
import signal
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


# ---------------------------------------------------------------- cases, each in a state no earlier one can break
# A bench releases caches and graphs between its cases, but a kernel fault (an illegal address, a
# device-side assert) is sticky: every later CUDA call in that process fails, and its memory stays
# held until the process ends. So on CUDA (--isolate auto) the bench process only supervises: the
# cases run in a worker process, and after a case that lost the context or killed its worker, the
# rest run in a fresh one (--resume), each worker appending to the same JSON (--merge-from).
def add_case_arguments(p) -> None:
    import argparse

    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="run the cases in a worker process, and the rest in a fresh one after a case that "
                        "lost the CUDA context or killed its worker (auto: yes on CUDA)")
    for flag, kw in (("--case-worker", dict(action="store_true")), ("--resume", dict(type=int, default=0)),
                     ("--merge-from", dict(default=None)), ("--fault-case", dict(type=int, default=None)),
                     ("--die-case", dict(type=int, default=None))):
        p.add_argument(flag, help=argparse.SUPPRESS, **kw)  # the supervisor's, and the tests' (*-case)


def supervises(args) -> bool:
    """Whether this process hands its cases to worker processes (see supervise)."""
    if args.case_worker or args.isolate == "no":
        return False
    return args.isolate == "yes" or torch.device(args.device or default_device()).type == "cuda"


def supervise(args, worker: list[str] | None = None) -> int:
    """Run the bench's cases in workers, each from where the last one stopped: the case after one
    that lost the context (the worker says so: doc["lost_context"]) or the case after the one it
    died in (doc["in_flight_case"]; between cases, doc["next_case"]). A worker finished only if its
    document says so (doc["complete"]): a Python error outside the cases exits 1 as a failed case
    does. Never touches CUDA. `worker`: the command before its flags (default: this bench's)."""
    out, start, rc = Path(args.out).resolve(), 0, 0  # workers run in the repository root
    out.unlink(missing_ok=True)  # a stale file must not pass for a worker's
    while True:
        cmd = [*(worker or [sys.executable, "-m", "bench", *args.argv]), "--case-worker", "--resume", str(start),
               "--out", str(out)]
        r = subprocess.run(cmd + (["--merge-from", str(out)] if start else []), cwd=REPO_ROOT)
        rc = max(rc, int(r.returncode != 0))
        try:
            doc = json.loads(out.read_text())
        except (OSError, ValueError):
            print(f"bench: the worker for cases {start}.. wrote no result (exit {r.returncode})", flush=True)
            return 1
        lost, complete = doc.get("lost_context") or {}, doc.pop("complete", False)
        if "resume_at" in lost:  # whatever its exit code: a torn-down CUDA context may abort at exit
            start = lost.pop("resume_at")
            why = f"the CUDA context was lost in case {lost['case']}"
        elif complete:
            write_json(out, doc)
            return rc
        else:  # died (a segfault, an abort) or raised outside a case: the rest go on without that case
            k, nxt = doc.pop("in_flight_case", None), doc.pop("next_case", start)
            where = f"in case {k}" if k is not None else f"between cases, before case {nxt}"
            doc.setdefault("worker_deaths", []).append(
                dict(case=k, error=f"the worker process ended (exit {r.returncode}) {where} without finishing"))
            if k is None and nxt <= start:  # no progress: it would end there again
                doc["worker_deaths"][-1]["error"] += f"; cases {start}.. not run"
                write_json(out, doc)
                return 1
            start = k + 1 if k is not None else nxt
            why = f"the worker ended {where}"
            if start >= doc.get("cases_total", start + 1):  # that was the last case
                write_json(out, doc)
                return 1
        write_json(out, doc)
        print(f"\nbench: {why}: cases {start}.. run in a fresh process", flush=True)


def context_lost(device) -> str | None:
    """After an exception: None if this process can still use `device`, else the error."""
    if torch.device(device).type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


class Cases:
    """A bench's cases, numbered in the order it runs them; which run in this process (from
    --resume, until one loses the CUDA context), and the bookkeeping supervise() reads in `doc`.
    `--fault-case N` makes case N fail as a lost context would, `--die-case N` kills the process in
    case N (how the tests get them)."""

    def __init__(self, args, device, doc: dict, save: Callable[[], None], total: int, lists=(), dicts=()):
        self.args, self.device, self.doc, self.save, self.total = args, device, doc, save, total
        self.n, self.lost_at = 0, None
        doc["cases_total"] = total  # the supervisor starts no worker with nothing left to run
        if args.merge_from:  # an earlier worker's document: its records first
            prev = json.loads(Path(args.merge_from).read_text())
            for k in lists:
                doc[k] = prev.get(k, []) + doc[k]
            for k in dicts:
                doc[k] = {**prev.get(k, {}), **doc[k]}
            for k in ("worker_deaths", "lost_contexts"):
                if k in prev:
                    doc[k] = prev[k]
            if prev.get("lost_context"):
                doc.setdefault("lost_contexts", []).append(prev["lost_context"])

    def runs_any(self, count: int) -> bool:
        """Whether any of the next `count` cases runs here (so what they share must be built); when
        none does, they are counted as passed over."""
        if self.lost_at is None and self.n + count > self.args.resume:
            return True
        self.n += count
        return False

    def start(self) -> bool:
        """Count the next case; True if it runs in this process (then recorded as in flight until
        done())."""
        i, self.n = self.n, self.n + 1
        if i < self.args.resume or self.lost_at is not None:
            return False
        self.doc["in_flight_case"] = i
        self.save()
        return True

    def done(self) -> None:
        """After a case's records: none in flight, and the next one's number."""
        self.doc.pop("in_flight_case", None)
        self.doc["next_case"] = self.n
        self.save()

    def inject(self) -> None:
        """Inside the case: the --fault-case fault (a lost context's stand-in) or --die-case death."""
        if self.n - 1 == self.args.die_case:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel ends a crashed process (no core file)
        if self.n - 1 == self.args.fault_case:
            self.lost_at = self.n - 1
            raise RuntimeError(f"injected fault in case {self.n - 1} (--fault-case): the CUDA context is lost")

    def fresh(self, *models) -> None:
        """Between cases: the models' caches and graphs released, device memory freed (nothing to
        free once the context is lost: its memory goes with the process)."""
        if self.lost_at is None:
            for m in models:
                m.release()
            free_memory(self.device)

    def failed(self) -> None:
        """After a case's error: no more cases in this process if it lost the context."""
        if self.lost_at is None and context_lost(self.device) is not None:
            self.lost_at = self.n - 1

    def finish(self) -> None:
        """After the last case: where the rest resume (a worker), or that they did not run."""
        assert self.n == self.total, f"{self.n} cases counted, {self.total} announced"
        self.doc.pop("in_flight_case", None)
        self.doc.pop("next_case", None)
        if self.args.case_worker:
            self.doc["complete"] = True
        if self.lost_at is not None and self.lost_at + 1 < self.n:
            rest = dict(case=self.lost_at)
            if self.args.case_worker:
                rest["resume_at"] = self.lost_at + 1
            else:
                rest["error"] = (f"cases {self.lost_at + 1}..{self.n - 1} not run: the CUDA context was lost in case "
                                 f"{self.lost_at} (--isolate yes runs them in a fresh process)")
            self.doc["lost_context"] = rest
        self.save()


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
