"""Kernel benchmarks: the SAE encode and controller kernels per backend, and what steering costs a decode step.

Sections (--sections, default all five):
  topk    steerfast.ops.topk_sae_encode(x, W_enc, b_enc, b_dec, k) for every backend (cuda, triton,
          torch), plus the baseline `gemm+topk` = torch.topk((x - b_dec) @ W_enc + b_enc, k) in the
          bench dtype (cuBLAS GEMM + torch.topk on a GPU). Per case: time, GB/s of the bytes the op
          must move (W_enc + x + biases + outputs), that as a fraction of measured copy bandwidth,
          and time / baseline time. Targets: batch 1, d=1536, n=16384 reads at >= 80% of copy
          bandwidth; batch 256 no slower than 1.1x the baseline.
  ctrl    steerfast.ops.sae_controller (argmax latent -> category -> coefficient) per backend, vs the
          torch reference.
  gemv    steerfast.fused_ops.fused_linear (RMSNorm prologue, bias / SwiGLU / residual epilogues) on every
          decoder-layer weight of qwen2.5-1.5b and llama-3.1-8b (tiny on CPU) at M = 1, 16, 64, for the
          triton and torch backends and the baseline `cublas` = F.linear(x, W, bias): time, GB/s, % of copy
          bandwidth, time / cublas time, max error vs an fp32 reference, and per layer the crossover M (the
          largest M where triton <= cublas). Targets: M = 1 reads at >= 80% of copy bandwidth; no slower
          than cublas up to the crossover. Cases, bytes and targets: bench/gemv_section.py.
  steer   m.generate on a preset shape (steerfast.presets) with and without
          steering=Steering(vector, layer, coef): relative difference of per-token time (target < 1%).
  sample  steerfast.sampling.sample (temperature 1, top_p 0.9) on a preset's vocabulary at batch 1, 16,
          64: the Triton kernel (no sort) against the torch reference's sort. bench/sample_section.py.

Timing on CUDA (per backend x case): one call (compiles, allocates), then warm-up calls, then
`reps` timed calls, each between two CUDA events, each preceded by a torch.cuda._sleep long enough
that the host has enqueued the call before the GPU reaches it (so the time is the device's, not
the Python dispatch's: decode steps replay CUDA graphs) and, at batch <= --flush-max-batch, by
zeroing a --flush-mib buffer, which evicts W_enc from L2 so it is read from HBM. Reported: the
median. `loop us` is the other view: the same calls back to back with nothing between them (no
flush), total / reps, which includes launch and dispatch overhead when that is longer than the kernel.
On CPU: time.perf_counter around each call, median; no flush; torch.set_num_threads(--cpu-threads, default
1: with two threads on a shared machine, tiny ops stalled ~16 ms at OpenMP barriers).

Isolation: on CUDA each section x backend runs in its own child process (--isolate auto), so a
kernel that faults (an illegal address poisons the CUDA context) costs only its own entries,
recorded as errors with the child's stderr; the run goes on. Any error gives exit status 1.

On a GPU, from the repository root:  python -m bench kernels   (writes bench/out/kernels.json)
On CPU it defaults to tiny shapes and the torch backend (Triton only under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from . import common, gemv_section, sample_section

SECTIONS = ("topk", "ctrl", "gemv", "steer", "sample")
OPS = {"topk": "topk_sae_encode", "ctrl": "sae_controller", "gemv": gemv_section.OP, "steer": "steer_add",
       "sample": sample_section.OP}
BASELINE = "gemm+topk"

# defaults: (CUDA, CPU)
DEFAULTS = dict(
    batches=("1,16,256", "1,4"), dims=("1536,4096", "64"), latents=("15,16384,65536", "15,1000"),
    ctrl_batches=("1,16", "1,4"), ctrl_dims=("1536", "64"), ctrl_latents=("15,50", "15,50"),
    steer_model=("qwen2.5-1.5b", "tiny"), steer_batches=("1,16", "1,2"), steer_new_tokens=(128, 8),
    steer_prompt_len=(32, 8), steer_reps=(5, 3), reps=(100, 20), copy_mib=(1024, 256),
)

TARGET_BW = dict(batch=1, d=1536, n=16384, min_fraction=0.80)
TARGET_RATIO = dict(batch=256, max_ratio=1.10)
TARGET_STEER = dict(max_rel_diff=0.01)
TARGET_BACKENDS = ("cuda", "triton")  # the fused kernels the targets are set for (not the torch reference)

DEFINITIONS = dict(
    us="median device time of one call, microseconds (CUDA events around the call; see timing)",
    loop_us="the same calls issued back to back with no sleep or flush between them: (time of all) / reps; "
            "includes launch / Python dispatch overhead where it exceeds the kernel time. None on CPU",
    bytes="bytes the op must move: W_enc d*n*elt + x batch*d*elt + b_enc n*elt + b_dec d*elt + outputs "
          "(topk: batch*k*(4 + 8), fp32 values and int64 indices; ctrl: + cat_map n*4 + cat_coef n*4 read, "
          "batch*(4 + 4 + 8 + 4) written); elt = bytes per element of the bench dtype. The same count for "
          "every backend of a case (the baseline writes bf16 values and the [batch, n] pre-activations: "
          "not counted), so GB/s compares backends",
    gbps="bytes / us, in 1e9 bytes per second",
    pct_copy_bw="100 * (bytes / us) / measured copy bandwidth (copy_bandwidth.bytes_per_s: read + written "
                "bytes of a large device-to-device copy, best of N)",
    vs_base="us / us of the case's baseline: topk: `gemm+topk`; ctrl: the torch backend. < 1 is faster",
    gemm_topk="baseline: torch.topk((x - b_dec) @ W_enc + b_enc, k) in the bench dtype (cuBLAS GEMM and "
              "torch.topk on CUDA)",
    torch_backend="steerfast's reference (steerfast.ops.*_torch): fp32 math and, for topk, a full stable sort",
    idx_ok="fraction of rows whose top-k index set (topk) / argmax latent (ctrl) equals the fp32 torch "
           "reference's (a near-tie at the k-th value may legitimately swap); '-' for the gemm+topk baseline, "
           "whose agreement is recorded as idx_agree: it rounds its pre-activations to the bench dtype, so < 1 "
           "is expected there and is no failure",
    max_err="max |values - reference values| (fp32 reference, values compared in descending order)",
    flushed="whether each timed call was preceded by zeroing a --flush-mib buffer (evicts L2): batch <= "
            "--flush-max-batch",
    steer_ms_per_token="median over reps of (wall time of one m.generate(prompts, max_new_tokens=N, "
                       "eos_token_id=None) call, device synchronised) / N; prefill included (short prompt)",
    steer_rel_diff="median over reps of (steered per-token time / plain per-token time of the same rep) - 1; "
                   "the two runs alternate order rep to rep. rel_diff_of_medians is the ratio of the medians",
    **gemv_section.DEFINITIONS,
    **sample_section.DEFINITIONS,
    targets=f"topk: batch {TARGET_BW['batch']}, d={TARGET_BW['d']}, n={TARGET_BW['n']}: pct_copy_bw >= "
            f"{100 * TARGET_BW['min_fraction']:.0f}; topk batch {TARGET_RATIO['batch']}: vs_base <= "
            f"{TARGET_RATIO['max_ratio']} (both for the cuda and triton backends); steer: rel_diff < "
            f"{100 * TARGET_STEER['max_rel_diff']:.0f}%. Set for an H100; informational on other devices",
)

TOPK_COLUMNS = [("batch", "batch"), ("d", "d"), ("n", "n"), ("k", "k"), ("backend", "backend"),
                ("us", "us"), ("loop_us", "loop us"), ("gbps", "GB/s"), ("pct_copy_bw", "% copy bw"),
                ("vs_base", "vs base"), ("idx_ok", "idx ok"), ("target", "target")]
CTRL_COLUMNS = [("batch", "batch"), ("d", "d"), ("n", "n"), ("backend", "backend"), ("us", "us"),
                ("loop_us", "loop us"), ("gbps", "GB/s"), ("vs_base", "vs torch"), ("idx_ok", "idx ok")]
STEER_COLUMNS = [("model", "model"), ("batch", "batch"), ("new_tokens", "new tokens"),
                 ("plain_ms", "plain ms/tok"), ("steered_ms", "steered ms/tok"), ("rel_pct", "diff %"),
                 ("target", "target")]


def add_arguments(p) -> None:
    d = lambda key: f"default {DEFAULTS[key][0]} on CUDA, {DEFAULTS[key][1]} on CPU"  # noqa: E731
    p.add_argument("--sections", type=common.str_list, default=list(SECTIONS),
                   help=f"comma-separated, among {','.join(SECTIONS)} (default all)")
    p.add_argument("--backends", type=common.str_list, default=None,
                   help="comma-separated among cuda,triton,torch (default all three on CUDA; torch on CPU, "
                        "plus triton when TRITON_INTERPRET=1). The topk baseline always runs; ctrl always runs torch")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    p.add_argument("--batches", type=common.int_list, default=None, help=f"topk batches ({d('batches')})")
    p.add_argument("--dims", type=common.int_list, default=None, help=f"topk d ({d('dims')})")
    p.add_argument("--latents", type=common.int_list, default=None, help=f"topk n ({d('latents')})")
    p.add_argument("--k", type=int, default=32, help="top-k (min(k, n) per case; default 32)")
    p.add_argument("--ctrl-batches", type=common.int_list, default=None, help=d("ctrl_batches"))
    p.add_argument("--ctrl-dims", type=common.int_list, default=None, help=d("ctrl_dims"))
    p.add_argument("--ctrl-latents", type=common.int_list, default=None, help=d("ctrl_latents"))
    gemv_section.add_arguments(p)
    sample_section.add_arguments(p)
    p.add_argument("--steer-model", default=None, help=f"preset shape ({d('steer_model')})")
    p.add_argument("--steer-batches", type=common.int_list, default=None, help=d("steer_batches"))
    p.add_argument("--steer-new-tokens", type=int, default=None, help=d("steer_new_tokens"))
    p.add_argument("--steer-prompt-len", type=int, default=None, help=d("steer_prompt_len"))
    p.add_argument("--steer-reps", type=int, default=None, help=f"timed pairs of runs ({d('steer_reps')})")
    p.add_argument("--steer-layer", type=int, default=10, help="steered layer (clamped to the model's last)")
    p.add_argument("--steer-coef", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=None, help=f"timed calls per kernel measurement, at most ({d('reps')})")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (after the first call)")
    p.add_argument("--max-ms", type=float, default=1000.0,
                   help="fewer reps (at least 5) when one measurement would take longer than this")
    p.add_argument("--flush-max-batch", type=int, default=1,
                   help="flush L2 before each timed call at batch <= this (CUDA; default 1)")
    p.add_argument("--flush-mib", type=int, default=256, help="size of the L2-flushing buffer (default 256)")
    p.add_argument("--copy-mib", type=int, default=None, help=f"copy-bandwidth buffer, MiB ({d('copy_mib')})")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="run each section x backend in a child process (auto: yes on CUDA, no on CPU)")
    p.add_argument("--worker-timeout", type=float, default=1200.0, help="seconds per child process")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch.set_num_threads on CPU (default 1: tiny ops time steadily on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(common.REPO_ROOT / "bench" / "out" / "kernels.json"),
                   help="JSON output path (default bench/out/kernels.json)")
    p.add_argument("--worker", nargs=2, metavar=("SECTION", "BACKEND"), default=None, help=argparse.SUPPRESS)


# ---------------------------------------------------------------- settings and cases
def settings(args, device: torch.device) -> dict:
    i = 0 if device.type == "cuda" else 1
    pick = lambda v, key, conv: v if v is not None else conv(DEFAULTS[key][i])  # noqa: E731
    ident = lambda x: x  # noqa: E731
    s = dict(
        device=str(device), dtype=args.dtype, seed=args.seed, k=args.k,
        batches=pick(args.batches, "batches", common.int_list), dims=pick(args.dims, "dims", common.int_list),
        latents=pick(args.latents, "latents", common.int_list),
        ctrl_batches=pick(args.ctrl_batches, "ctrl_batches", common.int_list),
        ctrl_dims=pick(args.ctrl_dims, "ctrl_dims", common.int_list),
        ctrl_latents=pick(args.ctrl_latents, "ctrl_latents", common.int_list),
        steer_model=pick(args.steer_model, "steer_model", ident),
        steer_batches=pick(args.steer_batches, "steer_batches", common.int_list),
        steer_new_tokens=pick(args.steer_new_tokens, "steer_new_tokens", ident),
        steer_prompt_len=pick(args.steer_prompt_len, "steer_prompt_len", ident),
        steer_reps=pick(args.steer_reps, "steer_reps", ident),
        steer_layer=args.steer_layer, steer_coef=args.steer_coef,
        reps=pick(args.reps, "reps", ident), warmup=args.warmup, max_ms=args.max_ms,
        flush_max_batch=args.flush_max_batch if device.type == "cuda" else None,
        flush_mib=args.flush_mib if device.type == "cuda" else None,
        cpu_threads=args.cpu_threads if device.type == "cpu" else None,
    )
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.cpu_threads))
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad:
        raise SystemExit(f"error: unknown section(s) {bad}; expected among {SECTIONS}")
    s["sections"] = [x for x in SECTIONS if x in args.sections]
    notes = []
    if args.backends is not None:
        backends = list(args.backends)
        bad = [b for b in backends if b not in ("cuda", "triton", "torch")]
        if bad:
            raise SystemExit(f"error: unknown backend(s) {bad}; expected among cuda,triton,torch")
    elif device.type == "cuda":
        backends = ["cuda", "triton", "torch"]
    else:
        backends = ["torch"]
        from steerfast import backend as sfb
        if sfb.triton_interpret() and sfb.triton_available():
            backends.insert(0, "triton")
        else:
            notes.append("triton skipped: on CPU it runs only under TRITON_INTERPRET=1 (set it to include triton)")
        notes.append("cuda skipped: no CUDA device")
    s["backends"] = backends
    if "gemv" in s["sections"]:
        gemv_section.settings(args, s, device.type == "cuda")
        if "cuda" in backends:
            notes.append("gemv: fused_linear has no cuda backend (triton, torch and the cublas baseline run)")
    if "sample" in s["sections"]:
        sample_section.settings(args, s, device.type == "cuda")
    s["notes"] = notes
    if min(s["batches"] + s["ctrl_batches"] + s["steer_batches"] + s["dims"] + s["latents"]
           + s["ctrl_dims"] + s["ctrl_latents"], default=1) < 1 or args.k < 1:
        raise SystemExit("error: batches, dims, latents and --k must be >= 1")
    return s


def section_backends(section: str, s: dict) -> list[str]:
    if section == "topk":
        return [BASELINE, *s["backends"]]
    if section == "ctrl":
        return s["backends"] if "torch" in s["backends"] else [*s["backends"], "torch"]
    if section == "gemv":
        return gemv_section.backends(s)
    if section == "sample":
        return sample_section.backends(s)
    return ["default"]  # steer: the dispatch's own choice, as generate uses it


def section_cases(section: str, s: dict) -> list[dict]:
    if section == "topk":
        return [dict(op=OPS[section], batch=b, d=d, n=n, k=min(s["k"], n))
                for b in s["batches"] for d in s["dims"] for n in s["latents"]]
    if section == "ctrl":
        return [dict(op=OPS[section], batch=b, d=d, n=n)
                for b in s["ctrl_batches"] for d in s["ctrl_dims"] for n in s["ctrl_latents"]]
    if section == "gemv":
        return gemv_section.cases(s)
    if section == "sample":
        return sample_section.cases(s)
    return [dict(op=OPS[section], model=s["steer_model"], batch=b) for b in s["steer_batches"]]


def case_key(r: dict) -> tuple:
    return tuple(r.get(k) for k in ("op", "model", "weight", "batch", "d", "n", "backend"))


# ---------------------------------------------------------------- timing
class Timer:
    """Median time of a callable: CUDA events with sleep (and optional L2 flush) before each call, or
    time.perf_counter on CPU. See the module docstring."""

    def __init__(self, device: torch.device, s: dict):
        self.device, self.s = device, s
        self.cuda = device.type == "cuda"
        self._flush = None
        self.cycles_per_us = None
        if self.cuda:
            torch.cuda._sleep(1000)  # load the sleep kernel
            a, b = self._events(2)
            a.record()
            torch.cuda._sleep(1_000_000)
            b.record()
            b.synchronize()
            self.cycles_per_us = 1_000_000 / (a.elapsed_time(b) * 1e3)

    @staticmethod
    def _events(n):
        return [torch.cuda.Event(enable_timing=True) for _ in range(n)]

    def flush_buffer(self):
        if self._flush is None:
            self._flush = torch.empty(self.s["flush_mib"] << 20, dtype=torch.uint8, device=self.device)
        return self._flush

    def __call__(self, fn, flush: bool = False) -> dict:
        return self._cuda(fn, flush) if self.cuda else self._cpu(fn)

    def _cpu(self, fn) -> dict:
        t0 = time.perf_counter()
        fn()  # first call: compile / allocate
        first = time.perf_counter() - t0
        for _ in range(min(self.s["warmup"], 2)):
            fn()
        t0 = time.perf_counter()
        fn()
        est = time.perf_counter() - t0
        reps = max(3, min(self.s["reps"], int(self.s["max_ms"] / 1e3 / max(est, 1e-9))))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return self._stats([t * 1e6 for t in ts], first_call_s=first, flushed=False, sleep_us=None,
                           host_us=None, loop_us=None)

    def _cuda(self, fn, flush: bool) -> dict:
        dev = self.device
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()  # first call: compile (Triton), allocate
        torch.cuda.synchronize(dev)
        first = time.perf_counter() - t0
        # host time to enqueue one call (GPU kept busy so nothing waits on it)
        torch.cuda._sleep(int(20_000 * self.cycles_per_us))
        hs = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            hs.append(time.perf_counter() - t0)
        torch.cuda.synchronize(dev)
        host_us = common.percentile([h * 1e6 for h in hs], 50)
        a, b = self._events(2)
        a.record()
        for _ in range(3):
            fn()
        b.record()
        b.synchronize()
        est_us = a.elapsed_time(b) * 1e3 / 3  # an upper bound: includes host gaps
        sleep_us = min(max(50.0, 2 * host_us + 20), 5000.0)
        buf = self.flush_buffer() if flush else None
        flush_us = 0.0
        if buf is not None:
            a.record()
            buf.zero_()
            b.record()
            b.synchronize()
            flush_us = a.elapsed_time(b) * 1e3
        per_rep_us = est_us + sleep_us + flush_us
        reps = max(5, min(self.s["reps"], int(self.s["max_ms"] * 1e3 / per_rep_us)))
        for _ in range(self.s["warmup"]):
            fn()
        starts, ends = self._events(reps), self._events(reps)
        cycles = int(sleep_us * self.cycles_per_us)
        for i in range(reps):
            if buf is not None:
                buf.zero_()
            torch.cuda._sleep(cycles)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(dev)
        ts = [st.elapsed_time(en) * 1e3 for st, en in zip(starts, ends)]
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        loop_us = a.elapsed_time(b) * 1e3 / reps
        return self._stats(ts, first_call_s=first, flushed=buf is not None, sleep_us=sleep_us,
                           host_us=host_us, loop_us=loop_us, flush_us=flush_us if buf is not None else None)

    @staticmethod
    def _stats(ts_us, **extra) -> dict:
        pc = common.percentile
        return dict(us=pc(ts_us, 50), min_us=min(ts_us), p10_us=pc(ts_us, 10), p90_us=pc(ts_us, 90),
                    mean_us=sum(ts_us) / len(ts_us), reps=len(ts_us), **extra)


# ---------------------------------------------------------------- inputs
def sae_inputs(batch: int, d: int, n: int, dtype, device, seed: int):
    """x ~ N(0, 1) [batch, d]; W_enc ~ N(0, 1/d) [d, n]; b_enc ~ N(0, 0.1) [n]; b_dec ~ N(0, 0.1) [d]."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch * 7919 + d * 31 + n)
    rn = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    x = rn(batch, d)
    W = rn(d, n).mul_(d ** -0.5)
    b_enc = rn(n).mul_(0.1)
    b_dec = rn(d).mul_(0.1)
    return x, W, b_enc, b_dec


