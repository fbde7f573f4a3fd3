"""The `sample` section of `python -m bench kernels`: one decode step's token choice from its logits,
steerfast.sampling.sample with temperature 1, top_p 0.9 (the nucleus) on a preset's vocabulary.

Backends: `triton` (kernels/sample.py: one program per row, the nucleus by radix selection, the
noise hashed in place) and `torch` (the reference: sorts each row, writes the [B, V] noise). Per
case: time, GB/s of the logits read once, time / torch time, and the share of rows whose token is
the reference's (a near-tie of two noisy scores may differ by the GPU's log; a wrong nucleus would
not agree). Which backend a step should use at which batch is this table's question: the kernel
reads each row ~11 times from one SM, the sort spreads a row over the GPU.

This module holds the cases, inputs, measurement and bytes; bench/kernels.py dispatches.
"""
from __future__ import annotations

import torch

from . import common

OP = "sample"
BACKENDS = ("triton", "torch")
DEFAULTS = dict(sample_batches=("1,16,64", "1,4"), sample_vocab=(151936, 1000))
COLUMNS = [("batch", "batch"), ("vocab", "vocab"), ("backend", "backend"), ("us", "us"), ("loop_us", "loop us"),
           ("gbps", "GB/s"), ("vs_base", "vs torch"), ("agree", "same token"), ("fit", "rows fit")]
DEFINITIONS = dict(
    sample_bytes="logits read once: batch * vocab * 4 (fp32 logits, as the decode step's sampling gets them)",
    sample_agree="share of rows whose token equals the torch reference's (steerfast.sampling.sample_torch)",
    sample_logits="per row N(0, 2.5^2) over the vocabulary plus 32 tokens raised by a uniform 5..20: from "
                  "a confident next token to a spread-out one",
    sample_fit="share of rows whose possible nucleus (tokens at least (1 - top_p) / (2 V) likely) fits the "
               "kernel's candidate slots; the other rows select over their whole row",
)


def add_arguments(p) -> None:
    d = lambda key: f"default {DEFAULTS[key][0]} on CUDA, {DEFAULTS[key][1]} on CPU"  # noqa: E731
    p.add_argument("--sample-batches", type=common.int_list, default=None, help=f"sample: rows ({d('sample_batches')})")
    p.add_argument("--sample-vocab", type=int, default=None, help=f"sample: vocabulary ({d('sample_vocab')})")


def settings(args, s: dict, cuda: bool) -> None:
    i = 0 if cuda else 1
    s["sample_batches"] = args.sample_batches or common.int_list(DEFAULTS["sample_batches"][i])
    s["sample_vocab"] = args.sample_vocab or DEFAULTS["sample_vocab"][i]
    if min(s["sample_batches"], default=1) < 1 or s["sample_vocab"] < 1:
        raise SystemExit("error: --sample-batches and --sample-vocab must be >= 1")


def backends(s: dict) -> list[str]:
    return [b for b in s["backends"] if b in BACKENDS] or ["torch"]


def cases(s: dict) -> list[dict]:
    return [dict(op=OP, batch=b, vocab=s["sample_vocab"]) for b in s["sample_batches"]]


def measure(case: dict, backend: str, s: dict, device, dtype, timer) -> dict:
    from steerfast import sampling
    from steerfast.kernels.sample import CANDIDATE_SLOTS

    B, V = case["batch"], case["vocab"]
    g = torch.Generator().manual_seed(s["seed"] * 7919 + B)
    logits = torch.randn(B, V, generator=g) * 2.5
    logits[:, :32] += 5 + 15 * torch.rand(B, 1, generator=g)  # a few likely tokens, more or less ahead
    logits = logits.to(device)
    f32 = lambda v: torch.full((B,), v, dtype=torch.float32, device=device)  # noqa: E731
    args = (logits, f32(1.0), torch.full((B,), V, device=device), f32(0.9),
            torch.arange(B, device=device), torch.full((B,), 1000, dtype=torch.int32, device=device))

    def fn():
        return sampling.sample(*args, "filter", backend=backend)
    agree = (fn() == sampling.sample_torch(*args, True)).float().mean().item()
    fit = ((logits.softmax(-1) >= (1 - 0.9) / (2 * V)).sum(-1) <= CANDIDATE_SLOTS).float().mean().item()
    return dict(**timer(fn, flush=False), agree=agree, fit=fit)


def postprocess(recs: list[dict]) -> None:
    base = {r["batch"]: r.get("us") for r in recs if r["backend"] == "torch" and "error" not in r}
    for r in recs:
        r["bytes"] = r["batch"] * r["vocab"] * 4
        if "error" in r or not r.get("us"):
            continue
        r["gbps"] = r["bytes"] / r["us"] / 1e3
        r["vs_base"] = r["us"] / base[r["batch"]] if base.get(r["batch"]) else None


def print_table(recs: list[dict], short) -> None:
    rows = [dict(r, us="ERROR: " + short(r["error"], 40)) if "error" in r else r for r in recs]
    print("\nsample (temperature 1, top_p 0.9: the nucleus and a Gumbel-max token per row)")
    print(common.format_table(rows, COLUMNS))
