"""steerfast.ops against float64 references written here (never the implementation under test).

Every backend is called through the public wrappers (`steerfast.ops.decode_attention`,
`steerfast.ops.steer_add_`, `steerfast.ops.steer_residual_add`), so dispatch and the torch.library
custom ops are covered too.
Inputs are fresh random numbers each run; each test prints its seed (pytest shows it on failure)
and `STEERFAST_TEST_SEED=<seed>` replays it.

Accuracy rule (flash-attn's): the implementation's max error against the float64 reference must be
at most twice the error of plain PyTorch ops computing in the same dtype, plus a tiny floor; and
within (atol, rtol) of the reference.

Backends: "torch" always; "triton" on CUDA or under TRITON_INTERPRET=1 (CI: CPU, interpreter, so
its shapes are small); "cuda" and the large shapes only on a GPU (`-m gpu`).
"""
from __future__ import annotations

import math

import pytest
import torch

import steerfast.ops as ops
from steerfast import backend as _backend
from steerfast.errors import BackendUnavailableError

from backends import BACKENDS, DEVICE, DTYPES, FLOOR, GPU as _gpu, HAS_CUDA, TRITON_SKIP, check_2x, triton_only



def _attention_has_cuda_kernel() -> bool:
    """decode attention's CUDA kernel is flash-attn's."""
    return "cuda" in ops.decode_attention_backends()


def _skip_unavailable(backend, op, dtype=None):
    if backend == "triton" and TRITON_SKIP:
        pytest.skip(TRITON_SKIP)
    if backend == "cuda":
        if op == "decode_attention":
            if not _attention_has_cuda_kernel():
                pytest.skip("flash-attn (the CUDA decode attention) is not installed")
            if dtype == torch.float32:
                pytest.skip("flash-attn has no fp32 kernel")
        elif _backend.cuda_extension() is None:
            pytest.skip("steerfast._C was not built")


# ---------------------------------------------------------------- decode attention
def attention_ref(q, k_cache, v_cache, seq_lens, scale, dtype):
    """Attention of q [B, H, D] over keys 0..seq_lens[b]-1 of k_cache/v_cache [Bc, S, Hkv, D], computed
    with plain torch ops in `dtype` (float64: the reference; the inputs' dtype: the 2x rule's baseline,
    as flash-attn's attention_ref(upcast=False): scores, softmax and output each rounded to dtype)."""
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    valid = (torch.arange(S, device=q.device)[None, :] < seq_lens[:, None].long())  # [B, S]
    # positions past a row's length may hold garbage (NaN): take them out of the arithmetic
    k = torch.where(valid[:, :, None, None], k_cache[:B], 0).to(dtype).repeat_interleave(H // Hkv, dim=2)
    v = torch.where(valid[:, :, None, None], v_cache[:B], 0).to(dtype).repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q.to(dtype) * scale, k)  # [B, H, S]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(dtype)
    return torch.einsum("bhs,bshd->bhd", p, v)


def _make_attention_inputs(B, S, H, Hkv, D, dtype, lens, poison_value, strided, lens_dtype=torch.int32):
    """q [B, H, D] and caches [B + 2, S, Hkv, D]; cache rows >= B and positions >= seq_lens[b] hold
    `poison_value` (NaN for kernels that must not read them)."""
    Bc = B + 2
    if strided:  # q a slice of a fused qkv projection; K and V interleaved in one buffer
        q = torch.randn(B, H + 2 * Hkv, D, device=DEVICE, dtype=dtype)[:, :H]
        kv = torch.randn(Bc, S, 2, Hkv, D, device=DEVICE, dtype=dtype)
        k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    else:
        q = torch.randn(B, H, D, device=DEVICE, dtype=dtype)
        k_cache = torch.randn(Bc, S, Hkv, D, device=DEVICE, dtype=dtype)
        v_cache = torch.randn(Bc, S, Hkv, D, device=DEVICE, dtype=dtype)
    if lens == "full":
        seq_lens = torch.full((B,), S)
    elif lens == "one":
        seq_lens = torch.ones(B)
    else:  # ragged, with 1 and S present
        seq_lens = torch.randint(1, S + 1, (B,))
        seq_lens[0] = 1
        seq_lens[-1] = S
    seq_lens = seq_lens.to(device=DEVICE, dtype=lens_dtype)
    past = torch.arange(S, device=DEVICE)[None, :] >= seq_lens[:, None]  # [B, S]
    for c in (k_cache, v_cache):
        c[:B][past] = poison_value
        c[B:] = poison_value
    return q, k_cache, v_cache, seq_lens


