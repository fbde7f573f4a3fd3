"""Every GPU path that must work in one process, for real (`-m gpu`): recapture after cache growth
and new buckets, two models and two hybrids holding graphs at once, the hybrid's fast path and the
paper's grid under all three gates at batch 1 and 16, per-row steering; graph replay equal to eager.
tests/test_graphs.py checks the same lifecycle on the CPU against a model of the allocator."""
from __future__ import annotations

import pytest
import torch

import steerfast as sf
from steerfast.hybrid.step import SideStream
from tiny_models import random_prompts, tiny_hf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VOCAB = 11


def _models(hf, **kw):
    """(graphed, eager) steerfast models of one transformers model, float32 on the GPU."""
    return [sf.load_model(hf, device="cuda", dtype=torch.float32, eager=e, **kw) for e in (False, True)]


def test_decode_batches_1_16_64_1_with_growing_lengths_recapture_and_equal_eager(seed):
    hf = tiny_hf("qwen2", n_heads=6, n_kv_heads=2, dtype=torch.float32, max_pos=2048).cuda()
    graphed, eager = _models(hf, max_seq_len=2048)
    for B, n in [(1, 16), (16, 40), (64, 300), (1, 600)]:  # new buckets; 300 and 600 grow the cache
        prompts = random_prompts(torch.randint(1, 40, (B,)).tolist())
        out = graphed.generate(prompts, n, eos_token_id=None)
        assert out == eager.generate(prompts, n, eos_token_id=None)
        vec = torch.randn(B, hf.config.hidden_size, device="cuda")  # per-row vectors
        for positions in ("all", "generated"):
            st = sf.Steering(vec, layer=1, coef=2.0, positions=positions)
            assert graphed.generate(prompts, n, eos_token_id=None, steering=st) == \
                eager.generate(prompts, n, eos_token_id=None, steering=st)
    assert len(graphed.graphs) > 0


def test_two_models_hold_graphs_at_once_and_survive_each_others_release(seed):
    a = _models(tiny_hf("llama", dtype=torch.float32).cuda())
    b = _models(tiny_hf("qwen2", dtype=torch.float32).cuda())
    p = random_prompts([5, 17, 3])
    want = [m[1].generate(p, 30, eos_token_id=None) for m in (a, b)]
    for _ in range(2):
        assert [m[0].generate(p, 30, eos_token_id=None) for m in (a, b)] == want
        a[0].release()  # b's graphs and pool are untouched; a recaptures into a fresh pool
    torch.cuda.synchronize()


def _hybrid_parts():
    hf_b = tiny_hf("llama", n_heads=4, n_kv_heads=2, head_dim=16, layers=3, vocab=VOCAB, dtype=torch.float32).cuda()
    hf_t = tiny_hf("qwen2", n_heads=6, n_kv_heads=2, head_dim=16, layers=3, vocab=VOCAB, dtype=torch.float32).cuda()
    n = 5
    sae = sf.TopKSAE(W_enc=torch.randn(96, n), b_enc=torch.randn(n), W_dec=torch.randn(n, 96), b_dec=torch.randn(96),
                     k=1).to("cuda", torch.float32)
    return hf_b, hf_t, (sae, torch.randn(n, 64, device="cuda"), 0.3 * torch.randn(64, device="cuda"))


