"""sf.Hybrid against the paper's loop (steerfast.hybrid.reference): token for token, flag for flag."""
from __future__ import annotations

import pytest
import torch

import steerfast as sf
from steerfast import errors
from steerfast.hybrid.reference import paper_hybrid
from tiny_models import random_prompts, tiny_hf

VOCAB = 11  # small, so random base and thinking models agree often enough to give unsteered tokens


def _pair(base_family, think_family):
    base = tiny_hf(base_family, n_heads=4, n_kv_heads=2, head_dim=16, layers=3, vocab=VOCAB)
    think = tiny_hf(think_family, n_heads=6, n_kv_heads=2, head_dim=16, layers=4, vocab=VOCAB)
    return base, think


def _controller(d_think, d_base, n_latents=5, normalize=False):
    sae = sf.TopKSAE(W_enc=torch.randn(d_think, n_latents, dtype=torch.float64),
                     b_enc=torch.randn(n_latents, dtype=torch.float64),
                     W_dec=torch.randn(n_latents, d_think, dtype=torch.float64),
                     b_dec=torch.randn(d_think, dtype=torch.float64), k=1,
                     mean=torch.randn(d_think, dtype=torch.float64) if normalize else None, normalize=normalize)
    vectors = torch.randn(n_latents, d_base, dtype=torch.float64)
    bias = 0.3 * torch.randn(d_base, dtype=torch.float64)
    return sae, vectors, bias


