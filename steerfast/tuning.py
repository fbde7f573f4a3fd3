"""The decode step's GEMVs tune themselves to the GPU that runs them (project issue 11: "an autotuned
or table-driven choice of blocks and split-K, so it tunes itself on whichever GPU it runs").

Without tuning, the launchers take a fixed table picked on an H200 (`kernels/fused_linear.gpu_config`,
`kernels/qkv_rope._config`). `steerfast tune` measures this GPU instead: for each weight of a model's
decode step (QKV + RoPE, output, gate/up, down, lm_head + argmax) and each row count, a coordinate
search from the table's config over blocks, warps, stages and split-K, timed with the L2 flushed (a
decode step reads every weight from HBM), each candidate checked against a float64 ground truth
under the tests' 2x rule before its time counts. It also times the reference (cuBLAS plus the
epilogue as separate kernels): where that wins, the step uses it at that row count, which is where
"the step picks by M" comes from. The results go to one JSON file per GPU model, Triton version and
kernel source (device_slug), read once per process.

Why not `triton.autotune`: it benchmarks on a kernel's first call, which can land inside a CUDA
graph capture, and it would redo so on every process start.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

OFF_ENV, PATH_ENV = "STEERFAST_TUNED", "STEERFAST_TUNED_PATH"  # "0": ignore tuned configs; the file to use
SMEM_BYTES = 227 * 1024  # shared memory a Hopper block may use (A100: 163 KB; a bigger config fails to compile)


# ---------------------------------------------------------------- the tuned table, as the launchers read it
def row_bucket(M: int) -> int:
    """Row counts tuned together: 1, 2, 4, ... (a CUDA-graph batch bucket, the hybrid's candidate rows)."""
    return 1 << max(0, M - 1).bit_length()


def key(op: str, M: int, N: int, K: int, elt: int) -> str:
    return f"{op}|M{row_bucket(M)}|N{N}|K{K}|e{elt}"


@functools.lru_cache(maxsize=None)
def device_slug(device: torch.device) -> str:
    """What a tuned config is valid for: the GPU model, the Triton version and the tuned kernels'
    source (a kernel change makes its old configs unproven: they are not read)."""
    import hashlib

    import triton

    from .kernels import fused_linear, qkv_rope

    p = torch.cuda.get_device_properties(device)
    name = "".join(c if c.isalnum() else "-" for c in p.name).strip("-").lower()
    src = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (fused_linear, qkv_rope))).hexdigest()
    return f"{name}-sm{p.major}{p.minor}-triton{triton.__version__}-kernels{src[:10]}"


