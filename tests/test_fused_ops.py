"""steerfast.fused_ops (the decode step's fused kernels) against float64 references.

Every backend is called through the public functions, so dispatch and the torch.library custom ops
are covered too. Inputs are fresh random numbers each run (`seed` fixture; replay with
STEERFAST_TEST_SEED). Accuracy: tests/test_ops.py's 2x rule: max error against the float64
reference at most twice that of the same-dtype torch reference, plus a small floor, and within
(atol, rtol). Backends: "torch" always, "triton" on CUDA or under TRITON_INTERPRET=1 (so the shapes
are small); these ops have no CUDA C++ kernel.
"""
from __future__ import annotations

import pytest
import torch

import steerfast.fused_ops as fo

from backends import DEVICE, DTYPES, FLOOR, TRITON, check_2x, triton_only

BACKENDS = ["torch", TRITON]
I32 = dict(device=DEVICE, dtype=torch.int32)
I64 = dict(device=DEVICE, dtype=torch.int64)


def _f64(t):
    return None if t is None else (t.double() if t.is_floating_point() else t)


# ---------------------------------------------------------------- decode tail
def _decode_tail_by_hand(nxt, done, tok, pos, seq_lens, step, out, stop):
    for b in range(nxt.shape[0]):
        n = int(tok[b]) if bool(done[b]) else int(nxt[b])
        if 0 <= int(step[b]) < out.shape[1]:
            out[b, int(step[b])] = n
        done[b] = bool(done[b]) or n in stop[b].tolist()
        tok[b] = n
        pos[b] += 1
        seq_lens[b] = int(pos[b]) + 1
        step[b] += 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, W, n_stop", [(1, 4, 1), (6, 9, 3), (37, 5, 0)])
def test_decode_tail(B, W, n_stop, backend, seed):
    V = 12  # a small vocabulary: stop hits are common
    state = dict(
        nxt=torch.randint(0, V, (B,), **I64),
        done=torch.rand(B, device=DEVICE) < 0.3,
        tok=torch.randint(0, V, (B,), **I64),
        pos=torch.randint(0, 100, (B,), **I32),
        seq_lens=torch.zeros(B, **I32),
        step=torch.randint(0, W + 1, (B,), **I64),  # step == W: nothing written
        out=torch.randint(0, V, (B, W), **I64),
        stop=torch.randint(-1, V, (B, n_stop), **I64),
    )
    if n_stop:
        state["stop"][0, -1] = state["nxt"][0]  # row 0 hits a stop token (done if it was not)
        state["done"][0] = False
    expect = {k: v.clone() for k, v in state.items()}
    for i in range(2):  # two steps: the in-place state feeds the next
        fo.decode_tail_(*state.values(), backend=backend)
        _decode_tail_by_hand(*expect.values())
        for k, v in state.items():
            assert torch.equal(v, expect[k]), f"decode_tail[{backend}] step {i} {k}: {v} != {expect[k]}"
    if n_stop:
        assert bool(state["done"][0])


# ---------------------------------------------------------------- fused linear
def _steer_inputs(M, N_out, dtype, with_bias):
    """(vectors, idx, coef, start, bias) and input_pos: row 0 unsteered (idx -1), the last row
    steered, some rows before their start."""
    C = 3
    vectors = torch.randn(C, N_out, device=DEVICE).to(dtype)
    idx = torch.randint(-1, C, (M,), **I32)
    idx[-1] = C - 1
    if M > 1:
        idx[0] = -1
    input_pos = torch.randint(0, 50, (M,), **I32)
    start = input_pos + torch.randint(-2, 2, (M,), **I32)  # about half the rows: pos < start
    start[-1] = input_pos[-1]
    coef = (torch.randn(M, device=DEVICE) * 4).float()
    bias = torch.randn(N_out, device=DEVICE).to(dtype) if with_bias else None
    return (vectors, idx, coef, start, bias), input_pos