CASES = [  # base family, thinking family, windows, sae_layer, steer_layer, normalize
    ("llama", "qwen2", [0, -1, -3], 2, 1, False),
    ("llama", "llama", [0, -1, -15, -50, -100], 1, 0, False),  # the paper's windows: -50, -100 reach the prompt
    ("qwen2", "llama", [-1], 3, 0, True),
    ("qwen2", "qwen2", [-3, 0], 0, 2, False),  # steer_layer is the base's last layer: no layers re-run
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-w{c[2]}" for c in CASES])
def test_hybrid_equals_the_papers_loop(case):
    base_family, think_family, windows, sae_layer, steer_layer, normalize = case
    hf_b, hf_t = _pair(base_family, think_family)
    sae, vectors, bias = _controller(hf_t.config.hidden_size, hf_b.config.hidden_size, normalize=normalize)
    coefs = [0.5, 2.0, 6.0]
    base = sf.load_model(hf_b, device="cpu", dtype=torch.float64)
    think = sf.load_model(hf_t, device="cpu", dtype=torch.float64)
    h = sf.Hybrid(base, think, sae, vectors, bias, sae_layer=sae_layer, steer_layer=steer_layer,
                  coefs=coefs, windows=windows, scratch_rows=4,  # small: the candidates go in several chunks
                  max_packed_tokens=20)  # and so do long windows' positions
    base_prompts, think_prompts = random_prompts([6, 9, 4], VOCAB), random_prompts([8, 5, 7], VOCAB)
    res = h.generate(base_prompts, think_prompts, max_new_tokens=24, eos_token_id=None)
    for b in range(3):
        tokens, steered = paper_hybrid(hf_b, hf_t, sae, vectors, bias, sae_layer, steer_layer, coefs, windows,
                                       base_prompts[b], think_prompts[b], 24)
        assert res.tokens[b] == tokens
        assert res.steered[b] == steered
    flags = [s for seq in res.steered for s in seq]
    assert any(flags) and not all(flags), "the data must hold steered and unsteered tokens"
    assert 0 < res.steered_share < 1
    assert all((c is None) == (not s) for cs, ss in zip(res.coef, res.steered) for c, s in zip(cs, ss))


def test_controller_gate_steers_whenever_a_category_fires():
    hf_b, hf_t = _pair("llama", "llama")
    sae, vectors, bias = _controller(hf_t.config.hidden_size, hf_b.config.hidden_size)
    cat_map = torch.tensor([0, -1, 1, -1, 2])
    base = sf.load_model(hf_b, device="cpu", dtype=torch.float64)
    think = sf.load_model(hf_t, device="cpu", dtype=torch.float64)
    h = sf.Hybrid(base, think, sae, vectors, bias, sae_layer=1, steer_layer=1, coefs=[3.0], windows=[-2],
                  gate="controller", cat_map=cat_map)
    bp, tp = random_prompts([5, 7], VOCAB), random_prompts([6, 6], VOCAB)
    res = h.generate(bp, tp, max_new_tokens=20, eos_token_id=None)
    for b in range(2):
        tokens, steered = paper_hybrid(hf_b, hf_t, sae, vectors, bias, 1, 1, [3.0], [-2], bp[b], tp[b], 20,
                                       gate="controller", cat_map=cat_map)
        assert (res.tokens[b], res.steered[b]) == (tokens, steered)
    assert all(s == (c >= 0) for cs, ss in zip(res.category, res.steered) for c, s in zip(cs, ss))


class _CharTokenizer:
    """A toy tokenizer pair with different vocabularies: base ids are letters, the thinking
    model's are letters and letter pairs (so re-encoding changes the token count)."""

    def __init__(self, units):
        self.units = units

    def get_vocab(self):
        return {u: i for i, u in enumerate(self.units)}

    def decode(self, ids):
        return "".join(self.units[i] for i in ids)

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            for u in sorted(self.units, key=len, reverse=True):
                if text.startswith(u, i):
                    ids.append(self.units.index(u))
                    i += len(u)
                    break
        return ids


def test_different_tokenizers_decode_and_reencode():
    letters = list("abcdefghijk")
    base_tok, think_tok = _CharTokenizer(letters), _CharTokenizer(letters + ["ab", "ba", "cd", "dc", "ee"])
    hf_b = tiny_hf("llama", layers=2, vocab=len(base_tok.units))
    hf_t = tiny_hf("qwen2", n_heads=6, layers=3, vocab=len(think_tok.units))
    sae, vectors, bias = _controller(hf_t.config.hidden_size, hf_b.config.hidden_size)
    base = sf.load_model(hf_b, device="cpu", dtype=torch.float64)
    think = sf.load_model(hf_t, device="cpu", dtype=torch.float64, max_seq_len=128)
    h = sf.Hybrid(base, think, sae, vectors, bias, sae_layer=1, steer_layer=0, coefs=[1.0, 4.0], windows=[-1, -2],
                  tokenizers=(base_tok, think_tok))
    bp, tp = random_prompts([5, 3], 11), random_prompts([4, 6], 11)
    res = h.generate(bp, tp, max_new_tokens=16, eos_token_id=None)
    retok = lambda t: think_tok.encode(base_tok.decode([t]))  # noqa: E731
    for b in range(2):
        tokens, steered = paper_hybrid(hf_b, hf_t, sae, vectors, bias, 1, 0, [1.0, 4.0], [-1, -2], bp[b], tp[b], 16,
                                       retokenize=retok)
        assert (res.tokens[b], res.steered[b]) == (tokens, steered)
    with pytest.raises(errors.InvalidInputError, match="tokenizers"):
        sf.Hybrid(base, think, sae, vectors, bias, 1, 0, [1.0], [-1])


def test_stops_at_base_eos_per_sequence_and_reports_counts():
    hf_b, hf_t = _pair("llama", "qwen2")
    sae, vectors, bias = _controller(hf_t.config.hidden_size, hf_b.config.hidden_size)
    base = sf.load_model(hf_b, device="cpu", dtype=torch.float64)
    think = sf.load_model(hf_t, device="cpu", dtype=torch.float64)
    h = sf.Hybrid(base, think, sae, vectors, bias, 2, 1, [1.0, 3.0], [-1])
    bp, tp = random_prompts([6, 6], VOCAB), random_prompts([5, 5], VOCAB)
    free = h.generate(bp, tp, max_new_tokens=20, eos_token_id=None)
    eos = free.tokens[0][4]
    res = h.generate(bp, tp, max_new_tokens=20, eos_token_id=eos)
    for b in range(2):
        cut = free.tokens[b].index(eos) + 1 if eos in free.tokens[b] else 20
        assert res.tokens[b] == free.tokens[b][:cut]
    counts = res.category_counts
    assert sum(counts.values()) == sum(map(sum, res.steered))
    marked = res.trace(0, names=["A", "B", "C", "D", "E"])
    assert marked.count("[") == marked.count("]") and (("[" in marked) == any(res.steered[0]))


@pytest.mark.parametrize("windows", [[-1], [0, -1, -3]], ids=["fast-path", "host-loop"])
def test_a_batch_whose_rows_finish_at_different_times_equals_the_papers_loop(windows):
    """Six sequences of different lengths, an EOS that ends some early and others not at all, the
    gate steering different rows at each step: every row token for token and flag for flag."""
    hf_b, hf_t = _pair("qwen2", "llama")
    sae, vectors, bias = _controller(hf_t.config.hidden_size, hf_b.config.hidden_size)
    base = sf.load_model(hf_b, device="cpu", dtype=torch.float64)
    think = sf.load_model(hf_t, device="cpu", dtype=torch.float64)
    kw = dict(sae_layer=2, steer_layer=1, coefs=[0.5, 3.0], windows=windows)
    h = sf.Hybrid(base, think, sae, vectors, bias, scratch_rows=5, **kw)
    bp, tp = random_prompts([3, 9, 5, 12, 4, 7], VOCAB), random_prompts([6, 4, 10, 5, 8, 3], VOCAB)
    free = h.generate(bp, tp, max_new_tokens=16, eos_token_id=None)
    # the EOS: a token some rows emit early and some never, so rows stop at different steps
    firsts = {t: [seq.index(t) if t in seq else 99 for seq in free.tokens] for t in range(VOCAB)}
    eos = max(firsts, key=lambda t: len(set(firsts[t])))
    res = h.generate(bp, tp, max_new_tokens=16, eos_token_id=eos)
    assert len({len(t) for t in res.tokens}) > 1, "rows must finish at different times"
    for b in range(6):
        tokens, steered = paper_hybrid(hf_b, hf_t, sae, vectors, bias, kw["sae_layer"], kw["steer_layer"],
                                       kw["coefs"], windows, bp[b], tp[b], 16, eos=(eos,))
        assert res.tokens[b] == tokens, b
        assert res.steered[b] == steered, b
    per_step = [{b for b in range(6) if i < len(res.steered[b]) and res.steered[b][i]} for i in range(16)]
    assert len({frozenset(x) for x in per_step if x}) > 1, "the gate must steer different rows at different steps"


def test_bad_hybrid_arguments():
    hf_b, hf_t = _pair("llama", "qwen2")
    sae, vectors, bias = _controller(hf_t.config.hidden_size, hf_b.config.hidden_size)
    base = sf.load_model(hf_b, device="cpu", dtype=torch.float64)
    think = sf.load_model(hf_t, device="cpu", dtype=torch.float64)
    ok = dict(base=base, thinking=think, sae=sae, vectors=vectors, bias=bias, sae_layer=1, steer_layer=1,
              coefs=[1.0], windows=[-1])
    bad = [
        (errors.ShapeMismatchError, dict(sae=_controller(hf_b.config.hidden_size, 8)[0])),  # base-width SAE
        (errors.ShapeMismatchError, dict(vectors=torch.randn(5, 7, dtype=torch.float64))),
        (errors.NonFiniteError, dict(bias=torch.full_like(bias, float("nan")))),
        (errors.LayerIndexError, dict(sae_layer=4)),
        (errors.LayerIndexError, dict(steer_layer=-1)),
        (errors.InvalidInputError, dict(windows=[1])),
        (errors.InvalidInputError, dict(coefs=[])),
        (errors.InvalidInputError, dict(gate="sometimes")),
        (errors.InvalidInputError, dict(scratch_rows=0)),
        (errors.InvalidInputError, dict(max_packed_tokens=2.5)),
        (errors.ShapeMismatchError, dict(cat_map=torch.tensor([0, 1, 2, 3, 9]))),
    ]
    for err, kw in bad:
        with pytest.raises(err):
            sf.Hybrid(**(ok | kw))
    with pytest.raises(errors.InvalidInputError, match="same Model"):
        sf.Hybrid(**(ok | dict(thinking=base, sae=_controller(hf_b.config.hidden_size, hf_b.config.hidden_size)[0])))
    h = sf.Hybrid(**ok)
    with pytest.raises(errors.TokenOutOfRangeError):
        h.generate([[1, VOCAB]], [[1]], 4)
    with pytest.raises(errors.InvalidInputError, match="thinking prompts"):
        h.generate([[1, 2]], [[1], [2]], 4)


def test_candidates_pack_windows_without_padding():
    """Every position of every candidate window once (varlen, no padding), chunks within the
    scratch rows and the token budget, each position after its window start and inside its sequence;
    the attention's query blocks cover each chunk's columns once, each block consecutive positions
    of one candidate."""
    from steerfast.kernels.window_attention import BLOCK_Q
    from steerfast.hybrid.loop import _pack_candidates
    g = torch.Generator().manual_seed(0)
    rows, B = [0, 2, 3], 5
    L = torch.randint(1, 40, (B,), generator=g).tolist()
    grid = [(c, w) for c in (0.5, 1.0) for w in (0, -1, -15, -50)]
    chunks = _pack_candidates(rows, [1, 0, 2, 4, 3], L, grid, B, scratch=3, max_tokens=30)
    idx = torch.cat([c for c, _, _ in chunks], 1)
    cand, pos, scratch, seq, first, cat, j = idx
    n = len(rows) * len(grid)
    lens_w = [(L[rows[c // len(grid)]], grid[c % len(grid)][1]) for c in range(n)]
    widths = [n_len if w == 0 else min(n_len, -w) for n_len, w in lens_w]
    assert idx.shape[1] == sum(widths)
    assert torch.bincount(cand, minlength=n).tolist() == widths
    assert (seq == torch.tensor(rows)[cand // len(grid)]).all() and (j == cand % len(grid)).all()
    assert (cat == torch.tensor([1, 0, 2, 4, 3])[seq]).all()
    assert ((first <= pos) & (pos < torch.tensor(L)[seq])).all()
    for ch, last, blocks in chunks:
        c = ch[0].unique()
        covered = torch.cat([torch.arange(f, f + r) for f, r in blocks.tolist()])
        assert torch.equal(covered, torch.arange(ch.shape[1])) and (blocks[:, 1] <= BLOCK_Q).all()
        for f, r in blocks.tolist():
            assert (ch[0][f:f + r] == ch[0][f]).all() and torch.equal(ch[1][f:f + r], ch[1][f] + torch.arange(r))
        assert (ch[0][last] == c).all() and (last == len(ch[0]) - 1).any()  # each candidate's last position
        assert ((ch[1][last] + 1) == torch.tensor(L)[ch[3][last]]).all()  # is its sequence's current one
        assert len(c) <= 3 and (len(c) == 1 or ch.shape[1] <= 30)
        assert ((ch[2] >= B) & (ch[2] < B + 3)).all()
        assert len(ch[2].unique()) == len(c)  # one scratch row per candidate in a chunk


def test_synthetic_gate_steers_a_fixed_share():
    hf_b, hf_t = _pair("qwen2", "llama")
    sae, vectors, bias = _controller(hf_t.config.hidden_size, hf_b.config.hidden_size)
    base = sf.load_model(hf_b, device="cpu", dtype=torch.float64)
    think = sf.load_model(hf_t, device="cpu", dtype=torch.float64)
    h = sf.Hybrid(base, think, sae, vectors, bias, 1, 1, [1.0, 4.0], [-1, 0], gate=0.25)
    res = h.generate(random_prompts([5, 8], VOCAB), random_prompts([6, 4], VOCAB), 24, eos_token_id=None)
    assert res.steered == [[(s + 1) % 4 == 0 for s in range(24)]] * 2
    assert res.steered_share == 0.25


@pytest.mark.gpu
@pytest.mark.parametrize("windows", [[-1], [-1, -3]], ids=["fast-path", "host-loop"])
def test_hybrid_graphed_on_gpu_equals_eager_and_the_papers_loop(windows):
    hf_b, hf_t = _pair("qwen2", "llama")
    hf_b, hf_t = hf_b.float().cuda(), hf_t.float().cuda()
    sae, vectors, bias = _controller(hf_t.config.hidden_size, hf_b.config.hidden_size)
    sae, vectors, bias = sae.to("cuda", torch.float32), vectors.float().cuda(), bias.float().cuda()
    kw = dict(sae=sae, vectors=vectors, bias=bias, sae_layer=2, steer_layer=1, coefs=[0.5, 2.0], windows=windows)
    bp, tp = random_prompts([6, 9, 4], VOCAB), random_prompts([8, 5, 7], VOCAB)
    runs = []
    for eager in (False, True):
        base = sf.load_model(hf_b, device="cuda", dtype=torch.float32, eager=eager)
        think = sf.load_model(hf_t, device="cuda", dtype=torch.float32, eager=eager)
        runs.append(sf.Hybrid(base, think, **kw).generate(bp, tp, 24, eos_token_id=None))
    graphed, eager = runs
    assert graphed.tokens == eager.tokens and graphed.steered == eager.steered  # the same kernels: exactly
    # against the paper's loop in float64, graphed (the fused kernels are float32 and narrower; in
    # float32 transformers sums in another order and the gate's and the choice's near ties could go
    # either way)
    hf_b, hf_t = hf_b.double(), hf_t.double()
    kw |= dict(sae=sae.to("cuda", torch.float64), vectors=vectors.double(), bias=bias.double())
    base, think = (sf.load_model(hf, device="cuda", dtype=torch.float64) for hf in (hf_b, hf_t))
    assert not base.eager
    graphed = sf.Hybrid(base, think, **kw).generate(bp, tp, 24, eos_token_id=None)
    for b in range(3):
        tokens, steered = paper_hybrid(hf_b, hf_t, kw["sae"], kw["vectors"], kw["bias"], 2, 1, [0.5, 2.0], windows,
                                       bp[b], tp[b], 24)
        assert (graphed.tokens[b], graphed.steered[b]) == (tokens, steered)


@pytest.mark.parametrize("gate", ["thinking", "controller", 0.3])
def test_device_side_fast_path_equals_the_host_loop(gate):
    """windows=[-1]: the whole step on the device (candidates as extra rows, no host sync) against
    the host-side loop, token for token and flag for flag, with a stop token mid-run."""
    hf_b, hf_t = _pair("llama", "qwen2")
    sae, vectors, bias = _controller(hf_t.config.hidden_size, hf_b.config.hidden_size, normalize=True)
    base = sf.load_model(hf_b, device="cpu", dtype=torch.float64)
    think = sf.load_model(hf_t, device="cpu", dtype=torch.float64)
    kw = dict(sae_layer=3, steer_layer=1, coefs=[0.5, 2.0, 6.0], windows=[-1], gate=gate)
    bp, tp = random_prompts([6, 9, 4], VOCAB), random_prompts([8, 5, 7], VOCAB)
    slow = sf.Hybrid(base, think, sae, vectors, bias, fast=False, **kw).generate(bp, tp, 40, eos_token_id=None)
    fast = sf.Hybrid(base, think, sae, vectors, bias, **kw).generate(bp, tp, 40, eos_token_id=None)
    assert (fast.tokens, fast.steered, fast.category, fast.coef) == (slow.tokens, slow.steered, slow.category,
                                                                    slow.coef)
    flags = [s for seq in fast.steered for s in seq]
    # the controller gate with every latent a category steers every token (the mix comes from the others)
    assert all(flags) if gate == "controller" else any(flags) and not all(flags)
    eos = slow.tokens[1][7]
    h = sf.Hybrid(base, think, sae, vectors, bias, **kw)
    stopped = h.generate(bp, tp, 40, eos_token_id=eos)
    assert stopped.tokens == sf.Hybrid(base, think, sae, vectors, bias, fast=False, **kw).generate(
        bp, tp, 40, eos_token_id=eos).tokens
    assert stopped.tokens[1] == slow.tokens[1][:slow.tokens[1].index(eos) + 1]


@pytest.mark.parametrize("windows", [[-1], [-1, -2]], ids=["fast-path", "host-loop"])
def test_callback_streams_each_steps_tokens(windows):
    hf_b, hf_t = _pair("llama", "qwen2")
    sae, vectors, bias = _controller(hf_t.config.hidden_size, hf_b.config.hidden_size)
    base = sf.load_model(hf_b, device="cpu", dtype=torch.float64)
    think = sf.load_model(hf_t, device="cpu", dtype=torch.float64)
    h = sf.Hybrid(base, think, sae, vectors, bias, sae_layer=1, steer_layer=1, coefs=[0.5, 2.0], windows=windows)
    seen = []
    res = h.generate(random_prompts([5, 7], VOCAB), random_prompts([6, 4], VOCAB), 12, eos_token_id=None,
                     callback=lambda step, toks: seen.append((step, toks)))
    assert [s for s, _ in seen] == list(range(12))
    assert [[t[b] for _, t in seen] for b in range(2)] == res.tokens


def test_packed_windows_on_the_triton_kernels_equal_the_torch_backend(monkeypatch):
    """The paper's windows through the fused Triton path (interpreted here): candidate windows
    attend block by block (kernels/window_attention.py), window 0 reaching the prompt's start;
    token for token, flag for flag and choice for choice with the torch backend, in float32."""
    from steerfast.backend import why_not
    if why_not("triton", torch.device("cpu")):
        pytest.skip(why_not("triton", torch.device("cpu")))
    hf_b, hf_t = _pair("qwen2", "llama")
    sae, vectors, bias = _controller(hf_t.config.hidden_size, hf_b.config.hidden_size)
    sae, vectors, bias = sae.to("cpu", torch.float32), vectors.float(), bias.float()
    base = sf.load_model(hf_b, device="cpu", dtype=torch.float32)
    think = sf.load_model(hf_t, device="cpu", dtype=torch.float32)
    h = sf.Hybrid(base, think, sae, vectors, bias, sae_layer=2, steer_layer=0, coefs=[0.5, 3.0],
                  windows=[0, -1, -15], scratch_rows=3)
    bp, tp = random_prompts([21, 4], VOCAB), random_prompts([6, 9], VOCAB)
    ref = h.generate(bp, tp, max_new_tokens=5, eos_token_id=None)
    monkeypatch.setenv("STEERFAST_BACKEND", "triton")
    from steerfast.kernels import window_attention
    calls = []
    monkeypatch.setattr(window_attention, "_window_attention_kernel",
                        _Counted(window_attention._window_attention_kernel, calls))
    out = h.generate(bp, tp, max_new_tokens=5, eos_token_id=None)
    assert calls, "the packed windows must run on the window-attention kernel"
    assert (out.tokens, out.steered, out.coef) == (ref.tokens, ref.steered, ref.coef)
    assert any(s for seq in out.steered for s in seq)


class _Counted:
    """A Triton kernel whose launches are counted."""
    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]