# ---------------------------------------------------------------- sections (worker side)
def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def measure_topk(case: dict, backend: str, s: dict, device, dtype, timer: Timer) -> dict:
    from steerfast import ops

    B, d, n, k = case["batch"], case["d"], case["n"], case["k"]
    x, W, b_enc, b_dec = sae_inputs(B, d, n, dtype, device, s["seed"])
    if backend == BASELINE:
        def fn():
            return torch.topk((x - b_dec) @ W + b_enc, k)
    else:
        def fn():
            return ops.topk_sae_encode(x, W, b_enc, b_dec, k, backend=backend)
    vals, idx = fn()
    ref = ops.topk_sae_encode_torch(x, W, b_enc, b_dec, k)
    agree = (idx.sort(-1).values == ref.indices.sort(-1).values).all(-1).float().mean().item()
    # the baseline rounds its pre-activations to the bench dtype: its agreement is information, not a check
    check = dict(idx_agree=agree) if backend == BASELINE else dict(idx_ok=agree)
    check["max_err"] = (vals.float() - ref.values).abs().max().item()
    del vals, idx, ref
    t = timer(fn, flush=device.type == "cuda" and B <= s["flush_max_batch"])
    return dict(**t, **check)


def measure_ctrl(case: dict, backend: str, s: dict, device, dtype, timer: Timer) -> dict:
    from steerfast import ops

    B, d, n = case["batch"], case["d"], case["n"]
    x, W, b_enc, b_dec = sae_inputs(B, d, n, dtype, device, s["seed"])
    cat_map = torch.arange(n, dtype=torch.int32, device=device)  # every latent its own category
    cat_coef = torch.linspace(1.0, 2.0, n, dtype=torch.float32, device=device)
    threshold = float("-inf")

    def fn():
        return ops.sae_controller(x, W, b_enc, b_dec, cat_map, threshold, cat_coef, backend=backend)
    out = fn()
    ref = ops.sae_controller_torch(x, W, b_enc, b_dec, cat_map, threshold, cat_coef)
    check = dict(idx_ok=(out.latent == ref.latent).float().mean().item(),
                 category_ok=(out.category == ref.category).float().mean().item(),
                 max_err=(out.value.float() - ref.value).abs().max().item())
    t = timer(fn, flush=device.type == "cuda" and B <= s["flush_max_batch"])
    return dict(**t, **check)


