"""The CUDA-graph owner's lifecycle, without CUDA: a backend that keeps PyTorch's graph-pool
bookkeeping (a pool lives while a graph captured into it lives; capturing into a retired pool is
the allocator's `use_count > 0` assert) and replays a step by running it. Through it the decode loop
and the hybrid take their graph paths on the CPU: recapture after cache growth, new buckets, two
models and two hybrids at once, and replay equal to eager."""
from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch

import steerfast as sf
from steerfast.graphs import GraphRunner
from tiny_models import random_prompts, tiny_hf


class PoolAllocator:
    """What CUDACachingAllocator tracks of graph pools: live graphs per pool, retired pools."""

    def __init__(self):
        self.use_count: dict[int, int] = {}
        self.ids = itertools.count(1)

    def begin(self, pool):
        if pool is None:
            pool = next(self.ids)
            self.use_count[pool] = 0
        elif self.use_count.get(pool, 0) <= 0:  # the real allocator keeps the entry: the assert
            raise RuntimeError("it->second->use_count > 0 INTERNAL ASSERT FAILED (capture into a retired pool)")
        self.use_count[pool] += 1
        return pool

    def end(self, pool):
        self.use_count[pool] -= 1

    @property
    def live_pools(self):
        return sorted(p for p, n in self.use_count.items() if n > 0)


class EagerGraph:
    def __init__(self, alloc: PoolAllocator, pool, step):
        self._pool, self._step = alloc.begin(pool), step
        weakref.finalize(self, alloc.end, self._pool)

    def pool(self):
        return self._pool

    def replay(self):
        self._step()


class EagerBackend:
    def __init__(self, alloc: PoolAllocator | None = None):
        self.alloc = alloc or PoolAllocator()
        self.captures = 0

    def capture(self, step, reset, pool, warmup):
        for _ in range(warmup):
            step()
            reset()
        self.captures += 1
        return EagerGraph(self.alloc, pool, step)

    @staticmethod
    def pool_of(graph):
        return graph.pool()


def test_release_retires_the_pool_and_the_next_capture_opens_a_fresh_one():
    backend = EagerBackend()
    runner = GraphRunner("cpu", backend)
    runner.capture("a", lambda: None)
    runner.capture("b", lambda: None)
    assert len(backend.alloc.live_pools) == 1, "graphs of one runner share one pool"
    assert runner.release(lambda k: k == "a") == 1
    runner.capture("c", lambda: None)  # the pool still lives through "b"
    assert runner.release() == 2
    gc.collect()
    assert backend.alloc.live_pools == []
    runner.capture("a", lambda: None)  # a stale handle here is the allocator's assert
    assert len(backend.alloc.live_pools) == 1
    with pytest.raises(KeyError):
        runner.capture("a", lambda: None)


def test_a_graph_still_held_after_release_keeps_its_pool_and_breaks_nothing():
    backend = EagerBackend()
    runner = GraphRunner("cpu", backend)
    held, _ = runner.capture("a", lambda: None)
    runner.release()
    runner.capture("a", lambda: None)
    assert len(backend.alloc.live_pools) == 2  # the held graph's pool, and the fresh one
    del held
    gc.collect()
    assert len(backend.alloc.live_pools) == 1


def test_the_allocator_model_rejects_a_retired_pool():
    """The model of the allocator is what makes the tests above able to fail: a runner that kept
    the last graph's pool across release() (the old engine._pool) dies here, as it did on the H200."""
    alloc = PoolAllocator()
    g = EagerGraph(alloc, None, lambda: None)
    stale = g.pool()
    del g
    gc.collect()
    with pytest.raises(RuntimeError, match="use_count > 0"):
        EagerGraph(alloc, stale, lambda: None)


def _graphed(hf, backend, **kw):
    return sf.Model(sf.load_model(hf, device="cpu", dtype=torch.float64).net, eager=False, graph_backend=backend, **kw)


def test_decode_recaptures_across_buckets_and_cache_growth_and_equals_eager(seed):
    hf = tiny_hf("qwen2", layers=2)
    backend = EagerBackend()
    graphed = _graphed(hf, backend, max_seq_len=400)
    eager = sf.load_model(hf, device="cpu", dtype=torch.float64, max_seq_len=400)
    runs = [(1, 8), (3, 8), (5, 20), (1, 8), (2, 8)]  # buckets 1 -> 4 -> 8 -> 1 -> 2; a larger bucket grows the cache
    for B, n in runs:
        prompts = random_prompts(torch.randint(3, 9, (B,)).tolist())
        steer = sf.Steering(torch.randn(B, hf.config.hidden_size, dtype=torch.float64), layer=1, coef=0.5)
        for kw in ({}, {"steering": steer}):
            out = graphed.generate(prompts, max_new_tokens=n, eos_token_id=None, **kw)
            assert out == eager.generate(prompts, max_new_tokens=n, eos_token_id=None, **kw)
    assert backend.captures >= 6
    gc.collect()
    assert len(backend.alloc.live_pools) == 1


