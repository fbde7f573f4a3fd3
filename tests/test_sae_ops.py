"""The SAE ops (`steerfast.ops.topk_sae_encode`, `steerfast.ops.sae_controller`) and the fused
`steerfast.ops.steer_residual_add` against float64 references written here, never the implementation
under test, through the public wrappers (so dispatch and the custom ops are covered too).

Inputs are fresh random numbers each run; each test prints its seed (pytest shows it on failure) and
`STEERFAST_TEST_SEED=<seed>` replays it.

Accuracy. The SAE ops compute in fp32 whatever the input dtype: z = (x - b_dec) W_enc + b_enc with
x - b_dec formed in fp32 and fp32 accumulation (see `sae_preactivations_torch`). So the values are held
(a) to flash-attn's 2x rule: max error against float64 <= 2 x the error of plain torch computing in the
input dtype (for 16-bit inputs, a 16-bit matmul: loose) + a tiny floor, and (b) to fp32-level
(atol, rtol) for every dtype, which is what holds 16-bit inputs to the fp32 semantics: rounding
x - b_dec to bf16 before a 16-bit matmul gives ~1e-3 and fails it.
Indices: exactly the reference's where the reference's neighbouring values are more than twice the
tolerance apart; elsewhere a valid top-k (each returned index's float64 value is the returned value).
Ties: integer-valued inputs make every backend's z exact, so there the output must be exactly the
float64 reference, stable-sorted (lower latent first among equal values).

Backends: "torch" always; "triton" on CUDA or under TRITON_INTERPRET=1 (CI: CPU, interpreter, so its
shapes are small: the whole file runs in about a minute on 2 cores); "cuda" and the large shapes only
on a GPU (`-m gpu`).
"""
from __future__ import annotations


import pytest
import torch

import steerfast.ops as ops
from steerfast import backend as _backend

from backends import BACKENDS, DEVICE, DTYPES as STEER_DTYPES, FLOOR, GPU as _gpu, TRITON_SKIP, triton_only

# SAE ops: (dtype, atol, rtol) against float64; all compute in fp32, so fp32-level for every dtype
# (16-bit inputs get a little room for tensor-core fp32 accumulation and a split x - b_dec)
SAE_DTYPES = [
    pytest.param((torch.float32, 1e-5, 1e-5), id="fp32"),
    pytest.param((torch.float16, 1e-4, 1e-4), id="fp16"),
    pytest.param((torch.bfloat16, 1e-4, 1e-4), id="bf16"),
]


def _skip_unavailable(backend, cuda_fn):
    if backend == "triton" and TRITON_SKIP:
        pytest.skip(TRITON_SKIP)
    if backend == "cuda":
        ext = _backend.cuda_extension()
        if ext is None:
            pytest.skip("steerfast._C was not built")
        if not hasattr(ext, cuda_fn):
            pytest.skip(f"steerfast._C has no {cuda_fn}")


def _check_2x(err, base_err, floor, what):
    assert err <= 2 * base_err + floor, (
        f"{what}: max error {err:.3g} > 2 x same-dtype torch error {base_err:.3g} + {floor:g}")


# ---------------------------------------------------------------- SAE inputs and references
def _make_sae(B, d, n, dtype, integer=False):
    """x [B, d], W_enc [d, n], b_enc [n], b_dec [d] in dtype, z ~ N(0, 1)-ish. integer: small integers
    (W_enc, b_enc in quarters) so that every backend computes z exactly, in any order: exact ties."""
    dev = dict(device=DEVICE)  # drawn where they are used: the GPU-only shapes hold up to 1e9 values
    if integer:
        x = torch.randint(-3, 4, (B, d), **dev).to(dtype)
        W = (torch.randint(-2, 3, (d, n), **dev) / 4).to(dtype)
        b_enc = (torch.randint(-4, 5, (n,), **dev) / 4).to(dtype)
        b_dec = torch.randint(-1, 2, (d,), **dev).to(dtype)
    else:
        x = torch.randn(B, d, **dev).to(dtype)
        W = (torch.randn(d, n, **dev) / d ** 0.5).to(dtype)
        b_enc = (torch.randn(n, **dev) * 0.3).to(dtype)
        b_dec = (torch.randn(d, **dev) * 0.3).to(dtype)
    return [t.contiguous() for t in (x, W, b_enc, b_dec)]


