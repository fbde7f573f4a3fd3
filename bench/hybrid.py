"""Hybrid-loop throughput: sf.Hybrid vs a naive transformers hybrid vs the paper's loop vs the floor.

Two random-weight models in one preset shape (steerfast.presets; default qwen2.5-1.5b on CUDA, the
shape of both Qwen2.5-Math-1.5B, the base, and DeepSeek-R1-Distill-Qwen-1.5B, the thinking model;
tiny on CPU), different seeds. A random Top-K SAE (k=1, --latents 15) on the thinking model's
residual after --sae-layer (default 18), random steering vectors [latents, d] and bias [d], steering
after base layer --steer-layer (default 10). Prompts are random token ids (every row --base-prompt-len
/ --thinking-prompt-len tokens); eos_token_id=None, so every run goes to length.

Configurations (--configs):
  a   windows [-1], coefs 0.1, 0.2, ..., 1.0 (10 candidates per steered token)
  b   the paper's grid: coefs 0.1..1.0 x windows {0, -1, -15, -50, -100} (50 candidates)
Gates (--gates, default thinking,rate), for each configuration x batch (--batches, default 1,16 on
CUDA, 1,2 on CPU):
  thinking   the paper's: steer when the thinking model's greedy token differs from the base's.
             Random models disagree almost always: the steered share it gave is recorded.
  <rate>     sf.Hybrid's synthetic gate (gate=--rate, default 0.12): steer at that fixed share of
             steps (step s steers when floor((s+1) rate) > floor(s rate)), comparable with the
             paper's ~12% steered tokens.

Sections (--sections, default all):
  steerfast  sf.Hybrid.generate: one short warm-up call (--warmup-tokens, long enough to steer once),
             then one timed call of --new-tokens. tokens/s = batch * steps / wall time (prefill
             included, device synchronised before and after); ms/token = wall time / steps.
  naive      steerfast.hybrid.reference.naive_hybrid, the hybrid as researchers write it with transformers: both models
             decode with past_key_values; each steered row re-runs the base model over its full
             sequence once per candidate, with a forward hook adding the vector on layer steer_layer
             (no candidate batching, no cache). Same semantics as the paper's loop. --naive-new-tokens
             (default 25 on CUDA: 3 steered steps at 12%), stopped early past --naive-budget-s a
             configuration (recorded as truncated; its per-token figures are over the steps it ran).
             Per-step times are recorded; at the synthetic gate the comparison takes the naive
             hybrid's time per token at steerfast's steered share from them.
  paper      the authors' loop against steerfast at each context in --contexts (default 200 and 1000
             tokens on CUDA): both prompts that long, batch 1. steerfast.hybrid.reference.paper_hybrid
             (the paper's loop: no KV cache, every forward from scratch), --paper-new-tokens per run.
             t_unsteered: a run that never steers (gate "controller" with threshold +inf: T, SAE and B
             each step, as an unsteered step of the paper's loop); t_steered: a run with the thinking
             gate and the configuration's grid, less its unsteered steps (share s: (run time / steps -
             (1 - s) t_unsteered) / s). The paper's time per token at steerfast's share s: (1 - s)
             t_unsteered + s t_steered. steerfast: sf.Hybrid on the same prompts at the synthetic gate,
             --context-new-tokens new tokens; the ratio is its tokens/s times that time per token.
  floor      the floor a configuration's step can reach: both models' bytes per decode step at the
             copy bandwidth (bench.decode.bytes_per_step: weights + KV at the mean context, prompt +
             new_tokens / 2) plus, for the steered share s of the rows, the candidate re-runs' FLOPs
             (hybrid_cost.candidate_flops) at the measured matmul peak (common.matmul_peak, the bench dtype):
             floor tok/s = batch / (bytes / bandwidth + s * batch * FLOPs / peak).

Speedups: steerfast tokens/s over the naive hybrid's (same configuration, batch, gate); and over the
paper's loop on the same token mix (1 / the paper's time per token above, measured at the first of
--contexts: the paper's loop runs one problem at a time); the contexts table gives the ratio at
each context, steerfast at batch 1 on the same prompts.

Targets (printed ok/MISS on CUDA only, at the synthetic gate): config a >= 50% of its floor at batch 1
and >= 40% at 16; config b >= 40% at batches 1 and 16 and >= 20x the paper's loop at context 200.

Robust unattended: every case in its own try/except from fresh caches and graphs, errors recorded
with their tracebacks in the JSON (written after every result), exit status 1 on any error. On
CUDA (--isolate auto) the cases run in a worker process, and after one that lost the CUDA context
(a kernel fault is sticky) or killed the worker, in a fresh one, all into one JSON (common.supervise).

On a GPU, from the repository root:  python -m bench hybrid   (writes bench/out/hybrid.json)
"""
from __future__ import annotations