@pytest.mark.parametrize("windows", [[-1], [0, -1, -15]], ids=["fast-path", "paper-grid"])
@pytest.mark.parametrize("gate", ["thinking", "controller", 0.12])
def test_hybrid_at_batch_1_and_16_graphed_equals_eager(windows, gate, seed):
    hf_b, hf_t, (sae, vectors, bias) = _hybrid_parts()
    (gb, eb), (gt, et) = _models(hf_b), _models(hf_t)
    kw = dict(sae_layer=1, steer_layer=1, coefs=[0.5, 2.0, 6.0], windows=windows, gate=gate)
    graphed = [sf.Hybrid(gb, gt, sae, vectors, bias, **kw) for _ in range(2)]  # two hybrids over one pair
    eager = sf.Hybrid(eb, et, sae, vectors, bias, **kw)
    for B in (1, 16, 1):
        bp = random_prompts(torch.randint(3, 30, (B,)).tolist(), VOCAB)
        tp = random_prompts(torch.randint(3, 30, (B,)).tolist(), VOCAB)
        want = eager.generate(bp, tp, 40, eos_token_id=None)
        for i, h in enumerate(graphed):
            had = len(graphed[1].graphs)
            got = h.generate(bp, tp, 40, eos_token_id=None)
            assert (got.tokens, got.steered, got.category, got.coef, got.window) == \
                (want.tokens, want.steered, want.category, want.coef, want.window)
            if B == 16 and i == 0 and had:  # the first to grow the caches released the other's graphs
                assert not len(graphed[1].graphs)
    torch.cuda.synchronize()


def test_programmatic_dependent_launch_decodes_the_same_tokens(seed, monkeypatch):
    """STEERFAST_PDL=1 (compute capability >= 9): graphed and eager decoding with the fused kernels
    launched dependently give the tokens of decoding without it (each kernel waits for its predecessor
    before touching memory: a missing wait would read stale activations)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability >= 9")
    hf = tiny_hf("qwen2", n_heads=6, n_kv_heads=2, dtype=torch.float32).cuda()
    prompts = random_prompts([5, 17, 9])
    ref = sf.load_model(hf, device="cuda", dtype=torch.float32, eager=True).generate(prompts, 40, eos_token_id=None)
    monkeypatch.setenv("STEERFAST_PDL", "1")
    for m in _models(hf):
        assert m.generate(prompts, 40, eos_token_id=None) == ref


@pytest.mark.parametrize("windows", [[-1], [0, -1, -15]], ids=["fast-path", "paper-grid"])
def test_hybrid_on_two_streams_equals_one_stream(windows, seed, monkeypatch):
    """The thinking model on a second stream (the default with both models on one GPU) gives what
    one stream gives (STEERFAST_TWO_STREAMS=0), graphed and eager, at batch 16."""
    hf_b, hf_t, (sae, vectors, bias) = _hybrid_parts()
    kw = dict(sae_layer=1, steer_layer=1, coefs=[0.5, 2.0, 6.0], windows=windows, gate=0.25)
    bp = random_prompts(torch.randint(3, 30, (16,)).tolist(), VOCAB)
    tp = random_prompts(torch.randint(3, 30, (16,)).tolist(), VOCAB)
    runs = {}
    for streams in ("1", "0"):
        monkeypatch.setenv("STEERFAST_TWO_STREAMS", streams)
        for (b, t) in zip(_models(hf_b), _models(hf_t)):  # graphed pair, then eager pair
            h = sf.Hybrid(b, t, sae, vectors, bias, **kw)
            assert isinstance(h.settings.side, SideStream) == (streams == "1")
            r = h.generate(bp, tp, 32, eos_token_id=None)
            runs[streams, b.eager] = (r.tokens, r.steered, r.category, r.coef, r.window)
    assert len(set(map(repr, runs.values()))) == 1, "two streams changed the result"


def test_split_k_decoding_is_deterministic_and_graphs_equal_eager(seed, monkeypatch):
    """STEERFAST_SPLIT_K=auto (K split over programs, the last to arrive sums the partials in order):
    graphed equals eager and a second run equals the first, token for token (fp16 to make the sums'
    order matter more)."""
    monkeypatch.setenv("STEERFAST_SPLIT_K", "auto")
    hf = tiny_hf("llama", n_heads=8, n_kv_heads=2, head_dim=64, layers=2, dtype=torch.float16).cuda()
    graphed, eager = [sf.load_model(hf, device="cuda", dtype=torch.float16, eager=e) for e in (False, True)]
    prompts = random_prompts([5, 17, 9, 30])
    first = graphed.generate(prompts, 48, eos_token_id=None)
    assert graphed.generate(prompts, 48, eos_token_id=None) == first
    assert eager.generate(prompts, 48, eos_token_id=None) == first