def measure_steer(cases: list[dict], s: dict, device, dtype, emit) -> None:
    """All steer cases at once (one model). emit(record) for each."""
    import transformers

    import steerfast as sf
    from steerfast.presets import random_hf_model

    transformers.logging.set_verbosity_error()
    P, N, reps = s["steer_prompt_len"], s["steer_new_tokens"], s["steer_reps"]
    t0 = time.perf_counter()
    hf = random_hf_model(s["steer_model"], device, dtype, seed=s["seed"])
    m = sf.load_model(hf, device=device, dtype=dtype, max_seq_len=P + N)
    del hf
    common.free_memory(device)
    build_s = time.perf_counter() - t0
    a = m.args
    layer = min(s["steer_layer"], a.n_layers - 1)
    g = torch.Generator().manual_seed(s["seed"] + 17)
    vector = torch.randn(a.dim, generator=g)
    vector = (vector / vector.norm() * a.dim ** 0.5 * 0.1).to(device=device, dtype=dtype)
    steering = sf.Steering(vector, layer=layer, coef=s["steer_coef"])
    for case in cases:
        B = case["batch"]
        rec = dict(case, backend="default", prompt_len=P, new_tokens=N, layer=layer, coef=s["steer_coef"],
                   cuda_graphs=not m.eager, model_build_s=build_s)
        m.release()  # each case from fresh caches and graphs: an earlier one cannot break it
        common.free_memory(device)
        try:
            prompts = torch.randint(0, a.vocab_size, (B, P), generator=g).tolist()
            kw = dict(max_new_tokens=N, eos_token_id=None)
            runs = dict(plain=lambda: m.generate(prompts, **kw),
                        steered=lambda: m.generate(prompts, steering=steering, **kw))
            for f in runs.values():  # warm-up: captures each variant's CUDA graph
                f()
            times = dict(plain=[], steered=[])
            for r in range(reps):
                for name in (("plain", "steered") if r % 2 == 0 else ("steered", "plain")):
                    out, wall = common.timed(runs[name], device)
                    assert sum(map(len, out)) == B * N, f"{name}: expected {B * N} tokens"
                    times[name].append(wall / N * 1e3)
            med = {k: common.percentile(v, 50) for k, v in times.items()}
            ratios = [st / pl for st, pl in zip(times["steered"], times["plain"])]
            rec.update(plain_ms_per_token=med["plain"], steered_ms_per_token=med["steered"],
                       rel_diff=common.percentile(ratios, 50) - 1,
                       rel_diff_of_medians=med["steered"] / med["plain"] - 1,
                       plain_ms_per_token_all=times["plain"], steered_ms_per_token_all=times["steered"],
                       steer_residual_add_backend=steer_backend(device, dtype))
        except Exception as e:  # noqa: BLE001
            rec["error"] = err_text(e)
            rec["traceback"] = traceback.format_exc(limit=8)
            common.free_memory(device)
        emit(rec)
        dead = common.context_lost(device) if "error" in rec else None
        if dead:
            raise RuntimeError(f"CUDA context lost: {dead}")


