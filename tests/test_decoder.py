"""The lean decoder against transformers: tokens, logits, steering, sampling, loading."""
from __future__ import annotations

import pytest
import torch

import steerfast as sf
from steerfast.model import Context
from tiny_models import greedy_regret, hf_greedy, random_prompts, tiny_hf

# (family, n_heads, n_kv_heads, tied, llama3_rope): GQA 1:1, 2:1, 6:1; tied and untied; qkv bias
# (Qwen2); llama3 RoPE scaling with prompts that cross its original 32-position context
CONFIGS = [
    ("llama", 4, 4, False, False),
    ("llama", 4, 2, True, True),
    ("llama", 6, 1, False, True),
    ("qwen2", 4, 2, False, False),
    ("qwen2", 6, 1, True, False),
    ("qwen2", 4, 4, True, False),
]
IDS = [f"{f}-gqa{h // kv}-{'tied' if t else 'untied'}{'-llama3' if r else ''}" for f, h, kv, t, r in CONFIGS]


@pytest.fixture(scope="module", params=CONFIGS, ids=IDS)
def pair(request):
    family, h, kv, tied, rope = request.param
    hf = tiny_hf(family, n_heads=h, n_kv_heads=kv, tied=tied, llama3_rope=rope)
    return hf, sf.load_model(hf, device="cpu", dtype=torch.float64)


def test_greedy_equals_transformers_ragged_batch(pair):
    hf, m = pair
    prompts = random_prompts([37, 5, 1, 20])  # ragged; 37 + 70 crosses llama3's original context
    out = m.generate(prompts, max_new_tokens=70, eos_token_id=None)
    for p, o in zip(prompts, out):
        assert o == hf_greedy(hf, p, 70)
    # a random model may fall into a loop on one prompt; across the batch the tokens must vary, or
    # the comparison would be weak
    assert len({t for o in out for t in o}) > 10, "degenerate outputs would make the comparison weak"


def test_prefill_and_decode_logits_match_transformers(pair):
    hf, m = pair
    seq = random_prompts([45])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0]  # [T, V], float64
    net, T0 = m.net, 30
    m.ensure_cache(1, len(seq))
    pos = torch.arange(T0, dtype=torch.int32)[None]
    got = [net(torch.tensor([seq[:T0]]), Context(input_pos=pos, kv_len=T0))[0]]  # all prefill positions
    for t in range(T0, len(seq)):  # then one decode step per token
        ctx = Context(input_pos=torch.tensor([[t]], dtype=torch.int32), kv_len=t + 1)
        got.append(net(torch.tensor([[seq[t]]]), ctx)[0])
    got = torch.cat(got)
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)


def test_float32_logits_within_twice_torch_own_error():
    """flash-attn's rule: our fp32 error vs an fp64 reference is at most 2x transformers' own fp32 error."""
    hf64 = tiny_hf("qwen2", n_heads=6, n_kv_heads=2, llama3_rope=False)
    hf32 = tiny_hf("qwen2", n_heads=6, n_kv_heads=2, dtype=torch.float32)
    hf32.load_state_dict(hf64.state_dict())
    m = sf.load_model(hf64, device="cpu", dtype=torch.float32)
    seq = random_prompts([40])[0]
    with torch.no_grad():
        ref, theirs = hf64(torch.tensor([seq])).logits[0], hf32(torch.tensor([seq])).logits[0].double()
    m.ensure_cache(1, len(seq))
    ours = m.net(torch.tensor([seq]), Context(input_pos=torch.arange(len(seq), dtype=torch.int32)[None],
                                              kv_len=len(seq)))[0].double()
    assert (ours - ref).abs().max() <= 2 * (theirs - ref).abs().max() + 1e-6


def _hook_steering(hf, layer, vec, from_pos=0):
    """Reference steering: a forward hook adding `vec` to decoder layer `layer`'s output at
    absolute positions >= from_pos (HF runs with a KV cache, so track positions by call)."""
    seen = [0]

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        T = h.shape[1]
        p = torch.arange(seen[0], seen[0] + T)
        seen[0] += T
        h = h + vec * (p >= from_pos)[None, :, None].to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return hf.model.layers[layer].register_forward_hook(hook), seen


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_steering_equals_forward_hook(positions):
    hf = tiny_hf("llama", n_heads=4, n_kv_heads=2, layers=4)
    m = sf.load_model(hf, device="cpu", dtype=torch.float64)
    d, layer, coef = hf.config.hidden_size, 2, 3.0
    vec = torch.randn(d, dtype=torch.float64)
    prompts = random_prompts([12, 7])
    out = m.generate(prompts, max_new_tokens=40, eos_token_id=None,
                     steering=sf.Steering(vec, layer=layer, coef=coef, positions=positions))
    plain = m.generate(prompts, max_new_tokens=40, eos_token_id=None)
    for p, o, u in zip(prompts, out, plain):
        handle, seen = _hook_steering(hf, layer, coef * vec, 0 if positions == "all" else len(p))
        try:
            ref = hf_greedy(hf, p, 40)
        finally:
            handle.remove()
        assert o == ref
        assert o != u, "the steering vector should change the output, or this test shows nothing"


