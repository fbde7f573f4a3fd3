"""The `gemv` section of `python -m bench kernels`: steerfast.fused_ops.fused_linear on every
decoder-layer weight shape of a preset, against a plain cuBLAS linear.

Cases: for each preset (--gemv-models; qwen2.5-1.5b and llama-3.1-8b on CUDA, tiny on CPU) and each
M (--gemv-batches; 1,16,64 on CUDA, 1,4 on CPU), the five weights of a decoder step, each with the
fusions the decode step uses around it:

    qkv      W [(H + 2 Hkv) D, d]  RMSNorm prologue, + bias where the preset has a qkv bias
    o        W [d, H D]            + bias where the preset has one, + residual
    gate_up  W [2 I, d]            RMSNorm prologue, SwiGLU epilogue (output [M, I]), + mlp bias if any
    down     W [d, I]              + mlp bias if any, + residual
    lm_head  W [V, d]              plain

Backends: `cublas` (the baseline: torch.nn.functional.linear(x, W, bias) in the bench dtype, cuBLAS
on a GPU; none of the prologue / epilogue fusions), steerfast's `triton` fused_linear and `torch`
(its reference, eager PyTorch: several kernels). fused_linear has no CUDA C++ version, so a
requested `cuda` backend is not run here.

Timing as the other sections (kernels.Timer): L2 flushed before each timed call at M <= --flush-max-batch
(default 1). Above it, a weight that fits in L2 (H200: 60 MB; e.g. every qwen2.5-1.5b weight but
gate_up and lm_head) is read from L2 by the repeated calls, which a decode step (every layer's weights
between two uses of one) never does: `--flush-max-batch 64` gives decode-like times and crossovers.

This module holds the cases, inputs, measurement, bytes and targets; bench/kernels.py dispatches.
"""
from __future__ import annotations

import torch

from . import common

OP = "fused_linear"
BASELINE = "cublas"
FUSED_BACKENDS = ("triton", "torch")
LAYERS = ("qkv", "o", "gate_up", "down", "lm_head")
DEFAULTS = dict(gemv_models=("qwen2.5-1.5b,llama-3.1-8b", "tiny"), gemv_batches=("1,16,64", "1,4"))
TARGET_BW = dict(batch=1, min_fraction=0.80, models=("qwen2.5-1.5b", "llama-3.1-8b"), backend="triton")
TARGET_XOVER = dict(models=("qwen2.5-1.5b", "llama-3.1-8b"), backend="triton")

DEFINITIONS = dict(
    gemv_cases="fused_linear per decoder-layer weight of a preset: qkv [(H+2Hkv)D, d] RMSNorm (+ qkv bias); o "
               "[d, HD] + residual; gate_up [2I, d] RMSNorm + SwiGLU; down [d, I] + residual; lm_head [V, d] plain. "
               "M = batch rows",
    gemv_bytes="N*K*elt (W) + M*K*elt (x) + M*N_out*elt (output) [+ M*N_out*elt residual read] [+ N*elt bias] "
               "[+ K*elt RMSNorm weight]; N_out = N/2 with SwiGLU. The fused op's count, used for every backend "
               "of a case (the cublas baseline writes M*N and reads no residual: not counted), so GB/s compares",
    gemv_cublas="baseline: torch.nn.functional.linear(x, W, bias) in the bench dtype (cuBLAS on CUDA), without the "
                "norm / SwiGLU / residual the fused op also does",
    gemv_max_err="max |output - fp32 reference|: fused backends vs fused_linear_torch on fp32 copies of the inputs; "
                 "cublas vs F.linear in fp32 (its own function). ref_absmax: max |fp32 reference| for scale",
    gemv_crossover_m="per (model, weight): the largest measured M at which triton us <= cublas us (None: at none); "
                     "the decode step can use fused_linear up to it and cuBLAS above",
    gemv_targets=f"CUDA only: triton pct_copy_bw >= {100 * TARGET_BW['min_fraction']:.0f} at M = 1 for every layer of "
                 f"{', '.join(TARGET_BW['models'])}; per weight, triton no slower than cublas at every measured M up "
                 "to its crossover (which must be >= the smallest M)",
)