def cache_path(slug: str) -> Path:
    if os.environ.get(PATH_ENV):
        return Path(os.environ[PATH_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "steerfast" / "tuned" / f"{slug}.json"


def _usable(k: str, e) -> bool:
    """An entry the launchers can take as it is: every key of its op's configs, integers, two times."""
    axes = AXES.get(k.split("|")[0])
    cfg = e.get("config") if isinstance(e, dict) else None
    return (axes is not None and isinstance(cfg, dict) and set(cfg) == set(axes)
            and all(type(v) is int and v > 0 for v in cfg.values())
            and all(isinstance(e.get(t), (int, float)) for t in ("us", "reference_us")))


@functools.lru_cache(maxsize=None)
def _entries(slug: str) -> dict:
    import warnings

    p = cache_path(slug)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a broken file must not stop decoding: the table still works
        warnings.warn(f"steerfast: ignoring the tuned configs in {p} ({e}); rerun `steerfast tune`", stacklevel=2)
        return {}
    entries = doc.get("entries", {}) if isinstance(doc, dict) and doc.get("slug") == slug else {}
    usable = {k: e for k, e in entries.items() if _usable(k, e)}
    if len(usable) < len(entries):
        warnings.warn(f"steerfast: ignoring {len(entries) - len(usable)} malformed tuned configs in {p}; rerun "
                      "`steerfast tune`", stacklevel=2)
    return usable


def _entry(op: str, device: torch.device, M: int, N: int, K: int, elt: int) -> dict | None:
    if device.type != "cuda" or os.environ.get(OFF_ENV, "1") == "0":
        return None
    return _entry_of(op, device, row_bucket(M), N, K, elt)


@functools.lru_cache(maxsize=None)
def _entry_of(op: str, device: torch.device, bucket: int, N: int, K: int, elt: int) -> dict | None:
    return _entries(device_slug(device)).get(key(op, bucket, N, K, elt))  # once per shape: launches are hot


def lookup(op: str, device: torch.device, M: int, N: int, K: int, elt: int) -> dict | None:
    """The tuned launch config for this shape on this GPU (a copy), or None: use the table."""
    e = _entry(op, device, M, N, K, elt)
    return dict(e["config"]) if e else None


def reference_wins(op: str, device: torch.device, M: int, N: int, K: int, elt: int) -> bool | None:
    """Whether the torch reference (cuBLAS) beat the tuned kernel at this shape; None: not tuned."""
    e = _entry(op, device, M, N, K, elt)
    return None if e is None else e["reference_us"] < e["us"]


def forget() -> None:
    """Drop what was read (after `tune` wrote the file, or a test changed it)."""
    _entries.cache_clear()
    _entry_of.cache_clear()


# ---------------------------------------------------------------- the search
# Each axis in the order searched; a value that does not fit the shape is skipped (see _fits).
AXES = {
    "fused_linear": dict(BLOCK_N=(16, 32, 64, 128, 256), BLOCK_K=(64, 128, 256, 512), SPLIT_K=(1, 2, 4, 8, 16),
                         num_warps=(4, 8), num_stages=(2, 3, 4, 5)),
    "qkv_rope": dict(BLOCK_J=(16, 32, 64), BLOCK_K=(64, 128, 256, 512), SPLIT_K=(1, 2, 4, 8, 16),
                     num_warps=(4, 8), num_stages=(2, 3, 4, 5)),
}
AXES["fused_linear_swiglu"] = AXES["fused_linear"]
AXES["lm_head_argmax"] = {k: v for k, v in AXES["fused_linear"].items() if k != "SPLIT_K"}


def _fits(op: str, cfg: dict, M: int, N: int, K: int, elt: int) -> bool:
    """Whether a config can run the shape: split-K keeps two BLOCK_K steps per split (as split_k_for),
    and the pipeline's W and x tiles fit in shared memory. (A RoPE block wider than half a head is
    masked, so it runs; the search then finds it slower.)"""
    from .kernels.fused_linear import block_m

    if cfg.get("SPLIT_K", 1) > max(1, K // (2 * cfg["BLOCK_K"])):
        return False
    w_rows = 2 * cfg["BLOCK_J"] if op == "qkv_rope" else cfg["BLOCK_N"] * (2 if op == "fused_linear_swiglu" else 1)
    return cfg["num_stages"] * (w_rows + block_m(M)) * cfg["BLOCK_K"] * elt <= SMEM_BYTES


def coordinate_search(start: dict, axes: dict, cost: Callable[[dict], float], rounds: int = 1) -> tuple[dict, float, int]:
    """Best config found by trying every value of one axis at a time from `start`, keeping the best
    so far; `cost` is inf for a config that cannot run. Returns (config, its cost, configs measured)."""
    seen: dict = {}

    def c(cfg):
        k = tuple(sorted(cfg.items()))
        if k not in seen:
            seen[k] = cost(cfg)
        return seen[k]

    best, best_cost = dict(start), c(start)
    for _ in range(rounds):
        for name, values in axes.items():
            for v in values:
                cand = best | {name: v}
                if c(cand) < best_cost:
                    best, best_cost = cand, c(cand)
    return best, best_cost, len(seen)


@dataclass
class Case:
    """One weight at one row count: `run(config)` launches the Triton kernel (config=None: the table),
    `reference()` the torch op, `error(out)` the output's distance from the float64 ground truth
    (after `reset()` and one run), whose largest magnitude is `scale`."""
    op: str
    weight: str
    M: int
    N: int
    K: int
    dtype: torch.dtype
    run: Callable
    reference: Callable
    error: Callable
    scale: float
    reset: Callable = lambda: None  # before a checked run: the state the error is measured from

    @property
    def elt(self) -> int:
        return torch.finfo(self.dtype).bits // 8


def decode_weights(a) -> list[dict]:
    """The five weights a decode step of ModelArgs `a` reads, with the fusions around each."""
    H, Hkv, D, d, I = a.n_heads, a.n_kv_heads, a.head_dim, a.dim, a.intermediate_size
    flags = dict(norm=False, bias=False, residual=False, swiglu=False)
    return [dict(flags, weight="qkv", N=(H + 2 * Hkv) * D, K=d, norm=True, bias=a.qkv_bias),
            dict(flags, weight="o", N=d, K=H * D, bias=a.o_bias, residual=True),
            dict(flags, weight="gate_up", N=2 * I, K=d, norm=True, bias=a.mlp_bias, swiglu=True),
            dict(flags, weight="down", N=d, K=I, bias=a.mlp_bias, residual=True),
            dict(flags, weight="lm_head", N=a.vocab_size, K=d)]


def _cases(a, M: int, dtype, device, seed: int) -> list[Case]:
    from . import fused_ops
    from .kernels import fused_linear as FL
    from .kernels import qkv_rope as QR

    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g, device=device, dtype=dtype).mul_(scale)  # noqa: E731
    # the ground truth in float64, RMSNorm's statistics too (tests/test_fused_ops.py's references)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    err = lambda out, ref: (out.double() - ref).abs().max().item()  # noqa: E731
    stats = dict(stats_dtype=torch.float64)
    out = []
    for w in decode_weights(a):
        N, K = w["N"], w["K"]
        x, W = rnd(M, K), rnd(N, K, scale=K ** -0.5)
        norm = rnd(K, scale=0.1).add_(1.0) if w["norm"] else None
        bias = rnd(N, scale=0.1) if w["bias"] else None
        if w["weight"] == "qkv":
            H, Hkv, D, S = a.n_heads, a.n_kv_heads, a.head_dim, 16
            cos, sin = rnd(S, D), rnd(S, D)
            pos = torch.randint(0, S, (M,), generator=g, device=device, dtype=torch.int32)
            rows = torch.arange(M, device=device)
            kv = torch.zeros(2, M, S, Hkv, D, device=device, dtype=dtype)
            args = (x, W, norm, a.norm_eps, bias, cos, sin, pos, rows, kv[0], kv[1], H, Hkv)
            kv_ref = kv.double()
            q_ref = fused_ops.qkv_rope_kv_write_torch(f64(x), f64(W), f64(norm), a.norm_eps, f64(bias), f64(cos),
                                                      f64(sin), pos, rows, kv_ref[0], kv_ref[1], H, Hkv, **stats)

            out.append(Case("qkv_rope", "qkv", M, N, K, dtype,
                            lambda cfg, args=args: QR.qkv_rope_kv_write(*args, config=cfg),
                            lambda args=args: fused_ops.qkv_rope_kv_write_torch(*args),
                            lambda q, q_ref=q_ref, kv=kv, kv_ref=kv_ref: max(err(q, q_ref), err(kv, kv_ref)),
                            max(q_ref.abs().max().item(), kv_ref.abs().max().item()),
                            kv.zero_))  # checked runs start from an empty cache: each write is its own
        elif w["weight"] == "lm_head":  # the decode step fuses the final RMSNorm in front
            norm = rnd(K, scale=0.1).add_(1.0)
            logits = fused_ops.rms_norm_torch(f64(x), f64(norm), a.norm_eps, **stats) @ f64(W).T
            out.append(Case("lm_head_argmax", "lm_head", M, N, K, dtype,
                            lambda cfg, x=x, W=W, n=norm: FL.lm_head_argmax(x, W, n, a.norm_eps, config=cfg),
                            lambda x=x, W=W, n=norm: fused_ops.lm_head_argmax_torch(x, W, n, a.norm_eps),
                            # how far the chosen token's exact logit falls below the best one
                            lambda ids, lg=logits: (lg.max(-1).values - lg.gather(1, ids[:, None])[:, 0]).max().item(),
                            logits.abs().max().item()))
        else:
            res = rnd(M, N // 2 if w["swiglu"] else N) if w["residual"] else None
            kw = dict(norm_weight=norm, eps=a.norm_eps, bias=bias, residual=res, swiglu=w["swiglu"])
            ref = fused_ops.fused_linear_torch(f64(x), f64(W), f64(norm), a.norm_eps, f64(bias), f64(res),
                                               w["swiglu"], **stats)
            op = "fused_linear_swiglu" if w["swiglu"] else "fused_linear"
            out.append(Case(op, w["weight"], M, N // 2 if w["swiglu"] else N, K, dtype,
                            lambda cfg, x=x, W=W, kw=kw: FL.fused_linear(x, W, **kw, config=cfg),
                            lambda x=x, W=W, kw=kw: fused_ops.fused_linear(x, W, **kw, backend="torch"),
                            lambda o, ref=ref: err(o, ref), ref.abs().max().item()))
    return out


def table_config(case: Case, device: torch.device) -> dict:
    """The launcher's untuned choice for the case, SPLIT_K made explicit."""
    from .kernels import fused_linear as FL
    from .kernels import qkv_rope as QR
    from .kernels._common import num_sms

    interpret = device.type != "cuda"
    if case.op == "qkv_rope":
        return QR._config(case.M, interpret, case.elt) | dict(SPLIT_K=1)
    if interpret:
        cfg = dict(FL._INTERP_CONFIG)
    else:
        cfg = FL.gpu_config(case.M, case.N, case.K, case.op == "fused_linear_swiglu", case.op == "lm_head_argmax",
                            case.elt, num_sms(device))
    return cfg if case.op == "lm_head_argmax" else cfg | dict(SPLIT_K=cfg.get("SPLIT_K", 1))


def gpu_time_us(fn) -> float:
    """Median time of fn in µs with the L2 flushed before each call (triton.testing.do_bench)."""
    import triton.testing

    return 1000.0 * triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def tune_case(case: Case, start: dict, time_us: Callable, rounds: int = 1) -> dict:
    """Search the case's configs from `start`. A config's time counts only if its distance from the
    float64 ground truth is within the project's rule: 2x the same-dtype torch op's, plus one
    rounding of the dtype at the output's scale (another summation order may round an output, or
    pick a near-tied token, the other way)."""
    def checked(fn):
        case.reset()
        return case.error(fn())

    tol = 2.0 * checked(case.reference) + torch.finfo(case.dtype).eps * case.scale
    failed, ran = [], {}

    def cost(cfg):
        k = tuple(sorted(cfg.items()))
        if k not in ran and _fits(case.op, cfg, case.M, case.N, case.K, case.elt):
            ran[k] = measure(cfg)
        return ran.get(k, math.inf)

    def measure(cfg):
        try:
            e = checked(lambda: case.run(cfg))
        except Exception as ex:  # noqa: BLE001 -- e.g. out of resources at compile time: not a candidate
            failed.append(f"{cfg}: {type(ex).__name__}")
            return math.inf
        if not e <= tol:
            failed.append(f"{cfg}: error {e:.3g} > {tol:.3g}")
            return math.inf
        return time_us(lambda: case.run(cfg))

    start_us = cost(start)  # inf when the table's own config cannot run here: the search still can
    best, us, _ = coordinate_search(start, AXES[case.op], cost, rounds)
    return dict(op=case.op, weight=case.weight, M=case.M, N=case.N, K=case.K, elt=case.elt, config=best, us=us,
                table_us=start_us, reference_us=time_us(case.reference), tried=len(ran), failed=failed)


def tune(a, rows: list[int], dtype, device: torch.device, time_us: Callable | None = None, rounds: int = 1,
         seed: int = 0, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Tune every decode weight of ModelArgs `a` at each row count; returns one record per case."""
    time_us = time_us or gpu_time_us
    out = []
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():  # do_bench's device
        for M in rows:
            for case in _cases(a, row_bucket(M), dtype, device, seed):
                r = tune_case(case, table_config(case, device), time_us, rounds)
                out.append(r)
                if progress:
                    progress(r)
    return out


def save(records: list[dict], slug: str) -> Path:
    """Merge the records into the slug's file (other shapes stay), atomically."""
    p = cache_path(slug)
    try:
        doc = json.loads(p.read_text())
        entries = doc.get("entries", {}) if doc.get("slug") == slug else {}
    except (OSError, ValueError):
        entries = {}
    for r in records:
        if math.isfinite(r["us"]):
            entries[key(r["op"], r["M"], r["N"], r["K"], r["elt"])] = dict(
                config=r["config"], us=r["us"], table_us=r["table_us"], reference_us=r["reference_us"])
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(slug=slug, torch=torch.__version__, entries=entries), indent=1, sort_keys=True))
    tmp.replace(p)
    forget()
    return p


# ---------------------------------------------------------------- `steerfast tune`
def add_arguments(p) -> None:
    from .presets import SHAPES

    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a local Hugging Face model directory (only its config.json is read)")
    src.add_argument("--random", choices=sorted(SHAPES), default="qwen2.5-1.5b",
                     help="a preset's shapes (default qwen2.5-1.5b)")
    p.add_argument("--rows", default="1,16,64", help="rows per call to tune for, comma-separated (a decode batch; "
                   "the hybrid's fast step runs batch x (1 + coefficients) rows); default 1,16,64")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--rounds", type=int, default=1, help="passes of the coordinate search (default 1)")
    p.add_argument("--device", default=None, help="default cuda (cpu only under TRITON_INTERPRET=1: a dry run "
                   "whose times mean nothing, written nowhere)")


def run(args) -> int:
    import json as _json

    from .backend import triton_interpret
    from .cli import DTYPES, UsageError
    from .config import ModelArgs
    from .presets import hf_config

    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        raise UsageError(f"--rows {args.rows!r}: expected comma-separated integers") from None
    if not rows or min(rows) < 1 or max(rows) > 4096:
        raise UsageError(f"--rows {args.rows!r}: each must be in [1, 4096]")
    if args.rounds < 1:
        raise UsageError("--rounds must be >= 1")
    if args.model:
        try:
            cfg = _json.loads((Path(args.model) / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {args.model}: no readable config.json ({e})") from None
        a, name = ModelArgs.from_hf(cfg), args.model
    else:
        a, name = ModelArgs.from_hf(hf_config(args.random).to_dict()), args.random
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU here; tuning measures the GPU that will run the kernels")
    if device.type == "cuda" and triton_interpret():
        raise UsageError("TRITON_INTERPRET=1 would time the interpreter, not the GPU: unset it")
    if device.type != "cuda" and not triton_interpret():
        raise UsageError(f"--device {device}: Triton runs on the CPU only with TRITON_INTERPRET=1")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the file and the lookups key on it
    dtype = DTYPES[args.dtype]
    print(f"tuning the decode GEMVs of {name} ({args.dtype}) for rows {rows} on {device}")
    print(f"{'weight':<8} {'M':>4} {'N':>7} {'K':>6} {'table us':>9} {'tuned us':>9} {'torch us':>9}  use   config")

    def show(r):
        use = "torch" if r["reference_us"] < r["us"] else "triton"
        cfg = " ".join(f"{k}={v}" for k, v in sorted(r["config"].items()))
        print(f"{r['weight']:<8} {r['M']:>4} {r['N']:>7} {r['K']:>6} {r['table_us']:>9.1f} {r['us']:>9.1f} "
              f"{r['reference_us']:>9.1f}  {use:<6} {cfg}" + (f"  ({len(r['failed'])} configs failed)"
                                                             if r["failed"] else ""), flush=True)

    if device.type != "cuda":  # the interpreter: every path runs, nothing is worth keeping
        import time

        def wall_us(fn):
            t0 = time.perf_counter()
            fn()
            return 1e6 * (time.perf_counter() - t0)
        tune(a, rows, dtype, device, wall_us, args.rounds, progress=show)
        print("dry run on the CPU: nothing written")
        return 0
    records = tune(a, rows, dtype, device, rounds=args.rounds, progress=show)
    path = save(records, device_slug(device))
    print(f"wrote {path}: the decode step uses these configs on every {torch.cuda.get_device_name(device)} "
          f"({OFF_ENV}=0 ignores them)")
    return 0