def test_per_sequence_steering_vectors():
    hf = tiny_hf("qwen2", n_heads=4, n_kv_heads=2)
    m = sf.load_model(hf, device="cpu", dtype=torch.float64)
    vecs = torch.randn(2, hf.config.hidden_size, dtype=torch.float64)
    prompts = random_prompts([9, 14])
    out = m.generate(prompts, 30, eos_token_id=None, steering=sf.Steering(vecs, layer=1, coef=2.0))
    for b in range(2):
        assert out[b] == m.generate([prompts[b]], 30, eos_token_id=None,
                                    steering=sf.Steering(vecs[b], layer=1, coef=2.0))[0]


def test_sampling_is_reproducible_and_independent_of_batching():
    hf = tiny_hf("llama")
    m = sf.load_model(hf, device="cpu", dtype=torch.float64)
    prompts = random_prompts([6, 11, 3])
    kw = dict(max_new_tokens=40, temperature=1.0, eos_token_id=None)
    a = m.generate(prompts, seed=7, **kw)
    assert a == m.generate(prompts, seed=7, **kw)
    assert a != m.generate(prompts, seed=8, **kw)
    assert a != m.generate(prompts, **{**kw, "temperature": 0.0})
    # a sequence's samples depend on its seed, index and positions, not on the rest of the batch
    assert m.generate(prompts[:2], seed=7, **kw) == a[:2]
    # top_k=1 is greedy whatever the temperature; top_p keeps only the most probable token when tiny
    greedy = m.generate(prompts, max_new_tokens=40, eos_token_id=None)
    assert m.generate(prompts, seed=3, top_k=1, **kw) == greedy
    assert m.generate(prompts, seed=3, top_p=1e-6, **kw) == greedy