COLUMNS = [("model", "model"), ("weight", "weight"), ("N", "N"), ("K", "K"), ("batch", "M"), ("backend", "backend"),
           ("us", "us"), ("loop_us", "loop us"), ("gbps", "GB/s"), ("pct_copy_bw", "% copy bw"),
           ("vs_base", "vs cublas"), ("max_err", "max err"), ("crossover_m", "xover M"), ("target", "target")]


# ---------------------------------------------------------------- settings and cases
def add_arguments(p) -> None:
    d = lambda key: f"default {DEFAULTS[key][0]} on CUDA, {DEFAULTS[key][1]} on CPU"  # noqa: E731
    p.add_argument("--gemv-models", type=common.str_list, default=None,
                   help=f"gemv: preset shapes, steerfast.presets.SHAPES ({d('gemv_models')})")
    p.add_argument("--gemv-batches", type=common.int_list, default=None, help=f"gemv: M rows ({d('gemv_batches')})")


def settings(args, s: dict, cuda: bool) -> None:
    """Fill s['gemv_models'], s['gemv_batches'] (defaults by device); check them."""
    from steerfast.presets import SHAPES

    i = 0 if cuda else 1
    s["gemv_models"] = args.gemv_models or common.str_list(DEFAULTS["gemv_models"][i])
    s["gemv_batches"] = args.gemv_batches or common.int_list(DEFAULTS["gemv_batches"][i])
    bad = [m for m in s["gemv_models"] if m not in SHAPES]
    if bad:
        raise SystemExit(f"error: unknown --gemv-models {bad}; expected among {sorted(SHAPES)}")
    if min(s["gemv_batches"], default=1) < 1:
        raise SystemExit("error: --gemv-batches must be >= 1")


def backends(s: dict) -> list[str]:
    return [BASELINE, *(b for b in s["backends"] if b in FUSED_BACKENDS)]


def layer_shapes(model: str) -> tuple[list[dict], float]:
    """The five decoder-step weights of preset `model`, with the fusions around each; its RMSNorm eps."""
    from steerfast.config import ModelArgs
    from steerfast.presets import hf_config
    from steerfast.tuning import decode_weights

    a = ModelArgs.from_hf(hf_config(model).to_dict())
    return decode_weights(a), a.norm_eps


def cases(s: dict) -> list[dict]:
    out = []
    for model in s["gemv_models"]:
        shapes, eps = layer_shapes(model)
        for sh in shapes:
            for M in s["gemv_batches"]:
                out.append(dict(op=OP, model=model, weight=sh["weight"], batch=M, **{k: v for k, v in sh.items()
                                                                                  if k != "weight"}, eps=eps))
    return out


def op_bytes(r: dict, elt: int) -> int:
    M, N, K = r["batch"], r["N"], r["K"]
    n_out = N // 2 if r["swiglu"] else N
    b = N * K * elt + M * K * elt + M * n_out * elt
    if r["residual"]:
        b += M * n_out * elt
    if r["bias"]:
        b += N * elt
    if r["norm"]:
        b += K * elt
    return b


# ---------------------------------------------------------------- inputs and measurement (worker side)
_W_CACHE: dict = {}  # the last weight made: one per (model, layer, dtype), shared by that layer's M cases


def _seed(*parts) -> int:
    h = 0
    for p in parts:
        for ch in str(p):
            h = (h * 131 + ord(ch)) % (1 << 61)
    return h