# (B, S, H, Hkv, D, lens, strided): small enough for the Triton interpreter on 2 CPU cores
ATTN_SHAPES = [
    pytest.param((1, 431, 12, 2, 128, "full", False), id="qwen1.5b-B1-S431"),  # GQA 6, split over S
    pytest.param((1, 300, 12, 2, 128, "one", False), id="B1-len1"),  # all but one split empty
    pytest.param((3, 100, 4, 4, 80, "ragged", True), id="B3-mha-D80-strided"),  # GQA 1, D padded
    pytest.param((2, 90, 14, 2, 64, "ragged", False, torch.int64), id="B2-gqa7-lens-int64"),  # the model's
    # seq_lens: input_pos + 1 (int64)
    pytest.param((5, 257, 8, 4, 64, "ragged", False), id="B5-gqa2-D64"),
]
ATTN_SHAPES_GPU = [
    pytest.param((1, 4096, 32, 8, 128, "full", False), id="llama8b-B1-S4096", marks=_gpu),
    pytest.param((8, 2048, 12, 2, 128, "ragged", False), id="qwen1.5b-B8-S2048", marks=_gpu),
    pytest.param((4, 1999, 28, 4, 128, "ragged", True), id="qwen7b-gqa7-strided", marks=_gpu),
    pytest.param((2, 3001, 16, 2, 96, "ragged", False), id="gqa8-D96", marks=_gpu),
    pytest.param((64, 517, 32, 8, 128, "ragged", False), id="llama8b-B64", marks=_gpu),
    pytest.param((3, 70000, 2, 1, 64, "ragged", False), id="long-S70000", marks=_gpu),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES + ATTN_SHAPES_GPU)