def steer_backend(device, dtype) -> str:
    import warnings

    from steerfast import backend as sfb
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = dtype in (torch.float32, torch.float16, torch.bfloat16)
        implemented = ("cuda", "triton", "torch") if fast else ("torch",)
        return sfb.choose("steer_residual_add", torch.device(device), implemented)


def run_section(section: str, backend: str, s: dict, device, emit) -> None:
    """Measure every case of `section` for `backend`, calling emit(record) after each. A case that
    raises is an error record; a lost CUDA context marks the rest as errors and stops."""
    dtype = common.DTYPES[s["dtype"]]
    cases = section_cases(section, s)
    if section == "steer":
        try:
            measure_steer(cases, s, device, dtype, emit)
        except Exception as e:  # noqa: BLE001 -- the model build, or a lost context
            for c in cases:  # emit() skips the cases already recorded
                emit(dict(c, backend="default", error=err_text(e), traceback=traceback.format_exc(limit=8)),
                     missing_only=True)
        return
    measure = dict(topk=measure_topk, ctrl=measure_ctrl, gemv=gemv_section.measure,
                   sample=sample_section.measure)[section]
    timer = Timer(torch.device(device), s)
    lost = None
    for case in cases:
        rec = dict(case, backend=backend, dtype=s["dtype"])
        if lost:
            rec["error"] = f"not run: CUDA context lost earlier ({lost})"
            emit(rec)
            continue
        try:
            rec.update(measure(case, backend, s, device, dtype, timer))
        except Exception as e:  # noqa: BLE001 -- an unattended run records the failure and goes on
            rec["error"] = err_text(e)
            rec["traceback"] = traceback.format_exc(limit=8)
            common.free_memory(device)
            lost = common.context_lost(device)
        emit(rec)