# (M, K, N, variant): variant in plain, norm, bias, swiglu, residual, steer (norm + bias + residual + steer)
LINEAR_CASES = [
    pytest.param((1, 64, 123, "plain"), id="M1-K64-N123"),
    pytest.param((3, 200, 5, "norm"), id="M3-K200-N5-norm"),
    pytest.param((17, 64, 431, "bias"), id="M17-K64-N431-bias"),
    pytest.param((3, 200, 123, "swiglu"), id="M3-K200-I123-norm-swiglu-bias"),
    pytest.param((17, 64, 123, "residual"), id="M17-K64-N123-norm-residual"),
    pytest.param((5, 200, 123, "steer"), id="M5-K200-N123-all-steer"),
    pytest.param((70, 64, 17, "steer-nobias"), id="M70-K64-N17-steer-two-row-blocks"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_fused_linear(case, dtype_tol, backend, seed):
    M, K, N, variant = case
    dtype, atol, rtol = dtype_tol
    swiglu = variant == "swiglu"
    N_w = 2 * N if swiglu else N
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    W = (torch.randn(N_w, K, device=DEVICE) / K ** 0.5).to(dtype)
    kw = dict(swiglu=swiglu)
    if variant not in ("plain", "bias"):
        kw.update(norm_weight=(1 + 0.2 * torch.randn(K, device=DEVICE)).to(dtype), eps=1e-5)
    if variant in ("bias", "swiglu", "steer"):
        kw["bias"] = torch.randn(N_w, device=DEVICE).to(dtype) * 0.5
    if variant in ("residual", "steer", "steer-nobias"):
        kw["residual"] = torch.randn(M, N, device=DEVICE).to(dtype)
    if variant.startswith("steer"):
        kw["steer"], kw["input_pos"] = _steer_inputs(M, N, dtype, variant == "steer")

    out = fo.fused_linear(x, W, backend=backend, **kw)

    assert out.dtype == dtype and out.shape == (M, N)
    kw64 = {k: (tuple(_f64(t) for t in v) if k == "steer" else _f64(v)) if not isinstance(v, (bool, float))
            else v for k, v in kw.items()}
    ref = fo.fused_linear_torch(x.double(), W.double(), **kw64, stats_dtype=torch.float64)
    base = fo.fused_linear_torch(x, W, **kw)
    check_2x(out, ref, base, atol, rtol, FLOOR[dtype], f"fused_linear[{backend}] {variant} seed={seed}")
    if variant.startswith("steer"):  # rows not steered are exactly the unsteered layer's output
        steer = kw.pop("steer")
        plain = fo.fused_linear(x, W, backend=backend, **{k: v for k, v in kw.items() if k != "input_pos"})
        vectors, idx, coef, start, _ = steer
        off = (idx < 0) | (kw["input_pos"] < start)
        assert off.any() and (~off).any()
        assert torch.equal(out[off], plain[off])


# ---------------------------------------------------------------- QKV + RoPE + KV write
def _rope_tables(S, D, dtype):
    """steerfast.model's tables: angles in fp32, halves duplicated, cast to the model dtype."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.arange(S, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)


# (M, K, H, Hkv, D, bias)
QKV_CASES = [
    pytest.param((1, 64, 6, 2, 16, True), id="M1-K64-H6-Hkv2-D16-bias"),
    pytest.param((3, 200, 6, 2, 32, False), id="M3-K200-H6-Hkv2-D32"),
    pytest.param((17, 64, 4, 4, 40, True), id="M17-K64-mha-D40-bias"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("case", QKV_CASES)
def test_qkv_rope_kv_write(case, dtype_tol, backend, seed):
    M, K, H, Hkv, D, with_bias = case
    dtype, atol, rtol = dtype_tol
    S, Bc = 40, M + 3
    N = (H + 2 * Hkv) * D
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    W = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype)
    nw = (1 + 0.2 * torch.randn(K, device=DEVICE)).to(dtype)
    bias = (torch.randn(N, device=DEVICE) * 0.5).to(dtype) if with_bias else None
    cos, sin = _rope_tables(S, D, dtype)
    rows = torch.randperm(Bc, device=DEVICE)[:M]  # cache rows out of order, some never written
    pos = torch.randint(0, S, (M,), **I32)
    pos[-1] = S - 1
    k_cache = torch.randn(Bc, S, Hkv, D, device=DEVICE).to(dtype)
    v_cache = torch.randn(Bc, S, Hkv, D, device=DEVICE).to(dtype)
    k0, v0 = k_cache.clone(), v_cache.clone()

    q = fo.qkv_rope_kv_write(x, W, nw, 1e-6, bias, cos, sin, pos, rows, k_cache, v_cache, H, Hkv, backend=backend)

    assert q.dtype == dtype and q.shape == (M, H, D)
    caches = {}
    for name, dt in (("ref", torch.float64), ("base", dtype)):
        kc, vc = k0.clone().to(dt), v0.clone().to(dt)
        qq = fo.qkv_rope_kv_write_torch(x.to(dt), W.to(dt), nw.to(dt), 1e-6, _f64(bias) if dt == torch.float64 else bias,
                                        cos.to(dt), sin.to(dt), pos, rows, kc, vc, H, Hkv,
                                        stats_dtype=torch.float64 if dt == torch.float64 else torch.float32)
        caches[name] = (qq, kc[rows, pos.long()], vc[rows, pos.long()])
    what = f"qkv_rope_kv_write[{backend}] seed={seed}"
    written = (k_cache[rows, pos.long()], v_cache[rows, pos.long()])
    for i, (name, out) in enumerate(zip(("q", "k", "v"), (q,) + written)):
        check_2x(out, caches["ref"][i], caches["base"][i], atol, rtol, FLOOR[dtype], f"{what} {name}")
    untouched = torch.ones(Bc, S, dtype=torch.bool, device=DEVICE)
    untouched[rows, pos.long()] = False
    assert torch.equal(k_cache[untouched], k0[untouched]) and torch.equal(v_cache[untouched], v0[untouched])


# ---------------------------------------------------------------- lm_head + argmax
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("M, K, V", [(1, 64, 431), (3, 200, 123), (17, 64, 1500)])
def test_lm_head_argmax(M, K, V, dtype_tol, backend, seed):
    """The chosen id's float64 logit is as close to the float64 maximum as torch's own same-dtype
    choice (2x rule on the regret); a near-tie may legitimately go either way."""
    dtype, atol, rtol = dtype_tol
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    W = (torch.randn(V, K, device=DEVICE) / K ** 0.5).to(dtype)
    nw = (1 + 0.2 * torch.randn(K, device=DEVICE)).to(dtype)

    ids = fo.lm_head_argmax(x, W, nw, 1e-6, backend=backend)

    assert ids.dtype == torch.int64 and ids.shape == (M,)
    logits = torch.nn.functional.linear(fo.rms_norm_torch(x.double(), nw.double(), 1e-6, torch.float64), W.double())  # [M, V]
    base = fo.lm_head_argmax_torch(x, W, nw, 1e-6)
    top = logits.max(dim=-1).values
    regret = top - logits.gather(1, ids[:, None])[:, 0]
    base_regret = top - logits.gather(1, base[:, None])[:, 0]
    assert (regret <= 2 * base_regret + atol * top.abs().clamp(min=1)).all(), (
        f"lm_head_argmax[{backend}] seed={seed}: ids {ids.tolist()} (regret {regret.tolist()}), "
        f"torch {base.tolist()} (regret {base_regret.tolist()})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_lm_head_argmax_ties_go_to_the_lowest_id(dtype_tol, backend):
    """Equal maximal logits (duplicate W rows) in one block and across blocks: torch.argmax's first."""
    dtype = dtype_tol[0]
    M, K, V = 3, 64, 700
    x = (torch.rand(M, K, device=DEVICE) + 0.1).to(dtype)  # positive rows: all-ones W rows win
    W = (torch.randn(V, K, device=DEVICE) * 0.01).to(dtype)
    winners = [9, 11, 75, 300, 699]  # same 16- and 64-column block, and blocks apart
    W[winners] = 1.0
    nw = torch.ones(K, device=DEVICE, dtype=dtype)
    ids = fo.lm_head_argmax(x, W, nw, 1e-6, backend=backend)
    assert ids.tolist() == [9] * M
    W[9] = 0.5  # the next duplicate takes over
    assert fo.lm_head_argmax(x, W, None, 0.0, backend=backend).tolist() == [11] * M


# ---------------------------------------------------------------- register_fake
def test_fake_tensor_shapes():
    """Every custom op's register_fake gives the right shapes and dtypes (what torch.compile traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    M, K, N, H, Hkv, D, S, Bc, dt = 3, 64, 40, 6, 2, 16, 20, 5, torch.bfloat16
    with FakeTensorMode():
        x = torch.empty(M, K, dtype=dt)
        W = torch.empty(N, K, dtype=dt)
        nw = torch.empty(K, dtype=dt)
        steer = (torch.empty(2, N // 2, dtype=dt), torch.empty(M, dtype=torch.int32),
                 torch.empty(M, dtype=torch.float32), torch.empty(M, dtype=torch.int32), None)
        out = fo.fused_linear(x, W, norm_weight=nw, eps=1e-6, swiglu=True, residual=torch.empty(M, N // 2, dtype=dt),
                              steer=steer, input_pos=torch.empty(M, dtype=torch.int32))
        assert out.shape == (M, N // 2) and out.dtype == dt
        k_cache, v_cache = torch.empty(Bc, S, Hkv, D, dtype=dt), torch.empty(Bc, S, Hkv, D, dtype=dt)
        q = fo.qkv_rope_kv_write(x, torch.empty((H + 2 * Hkv) * D, K, dtype=dt), nw, 1e-6, None,
                                 torch.empty(S, D, dtype=dt), torch.empty(S, D, dtype=dt),
                                 torch.empty(M, dtype=torch.int32), torch.empty(M, dtype=torch.int64),
                                 k_cache, v_cache, H, Hkv)
        assert q.shape == (M, H, D) and q.dtype == dt
        ids = fo.lm_head_argmax(x, W, nw, 1e-6)
        assert ids.shape == (M,) and ids.dtype == torch.int64
        B = 4
        fo.decode_tail_(torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.bool),
                        torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int32),
                        torch.empty(B, dtype=torch.int32), torch.empty(B, dtype=torch.int64),
                        torch.empty(B, 8, dtype=torch.int64), torch.empty(B, 2, dtype=torch.int64))


# ---------------------------------------------------------------- the GPU block-size tables
def _guarded(shape, dtype, fill, pad=1024):
    """A view into a bigger buffer whose surroundings hold NaN (ints: -7): a read outside the view that
    reaches an output shows as NaN or a wrong value."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + 2 * pad,), float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=DEVICE)
    view = buf[pad:pad + n].view(shape)
    view.copy_(fill)
    return view


@triton_only
@pytest.mark.parametrize("M, dtype_tol", [  # 4 of 16 padded rows, one full 32-row block, two row blocks
    pytest.param(M, dt.values[0], id=f"M{M}-{dt.id}")  # fp32: the table's BLOCK_K halved
    for M, dt in ((4, DTYPES[0]), (4, DTYPES[2]), (32, DTYPES[0]), (32, DTYPES[2]), (70, DTYPES[2]))])
def test_gpu_table_configs(M, dtype_tol, seed):
    """The block sizes a GPU picks (fused_linear.gpu_config, qkv_rope._config), also under the
    interpreter (whose own small config the other tests use), on shapes whose N and K are not
    multiples of the blocks; inputs surrounded by NaN. The H200 sweep's illegal memory access at
    M = 4 and 32 (Llama-3.1-8B shapes) was looked for this way; none of these reads or writes it."""
    from steerfast.kernels import fused_linear as FL
    from steerfast.kernels import qkv_rope as QR

    dtype, atol, rtol = dtype_tol
    elt = torch.empty((), dtype=dtype).element_size()
    K, I, d, V = 200, 150, 136, 700
    r = lambda *s, scale=1.0: _guarded(s, dtype, (torch.randn(*s, device=DEVICE) * scale).to(dtype))  # noqa: E731
    x, nw, res = r(M, K), _guarded((K,), dtype, (1 + 0.2 * torch.randn(K, device=DEVICE)).to(dtype)), r(M, d)
    what = f"M={M} {dtype} seed={seed}"

    W13, b13 = r(2 * I, K, scale=K ** -0.5), r(2 * I, scale=0.5)
    out = FL.fused_linear(x, W13, nw, 1e-5, bias=b13, swiglu=True, config=FL.gpu_config(M, I, K, swiglu=True, elt=elt))
    kw = dict(norm_weight=nw, eps=1e-5, bias=b13, swiglu=True)
    ref = fo.fused_linear_torch(x.double(), W13.double(), **{k: v if isinstance(v, (bool, float)) else _f64(v)
                                                                  for k, v in kw.items()}, stats_dtype=torch.float64)
    check_2x(out, ref, fo.fused_linear_torch(x, W13, **kw), atol, rtol, FLOOR[dtype], f"norm+w13+swiglu {what}")

    x2, W2 = r(M, I), r(d, I, scale=I ** -0.5)
    for N_cfg in (d, 4096):  # the table's narrow (d = 1536) and wide (N >= 4096) entries
        out = FL.fused_linear(x2, W2, residual=res, config=FL.gpu_config(M, N_cfg, I, elt=elt))
        ref = fo.fused_linear_torch(x2.double(), W2.double(), residual=res.double())
        check_2x(out, ref, fo.fused_linear_torch(x2, W2, residual=res), atol, rtol, FLOOR[dtype], f"w2+res {what}")

    Wl = r(V, K, scale=K ** -0.5)
    ids = FL.lm_head_argmax(x, Wl, nw, 1e-6, config=FL.gpu_config(M, V, K, argmax=True, elt=elt))
    logits = torch.nn.functional.linear(fo.rms_norm_torch(x.double(), nw.double(), 1e-6, torch.float64), Wl.double())
    base = fo.lm_head_argmax_torch(x, Wl, nw, 1e-6)
    top = logits.max(dim=-1).values
    regret = top - logits.gather(1, ids[:, None])[:, 0]
    base_regret = top - logits.gather(1, base[:, None])[:, 0]
    assert ((ids >= 0) & (ids < V)).all(), f"lm_head_argmax {what}: ids {ids.tolist()}"
    assert (regret <= 2 * base_regret + atol * top.abs().clamp(min=1)).all(), f"lm_head_argmax {what}: {ids.tolist()}"

    H, Hkv, D, S = 4, 2, 64, 24
    Bc = M + 2
    Wqkv = r((H + 2 * Hkv) * D, K, scale=K ** -0.5)
    cos, sin = _rope_tables(S, D, dtype)
    pos = _guarded((M,), torch.int32, torch.randint(0, S, (M,), **I32))
    rows = _guarded((M,), torch.int64, torch.randperm(Bc, device=DEVICE)[:M])
    k0, v0 = torch.randn(Bc, S, Hkv, D, device=DEVICE).to(dtype), torch.randn(Bc, S, Hkv, D, device=DEVICE).to(dtype)
    k_cache, v_cache = k0.clone(), v0.clone()
    q = QR.qkv_rope_kv_write(x, Wqkv, nw, 1e-6, None, cos, sin, pos, rows, k_cache, v_cache, H, Hkv,
                             config=QR._config(M, False, elt))
    kr, vr = k0.double(), v0.double()
    qr = fo.qkv_rope_kv_write_torch(x.double(), Wqkv.double(), nw.double(), 1e-6, None, cos.double(), sin.double(),
                                    pos, rows, kr, vr, H, Hkv, stats_dtype=torch.float64)
    kb, vb = k0.clone(), v0.clone()
    qb = fo.qkv_rope_kv_write_torch(x, Wqkv, nw, 1e-6, None, cos, sin, pos, rows, kb, vb, H, Hkv)
    p = pos.long()
    for name, o, rf, b in (("q", q, qr, qb), ("k", k_cache[rows, p], kr[rows, p], kb[rows, p]),
                           ("v", v_cache[rows, p], vr[rows, p], vb[rows, p])):
        check_2x(o, rf, b, atol, rtol, FLOOR[dtype], f"qkv_rope {name} {what}")
    untouched = torch.ones(Bc, S, dtype=torch.bool, device=DEVICE)
    untouched[rows, p] = False
    assert torch.equal(k_cache[untouched], k0[untouched]) and torch.equal(v_cache[untouched], v0[untouched])


def test_the_automatic_choice_leaves_gemm_shapes_to_the_reference(monkeypatch):
    """Up to FUSED_MAX_M rows the fused kernels; past that (the hybrid's packed windows) the GEMM shape
    goes to the reference (cuBLAS) unless a backend is named."""
    from steerfast.fused_ops import FUSED_MAX_M, _implemented

    monkeypatch.delenv("STEERFAST_BACKEND", raising=False)
    assert _implemented(torch.bfloat16, FUSED_MAX_M) == ("triton", "torch")
    assert _implemented(torch.bfloat16, FUSED_MAX_M + 1) == ("torch",)
    assert _implemented(torch.bfloat16, 4096, backend="triton") == ("triton", "torch")
    assert _implemented(torch.float64, 1) == ("torch",)
    monkeypatch.setenv("STEERFAST_BACKEND", "triton")
    assert _implemented(torch.float32, 4096) == ("triton", "torch")


@triton_only
@pytest.mark.parametrize("M, split", [(1, 2), (5, 3), (70, 4)])
@pytest.mark.parametrize("dtype_tol", [DTYPES[0], DTYPES[2]])
def test_split_k_fused_linear(M, split, dtype_tol, seed):
    """fused_linear with K split over programs (config SPLIT_K; STEERFAST_SPLIT_K picks it on a GPU):
    the last split to arrive sums every split's partials in order and finishes the tile. Under the
    2x rule for residual + steering and RMSNorm + SwiGLU; bitwise the same on a second call
    (deterministic: the sum's order does not depend on which split arrives last)."""
    from steerfast.kernels import fused_linear as FL

    dtype, atol, rtol = dtype_tol
    K, I, d = 333, 150, 136  # K not a multiple of the splits' blocks
    r = lambda *s, scale=1.0: (torch.randn(*s, device=DEVICE) * scale).to(dtype)  # noqa: E731
    x, nw, res = r(M, K), (1 + 0.2 * torch.randn(K, device=DEVICE)).to(dtype), r(M, d)
    cfg = dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1, SPLIT_K=split)
    what = f"M={M} split={split} {dtype} seed={seed}"
    W13, b13 = r(2 * I, K, scale=K ** -0.5), r(2 * I, scale=0.5)
    W2 = r(d, K, scale=K ** -0.5)
    steer = (r(3, d), torch.randint(-1, 3, (M,), **I32), torch.rand(M, device=DEVICE) * 3,
             torch.zeros(M, **I32), r(d))
    pos = torch.zeros(M, **I32)
    cases = [("norm+w13+swiglu", x, W13, dict(norm_weight=nw, eps=1e-5, bias=b13, swiglu=True)),
             ("w2+res+steer", x, W2, dict(residual=res, steer=steer, input_pos=pos))]
    for name, xx, W, kw in cases:
        sv, si, sc, ss, sb = kw.get("steer") or (None,) * 5
        run = lambda: FL.fused_linear(  # noqa: E731
            xx, W, kw.get("norm_weight"), kw.get("eps", 0.0), kw.get("bias"), kw.get("residual"),
            kw.get("swiglu", False), sv, si, sc, ss, sb, kw.get("input_pos"), config=cfg)
        out = run()
        ref = fo.fused_linear_torch(xx.double(), W.double(), **{k: _f64(v) if isinstance(v, torch.Tensor) else
                                                                   (tuple(map(_f64, v)) if k == "steer" else v)
                                                                   for k, v in kw.items()}, stats_dtype=torch.float64)
        check_2x(out, ref, fo.fused_linear_torch(xx, W, **kw), atol, rtol, FLOOR[dtype], f"{name} {what}")
        assert torch.equal(run(), out), f"{name} {what}: a second call differs"


def test_split_k_choice():
    """STEERFAST_SPLIT_K: off (1) unless asked; "auto" fills the SMs the tiles leave idle, each split at
    least two BLOCK_K steps; a number is taken as given within that cap."""
    from steerfast.kernels.fused_linear import split_k_for

    assert split_k_for(70, 1536, 128, 132, mode="1") == 1
    assert split_k_for(70, 1536, 128, 132, mode="auto") == 2  # Qwen2.5-1.5B gate/up at M = 1
    assert split_k_for(12, 8960, 128, 132, mode="auto") == 16
    assert split_k_for(12, 1536, 512, 132, mode="auto") == 1  # K too short to split
    assert split_k_for(500, 4096, 128, 132, mode="auto") == 1  # enough programs already
    assert split_k_for(10, 4096, 128, 132, mode="4") == 4
    assert split_k_for(10, 4096, 128, 132, mode="64") == 16


@triton_only
@pytest.mark.parametrize("M, split", [(1, 2), (5, 3)])
@pytest.mark.parametrize("dtype_tol", [DTYPES[0], DTYPES[2]])
def test_split_k_qkv_rope(M, split, dtype_tol, seed):
    """qkv_rope_kv_write with K split over programs: q, the cache writes (and nothing else in the
    cache) under the 2x rule, bitwise the same on a second call."""
    from steerfast.kernels import qkv_rope as QR

    dtype, atol, rtol = dtype_tol
    H, Hkv, D, S, K = 4, 2, 32, 12, 203
    Bc = M + 2
    r = lambda *s, scale=1.0: (torch.randn(*s, device=DEVICE) * scale).to(dtype)  # noqa: E731
    x, nw = r(M, K), (1 + 0.2 * torch.randn(K, device=DEVICE)).to(dtype)
    W, b = r((H + 2 * Hkv) * D, K, scale=K ** -0.5), r((H + 2 * Hkv) * D, scale=0.5)
    cos, sin = _rope_tables(S, D, dtype)
    pos = torch.randint(0, S, (M,), **I32)
    rows = torch.randperm(Bc, device=DEVICE)[:M]
    k0, v0 = r(Bc, S, Hkv, D), r(Bc, S, Hkv, D)
    cfg = dict(BLOCK_J=16, BLOCK_K=32, num_warps=4, num_stages=1, SPLIT_K=split)
    outs = []
    for _ in range(2):
        kc, vc = k0.clone(), v0.clone()
        q = QR.qkv_rope_kv_write(x, W, nw, 1e-6, b, cos, sin, pos, rows, kc, vc, H, Hkv, config=cfg)
        outs.append((q, kc, vc))
    (q, kc, vc), (q2, kc2, vc2) = outs
    assert torch.equal(q, q2) and torch.equal(kc, kc2) and torch.equal(vc, vc2), "a second call differs"
    kr, vr = k0.double(), v0.double()
    qr = fo.qkv_rope_kv_write_torch(x.double(), W.double(), nw.double(), 1e-6, b.double(), cos.double(), sin.double(),
                                    pos, rows, kr, vr, H, Hkv, stats_dtype=torch.float64)
    kb, vb = k0.clone(), v0.clone()
    qb = fo.qkv_rope_kv_write_torch(x, W, nw, 1e-6, b, cos, sin, pos, rows, kb, vb, H, Hkv)
    p = pos.long()
    what = f"M={M} split={split} {dtype} seed={seed}"
    for name, o, rf, bs in (("q", q, qr, qb), ("k", kc[rows, p], kr[rows, p], kb[rows, p]),
                            ("v", vc[rows, p], vr[rows, p], vb[rows, p])):
        check_2x(o, rf, bs, atol, rtol, FLOOR[dtype], f"qkv_rope {name} {what}")
    written = torch.zeros(Bc, S, dtype=torch.bool, device=DEVICE)
    written[rows, p] = True
    assert torch.equal(kc[~written], k0[~written]) and torch.equal(vc[~written], v0[~written])