def preact_ref(x, W, b_enc, b_dec, dtype, relu=False):
    """z in plain torch ops in `dtype` (float64: the reference; the input dtype: the 2x rule's
    baseline: x - b_dec, the matmul and + b_enc each rounded to that dtype)."""
    z = (x.to(dtype) - b_dec.to(dtype)) @ W.to(dtype) + b_enc.to(dtype)
    return z.clamp(min=0) if relu else z


def _sort_desc(z):
    """Descending, the lower index first among equal values (a stable sort)."""
    return z.sort(dim=-1, descending=True, stable=True)


def _check_topk(vals, idx, z64, k, base_z, atol, rtol, floor, what):
    """vals/idx: the backend's [B, k]; z64 the float64 pre-activations [B, n]; base_z the same-dtype
    torch ones (the 2x rule's baseline)."""
    B, n = z64.shape
    assert vals.shape == (B, k) and idx.shape == (B, k), f"{what}: shapes {tuple(vals.shape)}, {tuple(idx.shape)}"
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64, f"{what}: dtypes {vals.dtype}, {idx.dtype}"
    ref_sorted, ref_order = _sort_desc(z64)
    ref_vals = ref_sorted[:, :k]
    out = vals.double()
    err = (out - ref_vals).abs().max().item()
    base_err = (_sort_desc(base_z.double())[0][:, :k] - ref_vals).abs().max().item()
    _check_2x(err, base_err, floor, what)
    torch.testing.assert_close(out, ref_vals, atol=atol, rtol=rtol, msg=lambda m: f"{what}: values: {m}")

    # a valid top-k: distinct latents in range, each one's float64 value is the value returned for it
    assert ((idx >= 0) & (idx < n)).all(), f"{what}: index out of range"
    if k > 1:
        assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), f"{what}: a latent twice"
    torch.testing.assert_close(out, z64.gather(1, idx), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: a returned value is not its latent's value: {m}")
    # descending; among equal returned values the lower latent first
    if k > 1:
        assert (vals[:, 1:] <= vals[:, :-1]).all(), f"{what}: values not descending"
        tied = vals[:, 1:] == vals[:, :-1]
        assert (idx[:, 1:][tied] > idx[:, :-1][tied]).all(), f"{what}: equal values not in latent order"
    # exactly the reference's latent wherever the reference's neighbours are well separated
    # (rank r is sure when no value within tolerance of the reference could swap it with a neighbour)
    tol = atol + rtol * ref_sorted.abs()  # [B, n]
    sure = torch.ones_like(ref_vals, dtype=torch.bool)
    sure[:, 1:] &= ref_sorted[:, :k - 1] - ref_sorted[:, 1:k] > tol[:, :k - 1] + tol[:, 1:k]
    m = min(k, n - 1)
    sure[:, :m] &= ref_sorted[:, :m] - ref_sorted[:, 1:m + 1] > tol[:, :m] + tol[:, 1:m + 1]
    bad = sure & (idx != ref_order[:, :k])
    assert not bad.any(), (
        f"{what}: latent differs from the reference at {bad.nonzero().tolist()[:5]} (well separated: "
        f"{sure.float().mean().item():.0%} of positions)")
    return sure


# ---------------------------------------------------------------- topk_sae_encode
# (B, d, n, k, relu). CPU (interpreter) shapes are small; every path of the Triton launcher is here:
# n_chunks = 1 (n = 5, 15), the GEMV form (B <= 4) and the tl.dot form (B > 4), several chunks + merge
# (n = 1000, 16384, 131072), k = 1, k = n, k = 128.
TOPK_SHAPES = [
    pytest.param((1, 64, 5, 5, False), id="B1-d64-n5-k5"),
    pytest.param((3, 64, 5, 1, True), id="B3-d64-n5-k1-relu"),
    pytest.param((3, 1536, 15, 15, True), id="B3-d1536-n15-k15-relu"),
    pytest.param((16, 64, 15, 7, False), id="B16-d64-n15-k7"),
    pytest.param((3, 64, 1000, 37, True), id="B3-d64-n1000-k37-relu"),
    pytest.param((16, 64, 1000, 128, False), id="B16-d64-n1000-k128"),
    pytest.param((1, 64, 500, 128, True), id="B1-d64-n500-k128-relu"),  # chunks of 32 < k
    pytest.param((5, 200, 300, 3, False), id="B5-d200-n300-k3"),  # d not a multiple of the d step
    pytest.param((1, 64, 16384, 16, False), id="B1-d64-n16384-k16"),
    pytest.param((2, 64, 700, 300, True), id="B2-d64-n700-k300-relu"),  # k > 128: chunks shorter than k
]
TOPK_SHAPES_GPU = [
    pytest.param((1, 4096, 131072, 64, False), id="B1-d4096-n131072-k64", marks=_gpu),
    pytest.param((3, 4096, 16384, 128, True), id="B3-d4096-n16384-k128-relu", marks=_gpu),
    pytest.param((16, 1536, 131072, 128, False), id="B16-d1536-n131072-k128", marks=_gpu),
    pytest.param((256, 4096, 16384, 32, True), id="B256-d4096-n16384-k32-relu", marks=_gpu),
    pytest.param((256, 1536, 1000, 1, False), id="B256-d1536-n1000-k1", marks=_gpu),
    pytest.param((256, 4096, 15, 15, False), id="B256-d4096-n15-k15", marks=_gpu),
    pytest.param((37, 8192, 5000, 100, False), id="B37-d8192-n5000-k100", marks=_gpu),
]


def _run_topk(backend, dtype, shape, atol, rtol, seed, integer=False):
    B, d, n, k, relu = shape
    x, W, b_enc, b_dec = _make_sae(B, d, n, dtype, integer)
    inputs = [t.clone() for t in (x, W, b_enc, b_dec)]
    vals, idx = ops.topk_sae_encode(x, W, b_enc, b_dec, k, relu=relu, backend=backend)
    for a, b in zip(inputs, (x, W, b_enc, b_dec)):
        assert torch.equal(a, b), "an input changed"
    z64 = preact_ref(x, W, b_enc, b_dec, torch.float64, relu)
    base = preact_ref(x, W, b_enc, b_dec, dtype, relu)
    what = f"topk_sae_encode[{backend}] B={B} d={d} n={n} k={k} relu={relu} {dtype} seed={seed}"
    return vals, idx, z64, _check_topk(vals, idx, z64, k, base, atol, rtol, FLOOR[dtype], what), what


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_tol", SAE_DTYPES)
@pytest.mark.parametrize("shape", TOPK_SHAPES + TOPK_SHAPES_GPU)
def test_topk_sae_encode(shape, dtype_tol, backend, seed):
    dtype, atol, rtol = dtype_tol
    _skip_unavailable(backend, "topk_sae_encode")
    vals, _, _, sure, what = _run_topk(backend, dtype, shape, atol, rtol, seed)
    # with random z the index check must bite: many positions have well-separated neighbours (ReLU's
    # zeros are exact ties: not counted)
    nonzero = vals != 0
    assert sure[nonzero].float().mean() > 0.3, f"{what}: too few positions well separated to check indices"


@triton_only
def test_topk_sae_encode_triton_n131072(seed):
    """The widest SAE through Triton on the CPU too: 1024 chunks of the GEMV form, merged."""
    _run_topk("triton", torch.float32, (1, 64, 131072, 3, False), 1e-5, 1e-5, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [
    pytest.param((3, 64, 1000, 128, True), id="B3-n1000-k128-relu"),  # GEMV form, 4 chunks, merge
    pytest.param((6, 64, 1000, 100, False), id="B6-n1000-k100"),  # tl.dot form, 2 chunks, merge
    pytest.param((2, 64, 16384, 128, False), id="B2-n16384-k128"),  # 64 chunks, merge
    pytest.param((4, 64, 15, 15, True), id="B4-n15-k15-relu"),  # one chunk
    pytest.param((64, 1536, 131072, 128, True), id="B64-d1536-n131072-k128-relu", marks=_gpu),
])
def test_topk_sae_encode_ties_exact(shape, dtype, backend, seed):
    """Integer-valued inputs: z is exact in every backend and full of equal values (ReLU zeros,
    duplicated columns), so the output must be exactly the float64 stable sort: among equal values
    the lower latent first, also across chunk boundaries."""
    _skip_unavailable(backend, "topk_sae_encode")
    B, d, n, k, relu = shape
    x, W, b_enc, b_dec = _make_sae(B, d, n, dtype, integer=True)
    # duplicated columns (latent j copies latent src[j] < j), some of them across chunk boundaries
    dup = torch.randperm(n - 1)[: n // 3] + 1
    src = (dup * torch.rand(dup.shape)).long()
    W[:, dup.to(DEVICE)] = W[:, src.to(DEVICE)]
    b_enc[dup.to(DEVICE)] = b_enc[src.to(DEVICE)]
    vals, idx = ops.topk_sae_encode(x, W, b_enc, b_dec, k, relu=relu, backend=backend)
    z64 = preact_ref(x, W, b_enc, b_dec, torch.float64, relu)
    ref_vals, ref_idx = _sort_desc(z64)
    what = f"topk_sae_encode[{backend}] ties B={B} n={n} k={k} {dtype} seed={seed}"
    assert (ref_vals[:, :k].diff(dim=1) == 0).any(), f"{what}: the inputs must hold ties"
    assert torch.equal(vals.double(), ref_vals[:, :k]), f"{what}: values differ from the exact reference"
    assert torch.equal(idx, ref_idx[:, :k]), (
        f"{what}: indices differ from the stable order at {(idx != ref_idx[:, :k]).nonzero().tolist()[:5]}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_sae_encode_all_equal(backend):
    """Every latent equal (identical columns; or every one 0 after ReLU): indices 0, 1, 2, ..."""
    _skip_unavailable(backend, "topk_sae_encode")
    for n, k, B in ((5, 5, 1), (300, 128, 3), (300, 64, 7)):
        x, W, b_enc, b_dec = _make_sae(B, 64, n, torch.float32, integer=True)
        W_same = W[:, :1].expand(64, n).contiguous()
        b_same = torch.full_like(b_enc, 0.25)
        expect = torch.arange(k, device=DEVICE).expand(B, k)
        for relu, W_, b_ in ((False, W_same, b_same), (True, W, b_enc - 1000.0)):
            vals, idx = ops.topk_sae_encode(x, W_, b_, b_dec, k, relu=relu, backend=backend)
            assert torch.equal(idx, expect), f"{backend} n={n} k={k} relu={relu}: {idx[:, :8].tolist()}"
            assert (vals == vals[:, :1]).all(), f"{backend} n={n} k={k} relu={relu}: values not all equal"
            if relu:
                assert (vals == 0).all()


# ---------------------------------------------------------------- sae_controller
# (B, d, n)
CTRL_SHAPES = [
    pytest.param((1, 64, 5), id="B1-d64-n5"),
    pytest.param((3, 1536, 15), id="B3-d1536-n15"),
    pytest.param((16, 64, 50), id="B16-d64-n50"),
    pytest.param((5, 200, 1000), id="B5-d200-n1000"),
    pytest.param((2, 64, 16384), id="B2-d64-n16384"),
]
CTRL_SHAPES_GPU = [
    pytest.param((1, 4096, 50), id="B1-d4096-n50", marks=_gpu),
    pytest.param((256, 4096, 15), id="B256-d4096-n15", marks=_gpu),
    pytest.param((64, 1536, 4096), id="B64-d1536-n4096", marks=_gpu),
    pytest.param((3, 8192, 16384), id="B3-d8192-n16384", marks=_gpu),  # the controller is for small SAEs
]


def _controller_inputs(B, d, n, dtype, n_cat, integer=False):
    x, W, b_enc, b_dec = _make_sae(B, d, n, dtype, integer)
    cat_map = torch.randint(-1, n_cat, (n,), dtype=torch.int32, device=DEVICE)
    cat_map[0] = -1  # latents without a category
    cat_coef = torch.randn(n_cat, device=DEVICE) * 3
    return x, W, b_enc, b_dec, cat_map, cat_coef


def _check_controller(out, z64, cat_map, threshold, cat_coef, base_z, atol, rtol, floor, what):
    category, coef, latent, value = out
    B = z64.shape[0]
    assert category.shape == coef.shape == latent.shape == value.shape == (B,)
    assert (category.dtype, coef.dtype, latent.dtype, value.dtype) == (
        torch.int32, torch.float32, torch.int64, torch.float32), what
    ref_max = z64.max(dim=1).values
    out_v = value.double()
    _check_2x((out_v - ref_max).abs().max().item(), (base_z.double().max(dim=1).values - ref_max).abs().max().item(),
              floor, what)
    torch.testing.assert_close(out_v, ref_max, atol=atol, rtol=rtol, msg=lambda m: f"{what}: value: {m}")
    # the latent is an argmax: its float64 value is the returned value; the reference's (first) argmax
    # wherever the top two are well apart
    torch.testing.assert_close(out_v, z64.gather(1, latent[:, None])[:, 0], atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: latent's value: {m}")
    tol = atol + rtol * ref_max.abs()
    top2 = z64.topk(min(2, z64.shape[1]), dim=1).values
    margin = top2[:, 0] - top2[:, -1] if z64.shape[1] > 1 else torch.full_like(ref_max, float("inf"))
    sure = margin > 2 * tol
    ref_latent = z64.argmax(dim=1)  # the first maximal index
    assert torch.equal(latent[sure], ref_latent[sure]), f"{what}: latent {latent.tolist()} != {ref_latent.tolist()}"
    # category and coef follow from the returned latent and value, exactly
    expect_cat = torch.where(value >= threshold, cat_map[latent], -1).to(torch.int32)
    assert torch.equal(category, expect_cat), f"{what}: category {category.tolist()} != {expect_cat.tolist()}"
    expect_coef = torch.where(category >= 0, cat_coef[category.clamp(min=0).long()], 0.0)
    assert torch.equal(coef, expect_coef), f"{what}: coef {coef.tolist()} != {expect_coef.tolist()}"
    # and from the reference where that is unambiguous
    clear = sure & ((ref_max - threshold).abs() > 2 * tol)
    ref_cat = torch.where(ref_max >= threshold, cat_map[ref_latent], -1).to(torch.int32)
    assert torch.equal(category[clear], ref_cat[clear]), what
    return sure


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_tol", SAE_DTYPES)
@pytest.mark.parametrize("shape", CTRL_SHAPES + CTRL_SHAPES_GPU)
@pytest.mark.parametrize("thresh", ["-inf", "split"])
def test_sae_controller(thresh, shape, dtype_tol, backend, seed):
    B, d, n = shape
    dtype, atol, rtol = dtype_tol
    _skip_unavailable(backend, "sae_controller")
    x, W, b_enc, b_dec, cat_map, cat_coef = _controller_inputs(B, d, n, dtype, n_cat=4)
    z64 = preact_ref(x, W, b_enc, b_dec, torch.float64)
    base = preact_ref(x, W, b_enc, b_dec, dtype)
    if thresh == "-inf":
        threshold = float("-inf")
    else:  # between two rows' maxima, in the widest gap (B = 1: below or above the only one, by seed)
        row_max = z64.max(dim=1).values.sort().values
        if B == 1:
            threshold = row_max[0].item() + (0.5 if seed % 2 else -0.5)
        else:
            i = row_max.diff().argmax().item()
            threshold = ((row_max[i] + row_max[i + 1]) / 2).item()
    what = f"sae_controller[{backend}] B={B} d={d} n={n} thr={threshold:.4g} {dtype} seed={seed}"
    out = ops.sae_controller(x, W, b_enc, b_dec, cat_map, threshold, cat_coef, backend=backend)
    sure = _check_controller(out, z64, cat_map, threshold, cat_coef, base, atol, rtol, FLOOR[dtype], what)
    if B > 1:  # the latent check must bite (one row: a close top two, ~0.2% of draws, would be no error)
        assert sure.float().mean() >= 0.5, f"{what}: too few rows with a clear argmax"
    if thresh == "split" and B > 1:
        assert (out[3].double() < threshold).any() and (out[3].double() >= threshold).any(), \
            f"{what}: the threshold must split the rows"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sae_controller_ties_and_categories(dtype, backend, seed):
    """Integer inputs with the maximal column duplicated: the lowest latent wins, exactly; the category
    map's -1 entries, a threshold exactly at a row's max (>=: steered) and cat_coef gathering; the
    default cat_coef (all ones)."""
    _skip_unavailable(backend, "sae_controller")
    B, d, n = 6, 64, 40
    x, W, b_enc, b_dec, cat_map, cat_coef = _controller_inputs(B, d, n, dtype, n_cat=5, integer=True)
    z64 = preact_ref(x, W, b_enc, b_dec, torch.float64)
    first = z64.argmax(dim=1)  # duplicate each row's argmax column to a higher latent: a tie for the max
    for r in range(B):
        j = int(first[r])
        for dst in {n - 1, min(j + 1, n - 1)} - {j}:
            W[:, dst] = W[:, j]
            b_enc[dst] = b_enc[j]
    z64 = preact_ref(x, W, b_enc, b_dec, torch.float64)
    ref_val, ref_latent = z64.max(dim=1)
    assert ((z64 == ref_val[:, None]).sum(dim=1) >= 2).any(), "the inputs must hold a tie for the max"
    cat_map[ref_latent[0]] = -1  # row 0's winner has no category
    threshold = float(ref_val[1])  # row 1 exactly at the threshold: steered (>=)
    out = ops.sae_controller(x, W, b_enc, b_dec, cat_map, threshold, cat_coef, backend=backend)
    category, coef, latent, value = out
    what = f"sae_controller[{backend}] ties {dtype} seed={seed}"
    assert torch.equal(latent, ref_latent), f"{what}: latent {latent.tolist()} != {ref_latent.tolist()}"
    assert torch.equal(value.double(), ref_val), what
    expect_cat = torch.where(ref_val >= threshold, cat_map[ref_latent], -1).to(torch.int32)
    assert torch.equal(category, expect_cat), f"{what}: {category.tolist()} != {expect_cat.tolist()}"
    assert category[0] == -1 and (category[1] == cat_map[ref_latent[1]])
    expect_coef = torch.where(expect_cat >= 0, cat_coef[expect_cat.clamp(min=0).long()], 0.0)
    assert torch.equal(coef, expect_coef), f"{what}: coef {coef.tolist()} != {expect_coef.tolist()}"
    # default cat_coef: ones where there is a category, 0 elsewhere
    category, coef, _, _ = ops.sae_controller(x, W, b_enc, b_dec, cat_map, backend=backend)
    assert torch.equal(category, cat_map[ref_latent]), what
    assert torch.equal(coef, (category >= 0).float()), what


# ---------------------------------------------------------------- steer_residual_add
def _make_steer(B, T, d, V, dtype, with_bias):
    x = torch.randn(B, T, d)
    y = torch.randn(B, T, d)
    vectors = torch.randn(V, d)
    bias = torch.randn(d) if with_bias else None
    idx = torch.randint(-1, V, (B,))
    if B > 1:
        idx[0] = -1
    idx[-1] = V - 1
    offset = torch.randint(0, 50, (B, 1))
    input_pos = offset + torch.arange(T)[None, :]
    start = offset[:, 0] + torch.randint(-1, T + 1, (B,))
    start[-1] = offset[-1, 0] + T // 2
    coef = torch.randn(B) * 4
    dev = dict(device=DEVICE)
    i32 = dict(device=DEVICE, dtype=torch.int32)
    return (x.to(dtype=dtype, **dev), y.to(dtype=dtype, **dev), input_pos.to(**i32).contiguous(), start.to(**i32),
            vectors.to(dtype=dtype, **dev), idx.to(**i32), coef.to(**dev),
            None if bias is None else bias.to(dtype=dtype, **dev))


STEER_SHAPES = [  # (B, T, d, V, bias)
    pytest.param((1, 1, 5, 1, False), id="B1-T1-d5"),
    pytest.param((3, 4, 123, 3, True), id="B3-T4-d123-bias"),
    pytest.param((5, 3, 1536, 2, False), id="B5-T3-d1536"),
    pytest.param((16, 33, 4096, 5, True), id="B16-T33-d4096-bias", marks=_gpu),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_tol", STEER_DTYPES)
@pytest.mark.parametrize("shape", STEER_SHAPES)
def test_steer_residual_add_exact(shape, dtype_tol, backend, seed):
    """Bit-exact against the fp32 computation written here: s = x + y rounded to dtype; steered
    positions round(s + coef * (v + bias)) computed in fp32 (on CUDA the product may be fused into an
    FMA, one rounding less: either result is accepted per element there); unsteered ones exactly x + y.
    And the 2x rule against float64 on the steered positions."""
    B, T, d, V, with_bias = shape
    dtype, atol, rtol = dtype_tol
    _skip_unavailable(backend, "steer_residual_add")
    x, y, input_pos, start, vectors, idx, coef, bias = _make_steer(B, T, d, V, dtype, with_bias)
    x0, y0 = x.clone(), y.clone()
    out = ops.steer_residual_add(x, y, input_pos, start, vectors, idx, coef, bias, backend=backend)
    what = f"steer_residual_add[{backend}] idx={idx.tolist()} start={start.tolist()} {dtype} seed={seed}"
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous(), what
    assert torch.equal(x, x0) and torch.equal(y, y0), f"{what}: an input changed"

    s = x + y  # the unfused residual add, in dtype
    gate = (idx >= 0)[:, None] & (input_pos >= start[:, None])  # [B, T]
    assert gate.any() and (~gate).any() if B > 1 else gate.any(), "inputs must steer some positions"
    assert torch.equal(out[~gate], s[~gate]), f"{what}: an unsteered position is not exactly x + y"
    v = vectors[idx.clamp(min=0).long()].float()  # [B, d]
    if bias is not None:
        v = v + bias.float()
    c = coef[:, None, None]
    two_roundings = (s.float() + c * v[:, None, :]).to(dtype)
    ok = out == two_roundings
    if DEVICE.type == "cuda":
        fused = (s.double() + c.double() * v[:, None, :].double()).float().to(dtype)
        ok |= out == fused
    ok |= ~gate[..., None]
    assert ok.all(), (f"{what}: {int((~ok).sum())} steered elements differ from the fp32 computation, e.g. "
                      f"{out[~ok][:3].tolist()} vs {two_roundings[~ok][:3].tolist()}")
    # float64 reference of the steered positions (from s rounded to dtype, as the op defines)
    ref = s.double() + c.double() * v[:, None, :].double()
    v16 = vectors[idx.clamp(min=0).long()] + (bias if bias is not None else 0)  # plain torch in dtype
    base = s + coef.to(dtype)[:, None, None] * v16[:, None, :]
    g = gate[..., None].expand_as(out)
    err = (out.double() - ref)[g].abs().max().item()
    base_err = (base.double() - ref)[g].abs().max().item()
    _check_2x(err, base_err, FLOOR[dtype], what)
    torch.testing.assert_close(out.double()[g], ref[g], atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sae_and_steering_ops_capture_on_a_side_stream_and_replay_exactly(backend, seed):
    """The hybrid captures the controller on the thinking model's stream, forked inside the graph:
    each op must launch on the current stream (a launch on another one breaks the capture or is
    missing from the graph) and replay with new inputs exactly as it runs eagerly."""
    _skip_unavailable(backend, "sae_controller")
    x, W, b_enc, b_dec, cat_map, cat_coef = _controller_inputs(16, 1536, 1000, torch.bfloat16, 5)
    h, y, pos, start, vectors, idx, coef, bias = _make_steer(16, 1, 1536, 5, torch.bfloat16, True)

    def step():
        enc = ops.topk_sae_encode(x, W, b_enc, b_dec, 32, backend=backend)
        ctl = ops.sae_controller(x, W, b_enc, b_dec, cat_map, 0.0, cat_coef, backend=backend)
        out = ops.steer_residual_add(h, y, pos, start, vectors, ctl.category, ctl.coef, bias, backend=backend)
        return enc, ctl, out

    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        step()  # compiles and warms up outside the capture
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fork = torch.cuda.Stream()
        fork.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(fork):
            captured = step()
        torch.cuda.current_stream().wait_stream(fork)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        h.copy_(torch.randn_like(h))
        graph.replay()
        want = step()
        torch.cuda.synchronize()
        for got, ref in zip((*captured[0], *captured[1], captured[2]), (*want[0], *want[1], want[2])):
            assert torch.equal(got, ref)
