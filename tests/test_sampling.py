"""Sampling: the nucleus against its definition in float64, and the Triton kernel (no sort) against
the torch reference, token for token over many seeds and positions."""
from __future__ import annotations

import pytest
import torch

from steerfast import sampling

from backends import BACKENDS, DEVICE, TRITON_SKIP, triton_only


def nucleus_by_definition(x: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Token i stays iff fewer than top_k tokens have a larger x and their probability (float64) is
    below top_p: pairwise, O(V^2)."""
    x = x.double()
    p = x.softmax(-1)
    larger = x[:, None, :] > x[:, :, None]  # [B, i, j]: x_j > x_i
    count = larger.sum(-1)
    mass = (larger * p[:, None, :]).sum(-1)
    return (count < top_k[:, None]) & ((mass < top_p[:, None].double()) | (top_p[:, None] >= 1))


def _rows(B, V, ties, g, dtype=torch.float32):
    """Logits in `dtype` with (ties) few distinct values, as bf16 logits have, or none; per-row
    settings with a greedy row, top-k only, top-p only, both and neither; top_p midway between two
    cumulative masses (float64) at least 1e-3 apart, so that float32 rounding cannot move the boundary."""
    logits = torch.randn(B, V, generator=g) * 3
    if ties:
        logits = (logits * 2).round() / 2
    logits = logits.to(dtype)
    temperature = torch.rand(B, generator=g) * 1.5 + 0.5
    temperature[0] = 0.0
    top_k = torch.randint(1, V + 1, (B,), generator=g)
    top_k[1::4] = V
    x = logits.float() / temperature.clamp(min=1e-6)[:, None]
    sx = x.double().sort(-1, descending=True).values
    cum = sx.softmax(-1).cumsum(-1)
    # the mass above each distinct value (the boundaries top_p can fall between)
    starts = torch.cat([torch.ones(B, 1, dtype=torch.bool), sx[:, 1:] != sx[:, :-1]], 1)
    top_p = torch.empty(B)
    for b in range(B):
        masses = torch.cat([torch.zeros(1, dtype=torch.float64), cum[b]])[:-1][starts[b]]
        masses = torch.cat([masses, torch.ones(1, dtype=torch.float64)])
        wide = torch.nonzero(masses[1:] - masses[:-1] >= 1e-3)[:, 0] + 1  # the first: the top token's mass
        i = int(wide[torch.randint(0, len(wide), (1,), generator=g)])
        top_p[b] = float((masses[i - 1] + masses[i]) / 2)
    top_p[2::4] = 1.0
    return logits, temperature, top_k, top_p


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("V", [5, 123, 431])
def test_nucleus_equals_its_definition(V, ties, seed):
    g = torch.Generator().manual_seed(seed)
    logits, temperature, top_k, top_p = _rows(8, V, ties, g)
    x = logits / temperature.clamp(min=1e-6)[:, None]
    assert torch.equal(sampling.nucleus(x, top_k, top_p), nucleus_by_definition(x, top_k, top_p))


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("V", [5, 123, 431])
def test_sample_takes_the_noisiest_kept_token(V, ties, dtype, backend, seed):
    """Each backend's token (through steerfast.sampling.sample) is the Gumbel-max over the nucleus,
    recomputed here in float64 from the same noise: in the kept set, with the largest noisy score;
    a different token only at a near-tie of two scores (the GPU's log is not torch's to the ulp)."""
    if backend == "triton" and TRITON_SKIP:
        pytest.skip(TRITON_SKIP)
    g = torch.Generator().manual_seed(seed)
    B = 8
    logits, temperature, top_k, top_p = _rows(B, V, ties, g, dtype)
    reps = 6  # each row at several positions and seeds: different noise
    rep = lambda t: t.repeat(reps).to(DEVICE)  # noqa: E731
    seeds = torch.randint(0, 2**40, (B * reps,), generator=g)
    pos = torch.randint(0, 10**6, (B * reps,), generator=g, dtype=torch.int32)
    args = (logits.repeat(reps, 1).to(DEVICE), rep(temperature), rep(top_k), rep(top_p), seeds.to(DEVICE),
            pos.to(DEVICE))
    for mode in ("sample", "filter"):
        tok = sampling.sample(*args, mode, backend=backend).cpu()
        x = logits.float().repeat(reps, 1) / temperature.clamp(min=1e-6).repeat(reps)[:, None]
        kept = nucleus_by_definition(x, top_k.repeat(reps), top_p.repeat(reps)) if mode == "filter" \
            else torch.ones_like(x, dtype=torch.bool)
        u = sampling.uniform_noise(seeds, pos, V).double()
        score = torch.where(kept, x.double() - torch.log(-torch.log(u)), float("-inf"))
        greedy = logits.float().argmax(-1).repeat(reps)
        want = torch.where(temperature.repeat(reps) > 0, score.argmax(-1), greedy)
        rows = torch.arange(B * reps)
        assert kept[rows, tok].all(), f"{mode}: a token outside the nucleus (seed={seed})"
        near = (score[rows, tok] - score[rows, want]).abs() <= 1e-5 * (1 + score[rows, want].abs())
        assert ((tok == want) | near).all(), f"{mode}: {tok.tolist()} != {want.tolist()} (seed={seed})"
        assert (tok == want).float().mean() > 0.9


@triton_only
@pytest.mark.parametrize("cap", [1, 40, None], ids=["overflow", "some-fit", "default"])
def test_kernel_candidate_slots(cap, seed):
    """The kernel's candidate slots: rows whose possible nucleus (tokens at least (1 - top_p) / (2 V)
    likely) overflows them select over the whole row; peaked and flat rows, several top_p; the
    token the reference's, near-ties of the noisy score excepted."""
    from steerfast.kernels.sample import CANDIDATE_SLOTS, sample

    g = torch.Generator().manual_seed(seed)
    B, V = 12, 431
    scale = torch.tensor([0.5, 2.0, 8.0]).repeat(B // 3)[:, None]  # flat .. peaked
    logits = (torch.randn(B, V, generator=g) * scale).to(DEVICE)
    temperature = torch.ones(B, device=DEVICE)
    top_k = torch.full((B,), V, device=DEVICE)
    top_p = torch.tensor([0.5, 0.9, 0.99, 0.999]).repeat_interleave(3).to(DEVICE)
    seeds, pos = torch.arange(B, device=DEVICE) + seed % 1000, torch.full((B,), 7, device=DEVICE)
    args = (logits, temperature, top_k, top_p, seeds, pos)
    tok = sample(*args, True, cap=CANDIDATE_SLOTS if cap is None else cap).cpu()
    want = sampling.sample_torch(*args, True).cpu()
    x = logits.cpu().double()
    kept = nucleus_by_definition(x, top_k.cpu(), top_p.cpu())
    score = torch.where(kept, x - torch.log(-torch.log(sampling.uniform_noise(seeds, pos, V).cpu().double())),
                        float("-inf"))
    rows = torch.arange(B)
    assert kept[rows, tok].all()
    assert ((tok == want) | ((score[rows, tok] - score[rows, want]).abs() <= 1e-5)).all(), (tok, want)


def order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 order-preserving keys of float32 x, as kernels/sample.py's _order_key."""
    bits = (x.float() + 0.0).view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >= 2**31, 0xFFFFFFFF - bits, bits + 2**31)