# ---------------------------------------------------------------- parent side: post-processing and tables
def op_bytes(r: dict, elt: int) -> int:
    B, d, n = r["batch"], r["d"], r["n"]
    inputs = d * n * elt + B * d * elt + n * elt + d * elt
    if r["op"] == "topk_sae_encode":
        return inputs + B * r["k"] * (4 + 8)
    return inputs + n * 4 + n * 4 + B * (4 + 4 + 8 + 4)


def postprocess(results: dict, s: dict, bw: dict) -> list[dict]:
    """Add bytes, GB/s, % copy bandwidth, vs baseline and targets to the kernel records; return the
    target checks."""
    elt = common.DTYPES[s["dtype"]].itemsize
    targets = []
    for section, base_name in (("topk", BASELINE), ("ctrl", "torch")):
        recs = results.get(OPS[section], [])
        base = {case_key(dict(r, backend=None)): r.get("us") for r in recs if r["backend"] == base_name}
        for r in recs:
            r["bytes"] = op_bytes(r, elt)
            if "error" in r or not r.get("us"):
                continue
            r["gbps"] = r["bytes"] / r["us"] / 1e3
            r["pct_copy_bw"] = 100 * r["bytes"] / (r["us"] * 1e-6) / bw["bytes_per_s"]
            b_us = base.get(case_key(dict(r, backend=None)))
            r["vs_base"] = r["us"] / b_us if b_us else None
            if section != "topk" or r["backend"] not in TARGET_BACKENDS:
                continue
            if (r["batch"], r["d"], r["n"]) == (TARGET_BW["batch"], TARGET_BW["d"], TARGET_BW["n"]):
                met = r["pct_copy_bw"] >= 100 * TARGET_BW["min_fraction"]
                r["target"] = f"bw>={100 * TARGET_BW['min_fraction']:.0f}%: {'ok' if met else 'MISS'}"
                targets.append(dict(target="read W_enc at >= 80% of copy bandwidth", op=r["op"], batch=r["batch"],
                                    d=r["d"], n=r["n"], backend=r["backend"], value=r["pct_copy_bw"] / 100,
                                    threshold=TARGET_BW["min_fraction"], met=met))
            if r["batch"] == TARGET_RATIO["batch"] and r["vs_base"] is not None:
                met = r["vs_base"] <= TARGET_RATIO["max_ratio"]
                r["target"] = f"<={TARGET_RATIO['max_ratio']}x base: {'ok' if met else 'MISS'}"
                targets.append(dict(target="no slower than 1.1x gemm+topk", op=r["op"], batch=r["batch"], d=r["d"],
                                    n=r["n"], backend=r["backend"], value=r["vs_base"],
                                    threshold=TARGET_RATIO["max_ratio"], met=met))
    targets += gemv_section.postprocess(results.get(gemv_section.OP, []), s, bw)
    sample_section.postprocess(results.get(sample_section.OP, []))
    for r in results.get("steer_add", []):
        if "error" not in r:
            met = r["rel_diff"] < TARGET_STEER["max_rel_diff"]
            r["target"] = f"<1%: {'ok' if met else 'MISS'}"
            targets.append(dict(target="steering adds < 1% per-token time", op="steer_add", model=r["model"],
                                batch=r["batch"], value=r["rel_diff"], threshold=TARGET_STEER["max_rel_diff"], met=met))
    return targets