def test_decode_attention(shape, dtype_tol, backend, seed):
    B, S, H, Hkv, D, lens, strided, *lens_dtype = shape
    dtype, atol, rtol = dtype_tol
    _skip_unavailable(backend, "decode_attention", dtype)
    # the torch reference multiplies masked-out values by 0, so it gets finite garbage there;
    # the Triton kernel must not read past a row's length at all: NaN there would show
    poison = float("nan") if backend == "triton" else 1e4
    q, k_cache, v_cache, seq_lens = _make_attention_inputs(B, S, H, Hkv, D, dtype, lens, poison, strided,
                                                           *lens_dtype)
    scale = 1.0 / math.sqrt(D)

    out = ops.decode_attention(q, k_cache, v_cache, seq_lens, scale, backend=backend)

    assert out.dtype == dtype and out.shape == (B, H, D)
    ref = attention_ref(q, k_cache, v_cache, seq_lens, scale, torch.float64)
    base = attention_ref(q, k_cache, v_cache, seq_lens, scale, dtype)
    check_2x(out, ref, base, atol, rtol, FLOOR[dtype],
           f"decode_attention[{backend}] seq_lens={seq_lens.tolist()} seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_attention_with_prefix_rows(num_splits, dtype_tol, backend, seed):
    """The hybrid's candidate rows: keys below prefix_lens[b] come from the sequence's row, the rest
    from the candidate's own scratch row; equal to attention over the keys gathered by hand."""
    dtype, atol, rtol = dtype_tol
    _skip_unavailable(backend, "decode_attention", dtype)
    Bc, S, H, Hkv, D, B = 7, 150, 6, 2, 64, 5
    k_cache, v_cache = (torch.randn(Bc, S, Hkv, D, device=DEVICE).to(dtype) for _ in range(2))
    q = torch.randn(B, H, D, device=DEVICE).to(dtype)
    seq_lens = torch.randint(1, S + 1, (B,), device=DEVICE)
    prefix_lens = (torch.rand(B, device=DEVICE) * seq_lens).long()  # 0 .. seq_len - 1: at least one own key
    prefix_rows = torch.randint(0, 3, (B,), device=DEVICE)
    rows = torch.arange(3, 3 + B, device=DEVICE) % Bc
    j = torch.arange(S, device=DEVICE)[None, :]
    src = torch.where(j < prefix_lens[:, None], prefix_rows[:, None], rows[:, None])
    k_seen, v_seen = k_cache[src, j], v_cache[src, j]  # [B, S, Hkv, D], by hand
    scale = 1.0 / math.sqrt(D)
    if backend == "triton":
        from steerfast.kernels.decode_attention import decode_attention as triton_attention
        out = triton_attention(q, k_cache, v_cache, seq_lens, scale, num_splits=num_splits, rows=rows,
                               prefix_rows=prefix_rows, prefix_lens=prefix_lens)
    else:
        out = ops.decode_attention(q, k_cache, v_cache, seq_lens, scale, backend=backend, rows=rows,
                                   prefix_rows=prefix_rows, prefix_lens=prefix_lens)
    ref = attention_ref(q, k_seen, v_seen, seq_lens, scale, torch.float64)
    base = attention_ref(q, k_seen, v_seen, seq_lens, scale, dtype)
    check_2x(out, ref, base, atol, rtol, FLOOR[dtype], f"prefix decode_attention[{backend}] seed={seed}")


WINDOW_SHAPES = [  # (Bc, S, H, Hkv, D, windows): windows of the packed candidates, 0 = the whole context
    pytest.param((9, 150, 6, 2, 64, [0, 1, 15, 50, 0, 33]), id="qwen-like-gqa3"),
    pytest.param((6, 123, 4, 4, 32, [5, 0, 17]), id="mha-D32"),
    pytest.param((6, 70, 8, 1, 48, [1, 1, 16, 0]), id="mqa-D48"),
]


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("shape", WINDOW_SHAPES)
def test_decode_attention_over_packed_windows(shape, dtype_tol, backend, seed):
    """The hybrid's packed candidate windows with their query blocks (the Triton backend serves a
    block of rows per program: kernels/window_attention.py): each window's rows at consecutive
    positions over its sequence's prefix, causal through seq_lens; against keys gathered by hand."""
    Bc, S, H, Hkv, D, windows = shape
    dtype, atol, rtol = dtype_tol
    _skip_unavailable(backend, "decode_attention", dtype)
    n = len(windows)
    k_cache, v_cache = (torch.randn(Bc, S, Hkv, D, device=DEVICE).to(dtype) for _ in range(2))
    seq_of = torch.randint(0, Bc - n, (n,)) if Bc > n else torch.zeros(n, dtype=torch.long)
    length = torch.randint(1, S + 1, (n,))  # each candidate's sequence length
    width = torch.tensor([L if w == 0 else min(w, L) for w, L in zip(windows, length.tolist())])
    cand = torch.arange(n).repeat_interleave(width)
    pos = (length - width)[cand] + torch.arange(int(width.sum())) - (width.cumsum(0) - width)[cand]
    rows = (Bc - n + cand).to(DEVICE)  # one scratch row per candidate, after the sequences
    prefix_rows, prefix_lens = seq_of[cand].to(DEVICE), (length - width)[cand].to(DEVICE, torch.int32)
    seq_lens = (pos + 1).to(DEVICE, torch.int32)
    blocks = ops.window_query_blocks(width).to(DEVICE)
    q = torch.randn(len(pos), H, D, device=DEVICE).to(dtype)
    scale = 1.0 / math.sqrt(D)
    out = ops.decode_attention(q, k_cache, v_cache, seq_lens, scale, backend=backend, rows=rows,
                               prefix_rows=prefix_rows, prefix_lens=prefix_lens, query_blocks=blocks)
    j = torch.arange(S, device=DEVICE)[None, :]
    src = torch.where(j < prefix_lens[:, None], prefix_rows[:, None], rows[:, None])
    k_seen, v_seen = k_cache[src, j], v_cache[src, j]  # [T, S, Hkv, D], by hand
    ref = attention_ref(q, k_seen, v_seen, seq_lens, scale, torch.float64)
    base = attention_ref(q, k_seen, v_seen, seq_lens, scale, dtype)
    check_2x(out, ref, base, atol, rtol, FLOOR[dtype], f"windowed decode_attention[{backend}] seed={seed}")


@triton_only
@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
def test_decode_attention_triton_splits(num_splits, seed):
    """The launcher's split count (chosen from shapes and the GPU otherwise), each path: one program
    per row and head group, a few splits, and more splits than blocks (empty, neutral partials)."""
    from steerfast.kernels.decode_attention import decode_attention

    B, S, H, Hkv, D = 3, 200, 6, 2, 64
    q, k_cache, v_cache, seq_lens = _make_attention_inputs(B, S, H, Hkv, D, torch.float32, "ragged",
                                                           float("nan"), False)
    out = decode_attention(q, k_cache, v_cache, seq_lens, 0.3, num_splits=num_splits)
    ref = attention_ref(q, k_cache, v_cache, seq_lens, 0.3, torch.float64)
    base = attention_ref(q, k_cache, v_cache, seq_lens, 0.3, torch.float32)
    check_2x(out, ref, base, 1e-5, 1e-5, FLOOR[torch.float32], f"num_splits={num_splits} seed={seed}")


@triton_only
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_triton_empty_row_is_zero(num_splits):
    """seq_lens >= 1 is a precondition; a row of length 0 still gets zeros (flash-attn's answer),
    not NaN, and reads nothing."""
    from steerfast.kernels.decode_attention import decode_attention

    q, k_cache, v_cache, seq_lens = _make_attention_inputs(2, 70, 2, 1, 64, torch.float32, "full",
                                                           float("nan"), False)
    seq_lens[0] = 0
    k_cache[0], v_cache[0] = float("nan"), float("nan")
    out = decode_attention(q, k_cache, v_cache, seq_lens, 0.125, num_splits=num_splits)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out[1]).all()