import dataclasses
import time

import torch

from steerfast import progress
from steerfast.hybrid.reference import naive_hybrid
from steerfast.presets import SHAPES, random_hf_model

from . import common
from .hybrid_cost import (bench_floor, bench_paper, contexts_table, counted_fast_step, floor_tokens_per_s,
                          paper_s_per_token)

SECTIONS = ("steerfast", "naive", "paper", "floor")
CONFIGS = {
    "a": dict(coefs=[round(0.1 * i, 1) for i in range(1, 11)], windows=[-1]),
    "b": dict(coefs=[round(0.1 * i, 1) for i in range(1, 11)], windows=[0, -1, -15, -50, -100]),
}
# defaults: (CUDA, CPU)
DEFAULTS = dict(model=("qwen2.5-1.5b", "tiny"), batches=("1,16", "1,2"), base_prompt_len=(128, 8),
                thinking_prompt_len=(150, 10), new_tokens=(128, 10), naive_new_tokens=(25, 10),
                paper_new_tokens=(8, 3), naive_budget_s=(60.0, 0.0), warmup_tokens=(10, 10), copy_mib=(1024, 64),
                contexts=("200,1000", "16,48"), context_new_tokens=(32, 9))
# project issue 12's bar (H100/H200, bf16, Qwen2.5-1.5B shapes, synthetic gate 0.12)
TARGET_PCT_FLOOR = (("a", 1, 50.0), ("a", 16, 40.0), ("b", 1, 40.0), ("b", 16, 40.0))  # config, batch, % floor
TARGET_VS_PAPER = ("b", 200, 20.0)  # config, context, x the paper's loop

COLUMNS = [
    ("config", "cfg"), ("batch", "batch"), ("gate", "gate"),
    ("sf_tok_s", "sf tok/s"), ("sf_ms", "sf ms/tok"), ("sf_share", "steered %"),
    ("naive_tok_s", "naive tok/s"), ("vs_naive", "vs naive"),
    ("paper_tok_s", "paper tok/s"), ("vs_paper", "vs paper"),
    ("floor_tok_s", "floor tok/s"), ("pct_floor", "% floor"),
]

CONTEXT_COLUMNS = [("config", "cfg"), ("context", "context"), ("sf_tok_s", "sf tok/s"), ("sf_share", "steered %"),
                   ("paper_tok_s", "paper tok/s"), ("vs_paper", "vs paper")]

NOTES = dict(
    tokens_per_s="batch * steps / wall time of one call (device synchronised before and after), prefill "
                 "included; steps = new tokens per row (every row runs to length: eos_token_id=None)",
    ms_per_token="mean per-token latency: wall time / steps (prefill included)",
    steered_share="share of generated tokens that were steered (HybridResult.steered_share for steerfast)",
    steerfast="sf.Hybrid(...).generate after one warm-up call of warmup_tokens on the same prompts",
    naive="steerfast.hybrid.reference.naive_hybrid: transformers models with past_key_values for the unsteered "
          "forwards; each steered row re-runs the base model over its full sequence once per candidate "
          "with a forward hook on layer steer_layer (no cache, no candidate batching); greedy; same "
          "semantics as the paper's loop. Fewer new tokens than steerfast (a shorter mean context: in "
          "the naive hybrid's favour) and possibly truncated by naive_budget_s. Per step its wall time is "
          "recorded (step_s, the prefill in step 0's; device synchronised) and whether any row steered",
    vs_naive="steerfast tokens/s / naive tokens/s, same configuration, batch and gate. At the synthetic gate "
             "(every row steers on the same steps) the naive tokens/s is taken at steerfast's steered share "
             "s: batch / ((1 - s) t_unsteered_step + s t_steered_step) from its per-step times "
             "(summary naive_basis says which), so a truncated or shorter naive run compares on the same mix",
    paper="steerfast.hybrid.reference.paper_hybrid, batch 1, both prompts `context` tokens long: t_unsteered "
          "from a run that never steers (gate='controller', threshold=+inf), t_steered from a thinking-gate "
          "run with the configuration's grid, less its unsteered steps. Its cost grows with the context; "
          "the main table compares at the first context",
    contexts="per configuration and context: steerfast (sf.Hybrid, batch 1, synthetic gate, the same prompts "
             "as the paper's loop, context_new_tokens new tokens after a warm-up) against the paper's loop at "
             "steerfast's steered share: vs_paper = sf tokens/s * paper time per token",
    vs_paper="steerfast tokens/s / (1 / paper time per token), paper time per token = (1 - s) t_unsteered "
             "+ s t_steered at steerfast's measured steered share s (at the 0.12 gate, s is ~0.12; the "
             "paper's loop runs one problem at a time, so at batch > 1 this also counts batching)",
    floor="per configuration and batch: batch / (bytes / copy bandwidth + s * batch * candidate FLOPs / "
          "matmul peak); bytes: base + thinking bytes per decode step (bench.decode.bytes_per_step: weights "
          "read + KV at the mean context prompt_len + new_tokens / 2); s: the row's steered share; "
          "candidate FLOPs: one steered row's re-runs (bench.hybrid_cost.candidate_flops: 2 * upper-layer "
          "matmul params per window position, 4 * heads * head_dim per attended key per upper layer, 2 * "
          "LM-head params per candidate) at that mean context",
    counted_step="windows [-1] (the device-side step) only: one step run eagerly under steerfast.launch_count on "
                 "the buffers generate used, both models at the mean context: its kernels and the bytes they "
                 "read, beside the floor's arithmetic bytes",
    errors="a configuration that raised is recorded with `error` (and `traceback`) and the run goes on; "
           "exit status 1",
)