def test_two_models_hold_graphs_at_once(seed):
    alloc = PoolAllocator()
    a = _graphed(tiny_hf("llama", layers=2), EagerBackend(alloc))
    b = _graphed(tiny_hf("qwen2", layers=2), EagerBackend(alloc))
    p = random_prompts([5, 7])
    outs = [(a.generate(p, 6, eos_token_id=None), b.generate(p, 6, eos_token_id=None)) for _ in range(2)]
    assert outs[0] == outs[1]
    a.release()
    gc.collect()
    assert len(alloc.live_pools) == 1  # b's
    assert b.generate(p, 6, eos_token_id=None) == outs[0][1]
    assert a.generate(p, 6, eos_token_id=None) == outs[0][0]  # recaptured in a fresh pool


VOCAB = 11


def _hybrid_pair(backend):
    hf_b = tiny_hf("llama", n_heads=4, n_kv_heads=2, head_dim=16, layers=3, vocab=VOCAB)
    hf_t = tiny_hf("qwen2", n_heads=6, n_kv_heads=2, head_dim=16, layers=3, vocab=VOCAB)
    n = 5
    sae = sf.TopKSAE(W_enc=torch.randn(96, n, dtype=torch.float64), b_enc=torch.randn(n, dtype=torch.float64),
                     W_dec=torch.randn(n, 96, dtype=torch.float64), b_dec=torch.randn(96, dtype=torch.float64), k=1)
    vectors, bias = torch.randn(n, 64, dtype=torch.float64), 0.3 * torch.randn(64, dtype=torch.float64)
    graphed = [_graphed(hf, backend) for hf in (hf_b, hf_t)]
    eager = [sf.load_model(hf, device="cpu", dtype=torch.float64) for hf in (hf_b, hf_t)]
    return graphed, eager, (sae, vectors, bias)


@pytest.mark.parametrize("windows", [[-1], [0, -1, -3]], ids=["fast-path", "host-loop"])
@pytest.mark.parametrize("gate", ["thinking", "controller", 0.5])
def test_two_hybrids_over_one_pair_recapture_and_equal_eager(gate, windows, seed):
    """The host loop (windows other than [-1]) captures its step graphs after the prefill, when the
    cache holds live sequences: the capture's warm-up runs must leave them as they were."""
    backend = EagerBackend()
    (gb, gt), (eb, et), (sae, vectors, bias) = _hybrid_pair(backend)
    kw = dict(sae_layer=1, steer_layer=1, coefs=[0.5, 2.0, 6.0], windows=windows, gate=gate)
    h1, h2 = (sf.Hybrid(gb, gt, sae, vectors, bias, **kw) for _ in range(2))
    ref = sf.Hybrid(eb, et, sae, vectors, bias, **kw)
    for B, n in [(1, 10), (3, 10), (2, 10)]:  # bucket 3 grows both caches under both hybrids' graphs
        bp, tp = random_prompts(torch.randint(3, 8, (B,)).tolist(), VOCAB), random_prompts([6] * B, VOCAB)
        want = ref.generate(bp, tp, max_new_tokens=n, eos_token_id=None)
        for h in (h1, h2, h1):
            got = h.generate(bp, tp, max_new_tokens=n, eos_token_id=None)
            assert (got.tokens, got.steered, got.category, got.coef) == \
                (want.tokens, want.steered, want.category, want.coef)
    if windows == [-1]:  # the fast path's graphs are the hybrid's; the host loop's, each model's step
        assert len(h1.graphs) and len(h2.graphs)
    else:
        assert not len(h1.graphs) and any(k[0] == "step" for k in gb.graphs.keys()) and len(gt.graphs)
    del h1, h2, h
    gc.collect()
    assert len(backend.alloc.live_pools) == sum(len(m.graphs) > 0 for m in (gb, gt))  # the models' own


@pytest.mark.parametrize("grown", ["base", "thinking"])
def test_a_cache_replaced_by_another_user_releases_the_hybrids_graphs_at_once(grown, seed):
    """The fast step's graphs read both models' caches: whoever replaces either cache (here the
    model's own generate at a larger batch) releases them then, so no stale pool keeps its memory
    until the hybrid's next generate, and that generate recaptures and still equals eager."""
    backend = EagerBackend()
    (gb, gt), (eb, et), (sae, vectors, bias) = _hybrid_pair(backend)
    kw = dict(sae_layer=1, steer_layer=1, coefs=[0.5, 2.0], windows=[-1], gate="thinking")
    h, ref = sf.Hybrid(gb, gt, sae, vectors, bias, **kw), sf.Hybrid(eb, et, sae, vectors, bias, **kw)
    bp, tp = random_prompts([4], VOCAB), random_prompts([6], VOCAB)
    h.generate(bp, tp, max_new_tokens=6, eos_token_id=None)
    assert len(h.graphs)
    m = gb if grown == "base" else gt
    rows = m.cache_rows
    m.generate(random_prompts([5] * (rows + 1), VOCAB), max_new_tokens=3, eos_token_id=None)
    assert m.cache_rows > rows and not len(h.graphs)
    gc.collect()
    assert len(backend.alloc.live_pools) == 1  # m's own step graphs
    got, want = (x.generate(bp, tp, max_new_tokens=6, eos_token_id=None) for x in (h, ref))
    assert (got.tokens, got.steered, got.coef) == (want.tokens, want.steered, want.coef)
