"""What a hybrid step costs, beside what it takes: the floor a configuration can reach (both models'
bytes at the copy bandwidth, the candidate re-runs' FLOPs at the matmul peak), the step's kernels
and bytes counted on the buffers it ran with, and the paper's own loop timed on the same prompts.
bench/hybrid.py runs the sections; these are its measurements and arithmetic."""
from __future__ import annotations

from steerfast.hybrid.reference import paper_hybrid

from . import common


def counted_fast_step(h, batch: int, context: int) -> dict | None:
    """Kernels and bytes read of one device-side step (windows [-1]) of `batch` rows at `context`
    tokens, counted by steerfast.launch_count on the buffers generate used; None for the host loop."""
    from steerfast.launch_count import count_launches

    step = h.eager_step(batch, context)
    if step is None:
        return None
    with count_launches() as n:
        step()
    return dict(kernels=n.total, bytes_read=n.total_bytes, syncs=n.syncs, context=context,
                bytes_by_kernel=dict(n.bytes_read.most_common()))


def counted_candidates(h, context: int, per_row: bool = False) -> dict:
    """Kernels and bytes read of one steered row's candidate re-runs (every coefficient x window of
    h's grid) at `context` tokens, counted by steerfast.launch_count; per_row: with the packed
    windows' attention served row by row (the decode-attention kernel), not block by block."""
    from steerfast import ops
    from steerfast.launch_count import count_launches

    run = h.eager_candidates(context)
    attention = ops.decode_attention
    if per_row:
        ops.decode_attention = lambda *a, query_blocks=None, **k: attention(*a, **k)
    try:
        with count_launches() as n:
            run()
    finally:
        ops.decode_attention = attention
    attn = {k: v for k, v in n.bytes_read.items() if "attention" in k}
    return dict(kernels=n.total, bytes_read=n.total_bytes, attention_bytes=sum(attn.values()), syncs=n.syncs,
                candidates=len(h.coefs) * len(h.windows), context=context)


def bench_paper(hf_b, hf_t, ctl, s, cfg, bp: list[int], tp: list[int], unsteered: dict | None) -> dict:
    """The paper's loop on one prompt pair: its time per unsteered token and per steered token."""
    sae, vectors, bias = ctl
    n = s["paper_new_tokens"]
    args = (hf_b, hf_t, sae, vectors, bias, s["sae_layer"], s["steer_layer"])
    dev = hf_b.device
    if unsteered is None:  # once: T, SAE and B per step, never steering
        (toks, flags), wall = common.timed(lambda: paper_hybrid(
            *args, cfg["coefs"], cfg["windows"], bp, tp, n, gate="controller", threshold=float("inf")), dev)
        assert not any(flags) and len(toks) == n
        unsteered = dict(steps=n, wall_s=wall, s_per_token=wall / n)
    (toks, flags), wall = common.timed(lambda: paper_hybrid(
        *args, cfg["coefs"], cfg["windows"], bp, tp, n, gate="thinking"), dev)
    share = sum(flags) / len(flags)
    tu = unsteered["s_per_token"]
    ts = None if share == 0 else (wall / n - (1 - share) * tu) / share
    return dict(new_tokens=n, grid_size=len(cfg["coefs"]) * len(cfg["windows"]), unsteered=unsteered,
                steered_run=dict(steps=n, wall_s=wall, steered_share=share, s_per_token=wall / n),
                t_unsteered_s=tu, t_steered_s=ts)


def paper_s_per_token(p: dict | None, share: float | None) -> float | None:
    if not p or "error" in p or p.get("t_steered_s") is None or share is None:
        return None
    return (1 - share) * p["t_unsteered_s"] + share * p["t_steered_s"]


def candidate_flops(net, steer_layer: int, cfg: dict, context: int) -> float:
    """FLOPs of one steered row's candidate re-runs at `context` tokens: every (coefficient, window)
    candidate runs layers steer_layer+1.. over its window's t positions (2 FLOPs per matmul weight
    per position; attention 4 * heads * head_dim per attended key, position p attending p + 1 keys)
    and the LM head at its last position."""
    a, upper = net.args, net.layers[steer_layer + 1:]
    params = sum(p.numel() for layer in upper for p in layer.parameters() if p.dim() == 2)
    per_key = 4 * a.n_heads * a.head_dim * len(upper)
    total = 0.0
    for w in cfg["windows"]:
        t = context if w == 0 else min(-w, context)
        keys = t * context - t * (t - 1) / 2  # positions context - t .. context - 1
        total += 2 * t * params + per_key * keys + 2 * net.head_weight.numel()
    return total * len(cfg["coefs"])


def bench_floor(base, think, s, batch: int, bw: dict, peak: dict) -> dict:
    from .decode import bytes_per_step

    N = s["new_tokens"]
    bb = bytes_per_step(base, batch, s["base_prompt_len"] + N / 2)
    bt = bytes_per_step(think, batch, s["thinking_prompt_len"] + N / 2)
    total = bb["total"] + bt["total"]
    ctx = round(s["base_prompt_len"] + N / 2)
    flops = {name: candidate_flops(base.net, s["steer_layer"], cfg, ctx) for name, cfg in s["configs"].items()}
    return dict(batch=batch, base_bytes_per_step=bb, thinking_bytes_per_step=bt, total_bytes_per_step=total,
                bandwidth_bytes_per_s=bw["bytes_per_s"], matmul_flops_per_s=peak["flops_per_s"],
                candidate_context=ctx, candidate_flops_per_steered_row=flops,
                unsteered_tokens_per_s=batch * bw["bytes_per_s"] / total,
                unsteered_ms_per_token=1e3 * total / bw["bytes_per_s"])


def floor_tokens_per_s(fl: dict | None, cfg: str, share: float | None) -> float | None:
    """batch / (bytes / bandwidth + share * batch * candidate FLOPs / peak): the configuration's floor."""
    if not fl or share is None:
        return None
    t = (fl["total_bytes_per_step"] / fl["bandwidth_bytes_per_s"]
         + share * fl["batch"] * fl["candidate_flops_per_steered_row"][cfg] / fl["matmul_flops_per_s"])
    return fl["batch"] / t


def contexts_table(doc: dict, s: dict) -> list[dict]:
    """steerfast (batch 1) over the paper's loop at each context, on the same token mix."""
    sf_runs = {(r["config"], r["context"]): r for r in doc["results"] if r["impl"] == "steerfast-context"}
    rows = []
    for p in doc["paper"]:
        r = sf_runs.get((p["config"], p["context"]), {})
        share = r.get("steered_share")
        pt = paper_s_per_token(p, share)
        tps = r.get("tokens_per_s")
        rows.append(dict(config=p["config"], context=p["context"], sf_tok_s="error" if r.get("error") else tps,
                         sf_share=None if share is None else 100 * share, paper_tok_s=1 / pt if pt else None,
                         vs_paper=tps * pt if tps and pt else None))
    return rows
