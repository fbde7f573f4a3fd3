"""Decode throughput: steerfast vs HF transformers `generate` vs the memory-bandwidth floor.

Models carry random weights in real checkpoints' shapes (steerfast.presets): decode speed depends
on shapes, not values, and nothing can be downloaded. Each is built as a transformers model
directly on the device in the bench dtype, and steerfast loads those same weights.

For each model x batch, on the same random prompts (every row `--prompt-len` tokens):
  steerfast   m.generate(eos_token_id=None): every row runs to --new-tokens. One warm-up call
              (captures the CUDA graph for this batch bucket, compiles Triton), then one timed
              call; tokens/s = batch * new tokens / wall time (prefill included).
  latency     a second call with a `callback` that records time.perf_counter() per step; the
              differences between successive steps give p50/p99 per-token latency. Callback mode
              syncs the host with the device every step, so it runs a little slower than above.
  hf          transformers generate, greedy, min_new_tokens = max_new_tokens = --hf-new-tokens,
              after a short warm-up; tokens/s the same way.
  floor       batch / (bytes read per decode step / measured copy bandwidth), with bytes read =
              the weights read per step + the KV cache read at the run's mean context length.
              '% floor' is steerfast tokens/s over it; '% floor decode' leaves the prefill out
              (the timed run's wall time less the callback run's prefill time).

Each case (model x batch x variant) starts from fresh caches and graphs; one that fails is
recorded with its traceback and the rest still run. On CUDA (--isolate auto) they run in a worker
process, and after a case that lost the CUDA context (a kernel fault is sticky) or killed the
worker, in a fresh one, all into one JSON (common.supervise).

On a GPU, from the repository root:  python -m bench decode   (writes bench/out/decode.json)
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings

import torch

from steerfast import progress
from steerfast.presets import random_hf_model

from . import common

CUDA_MODELS = "qwen2.5-1.5b,llama-3.1-8b"
CPU_MODELS = "tiny"

# opt-in settings of the decode kernels, to be measured against each other before one becomes the default
VARIANTS = {"default": {}, "pdl": {"STEERFAST_PDL": "1"}, "splitk": {"STEERFAST_SPLIT_K": "auto"},
            "pdl+splitk": {"STEERFAST_PDL": "1", "STEERFAST_SPLIT_K": "auto"}, "top-p": {}}
# variants that sample instead of decoding greedily: what the sampling step costs over the greedy head
SAMPLING = {"top-p": dict(temperature=1.0, top_p=0.9, seed=0)}
COLUMNS = [
    ("model", "model"), ("batch", "batch"), ("variant", "variant"),
    ("sf_tok_s", "steerfast tok/s"), ("sf_p50_ms", "p50 ms"), ("sf_p99_ms", "p99 ms"),
    ("hf_tok_s", "HF tok/s"), ("speedup", "vs HF"),
    ("floor_tok_s", "floor tok/s"), ("pct_floor", "% floor"), ("pct_floor_decode", "% floor decode"),
    ("kernels", "kernels/step"), ("step_mb", "MB read/step"), ("weight_mb", "weights MB"),
]


def add_arguments(p) -> None:
    p.add_argument("--models", type=common.str_list, default=None,
                   help=f"comma-separated shapes from steerfast.presets (default: {CUDA_MODELS} on CUDA, "
                        f"{CPU_MODELS} on CPU)")
    p.add_argument("--batches", type=common.int_list, default=None, help="default 1,16,64 on CUDA, 1,4 on CPU")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=None, help="default 256 on CUDA, 32 on CPU")
    p.add_argument("--hf-new-tokens", type=int, default=None,
                   help="new tokens for HF generate (default min(64, --new-tokens) on CUDA, --new-tokens on CPU)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers generate")
    p.add_argument("--variants", type=common.str_list, default=["default"],
                   help=f"comma-separated among {','.join(VARIANTS)}: each model x batch once per variant "
                        "(pdl: STEERFAST_PDL=1, programmatic dependent launch, compute capability >= 9; splitk: "
                        "STEERFAST_SPLIT_K=auto; top-p: sampling, temperature 1, top_p 0.9, without the HF "
                        "comparison); default: default")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="size of the bandwidth-measuring copy (default 1024 on CUDA, 256 on CPU)")
    common.add_case_arguments(p)
    p.add_argument("--out", default=str(common.REPO_ROOT / "bench" / "out" / "decode.json"),
                   help="JSON output path (default bench/out/decode.json)")


# ---------------------------------------------------------------- models
def attention_backend(device) -> dict:
    """The decode-attention backend steerfast picks on `device`, as steerfast.ops does."""
    from steerfast import backend, ops

    implemented = ops.decode_attention_backends()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chosen = backend.choose("decode_attention", torch.device(device), implemented)
    names = {"cuda": "flash-attn (flash_attn_with_kvcache)", "triton": "steerfast Triton kernel",
             "torch": "torch reference (SDPA)"}
    return dict(op="decode_attention", implemented=list(implemented), chosen=chosen, description=names[chosen])


def bytes_per_step(m, batch: int, mean_context: float) -> dict:
    """Bytes one decode step must read.

    Weights: we use the bytes of the parameters steerfast actually holds, minus the input
    embedding table when it is untied (a step gathers only `batch` rows of it; the LM head is
    read whole). ModelArgs.weight_bytes(dtype) is recorded beside it for comparison: it counts
    the untied input embedding as read (overstating Llama-3.1-8B's step by ~1.05 GB, ~7%) and
    leaves out norm weights and biases (a few hundred KB).
    """
    a, net = m.args, m.net
    el = m.dtype.itemsize
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    embed_bytes = net.tok_embeddings.weight.numel() * el
    gathered = batch * a.dim * el  # the embedding rows a step looks up
    weights = param_bytes if a.tie_word_embeddings else param_bytes - embed_bytes + gathered
    kv_per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * el
    kv = kv_per_token * batch * mean_context
    args_bytes = a.weight_bytes(m.dtype)
    return dict(weight_bytes_modelargs=args_bytes, param_bytes=param_bytes,
                modelargs_vs_params=(args_bytes - param_bytes) / param_bytes,
                weight_bytes_read=weights, kv_bytes_per_token=kv_per_token, mean_context=mean_context,
                kv_bytes_read=kv, total=weights + kv)


# ---------------------------------------------------------------- one model x batch
def bench_steerfast(m, prompts, new_tokens: int, device, sampling: dict | None = None) -> dict:
    batch = len(prompts)
    kw = dict(max_new_tokens=new_tokens, eos_token_id=None, **(sampling or {}))
    m.generate(prompts, **kw)  # warm-up: same shape, so the graph it captures is the one timed
    out, wall = common.timed(lambda: m.generate(prompts, **kw), device)
    n = sum(len(o) for o in out)
    assert n == batch * new_tokens, f"expected {batch * new_tokens} tokens, got {n}"

    stamps: list[float] = []
    common.sync(device)
    t0 = time.perf_counter()
    m.generate(prompts, callback=lambda step, toks: stamps.append(time.perf_counter()), **kw)
    common.sync(device)
    wall_cb = time.perf_counter() - t0
    lat = [b - a for a, b in zip(stamps, stamps[1:])]  # one decode step each (prefill excluded)
    prefill = stamps[0] - t0  # prompt to first token, on the host clock
    decode_s = wall - prefill
    return dict(tokens=n, wall_s=wall, tokens_per_s=n / wall,
                decode_tokens_per_s=batch * (new_tokens - 1) / decode_s if decode_s > 0 else None,
                callback_run=dict(wall_s=wall_cb, tokens_per_s=n / wall_cb, prefill_s=prefill,
                                  steps=len(lat),
                                  latency_ms=dict(p50=1e3 * common.percentile(lat, 50),
                                                  p99=1e3 * common.percentile(lat, 99),
                                                  mean=1e3 * sum(lat) / max(1, len(lat)),
                                                  min=1e3 * min(lat, default=float("nan")),
                                                  max=1e3 * max(lat, default=float("nan")))),
                _out=out)


def counted_step(m, batch: int, context: int) -> dict:
    """Kernels and bytes read of one greedy decode step of `batch` rows at `context` tokens, counted
    by steerfast.launch_count (run eagerly once on the buffers generate uses: a GPU graph replays the
    same kernels)."""
    from steerfast.launch_count import count_launches

    step = m.eager_step(batch, context)
    with count_launches() as n:
        step()
    return dict(kernels=n.total, bytes_read=n.total_bytes, syncs=n.syncs, context=context,
                bytes_by_kernel=dict(n.bytes_read.most_common()),
                kernels_by_name=dict((n.aten + n.triton).most_common()))


def bench_hf(hf, prompts, new_tokens: int, device) -> dict:
    ids = torch.tensor(prompts, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def gen(n):
        return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    gen(min(8, new_tokens))  # warm-up
    out, wall = common.timed(lambda: gen(new_tokens), device)
    new = out[:, ids.shape[1]:]
    n = new.numel()
    assert new.shape == (len(prompts), new_tokens), f"HF generated {tuple(new.shape)}"
    return dict(tokens=n, wall_s=wall, tokens_per_s=n / wall, _out=new.tolist())


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------- the command
NOTES = dict(
    tokens_per_s="batch * new tokens / wall time of one generate call after one warm-up call, device "
                 "synchronised before and after; includes the prefill; eos_token_id=None so every row "
                 "runs to max_new_tokens",
    decode_tokens_per_s="batch * (new_tokens - 1) / (wall_s - callback_run.prefill_s): the timed run's "
                        "decode steps alone, its prefill time taken from the callback run",
    latency="from a separate generate call with a callback recording time.perf_counter() per step: "
            "differences between successive steps (prefill excluded). Callback mode syncs host and "
            "device every step, so its tokens/s (callback_run) is a little below tokens_per_s",
    hf="transformers generate, greedy, min_new_tokens = max_new_tokens = hf_new_tokens (may be fewer "
       "than new_tokens: its mean context is shorter), same prompts and weights, after a short warm-up. "
       "agreeing_prefix_mean is informational only (random weights give near-tied logits)",
    floor="batch / (bytes_per_step.total / copy bandwidth). bytes_per_step = weight_bytes_read (the "
          "parameters steerfast holds, less the untied input-embedding table of which a step gathers "
          "only batch rows) + KV bytes at the mean context prompt_len + new_tokens / 2. "
          "weight_bytes_modelargs is ModelArgs.weight_bytes(dtype), for comparison",
    counted_step="one greedy decode step (batch rows at the mean context) run eagerly under "
                 "steerfast.launch_count: its kernels and the bytes they read (each kernel's input buffers, "
                 "the KV cache up to each row's length, gathers' rows), beside the floor's arithmetic bytes "
                 "(counted_vs_floor_bytes: 1.0 means the step reads nothing beyond weights and KV)",
    fraction_of_floor="steerfast tokens_per_s / floor tokens/s (prefill included, so an understatement: "
                      "the floor counts decode steps only); fraction_of_floor_decode uses decode_tokens_per_s",
    errors="a model x batch that raised is recorded with an `error` and the run goes on; exit status 1",
)


def bench_one(m, hf, name: str, batch: int, args, P: int, N: int, H: int, bw: dict, device,
              sampling: dict | None = None) -> dict:
    """Everything measured for one model x batch (see the module docstring)."""
    g = torch.Generator().manual_seed(args.seed * 7919 + batch)
    prompts = torch.randint(0, m.args.vocab_size, (batch, P), generator=g).tolist()
    sfr = bench_steerfast(m, prompts, N, device, sampling)
    sf_out = sfr.pop("_out")
    hfr = None
    if hf is not None:
        try:
            hfr = bench_hf(hf, prompts, H, device)
        except torch.cuda.OutOfMemoryError as e:  # HF's cache at a large batch: keep steerfast's numbers
            common.free_memory(device)
            hfr = dict(error=f"{type(e).__name__}: {e}".splitlines()[0])
        else:
            hf_out = hfr.pop("_out")
            hfr.update(new_tokens=H, attn_implementation=getattr(hf.config, "_attn_implementation", None),
                       agreeing_prefix_mean=sum(common_prefix(a, b) for a, b in zip(sf_out, hf_out)) / batch)
    floor_bytes = bytes_per_step(m, batch, P + N / 2)
    floor = batch * bw["bytes_per_s"] / floor_bytes["total"]
    counted = counted_step(m, batch, round(P + N / 2))
    dec = sfr["decode_tokens_per_s"]
    hf_tps = None if hfr is None else hfr.get("tokens_per_s")
    return dict(model=name, batch=batch, prompt_len=P, new_tokens=N, cuda_graphs=not m.eager,
                steerfast=sfr, hf=hfr,
                floor=dict(bytes_per_step=floor_bytes, bandwidth_bytes_per_s=bw["bytes_per_s"], tokens_per_s=floor),
                counted_step=counted, counted_vs_floor_bytes=counted["bytes_read"] / floor_bytes["total"],
                fraction_of_floor=sfr["tokens_per_s"] / floor,
                fraction_of_floor_decode=None if dec is None else dec / floor,
                speedup_vs_hf=None if hf_tps is None else sfr["tokens_per_s"] / hf_tps)


def table_row(r: dict) -> dict:
    if "error" in r:
        return dict(model=r["model"], batch=r["batch"], variant=r.get("variant"), sf_tok_s="error")
    lat, hf = r["steerfast"]["callback_run"]["latency_ms"], r["hf"] or {}
    hf_tps = "error" if "error" in hf else hf.get("tokens_per_s")
    pct = lambda x: None if x is None else 100 * x  # noqa: E731
    return dict(model=r["model"], batch=r["batch"], variant=r.get("variant"), sf_tok_s=r["steerfast"]["tokens_per_s"],
                sf_p50_ms=lat["p50"],
                sf_p99_ms=lat["p99"], hf_tok_s=hf_tps,
                speedup=r["speedup_vs_hf"], floor_tok_s=r["floor"]["tokens_per_s"],
                pct_floor=pct(r["fraction_of_floor"]), pct_floor_decode=pct(r["fraction_of_floor_decode"]),
                kernels=r["counted_step"]["kernels"], step_mb=r["counted_step"]["bytes_read"] / 1e6,
                weight_mb=r["floor"]["bytes_per_step"]["weight_bytes_read"] / 1e6)


def run(args) -> int:
    if common.supervises(args):
        return common.supervise(args)
    import transformers

    import steerfast as sf

    transformers.logging.set_verbosity_error()
    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = common.DTYPES[args.dtype]
    models = args.models or common.str_list(CUDA_MODELS if cuda else CPU_MODELS)
    batches = args.batches or ([1, 16, 64] if cuda else [1, 4])
    P = args.prompt_len
    N = args.new_tokens or (256 if cuda else 32)
    H = args.hf_new_tokens or (min(64, N) if cuda else N)
    if P < 1 or N < 2 or H < 1 or min(batches) < 1:
        raise SystemExit("error: --prompt-len, --hf-new-tokens and batches must be >= 1, --new-tokens >= 2")

    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"error: unknown --variants {bad}; choose from {list(VARIANTS)}")
    env = common.environment(device, dtype, getattr(args, "argv", []))
    env["attention_backend"] = attention_backend(device)
    print(f"device: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
          f"transformers {env['transformers']} | {env['dtype']} | decode attention: {env['attention_backend']['chosen']}")
    copy_mib = args.copy_mib or (1024 if cuda else 256)
    bw = common.copy_bandwidth(device, copy_mib << 20, repeats=10 if cuda else 5)
    print(f"copy bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s (read + write, {copy_mib} MiB copy, "
          f"best of {bw['repeats']})")

    doc = dict(bench="decode", env=env,
               settings=dict(models=models, batches=batches,
                             variants={v: dict(VARIANTS[v], **SAMPLING.get(v, {})) for v in args.variants},
                             prompt_len=P, new_tokens=N, hf_new_tokens=H,
                             hf=not args.no_hf, dtype=env["dtype"], device=str(device), seed=args.seed,
                             weight_init="N(0, 0.02) weights and biases, unit norm weights",
                             steerfast_load_model="eager=None (the default: CUDA graphs on CUDA, eager on CPU)"),
               copy_bandwidth=bw, notes=NOTES, models={}, results=[])
    bar = progress.bar(total=len(models) * len(batches) * len(args.variants), desc="bench decode", unit="case",
                       leave=False)
    cases = common.Cases(args, device, doc, lambda: common.write_json(args.out, doc),
                         len(models) * len(batches) * len(args.variants), lists=("results",), dicts=("models",))
    for name in models:
        if not cases.runs_any(len(batches) * len(args.variants)):
            continue
        try:
            t0 = time.perf_counter()
            hf = random_hf_model(name, device, dtype, seed=args.seed)
            m = sf.load_model(hf, device=device, dtype=dtype, max_seq_len=P + max(N, H))
            common.sync(device)
        except Exception as e:  # noqa: BLE001 -- every case of this model records it; the others still run
            hf = m = None
            built = common.error_record(e)
            print(f"\n{name}: ERROR building it: {built['error']}", flush=True)
        else:
            built = None
            doc["models"][name] = dict(build_s=time.perf_counter() - t0, model_args=dataclasses.asdict(m.args))
            print(f"\n{name}: built in {doc['models'][name]['build_s']:.1f} s ({m.args.n_layers} layers, "
                  f"dim {m.args.dim}, CUDA graphs {'off' if m.eager else 'on'})", flush=True)
        for batch in batches:
            for variant in args.variants:
                if not cases.start():
                    continue
                if built is not None:
                    doc["results"].append(dict(model=name, batch=batch, variant=variant, **built))
                    cases.done()
                    continue
                cases.fresh(m)  # each case from fresh caches and graphs: an earlier one cannot break it
                saved = {k: os.environ.get(k) for k in ("STEERFAST_PDL", "STEERFAST_SPLIT_K")}
                os.environ.update(VARIANTS[variant])
                try:
                    cases.inject()
                    hf_cmp = None if args.no_hf or variant in SAMPLING else hf  # HF's is greedy
                    r = dict(bench_one(m, hf_cmp, name, batch, args, P, N, H, bw, device, SAMPLING.get(variant)),
                             variant=variant)
                except Exception as e:  # noqa: BLE001 -- an unattended run records the failure and goes on
                    r = dict(model=name, batch=batch, variant=variant, **common.error_record(e))
                    print(f"  batch {batch} {variant}: ERROR {r['error']}", flush=True)
                    cases.failed()
                else:
                    row = table_row(r)
                    print(f"  batch {batch}: " + ", ".join(f"{h} {common.fmt(row[k])}" for k, h in COLUMNS[2:]),
                          flush=True)
                finally:
                    for k, v in saved.items():
                        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
                doc["results"].append(r)
                cases.done()  # saved: a crash later loses nothing
                bar.update()
        if built is not None:
            cases.failed()  # after the model's last case: a lost context resumes with the next model
        del hf, m
        cases.fresh()
    cases.finish()

    bar.close()
    print()
    print(common.format_table([table_row(r) for r in doc["results"]], COLUMNS))
    out = common.write_json(args.out, doc)
    rows = [table_row(r) for r in doc["results"] if "error" not in r]
    png = common.save_bar_chart(
        out.with_suffix(".png"), [f"{r['model']} b{r['batch']} {r['variant']}" for r in rows],
        {"steerfast": [r["sf_tok_s"] for r in rows],
         "HF generate": [r["hf_tok_s"] if isinstance(r["hf_tok_s"], float) else None for r in rows],
         "bandwidth floor": [r["floor_tok_s"] for r in rows]},
        f"decode tokens/s, {env['device_name']}, {env['dtype']}")
    print(f"\nwrote {out}" + (f" and {png}" if png else ""))
    return 1 if any("error" in r for r in doc["results"]) else 0