def add_arguments(p) -> None:
    d = lambda key: f"default {DEFAULTS[key][0]} on CUDA, {DEFAULTS[key][1]} on CPU"  # noqa: E731
    p.add_argument("--sections", type=common.str_list, default=list(SECTIONS),
                   help=f"comma-separated, among {','.join(SECTIONS)} (default all)")
    p.add_argument("--configs", type=common.str_list, default=list(CONFIGS),
                   help="comma-separated among a (windows [-1]), b (the paper's 10 x 5 grid); default a,b")
    p.add_argument("--model", default=None, help=f"preset shape of both models ({d('model')})")
    p.add_argument("--batches", type=common.int_list, default=None, help=d("batches"))
    p.add_argument("--base-prompt-len", type=int, default=None, help=d("base_prompt_len"))
    p.add_argument("--thinking-prompt-len", type=int, default=None, help=d("thinking_prompt_len"))
    p.add_argument("--new-tokens", type=int, default=None, help=f"steerfast's new tokens ({d('new_tokens')})")
    p.add_argument("--naive-new-tokens", type=int, default=None, help=d("naive_new_tokens"))
    p.add_argument("--naive-budget-s", type=float, default=None,
                   help=f"stop a naive run after this many seconds, 0: never ({d('naive_budget_s')})")
    p.add_argument("--paper-new-tokens", type=int, default=None, help=d("paper_new_tokens"))
    p.add_argument("--contexts", type=common.int_list, default=None,
                   help=f"prompt lengths the paper's loop and steerfast are compared at ({d('contexts')})")
    p.add_argument("--context-new-tokens", type=int, default=None,
                   help=f"steerfast's new tokens at each context ({d('context_new_tokens')})")
    p.add_argument("--warmup-tokens", type=int, default=None,
                   help=f"steerfast warm-up call's new tokens ({d('warmup_tokens')}; >= 9 steers once at 0.12)")
    p.add_argument("--rate", type=float, default=0.12, help="the synthetic gate's steered share (default 0.12)")
    p.add_argument("--gates", type=common.str_list, default=["thinking", "rate"],
                   help="comma-separated among thinking (the paper's), rate (the synthetic gate); default both")
    p.add_argument("--latents", type=int, default=15, help="SAE latents = categories (default 15)")
    p.add_argument("--sae-layer", type=int, default=None,
                   help="thinking layer the SAE reads (default 18; the last layer when the model has fewer)")
    p.add_argument("--steer-layer", type=int, default=None,
                   help="base layer steered (default 10; n_layers // 2 - 1 when the model has <= 18 layers)")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0, help="base model seed; the thinking model gets seed + 1")
    p.add_argument("--copy-mib", type=int, default=None, help=f"copy-bandwidth buffer, MiB ({d('copy_mib')})")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    common.add_case_arguments(p)
    p.add_argument("--out", default=str(common.REPO_ROOT / "bench" / "out" / "hybrid.json"),
                   help="JSON output path (default bench/out/hybrid.json)")