# ---------------------------------------------------------------- steering add
def _make_steer_inputs(B, T, d, V, dtype, with_bias):
    """h is a [B, T, d] view of a larger buffer (strided rows); returns (buf, h, input_pos, start,
    vectors, idx, coef, bias). Row 0 is unsteered (idx -1) when B > 1; at least one row is steered."""
    buf = torch.randn(B, T + 2, d, device=DEVICE, dtype=dtype)
    h = buf[:, 1:T + 1]
    vectors = torch.randn(V, d, device=DEVICE, dtype=dtype)
    bias = torch.randn(d, device=DEVICE, dtype=dtype) if with_bias else None
    idx = torch.randint(-1, V, (B,))
    if B > 1:
        idx[0] = -1
    idx[-1] = V - 1
    offset = torch.randint(0, 50, (B, 1))
    input_pos = offset + torch.arange(T)[None, :]  # [B, T] positions of a decode chunk
    start = offset[:, 0] + torch.randint(-1, T + 1, (B,))  # some positions before start, some after
    start[-1] = offset[-1, 0] + T // 2
    coef = torch.randn(B) * 4
    cast = dict(device=DEVICE, dtype=torch.int32)
    return (buf, h, input_pos.to(**cast).contiguous(), start.to(**cast), vectors, idx.to(**cast),
            coef.to(device=DEVICE, dtype=torch.float32), bias)