def test_top_k_samples_only_among_top_k():
    hf = tiny_hf("qwen2")
    m = sf.load_model(hf, device="cpu", dtype=torch.float64)
    prompt = random_prompts([10])[0]
    out = m.generate([prompt] * 1, max_new_tokens=1, temperature=5.0, top_k=3, seed=1)
    with torch.no_grad():
        top3 = hf(torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist()
    firsts = {m.generate([prompt], max_new_tokens=1, temperature=5.0, top_k=3, seed=s)[0][0] for s in range(40)}
    assert out[0][0] in top3 and firsts <= set(top3) and len(firsts) > 1


def test_stop_ids_per_sequence_and_eos_like_transformers():
    hf = tiny_hf("llama")
    m = sf.load_model(hf, device="cpu", dtype=torch.float64)
    prompts = random_prompts([8, 8])
    free = m.generate(prompts, max_new_tokens=40, eos_token_id=None)
    eos = free[0][10]  # a token the first sequence emits at step 10 (or earlier)
    out = m.generate(prompts, max_new_tokens=40, eos_token_id=eos)
    assert out[0] == hf_greedy(hf, prompts[0], 40, eos_token_id=eos)
    stop_b = free[1][5]
    out = m.generate(prompts, max_new_tokens=40, eos_token_id=None, stop_ids=[[], [stop_b]])
    assert out[0] == free[0]
    assert out[1] == free[1][:free[1].index(stop_b) + 1]


def test_callback_streams_every_token():
    hf = tiny_hf("qwen2")
    m = sf.load_model(hf, device="cpu", dtype=torch.float64)
    prompts = random_prompts([5, 9])
    seen = []
    out = m.generate(prompts, max_new_tokens=12, eos_token_id=None, callback=lambda step, toks: seen.append(toks))
    assert [list(col) for col in zip(*seen)] == out


@pytest.mark.parametrize("shard", [False, True])
def test_load_from_directory_equals_in_memory(tmp_path, shard):
    hf = tiny_hf("qwen2", n_heads=6, n_kv_heads=2, dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    prompts = random_prompts([9, 4])
    a = sf.load_model(tmp_path, device="cpu", dtype=torch.float32).generate(prompts, 30, eos_token_id=None)
    b = sf.load_model(hf, device="cpu", dtype=torch.float32).generate(prompts, 30, eos_token_id=None)
    assert a == b == [hf_greedy(hf, p, 30) for p in prompts]


def test_triton_backend_in_the_decoder(monkeypatch):
    """The Triton decode-attention and steering kernels inside the decode loop (interpreted on CPU)."""
    from steerfast.backend import why_not
    if why_not("triton", torch.device("cpu")):
        pytest.skip(why_not("triton", torch.device("cpu")))
    hf = tiny_hf("llama", n_heads=4, n_kv_heads=2, layers=2, dtype=torch.float32)
    m = sf.load_model(hf, device="cpu", dtype=torch.float32)
    prompts, vec = random_prompts([7, 3]), torch.randn(hf.config.hidden_size)
    steer = sf.Steering(vec, layer=0, coef=2.0)
    ref = m.generate(prompts, 16, eos_token_id=None, steering=steer)
    monkeypatch.setenv("STEERFAST_BACKEND", "triton")
    assert m.generate(prompts, 16, eos_token_id=None, steering=steer) == ref


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cuda_graph_decode_equals_eager_and_transformers(family):
    """The graphed step (Triton attention, fused steering, device-side sampling and stops) against
    the eager loop and transformers, on a batch that pads to its bucket (5 -> 8)."""
    hf = tiny_hf(family, n_heads=6, n_kv_heads=2, llama3_rope=family == "llama", dtype=torch.float32).cuda()
    graphed = sf.load_model(hf, device="cuda", dtype=torch.float32)
    eager = sf.load_model(hf, device="cuda", dtype=torch.float32, eager=True)
    assert not graphed.eager and eager.eager
    prompts = random_prompts([37, 5, 1, 20, 9])
    out = graphed.generate(prompts, 70, eos_token_id=None)
    assert out == eager.generate(prompts, 70, eos_token_id=None)  # the same kernels: exactly
    for p, o in zip(prompts, out):  # transformers' float32 sums in another order: near ties may go either way
        assert len(o) == 70 and greedy_regret(hf, p, o) < 1e-4
    steer = sf.Steering(torch.randn(hf.config.hidden_size, device="cuda"), layer=1, coef=3.0)
    kw = dict(eos_token_id=None, steering=steer, temperature=0.8, top_p=0.9, seed=5)
    assert graphed.generate(prompts, 40, **kw) == eager.generate(prompts, 40, **kw)
    stop = out[1][3]
    assert graphed.generate(prompts, 70, eos_token_id=stop) == eager.generate(prompts, 70, eos_token_id=stop)


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_steering_that_overflows_the_residual_stream_raises_and_the_model_goes_on(positions):
    """A vector finite on its own (1e30 in fp32) whose sum with the residual stream overflows: a named
    error, not garbage tokens; only the offending row is named, and the next call works."""
    hf = tiny_hf("llama", n_heads=4, n_kv_heads=2, layers=2, dtype=torch.float32)
    m = sf.load_model(hf, device="cpu", dtype=torch.float32)
    prompts = random_prompts([6, 4, 5])
    vec = torch.randn(3, hf.config.hidden_size)
    vec[1] *= 1e30
    with pytest.raises(sf.errors.NonFiniteError, match=r"sequence\(s\) \[1\].*layer 1"):
        m.generate(prompts, 20, eos_token_id=None, steering=sf.Steering(vec, layer=1, coef=1.0, positions=positions))
    vec[1] /= 1e30
    ok = m.generate(prompts, 20, eos_token_id=None, steering=sf.Steering(vec, layer=1, coef=1.0, positions=positions))
    assert ok == m.generate(prompts, 20, eos_token_id=None,
                            steering=sf.Steering(vec, layer=1, coef=1.0, positions=positions))
    assert m.generate(prompts, 20, eos_token_id=None) == [hf_greedy(hf, p, 20) for p in prompts]


@pytest.mark.parametrize("family,h,kv,tied", [("qwen2", 6, 1, True), ("llama", 4, 2, False)])
def test_fused_triton_decode_equals_transformers_fp32(family, h, kv, tied, monkeypatch):
    """The fused decode kernels (Triton, interpreted here) token for token with transformers' greedy
    generate in float32, with the prefill on the plain layers, and the steered step equal to the
    torch backend's."""
    from steerfast.backend import why_not
    if why_not("triton", torch.device("cpu")):
        pytest.skip(why_not("triton", torch.device("cpu")))
    hf = tiny_hf(family, n_heads=h, n_kv_heads=kv, tied=tied, layers=2, dtype=torch.float32)
    m = sf.load_model(hf, device="cpu", dtype=torch.float32)
    prompts = random_prompts([9, 3])
    steer = sf.Steering(torch.randn(2, hf.config.hidden_size), layer=0, coef=1.5, positions="generated")
    ref = m.generate(prompts, 10, eos_token_id=None, steering=steer)
    monkeypatch.setenv("STEERFAST_BACKEND", "triton")
    assert m.generate(prompts, 10, eos_token_id=None) == [hf_greedy(hf, p, 10) for p in prompts]
    assert m.generate(prompts, 10, eos_token_id=None, steering=steer) == ref
