"""Kernels and bytes of one decode step and one hybrid step at real model shapes, counted on the CPU.

    python -m bench count                       (Qwen2.5-1.5B shapes, batches 1 and 16; ~1 min each)
    python -m bench count --model llama-3.1-8b --batches 1

No GPU, and no kernel runs: the step is issued on the Triton path (STEERFAST_BACKEND=triton) with
every Triton launch counted by steerfast.launch_count and then skipped (a dry run: no value in a
step decides its control flow, so the launches are the GPU's). Aten ops (the embedding gather, the
hybrid's small ops and the thinking model's lm_head GEMM) do run. At batch 1 also one steered row's
candidate re-runs at the paper's grid (--coefs x windows 0, -1, -15, -50, -100), with the packed
windows' attention block by block (as it runs) and row by row (as before the window kernel).
Reported per step: kernels, bytes read (each kernel's inputs once, the KV cache up to each row's
length, or each query block's: L2 reuse between rows and blocks is not modelled, so candidate rows
re-reading their sequence's prefix count in full) and the floor's arithmetic bytes
(bench.decode.bytes_per_step). Random bf16 weights; prompts of --context tokens.
"""
from __future__ import annotations

import os
import time

import torch

from . import common

COLUMNS = [("what", "step"), ("batch", "batch"), ("kernels", "kernels"), ("gb_read", "GB read"),
           ("attn_gb", "attention GB"), ("floor_gb", "floor GB"), ("ratio", "read / floor"), ("syncs", "syncs")]


def add_arguments(p) -> None:
    p.add_argument("--model", default="qwen2.5-1.5b", help="preset shape of both models (default qwen2.5-1.5b)")
    p.add_argument("--batches", type=common.int_list, default=[1, 16], help="default 1,16")
    p.add_argument("--context", type=int, default=192, help="tokens in each sequence at the step (default 192)")
    p.add_argument("--coefs", type=int, default=10,
                   help="coefficients of both hybrids: windows [-1], and the grid at batch 1 (default 10)")
    p.add_argument("--out", default=str(common.REPO_ROOT / "bench" / "out" / "count.json"))


def _dry_run(self, *args, **kwargs):
    """A Triton launch that does not run; the greedy ids it would write stay valid token ids."""
    if getattr(self.fn, "__name__", "") == "_argmax_reduce_kernel":
        args[2].zero_()


def run(args) -> int:
    os.environ["STEERFAST_BACKEND"] = "triton"
    os.environ.setdefault("TRITON_INTERPRET", "1")  # set before triton is imported: CPU tensors launch
    from triton.runtime import interpreter, jit

    import steerfast as sf
    from steerfast.presets import SHAPES, random_hf_model

    from .decode import bytes_per_step, counted_step
    from .hybrid import make_controller
    from .hybrid_cost import counted_candidates, counted_fast_step

    if args.model not in SHAPES:
        raise SystemExit(f"error: --model {args.model!r} is not a preset; choose from {sorted(SHAPES)}")
    for cls in (interpreter.InterpretedFunction, jit.JITFunction):
        cls.run = _dry_run
    cpu, dtype, C = torch.device("cpu"), torch.bfloat16, args.context
    t0 = time.perf_counter()
    models = [sf.load_model(random_hf_model(args.model, cpu, dtype, seed=s), device=cpu, dtype=dtype,
                            max_seq_len=C + 16) for s in (0, 1)]
    base, think = models
    n = base.args.n_layers
    sae, vectors, bias = make_controller(think.args.dim, base.args.dim, 15, 0)
    layers = dict(sae_layer=min(18, n - 1), steer_layer=max(0, min(10, n - 2)))  # >= 1 layer re-run
    coefs = [0.1 * (i + 1) for i in range(args.coefs)]
    rows = []
    for B in args.batches:
        base.ensure_cache(B, C + 16)
        c = counted_step(base, B, C)
        floor = bytes_per_step(base, B, C)["total"]
        rows.append(dict(what="decode", batch=B, kernels=c["kernels"], gb_read=c["bytes_read"] / 1e9,
                         floor_gb=floor / 1e9, ratio=c["bytes_read"] / floor, syncs=c["syncs"]))
        h = sf.Hybrid(base, think, sae, vectors, bias, **layers,
                      coefs=coefs, windows=[-1], gate=0.12)
        prompts = [[1] * C] * B
        h.generate(prompts, prompts, max_new_tokens=2, eos_token_id=None)  # caches and the step's buffers
        c = counted_fast_step(h, B, C)
        floor = bytes_per_step(base, B, C)["total"] + bytes_per_step(think, B, C)["total"]
        rows.append(dict(what=f"hybrid, windows [-1], {args.coefs} coefs", batch=B, kernels=c["kernels"],
                         gb_read=c["bytes_read"] / 1e9, floor_gb=floor / 1e9, ratio=c["bytes_read"] / floor,
                         syncs=c["syncs"]))
        if B == 1:  # one steered row's candidates at the paper's grid: attention block by block and row by row
            g = sf.Hybrid(base, think, sae, vectors, bias, **layers,
                          coefs=coefs, windows=[0, -1, -15, -50, -100],
                          gate=0.12, scratch_rows=64, max_packed_tokens=8192)
            g.generate(prompts, prompts, max_new_tokens=2, eos_token_id=None)  # caches with scratch rows
            for per_row in (False, True):
                c = counted_candidates(g, C, per_row)
                rows.append(dict(what=f"grid candidates of 1 steered row ({c['candidates']}), attention "
                                      + ("per row" if per_row else "per block"),
                                 batch=1, kernels=c["kernels"], gb_read=c["bytes_read"] / 1e9,
                                 attn_gb=c["attention_bytes"] / 1e9, syncs=c["syncs"]))
        for m in models:
            m.release()
    doc = dict(bench="count", model=args.model, context=C, dtype="bf16", rows=rows,
               wall_s=time.perf_counter() - t0, env=common.environment(cpu, dtype, getattr(args, "argv", [])))
    print(common.format_table(rows, COLUMNS))
    print(f"\nwrote {common.write_json(args.out, doc)}")
    return 0