def steer_ref(h, input_pos, start, vectors, idx, coef, bias, dtype):
    """h + coef * (vectors[idx] + bias) on the gated rows, in plain torch ops in `dtype` (float64:
    the reference; h's dtype: the 2x rule's baseline). Returns (result, gate [B, T])."""
    v = vectors[idx.clamp(min=0).long()].to(dtype)  # [B, d]
    if bias is not None:
        v = v + bias.to(dtype)
    gate = (idx >= 0)[:, None] & (input_pos >= start[:, None])  # [B, T]
    steered = h.to(dtype) + coef.to(dtype)[:, None, None] * v[:, None, :]
    return torch.where(gate[..., None], steered, h.to(dtype)), gate


# (B, T, d, V, bias)
STEER_SHAPES = [
    pytest.param((1, 1, 5, 1, False), id="B1-T1-d5"),
    pytest.param((3, 4, 123, 3, True), id="B3-T4-d123-bias"),
    pytest.param((5, 7, 431, 4, True), id="B5-T7-d431-bias"),
    pytest.param((5, 3, 431, 2, False), id="B5-T3-d431"),
    pytest.param((16, 33, 4096, 5, True), id="B16-T33-d4096-bias", marks=_gpu),
    pytest.param((2, 1, 3584, 7, False), id="B2-T1-d3584", marks=_gpu),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("shape", STEER_SHAPES)
def test_steer_add(shape, dtype_tol, backend, seed):
    B, T, d, V, with_bias = shape
    dtype, atol, rtol = dtype_tol
    _skip_unavailable(backend, "steer_add")
    buf, h, input_pos, start, vectors, idx, coef, bias = _make_steer_inputs(B, T, d, V, dtype, with_bias)
    buf0 = buf.clone()
    h0 = buf0[:, 1:T + 1]
    ref, gate = steer_ref(h0, input_pos, start, vectors, idx, coef, bias, torch.float64)
    base, _ = steer_ref(h0, input_pos, start, vectors, idx, coef, bias, dtype)

    ops.steer_add_(h, input_pos, start, vectors, idx, coef, bias, backend=backend)

    what = f"steer_add_[{backend}] idx={idx.tolist()} start={start.tolist()} seed={seed}"
    assert torch.equal(buf[:, 0], buf0[:, 0]) and torch.equal(buf[:, T + 1], buf0[:, T + 1]), \
        f"{what}: wrote outside h"
    assert torch.equal(h[~gate], h0[~gate]), f"{what}: an unsteered row changed"
    if B > 1:
        assert idx[0] < 0 and torch.equal(h[0], h0[0]), f"{what}: the row with idx < 0 changed"
    assert gate.any(), "the inputs must steer at least one row"
    check_2x(h, ref, base, atol, rtol, FLOOR[dtype], what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steer_add_nothing_steered_is_a_no_op(backend):
    _skip_unavailable(backend, "steer_add")
    buf, h, input_pos, start, vectors, idx, coef, bias = _make_steer_inputs(3, 5, 123, 2, torch.bfloat16, True)
    idx.fill_(-1)
    h0 = h.clone()
    ops.steer_add_(h, input_pos, start, vectors, idx, coef, bias, backend=backend)
    assert torch.equal(h, h0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("shape", STEER_SHAPES)
def test_steer_residual_add(shape, dtype_tol, backend, seed):
    """x + y, then steered: unsteered rows are exactly the unfused `x + y`; steered ones are held
    to the float64 reference of (x + y rounded to dtype) + coef * (v + bias)."""
    if not hasattr(ops, "steer_residual_add"):
        pytest.skip("steerfast.ops has no steer_residual_add")
    B, T, d, V, with_bias = shape
    dtype, atol, rtol = dtype_tol
    _skip_unavailable(backend, "steer_add")
    _, _, input_pos, start, vectors, idx, coef, bias = _make_steer_inputs(B, T, d, V, dtype, with_bias)
    x = torch.randn(B, T, d, device=DEVICE, dtype=dtype)
    y = torch.randn(B, T, d, device=DEVICE, dtype=dtype)
    s = x + y  # the unfused residual add, in dtype
    ref, gate = steer_ref(s, input_pos, start, vectors, idx, coef, bias, torch.float64)
    base, _ = steer_ref(s, input_pos, start, vectors, idx, coef, bias, dtype)
    x0, y0 = x.clone(), y.clone()

    out = ops.steer_residual_add(x, y, input_pos, start, vectors, idx, coef, bias, backend=backend)

    what = f"steer_residual_add[{backend}] idx={idx.tolist()} start={start.tolist()} seed={seed}"
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(x, x0) and torch.equal(y, y0), f"{what}: an input changed"
    assert torch.equal(out[~gate], s[~gate]), f"{what}: an unsteered row is not exactly x + y"
    check_2x(out, ref, base, atol, rtol, FLOOR[dtype], what)


# ---------------------------------------------------------------- dispatch
def _small_inputs():
    q, k, v, sl = _make_attention_inputs(2, 20, 4, 2, 64, torch.float32, "ragged", 0.0, False)
    _, h, pos, start, vectors, idx, coef, bias = _make_steer_inputs(2, 3, 16, 2, torch.float32, True)
    return (q, k, v, sl), (h, pos, start, vectors, idx, coef, bias)


@triton_only
def test_env_var_selects_triton(monkeypatch):
    import steerfast.kernels.decode_attention as k_attn
    import steerfast.kernels.steer_add as k_steer

    calls = []

    def spy(name, fn):
        def wrapped(*a, **kw):
            calls.append(name)
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(k_attn, "decode_attention", spy("attn", k_attn.decode_attention))
    monkeypatch.setattr(k_steer, "steer_add_", spy("steer", k_steer.steer_add_))
    monkeypatch.setenv("STEERFAST_BACKEND", "triton")
    attn_args, steer_args = _small_inputs()
    ops.decode_attention(*attn_args)
    ops.steer_add_(*steer_args)
    assert calls == ["attn", "steer"]
    for op in ("decode_attention", "steer_add"):
        assert _backend.choose(op, DEVICE, ("cuda", "triton", "torch")) == "triton"


def test_a_tensor_on_another_device_is_refused_before_any_kernel():
    """A raw pointer from another device would fault in the kernel (an illegal address ends the CUDA
    context): every op names the stray argument first. 'meta' stands in for the other device."""
    from steerfast.errors import InvalidInputError

    attn_args, (h, pos, start, vectors, idx, coef, bias) = _small_inputs()
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    with pytest.raises(InvalidInputError, match="vectors is on meta"):
        ops.steer_add_(h, pos, start, meta(vectors), idx, coef, bias)
    with pytest.raises(InvalidInputError, match="y is on meta"):
        ops.steer_residual_add(h.contiguous(), meta(h.contiguous()), pos, start, vectors, idx, coef, bias)
    with pytest.raises(AssertionError, match="contiguous"):
        ops.steer_add_(h, pos, torch.stack([start, start], 1)[:, 0], vectors, idx, coef, bias)
    q, k, v, lens = attn_args[:4]
    with pytest.raises(InvalidInputError, match="seq_lens is on meta"):
        ops.decode_attention(q, k, v, meta(lens))
    d, n = 16, 9
    x, W, be, bd = torch.randn(3, d), torch.randn(d, n), torch.randn(n), torch.randn(d)
    with pytest.raises(InvalidInputError, match="W_enc is on meta"):
        ops.topk_sae_encode(x, meta(W), be, bd, 2)
    with pytest.raises(InvalidInputError, match="cat_map is on meta"):
        ops.sae_controller(x, W, be, bd, meta(torch.zeros(n, dtype=torch.int32)), 0.0)


def test_forcing_cuda_on_cpu_tensors_raises(monkeypatch):
    attn_args, steer_args = _small_inputs()
    attn_args = [t.cpu() for t in attn_args]
    steer_args = [t.cpu() for t in steer_args]
    with pytest.raises(BackendUnavailableError):
        ops.steer_add_(*steer_args, backend="cuda")
    monkeypatch.setenv("STEERFAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError):
        ops.steer_add_(*steer_args)
    with pytest.raises(BackendUnavailableError):
        ops.decode_attention(*attn_args)


def test_forcing_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    attn_args, steer_args = _small_inputs()
    with pytest.raises(BackendUnavailableError):
        ops.steer_add_(*[t.cpu() for t in steer_args], backend="triton")
    with pytest.raises(BackendUnavailableError):
        ops.decode_attention(*[t.cpu() for t in attn_args], backend="triton")
    with pytest.raises(BackendUnavailableError):
        ops.steer_add_(*[t.cpu() for t in steer_args], backend="nonsense")


# ---------------------------------------------------------------- torch.compile / CUDA graphs
@pytest.mark.parametrize("backend", ["torch", None])
def test_torch_compile_fullgraph(backend, monkeypatch):
    """Both custom ops trace as single opaque ops into one graph, dispatch included, on CPU.
    aot_eager: tracing, functionalisation and the fake kernels are what is under test, not
    inductor's C++ codegen (16 s cold on 2 cores)."""
    (q, k, v, sl), (h, pos, start, vectors, idx, coef, bias) = _small_inputs()
    args = [t.cpu() for t in (q, k, v, sl, h, pos, start, vectors, idx, coef, bias)]
    monkeypatch.delenv("STEERFAST_BACKEND", raising=False)

    def step(q, k, v, sl, h, pos, start, vectors, idx, coef, bias):
        out = ops.decode_attention(q, k, v, sl, 0.125, backend=backend)
        ops.steer_add_(h, pos, start, vectors, idx, coef, bias, backend=backend)
        return out * 2

    h_eager = args[4].clone()
    expect = step(*args[:4], h_eager, *args[5:])

    def compiled_run():
        torch._dynamo.reset()
        h = args[4].clone()
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args[:4], h, *args[5:])
        torch.testing.assert_close(got, expect, atol=0, rtol=0)
        torch.testing.assert_close(h, h_eager, atol=0, rtol=0)

    compiled_run()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_and_replay(backend, seed):
    """Both ops capture into one CUDA graph; a replay with new q, lengths and gates is exact."""
    _skip_unavailable(backend, "decode_attention", torch.bfloat16)
    _skip_unavailable(backend, "steer_add")
    B, S, H, Hkv, D = 4, 1000, 12, 2, 128
    q, k, v, sl = _make_attention_inputs(B, S, H, Hkv, D, torch.bfloat16, "full", 0.0, False)
    _, h, pos, start, vectors, idx, coef, bias = _make_steer_inputs(B, 1, 1536, 3, torch.bfloat16, True)

    def step():
        out = ops.decode_attention(q, k, v, sl, 0.1, backend=backend)
        ops.steer_add_(h, pos, start, vectors, idx, coef, bias, backend=backend)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles / warms up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    q.copy_(torch.randn_like(q))
    sl.copy_(torch.randint(1, S + 1, (B,), device=DEVICE, dtype=torch.int32))
    idx.copy_(torch.tensor([-1, 0, 2, 1], device=DEVICE, dtype=torch.int32))
    h0 = torch.randn_like(h)
    h.copy_(h0)
    graph.replay()
    torch.cuda.synchronize()
    expect_out = ops.decode_attention(q, k, v, sl, 0.1, backend=backend)
    expect_h = h0.clone()
    ops.steer_add_(expect_h, pos, start, vectors, idx, coef, bias, backend=backend)
    torch.testing.assert_close(out, expect_out, atol=0, rtol=0)
    torch.testing.assert_close(h, expect_h, atol=0, rtol=0)