def short(msg: str, n: int = 60) -> str:
    msg = msg.splitlines()[0] if msg else ""
    return msg if len(msg) <= n else msg[:n - 3] + "..."


def table_rows(section: str, recs: list[dict]) -> list[dict]:
    rows = []
    for r in recs:
        row = dict(r)
        if "error" in r:
            row["us"] = "ERROR: " + short(r["error"], 40)
        if section == "steer" and "error" not in r:
            row.update(plain_ms=r["plain_ms_per_token"], steered_ms=r["steered_ms_per_token"],
                       rel_pct=100 * r["rel_diff"])
        if section == "steer" and "error" in r:
            row["plain_ms"] = "ERROR: " + short(r["error"], 40)
        rows.append(row)
    return rows


def print_section(section: str, recs: list[dict]) -> None:
    if section == "gemv":
        return gemv_section.print_table(recs, short)
    if section == "sample":
        return sample_section.print_table(recs, short)
    cols = dict(topk=TOPK_COLUMNS, ctrl=CTRL_COLUMNS, steer=STEER_COLUMNS)[section]
    title = dict(topk="topk_sae_encode", ctrl="sae_controller", steer="steering overhead in generate")[section]
    print(f"\n{title}")
    print(common.format_table(table_rows(section, recs), cols))