def inputs(case: dict, dtype, device, seed: int) -> dict:
    """W ~ N(0, 1/K) [N, K] (the same for every M and backend of a layer); x ~ N(0, 1) [M, K]; RMSNorm
    weight 1 + N(0, 0.1); bias N(0, 0.1); residual N(0, 1) [M, N_out]."""
    M, N, K = case["batch"], case["N"], case["K"]
    key = (case["model"], case["weight"], N, K, dtype, str(device), seed)
    if key not in _W_CACHE:
        _W_CACHE.clear()
        common.free_memory(device)
        g = torch.Generator(device=device).manual_seed(_seed(seed, *key[:4]))
        W = torch.randn(N, K, generator=g, device=device, dtype=dtype).mul_(K ** -0.5)
        norm = torch.randn(K, generator=g, device=device, dtype=dtype).mul_(0.1).add_(1.0)
        bias = torch.randn(N, generator=g, device=device, dtype=dtype).mul_(0.1)
        _W_CACHE[key] = (W, norm, bias)
    W, norm, bias = _W_CACHE[key]
    g = torch.Generator(device=device).manual_seed(_seed(seed, *key[:4], M))
    n_out = N // 2 if case["swiglu"] else N
    x = torch.randn(M, K, generator=g, device=device, dtype=dtype)
    res = torch.randn(M, n_out, generator=g, device=device, dtype=dtype)
    return dict(x=x, W=W, norm_weight=norm if case["norm"] else None, bias=bias if case["bias"] else None,
                residual=res if case["residual"] else None, swiglu=case["swiglu"], eps=case["eps"])


def measure(case: dict, backend: str, s: dict, device, dtype, timer) -> dict:
    import torch.nn.functional as F

    from steerfast import fused_ops

    t = inputs(case, dtype, device, s["seed"])
    x, W, bias = t["x"], t["W"], t["bias"]
    f32 = lambda v: None if v is None else v.float()  # noqa: E731
    if backend == BASELINE:
        def fn():
            return F.linear(x, W, bias)
        ref = F.linear(x.float(), W.float(), f32(bias))
    else:
        kw = dict(norm_weight=t["norm_weight"], eps=t["eps"], bias=bias, residual=t["residual"], swiglu=t["swiglu"])

        def fn():
            return fused_ops.fused_linear(x, W, backend=backend, **kw)
        ref = fused_ops.fused_linear_torch(x.float(), W.float(), f32(t["norm_weight"]), t["eps"], f32(bias),
                                           f32(t["residual"]), t["swiglu"])
    out = fn()
    assert out.shape == ref.shape, f"output {tuple(out.shape)}, reference {tuple(ref.shape)}"
    check = dict(max_err=(out.float() - ref).abs().max().item(), ref_absmax=ref.abs().max().item())
    del out, ref
    tm = timer(fn, flush=device.type == "cuda" and case["batch"] <= s["flush_max_batch"])
    return dict(**tm, **check)


# ---------------------------------------------------------------- parent side
def _shape_key(r: dict) -> tuple:
    return r["model"], r["weight"]


def crossover(recs: list[dict]) -> list[dict]:
    """Per (model, weight): triton us / cublas us at each M measured by both, and crossover_m, the
    largest M at which triton <= cublas (None: at none)."""
    times: dict = {}
    for r in recs:
        if "error" not in r and r.get("us") and r["backend"] in (BASELINE, TARGET_XOVER["backend"]):
            times.setdefault(_shape_key(r), {}).setdefault(r["batch"], {})[r["backend"]] = r["us"]
    out = []
    for (model, layer), by_m in times.items():
        ratios = {M: t[TARGET_XOVER["backend"]] / t[BASELINE] for M, t in sorted(by_m.items()) if len(t) == 2}
        if not ratios:
            continue
        wins = [M for M, q in ratios.items() if q <= 1.0]
        xo = max(wins) if wins else None
        # the win region starts at the smallest M and is contiguous up to the crossover
        contiguous = xo is not None and all(q <= 1.0 for M, q in ratios.items() if M <= xo)
        out.append(dict(model=model, weight=layer, crossover_m=xo, ratio_by_m={str(M): q for M, q in ratios.items()},
                        contiguous=contiguous))
    return out


