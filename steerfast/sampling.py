"""Token choice on the device: greedy, or temperature / top-k / top-p sampling by Gumbel-max.

The noise is a counter-based hash of (sequence seed, position, token id), not a stateful RNG:
a sequence's samples depend only on its own seed and positions, so runs are reproducible across
batch sizes, eager and CUDA-graph modes, and replaying a graph needs no generator state.
Per-row parameters are tensors, so one captured graph serves any mix of settings.
"""
from __future__ import annotations

import torch

from . import backend as _backend

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, pos: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 in (0, 1), a pure function of (seed[b], pos[b], token id)."""
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    s = _mix32((seed.to(torch.int64) * 0x9E3779B1) & _M32)
    p = _mix32((pos.to(torch.int64) * 0x7FEB352D + 0x165667B1) & _M32)
    x = _mix32((s ^ p)[:, None] ^ ((ids[None, :] * 0x27D4EB2F) & _M32))
    return ((x >> 9).float() + 0.5) * (1.0 / (1 << 23))  # 23 bits: exact in float32, never 1


def nucleus(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the tokens top-k / top-p sampling keeps of x [B, V] (logits / temperature).
    Tie-inclusive, so it does not depend on how a sort orders equal values: token i stays iff fewer
    than top_k[b] tokens have a larger x and their probability is below top_p[b] (the top token
    always stays; top_p 1 keeps every token, even where the rounded mass before it reaches 1)."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    first = torch.searchsorted(-sorted_x, -sorted_x)  # [B, V] where each value's ties begin
    keep = (first < top_k[:, None]) & ((mass_before.gather(-1, first) < top_p[:, None]) | (top_p[:, None] >= 1))
    return torch.zeros_like(keep).scatter(-1, order, keep)


def sample_torch(logits, temperature, top_k, top_p, seed, pos, filter: bool) -> torch.Tensor:
    """The reference: Gumbel-max over the nucleus (found by sorting each row) of logits / temperature."""
    greedy = logits.argmax(-1)
    x = logits.float() / temperature.clamp(min=1e-6)[:, None]
    score = x - torch.log(-torch.log(uniform_noise(seed, pos, x.shape[-1])))
    if filter:
        score = score.masked_fill(~nucleus(x, top_k, top_p), float("-inf"))
    return torch.where(temperature > 0, score.argmax(-1), greedy)


@torch.library.custom_op("steerfast::sample", mutates_args=())
def _sample_op(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               seed: torch.Tensor, pos: torch.Tensor, filter: bool, backend: str) -> torch.Tensor:
    if backend == "triton":
        from .kernels.sample import sample as triton_sample
        return triton_sample(logits, temperature, top_k, top_p, seed, pos, filter)
    return sample_torch(logits, temperature, top_k, top_p, seed, pos, filter)


@_sample_op.register_fake
def _(logits, temperature, top_k, top_p, seed, pos, filter, backend):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def sample(logits, temperature, top_k, top_p, seed, pos, mode: str, backend: str | None = None) -> torch.Tensor:
    """logits [B, V]; temperature, top_p float32 [B]; top_k int64 [B] (V: off); seed int64 [B];
    pos [B]: the position the chosen token will take. mode (host-side, fixed per graph):
    'greedy', 'sample' or 'filter' (sample with top-k/top-p). Rows with temperature 0 are greedy.
    The Triton kernel (one program per row, no sort, no [B, V] noise in memory) on a GPU."""
    if mode == "greedy":
        return logits.argmax(-1)
    b = _backend.choose("sample", logits.device, ("triton", "torch"), backend)
    return _sample_op(logits.contiguous(), temperature, top_k, top_p, seed, pos, mode == "filter", b)