# ---------------------------------------------------------------- the command
def make_emit(section: str, backend: str, records: list, save=None):
    """emit(record): append (missing_only: unless that case is already there), save, print a progress line."""
    def emit(rec, missing_only=False):
        if missing_only and any(case_key(x) == case_key(rec) for x in records):
            return
        records.append(rec)
        if save is not None:
            save()
        tag = ("ERROR " + short(rec["error"], 200) if "error" in rec
               else f"{rec['us']:.1f} us" if "us" in rec else f"{100 * rec.get('rel_diff', 0):+.2f}%")
        where = " ".join(f"{k}={rec[k]}" for k in ("model", "weight", "batch", "d", "n") if k in rec)
        print(f"  {section} {backend} {where}: {tag}", flush=True)
    return emit


def run_worker(args) -> int:
    section, backend = args.worker
    device = common.resolve_device(args.device)
    s = settings(args, device)
    records: list[dict] = []
    common.write_json(args.out, dict(records=records))
    emit = make_emit(section, backend, records, lambda: common.write_json(args.out, dict(records=records)))
    run_section(section, backend, s, device, emit)
    return 0


def run_child(args, section: str, backend: str, tmpdir: str) -> tuple[list[dict], dict]:
    out = Path(tmpdir) / f"{section}-{backend}.json"
    errf = Path(tmpdir) / f"{section}-{backend}.stderr"
    argv = getattr(args, "argv", ["kernels"])
    cmd = [sys.executable, "-m", "bench", *argv, "--worker", section, backend, "--out", str(out)]
    t0 = time.perf_counter()
    rc, note = None, None
    with open(errf, "w") as ef:
        try:
            rc = subprocess.run(cmd, cwd=common.REPO_ROOT, stderr=ef, timeout=args.worker_timeout).returncode
        except subprocess.TimeoutExpired:
            note = f"child timed out after {args.worker_timeout:.0f} s"
    tail = errf.read_text(errors="replace")[-4000:]
    try:
        records = json.loads(out.read_text())["records"]
    except Exception:  # noqa: BLE001 -- died before writing
        records = []
    info = dict(section=section, backend=backend, rc=rc, wall_s=time.perf_counter() - t0, note=note,
                stderr_tail=tail if (rc != 0 or note) else tail[-1000:])
    if rc != 0 or note:
        why = note or f"child process exited with status {rc}"
        if tail.strip():
            why += ": " + tail.strip().splitlines()[-1]
        info["error"] = why
    return records, info