def postprocess(recs: list[dict], s: dict, bw: dict) -> list[dict]:
    """Bytes, GB/s, % copy bandwidth, vs cublas, crossover on the records; return the target checks
    (CUDA only). Idempotent: run after every section x backend."""
    elt = common.DTYPES[s["dtype"]].itemsize
    cuda = str(s["device"]).startswith("cuda")
    base = {(_shape_key(r), r["batch"]): r.get("us") for r in recs if r["backend"] == BASELINE and "error" not in r}
    xo = {(c["model"], c["weight"]): c for c in crossover(recs)}
    targets = []
    for r in recs:
        r["bytes"] = op_bytes(r, elt)
        r.pop("target", None)
        c = xo.get(_shape_key(r))
        r.pop("crossover_m", None)
        if c is not None:
            r["crossover_m"] = c["crossover_m"]
        if "error" in r or not r.get("us"):
            continue
        r["gbps"] = r["bytes"] / r["us"] / 1e3
        r["pct_copy_bw"] = 100 * r["bytes"] / (r["us"] * 1e-6) / bw["bytes_per_s"]
        b_us = base.get((_shape_key(r), r["batch"]))
        r["vs_base"] = r["us"] / b_us if b_us else None
        if (cuda and r["backend"] == TARGET_BW["backend"] and r["model"] in TARGET_BW["models"]
                and r["batch"] == TARGET_BW["batch"]):
            met = r["pct_copy_bw"] >= 100 * TARGET_BW["min_fraction"]
            r["target"] = f"bw>={100 * TARGET_BW['min_fraction']:.0f}%: {'ok' if met else 'MISS'}"
            targets.append(dict(target="fused_linear reads at >= 80% of copy bandwidth at M = 1", op=OP,
                                model=r["model"], weight=r["weight"], batch=r["batch"], backend=r["backend"],
                                value=r["pct_copy_bw"] / 100, threshold=TARGET_BW["min_fraction"], met=met))
    if cuda:
        for (model, layer), c in xo.items():
            if model not in TARGET_XOVER["models"]:
                continue
            ratios = c["ratio_by_m"]
            worst = max((q for M, q in ratios.items() if c["crossover_m"] is not None and int(M) <= c["crossover_m"]),
                        default=min(ratios.values()))
            targets.append(dict(target="fused_linear no slower than cublas up to its crossover M", op=OP, model=model,
                                weight=layer, backend=TARGET_XOVER["backend"], crossover_m=c["crossover_m"],
                                value=worst, threshold=1.0, met=c["contiguous"]))
    return targets


def table_rows(recs: list[dict], short) -> list[dict]:
    rows = []
    for r in recs:
        row = dict(r)
        if "error" in r:
            row["us"] = "ERROR: " + short(r["error"], 40)
        if r["backend"] != TARGET_XOVER["backend"]:
            row["crossover_m"] = None
        elif "crossover_m" in r and r["crossover_m"] is None:
            row["crossover_m"] = "none"
        rows.append(row)
    return rows


def print_table(recs: list[dict], short) -> None:
    print("\nfused_linear (gemv: decoder-layer weights; baseline cublas = F.linear(x, W, bias))")
    print(common.format_table(table_rows(recs, short), COLUMNS))
    xs = crossover(recs)
    if xs:
        print("\ncrossover (largest M with triton us <= cublas us; triton/cublas time by M)")
        rows = [dict(c, crossover_m=c["crossover_m"] if c["crossover_m"] is not None else "none",
                     ratios="  ".join(f"M={M}: {common.fmt(q)}" for M, q in c["ratio_by_m"].items()),
                     contiguous="yes" if c["contiguous"] else "no") for c in xs]
        print(common.format_table(rows, [("model", "model"), ("weight", "weight"), ("crossover_m", "xover M"),
                                         ("contiguous", "wins from M=min"), ("ratios", "triton / cublas")]))