@triton_only
@pytest.mark.parametrize("cap", [3, None], ids=["slots-overflow", "default-slots"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("V", [5, 431, 3001])
def test_kernel_keeps_exactly_the_nucleus(V, ties, cap, seed):
    """The kernel's kept set ({key(x) >= R}, R its selected threshold) equals the nucleus by its
    definition on every sampled row, over the whole row (slots overflowing) or over the candidates
    it compacted (top-p's probability cut and top-k's cut at the k-th largest lane maximum: V = 3001
    puts up to three tokens in each of the 1024 lanes)."""
    from steerfast.kernels.sample import CANDIDATE_SLOTS, sample

    g = torch.Generator().manual_seed(seed)
    B = 16
    logits, temperature, top_k, top_p = _rows(B, V, ties, g, torch.bfloat16)
    top_k[3::4] = torch.randint(1, min(V, 1100) + 1, (len(top_k[3::4]),), generator=g)  # top-k only
    top_p[3::4] = 1.0
    args = [t.to(DEVICE) for t in (logits, temperature, top_k, top_p, torch.arange(B), torch.zeros(B, dtype=torch.int32))]
    _, keep_from = sample(*args, True, cap=CANDIDATE_SLOTS if cap is None else cap, return_keep_from=True)
    x = logits.float() / temperature.clamp(min=1e-6)[:, None]
    kept = order_key(x) >= keep_from.cpu()[:, None]
    want = nucleus_by_definition(x, top_k, top_p)
    rows = temperature > 0  # greedy rows skip the selection
    assert torch.equal(kept[rows], want[rows]), (kept[rows].sum(-1), want[rows].sum(-1))
    assert (keep_from.cpu()[~rows] == 0).all()