def run(args) -> int:
    if args.worker:
        return run_worker(args)
    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    s = settings(args, device)
    dtype = common.DTYPES[s["dtype"]]
    isolate = args.isolate == "yes" or (args.isolate == "auto" and cuda)
    env = common.environment(device, dtype, getattr(args, "argv", []))
    print(f"device: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | {env['dtype']} | "
          f"backends {','.join(s['backends'])} | isolate {'yes' if isolate else 'no'}")
    for note in s["notes"]:
        print(f"note: {note}")
    copy_mib = args.copy_mib or DEFAULTS["copy_mib"][0 if cuda else 1]
    bw = common.copy_bandwidth(device, copy_mib << 20, repeats=10 if cuda else 5)
    print(f"copy bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s (read + write, {copy_mib} MiB copy, "
          f"best of {bw['repeats']})", flush=True)

    results = {OPS[sec]: [] for sec in s["sections"]}
    doc = dict(bench="kernels", env=env, settings=s, copy_bandwidth=bw, definitions=DEFINITIONS,
               notes=s["notes"], results=results, targets=[], workers=[])
    order = {sec: [case_key(dict(c, backend=b)) for c in section_cases(sec, s) for b in section_backends(sec, s)]
             for sec in s["sections"]}

    def sort_section(sec):
        pos = {k: i for i, k in enumerate(order[sec])}
        results[OPS[sec]].sort(key=lambda r: pos.get(case_key(r), len(pos)))

    with tempfile.TemporaryDirectory(prefix="bench-kernels-") as tmpdir:
        for sec in s["sections"]:
            for b in section_backends(sec, s):
                print(f"[{sec} / {b}]", flush=True)
                if isolate:
                    recs, info = run_child(args, sec, b, tmpdir)
                    doc["workers"].append(info)
                    got = {case_key(r) for r in recs}
                    for c in section_cases(sec, s):
                        c = dict(c, backend=b)
                        if case_key(c) not in got:
                            recs.append(dict(c, error=info.get("error") or "not measured (child gave no record)"))
                    if "error" in info:
                        print(f"  worker error: {info['error']}", flush=True)
                else:
                    recs = []
                    run_section(sec, b, s, device, make_emit(sec, b, recs))
                results[OPS[sec]].extend(recs)
                sort_section(sec)
                doc["targets"] = postprocess(results, s, bw)
                common.write_json(args.out, doc)  # after every section x backend: a crash later loses little
            common.free_memory(device)

    for sec in s["sections"]:
        print_section(sec, results[OPS[sec]])
    if doc["targets"]:
        print("\ntargets" + ("" if cuda else " (set for an H100: informational only on CPU)") + ":")
        for t in doc["targets"]:
            where = " ".join(f"{k}={t[k]}" for k in ("model", "weight", "batch", "d", "n", "backend", "crossover_m")
                             if k in t)
            print(f"  {'ok  ' if t['met'] else 'MISS'} {t['target']}: {where}: {t['value']:.3f} "
                  f"(threshold {t['threshold']})")
    errors = [r for recs in results.values() for r in recs if "error" in r]
    if errors:
        print(f"\n{len(errors)} error(s), by op, backend and message (full text and tracebacks in the JSON):")
        groups: dict[tuple, list[dict]] = {}
        for r in errors:
            groups.setdefault((r["op"], r["backend"], r["error"]), []).append(r)
        for (op, b, msg), rs in groups.items():
            keys = ("model", "weight", "batch", "d", "n")
            where = ", ".join("/".join(str(r[k]) for k in keys if r.get(k) is not None) for r in rs)
            print(f"  {op} [{b}] {len(rs)} case(s) ({short(where, 80)}): {short(msg, 400)}")
    out = common.write_json(args.out, doc)
    print(f"\nwrote {out}")
    return 1 if errors else 0