# ---------------------------------------------------------------- settings, models, inputs
def settings(args, device: torch.device) -> dict:
    i = 0 if device.type == "cuda" else 1
    pick = lambda v, key: DEFAULTS[key][i] if v is None else v  # noqa: E731
    model = pick(args.model, "model")
    if model not in SHAPES:
        raise SystemExit(f"error: --model {model!r} is not a preset; choose from {sorted(SHAPES)}")
    n_layers = SHAPES[model]["num_hidden_layers"]
    s = dict(model=model, n_layers=n_layers, dtype=args.dtype, device=str(device),
             batches=args.batches or common.int_list(DEFAULTS["batches"][i]),
             base_prompt_len=pick(args.base_prompt_len, "base_prompt_len"),
             thinking_prompt_len=pick(args.thinking_prompt_len, "thinking_prompt_len"),
             new_tokens=pick(args.new_tokens, "new_tokens"),
             naive_new_tokens=pick(args.naive_new_tokens, "naive_new_tokens"),
             naive_budget_s=pick(args.naive_budget_s, "naive_budget_s"),
             paper_new_tokens=pick(args.paper_new_tokens, "paper_new_tokens"),
             warmup_tokens=pick(args.warmup_tokens, "warmup_tokens"),
             contexts=args.contexts or common.int_list(DEFAULTS["contexts"][i]),
             context_new_tokens=pick(args.context_new_tokens, "context_new_tokens"),
             rate=args.rate, gates=list(args.gates), latents=args.latents, seed=args.seed,
             sae_layer=args.sae_layer if args.sae_layer is not None else min(18, n_layers - 1),
             steer_layer=args.steer_layer if args.steer_layer is not None else (
                 10 if n_layers > 18 else max(0, n_layers // 2 - 1)),
             sections=list(args.sections), configs={k: CONFIGS[k] for k in args.configs if k in CONFIGS},
             sae="random TopKSAE, k=1, W_enc/W_dec/b_enc/b_dec ~ N(0, 1) float32; vectors and bias ~ N(0, 1)",
             weight_init="N(0, 0.02) weights and biases, unit norm weights; base seed, thinking seed + 1",
             eos_token_id=None)
    bad = [c for c in args.configs if c not in CONFIGS] + [x for x in args.sections if x not in SECTIONS] + [
        g for g in args.gates if g not in ("thinking", "rate")]
    if bad:
        raise SystemExit(f"error: unknown configs/sections/gates {bad}; configs {list(CONFIGS)}, sections "
                         f"{list(SECTIONS)}, gates thinking, rate")
    if not 0 < s["rate"] <= 1:
        raise SystemExit("error: --rate must be in (0, 1]")
    if min(s["batches"]) < 1 or min(s["base_prompt_len"], s["thinking_prompt_len"], s["new_tokens"],
                                     s["naive_new_tokens"], s["paper_new_tokens"], s["warmup_tokens"],
                                     s["context_new_tokens"], *s["contexts"]) < 1:
        raise SystemExit("error: batches, prompt lengths and token counts must be >= 1")
    if not (0 <= s["sae_layer"] < n_layers and 0 <= s["steer_layer"] < n_layers):
        raise SystemExit(f"error: --sae-layer / --steer-layer must be in [0, {n_layers})")
    return s


def make_controller(d_think: int, d_base: int, n_latents: int, seed: int, device="cpu"):
    """A random SAE (k=1), steering vectors [n_latents, d_base] and bias [d_base], float32 on `device`
    (the paper's loop computes with them where the models' activations are)."""
    import steerfast as sf

    g = torch.Generator().manual_seed(seed * 1009 + 17)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    sae = sf.TopKSAE(W_enc=r(d_think, n_latents), b_enc=r(n_latents), W_dec=r(n_latents, d_think),
                     b_dec=r(d_think), k=1)
    return sae, r(n_latents, d_base), r(d_base)


def make_prompts(batch: int, P: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, P), generator=g).tolist()


def gate_name(gate) -> str:
    return gate if isinstance(gate, str) else f"{gate:g}"


# ---------------------------------------------------------------- sections
def bench_steerfast(h, bp, tp, N: int, warm: int, device) -> dict:
    kw = dict(eos_token_id=None)
    h.generate(bp, tp, max_new_tokens=warm, **kw)  # warm-up: Triton compiles, cache allocation
    res, wall = common.timed(lambda: h.generate(bp, tp, max_new_tokens=N, **kw), device)
    steps = max(len(t) for t in res.tokens)
    n = sum(len(t) for t in res.tokens)
    assert n == len(bp) * N, f"expected {len(bp) * N} tokens, got {n}"
    return dict(steps=steps, tokens=n, wall_s=wall, loop_elapsed_s=res.elapsed_s, tokens_per_s=n / wall,
                ms_per_token=1e3 * wall / steps, steered_share=res.steered_share,
                steered_share_per_sequence=res.steered_share_per_sequence)


def bench_naive(hf_b, hf_t, ctl, s, cfg, bp, tp, gate, device) -> dict:
    sae, vectors, bias = ctl
    r = naive_hybrid(hf_b, hf_t, sae, vectors, bias, s["sae_layer"], s["steer_layer"], cfg["coefs"],
                     cfg["windows"], bp, tp, s["naive_new_tokens"], gate=gate, budget_s=s["naive_budget_s"])
    flags = [f for fs in r["steered"] for f in fs]
    n = sum(len(t) for t in r["tokens"])
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    t_u = mean([t for t, st in zip(r["step_s"], r["step_steered"]) if not st])
    t_s = mean([t for t, st in zip(r["step_s"], r["step_steered"]) if st])
    return dict(steps=r["steps"], tokens=n, wall_s=r["wall_s"], tokens_per_s=n / r["wall_s"],
                ms_per_token=1e3 * r["wall_s"] / r["steps"], steered_share=sum(flags) / len(flags),
                truncated=r["truncated"], new_tokens_requested=s["naive_new_tokens"],
                t_unsteered_step_s=t_u, t_steered_step_s=t_s, step_s=r["step_s"], step_steered=r["step_steered"])


# ---------------------------------------------------------------- summary, targets, table
def summarize(doc: dict, s: dict) -> list[dict]:
    res = {(r["impl"], r["config"], r["batch"], r["gate"]): r for r in doc["results"]}
    paper = {p["config"]: p for p in doc["paper"] if p.get("context") == s["contexts"][0]}
    floor = {f["batch"]: f for f in doc["floor"] if "error" not in f}
    rows = []
    for cfg in s["configs"]:
        for batch in s["batches"]:
            for gate in [gate_name(s["rate"]) if g == "rate" else g for g in s["gates"]]:
                sfr = res.get(("steerfast", cfg, batch, gate), {})
                nv = res.get(("naive", cfg, batch, gate), {})
                ok = lambda r: r and "error" not in r  # noqa: E731
                sf_tps = sfr.get("tokens_per_s") if ok(sfr) else None
                nv_tps = nv.get("tokens_per_s") if ok(nv) else None
                share = sfr.get("steered_share") if ok(sfr) else None
                nv_basis = "measured" if nv_tps else None
                if (nv_tps and gate != "thinking" and share is not None and nv.get("t_unsteered_step_s")
                        and nv.get("t_steered_step_s")):  # every row steers on the same steps: exact mix
                    nv_tps = batch / ((1 - share) * nv["t_unsteered_step_s"] + share * nv["t_steered_step_s"])
                    nv_basis = "mix at steerfast's share"
                pt = paper_s_per_token(paper.get(cfg), share)
                fl_tps = floor_tokens_per_s(floor.get(batch), cfg, share)
                rows.append(dict(
                    config=cfg, batch=batch, gate=gate,
                    sf_tok_s="error" if sfr.get("error") else sf_tps,
                    sf_ms=sfr.get("ms_per_token") if ok(sfr) else None,
                    sf_share=None if share is None else 100 * share,
                    naive_tok_s="error" if nv.get("error") else nv_tps,
                    naive_share=nv.get("steered_share") if ok(nv) else None, naive_basis=nv_basis,
                    vs_naive=sf_tps / nv_tps if sf_tps and nv_tps else None,
                    paper_s_per_token=pt, paper_tok_s=1 / pt if pt else None,
                    vs_paper=sf_tps * pt if sf_tps and pt else None,
                    floor_tok_s=fl_tps, pct_floor=100 * sf_tps / fl_tps if sf_tps and fl_tps else None))
    return rows


def check_targets(rows: list[dict], contexts: list[dict], s: dict, cuda: bool) -> list[dict]:
    """Project issue 12's bar, at the synthetic gate: % of the floor per configuration and batch, and
    the paper's grid against the paper's loop at context 200 (checked on CUDA only)."""
    rate = gate_name(s["rate"])
    found = [(f"config {c}, batch {b}, gate {rate}: >= {thr:g}% of its floor", thr,
              next((r["pct_floor"] for r in rows if (r["config"], r["batch"], r["gate"]) == (c, b, rate)), None))
             for c, b, thr in TARGET_PCT_FLOOR]
    c, ctx, thr = TARGET_VS_PAPER
    found.append((f"config {c}, batch 1, gate {rate}, context {ctx}: >= {thr:g}x the paper's loop", thr,
                  next((r["vs_paper"] for r in contexts if (r["config"], r["context"]) == (c, ctx)), None)))
    return [dict(target=what, value=v if isinstance(v, float) else None, threshold=thr,
                 met=v >= thr if isinstance(v, float) else None, checked=cuda) for what, thr, v in found]


# ---------------------------------------------------------------- sections (one function each)
@dataclasses.dataclass
class _Sections:
    """What every section reads and where it records."""
    doc: dict
    s: dict
    device: torch.device
    prompts: dict  # batch -> (base prompts, thinking prompts)
    gates: list
    ctl: tuple  # (sae, vectors, bias)
    record: object  # record(rec, label): append a result, print it, save the JSON
    save: object
    cases: common.Cases


def section_steerfast(run: _Sections, base, think) -> None:
    """sf.Hybrid per configuration x batch x gate, each from fresh caches and graphs."""
    import steerfast as sf

    s = run.s
    print("\n[steerfast: sf.Hybrid]", flush=True)
    bar = progress.bar(total=len(s["configs"]) * len(s["batches"]) * len(run.gates), desc="sf.Hybrid", unit="case",
                       leave=False)
    for cfg_name, cfg in s["configs"].items():
        for B in s["batches"]:
            for gate in run.gates:
                bar.update()
                if not run.cases.start():
                    continue
                key = dict(impl="steerfast", config=cfg_name, batch=B, gate=gate_name(gate),
                           grid_size=len(cfg["coefs"]) * len(cfg["windows"]), new_tokens=s["new_tokens"])
                h = None
                try:
                    run.cases.inject()
                    sae, vectors, bias = run.ctl
                    h = sf.Hybrid(base, think, sae, vectors, bias, sae_layer=s["sae_layer"],
                                  steer_layer=s["steer_layer"], coefs=cfg["coefs"], windows=cfg["windows"], gate=gate)
                    rec = dict(key, **bench_steerfast(h, *run.prompts[B], s["new_tokens"], s["warmup_tokens"],
                                                      run.device))
                    rec["counted_step"] = counted_fast_step(h, B, min(s["base_prompt_len"], s["thinking_prompt_len"])
                                                            + s["new_tokens"] // 2)
                except Exception as e:  # noqa: BLE001 -- an unattended run records the failure and goes on
                    rec = dict(key, **common.error_record(e))
                    run.cases.failed()
                finally:  # each case starts from fresh caches and graphs: an earlier one cannot break it
                    h = None
                    run.cases.fresh(base, think)
                run.record(rec, f"config {cfg_name} batch {B} gate {gate_name(gate)}")
                run.cases.done()
    bar.close()


def section_floor(run: _Sections, base, think, bw: dict, peak: dict) -> None:
    if peak is not None:
        run.doc["matmul_peak"] = peak
    for B in run.s["batches"]:
        if not run.cases.start():
            continue
        try:
            run.cases.inject()
            run.doc["floor"].append(bench_floor(base, think, run.s, B, bw, peak))
        except Exception as e:  # noqa: BLE001
            run.doc["floor"].append(dict(batch=B, **common.error_record(e)))
            run.cases.failed()
        run.cases.done()
    run.save()


def section_naive(run: _Sections, hf_b, hf_t) -> None:
    """steerfast.hybrid.reference.naive_hybrid per configuration x batch x gate."""
    s = run.s
    print("\n[naive: transformers hybrid, KV cache, one full re-run per candidate]", flush=True)
    try:  # warm-up: CUDA context, cuBLAS, HF's first-call work
        if run.cases.lost_at is None:
            naive_hybrid(hf_b, hf_t, *run.ctl, s["sae_layer"], s["steer_layer"], [1.0], [-1],
                         run.prompts[s["batches"][0]][0][:1], run.prompts[s["batches"][0]][1][:1], 2)
    except Exception as e:  # noqa: BLE001 -- the timed runs will record the error
        print(f"  warm-up failed: {type(e).__name__}: {e}")
    bar = progress.bar(total=len(s["configs"]) * len(s["batches"]) * len(run.gates), desc="naive hybrid",
                       unit="case", leave=False)
    for cfg_name, cfg in s["configs"].items():
        for B in s["batches"]:
            for gate in run.gates:
                bar.update()
                if not run.cases.start():
                    continue
                key = dict(impl="naive", config=cfg_name, batch=B, gate=gate_name(gate),
                           grid_size=len(cfg["coefs"]) * len(cfg["windows"]))
                try:
                    run.cases.inject()
                    rec = dict(key, **bench_naive(hf_b, hf_t, run.ctl, s, cfg, *run.prompts[B], gate, run.device))
                except Exception as e:  # noqa: BLE001
                    rec = dict(key, **common.error_record(e))
                    run.cases.failed()
                run.cases.fresh()
                run.record(rec, f"config {cfg_name} batch {B} gate {gate_name(gate)}")
                run.cases.done()


def section_paper(run: _Sections, base, think, hf_b, hf_t) -> None:
    """At each context: steerfast at batch 1 and the paper's loop (its unsteered time measured once
    per context) per configuration, on the same prompts."""
    import steerfast as sf
    from steerfast.hybrid.reference import paper_hybrid

    s = run.s
    print("\n[paper: steerfast.hybrid.reference.paper_hybrid (no KV cache) vs steerfast, batch 1]", flush=True)
    try:
        if run.cases.lost_at is None:
            paper_hybrid(hf_b, hf_t, *run.ctl, s["sae_layer"], s["steer_layer"], [1.0], [-1], [1, 2], [1, 2], 1)  # warm-up
    except Exception as e:  # noqa: BLE001
        print(f"  warm-up failed: {type(e).__name__}: {e}")
    V = base.args.vocab_size
    for C in s["contexts"]:
        bp, tp = make_prompts(1, C, V, 7000 + C)[0], make_prompts(1, C, V, 8000 + C)[0]
        unsteered = None
        for cfg_name, cfg in s["configs"].items():
            if not run.cases.start():
                continue
            key = dict(config=cfg_name, context=C)
            h = None
            try:
                run.cases.inject()
                sae, vectors, bias = run.ctl
                h = sf.Hybrid(base, think, sae, vectors, bias, sae_layer=s["sae_layer"], steer_layer=s["steer_layer"],
                              coefs=cfg["coefs"], windows=cfg["windows"], gate=s["rate"])
                rec = dict(key, impl="steerfast-context", batch=1, gate=gate_name(s["rate"]),
                           **bench_steerfast(h, [bp], [tp], s["context_new_tokens"], s["warmup_tokens"], run.device))
            except Exception as e:  # noqa: BLE001
                rec = dict(key, impl="steerfast-context", batch=1, gate=gate_name(s["rate"]), **common.error_record(e))
                run.cases.failed()
            finally:
                h = None
                run.cases.fresh(base, think)
            run.record(rec, f"steerfast config {cfg_name} context {C}")
            if run.cases.lost_at is not None:  # the case's second half cannot run here
                run.doc["paper"].append(dict(key, error="not run: the CUDA context was lost in this case's "
                                                        "steerfast run"))
                run.cases.done()
                continue
            try:
                p = dict(key, **bench_paper(hf_b, hf_t, run.ctl, s, cfg, bp, tp, unsteered))
                unsteered = p["unsteered"]
                print(f"  paper config {cfg_name} context {C}: unsteered {1e3 * p['t_unsteered_s']:.1f} ms/token, "
                      f"steered {common.fmt(None if p['t_steered_s'] is None else 1e3 * p['t_steered_s'])} ms/token "
                      f"({p['grid_size']} candidates, share {p['steered_run']['steered_share']:.2f} in its run)",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                p = dict(key, **common.error_record(e))
                print(f"  paper config {cfg_name} context {C}: ERROR {p['error']}", flush=True)
                run.cases.failed()
            run.doc["paper"].append(p)
            run.cases.fresh()
            run.cases.done()


def run(args) -> int:
    if common.supervises(args):
        return common.supervise(args)
    import transformers

    import steerfast as sf

    transformers.logging.set_verbosity_error()
    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.cpu_threads)
    s = settings(args, device)
    dtype = common.DTYPES[s["dtype"]]
    env = common.environment(device, dtype, getattr(args, "argv", []))
    print(f"device: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
          f"transformers {env['transformers']} | {env['dtype']} | model {s['model']} | "
          f"sae_layer {s['sae_layer']} steer_layer {s['steer_layer']}")
    copy_mib = args.copy_mib or DEFAULTS["copy_mib"][0 if cuda else 1]
    bw = common.copy_bandwidth(device, copy_mib << 20, repeats=10 if cuda else 5)
    print(f"copy bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s (read + write, {copy_mib} MiB copy, "
          f"best of {bw['repeats']})", flush=True)
    doc = dict(bench="hybrid", env=env, settings=s, copy_bandwidth=bw, notes=NOTES, models={}, results=[],
               paper=[], floor=[], summary=[], contexts=[], targets=[], errors=[])

    def save():
        doc["summary"], doc["contexts"] = summarize(doc, s), contexts_table(doc, s)
        doc["targets"] = check_targets(doc["summary"], doc["contexts"], s, cuda)
        common.write_json(args.out, doc)

    sec, grid = s["sections"], len(s["configs"]) * len(s["batches"]) * len(s["gates"])
    total = grid * (("steerfast" in sec) + ("naive" in sec)) + len(s["batches"]) * ("floor" in sec) \
        + len(s["contexts"]) * len(s["configs"]) * ("paper" in sec)  # the sections' cases, as they count them
    cases = common.Cases(args, device, doc, save, total, lists=("results", "paper", "floor", "errors"))
    Pb, Pt = s["base_prompt_len"], s["thinking_prompt_len"]
    max_len = max(Pb, Pt, *s["contexts"]) + max(s["new_tokens"], s["naive_new_tokens"], s["paper_new_tokens"],
                                              s["warmup_tokens"], s["context_new_tokens"]) + 8
    try:
        t0 = time.perf_counter()
        hf_b = random_hf_model(s["model"], device, dtype, seed=s["seed"])
        hf_t = random_hf_model(s["model"], device, dtype, seed=s["seed"] + 1)
        base = sf.load_model(hf_b, device=device, dtype=dtype, max_seq_len=max_len)
        think = sf.load_model(hf_t, device=device, dtype=dtype, max_seq_len=max_len)
        ctl = make_controller(think.args.dim, base.args.dim, s["latents"], s["seed"], device)
        common.sync(device)
        doc["models"] = dict(build_s=time.perf_counter() - t0, base_args=dataclasses.asdict(base.args),
                             thinking_args=dataclasses.asdict(think.args), max_seq_len=max_len)
        print(f"models built in {doc['models']['build_s']:.1f} s ({base.args.n_layers} layers, dim {base.args.dim}, "
              f"vocab {base.args.vocab_size})", flush=True)
    except Exception as e:  # noqa: BLE001 -- nothing else can run; record it
        doc["errors"].append(dict(section="build", **common.error_record(e)))
        print(f"ERROR building the models: {doc['errors'][-1]['error']}")
        save()
        return 1

    V = base.args.vocab_size
    prompts = {B: (make_prompts(B, Pb, V, 1000 * s["seed"] + B), make_prompts(B, Pt, V, 1000 * s["seed"] + B + 500))
               for B in s["batches"]}

    def record(rec: dict, label: str, fmt_keys=("tokens_per_s", "ms_per_token", "steered_share")):
        doc["results"].append(rec)
        if "error" in rec:
            print(f"  {label}: ERROR {rec['error']}", flush=True)
        else:
            print(f"  {label}: " + ", ".join(f"{k} {common.fmt(rec[k])}" for k in fmt_keys)
                  + (" (truncated)" if rec.get("truncated") else ""), flush=True)
        save()

    run = _Sections(doc, s, device, prompts, [s["rate"] if g == "rate" else g for g in s["gates"]], ctl, record, save,
                    cases)
    if "steerfast" in s["sections"]:
        section_steerfast(run, base, think)
    if "floor" in s["sections"]:
        section_floor(run, base, think, bw, common.matmul_peak(device, dtype) if run.cases.lost_at is None else None)
    if "paper" in s["sections"]:
        section_paper(run, base, think, hf_b, hf_t)
    del base, think
    run.cases.fresh()
    if "naive" in s["sections"]:
        section_naive(run, hf_b, hf_t)
    del hf_b, hf_t
    run.cases.fresh()
    run.cases.finish()

    save()
    print()
    print(common.format_table(doc["summary"], COLUMNS))
    if doc["contexts"]:
        print("\nagainst the paper's loop by context (batch 1, gate " + gate_name(s["rate"]) + "):")
        print(common.format_table(doc["contexts"], CONTEXT_COLUMNS))
    print("\ntargets" + ("" if cuda else " (set for an H100: not checked on CPU)") + ":")
    for t in doc["targets"]:
        mark = ("ok  " if t["met"] else "MISS") if cuda and t["met"] is not None else "n/a " if not cuda else "MISS"
        print(f"  {mark} {t['target']}: {common.fmt(t['value'])}")
    errors = [r for r in doc["results"] + doc["paper"] + doc["floor"] + doc["errors"] if "error" in r]
    if errors:
        print(f"\n{len(errors)} error(s) (full text and tracebacks in the JSON):")
        for r in errors:
            where = " ".join(f"{k}={r[k]}" for k in ("impl", "config", "batch", "gate", "section") if k in r)
            print(f"  {where}: {r['error'][:300]}")
    out = common.write_json(args.out, doc)
    rows = doc["summary"]
    png = common.save_bar_chart(
        out.with_suffix(".png"), [f"{r['config']} b{r['batch']} {r['gate']}" for r in rows],
        {"steerfast": [r.get("sf_tok_s") for r in rows], "naive transformers": [r.get("naive_tok_s") for r in rows],
         "paper's loop": [r.get("paper_tok_s") for r in rows],
         "floor (bytes + candidate FLOPs)": [r.get("floor_tok_s") for r in rows]},
        f"hybrid tokens/s, {doc['env']['device_name']}, {doc['env']['dtype']}")
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return 1 if errors else 0
