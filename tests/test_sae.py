"""TopKSAE: encode/decode semantics against float64, and its three file layouts."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import steerfast as sf
from steerfast import errors


def _weights(d=24, n=40, dtype=torch.float64):
    return dict(W_enc=torch.randn(d, n, dtype=dtype), b_enc=torch.randn(n, dtype=dtype),
                W_dec=torch.randn(n, d, dtype=dtype), b_dec=torch.randn(d, dtype=dtype))


def _ref_topk(x, w, k, relu, mean=None, normalize=False, subtract_b_dec=True):
    x = x.double()
    if mean is not None:
        x = x - mean.double()
    if normalize:
        x = x / x.norm(dim=-1, keepdim=True)
    z = (x - (w["b_dec"].double() if subtract_b_dec else 0)) @ w["W_enc"].double() + w["b_enc"].double()
    if relu:
        z = z.clamp(min=0)
    return z.topk(k, dim=-1)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("centre_and_normalize", [False, True])
def test_encode_matches_float64(relu, centre_and_normalize):
    w = _weights()
    mean = torch.randn(24, dtype=torch.float64) if centre_and_normalize else None
    sae = sf.TopKSAE(**w, k=7, mean=mean, normalize=centre_and_normalize, relu=relu)
    x = torch.randn(2, 5, 24, dtype=torch.float64)  # any leading shape: rows are flattened
    vals, idx = sae.encode(x)
    ref = _ref_topk(x.reshape(-1, 24), w, 7, relu, mean, centre_and_normalize)
    assert vals.shape == idx.shape == (10, 7)
    torch.testing.assert_close(vals.double(), ref.values, atol=1e-5, rtol=1e-5)  # values are fp32
    assert torch.equal(idx, ref.indices)


def test_decode_is_the_sparse_sum_of_decoder_rows():
    w = _weights()
    sae = sf.TopKSAE(**w, k=5)
    x = torch.randn(6, 24, dtype=torch.float64)
    vals, idx = sae.encode(x)
    dense = torch.zeros(6, 40, dtype=torch.float64).scatter(1, idx, vals.double())
    torch.testing.assert_close(sae.decode(vals, idx), dense @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5)


def test_ties_go_to_the_lower_latent_index():
    w = _weights(n=12)
    w["W_enc"][:, 9] = w["W_enc"][:, 2]
    w["b_enc"][9] = w["b_enc"][2]
    w["W_enc"][:, 2] *= 0  # make latent 2 (== 9) the largest for every row
    w["W_enc"][:, 9] *= 0
    w["b_enc"][2] = w["b_enc"][9] = 100.0
    vals, idx = sf.TopKSAE(**w, k=3).encode(torch.randn(4, 24, dtype=torch.float64))
    assert idx[:, :2].tolist() == [[2, 9]] * 4 and torch.equal(vals[:, 0], vals[:, 1])


def test_controller_categories_threshold_and_coefficients():
    w = _weights(n=6)
    sae = sf.TopKSAE(**w, k=1)
    x = torch.randn(32, 24, dtype=torch.float64)
    z = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    cat_map = torch.tensor([0, 1, -1, 2, 0, 1], dtype=torch.int32)
    coefs = torch.tensor([0.5, 2.0, 3.0])
    thr = z.max(-1).values.median().item()
    out = sae.controller(x, cat_map, threshold=thr, cat_coef=coefs)
    latent = z.argmax(-1)
    want = torch.where(z.max(-1).values >= thr, cat_map[latent].long(), -1)
    assert torch.equal(out.latent, latent) and torch.equal(out.category.long(), want)
    assert torch.equal(out.coef, torch.where(want >= 0, coefs[want.clamp(min=0)], 0.0))
    assert (want == -1).any() and (want >= 0).any()


def test_save_load_roundtrip(tmp_path):
    w = _weights(dtype=torch.float32)
    sae = sf.TopKSAE(**w, k=4, mean=torch.randn(24), normalize=True, relu=True, metadata={"layer": 6})
    sae.save(tmp_path / "sae.safetensors")
    back = sf.TopKSAE.load(tmp_path / "sae.safetensors")
    assert (back.k, back.normalize, back.relu, back.metadata) == (4, True, True, {"layer": 6})
    x = torch.randn(5, 24)
    assert all(torch.equal(a, b) for a, b in zip(sae.encode(x), back.encode(x)))
    half = sf.TopKSAE.load(tmp_path / "sae.safetensors", dtype=torch.float16)
    assert half.W_enc.dtype == torch.float16


def test_loads_sparsify_layout(tmp_path):
    w = _weights(dtype=torch.float32)
    hook = tmp_path / "layers.6"
    hook.mkdir()
    (hook / "cfg.json").write_text(json.dumps(dict(k=5, num_latents=40, expansion_factor=2, d_in=24,
                                                   normalize_decoder=True, multi_topk=False)))
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}, hook / "sae.safetensors")
    with pytest.raises(errors.InvalidInputError, match="hookpoint"):
        sf.TopKSAE.load(tmp_path)
    sae = sf.TopKSAE.load(tmp_path, hookpoint="layers.6")
    x = torch.randn(7, 24)
    vals, idx = sae.encode(x)
    ref = _ref_topk(x, w, 5, relu=True)
    torch.testing.assert_close(vals.double(), ref.values, atol=1e-4, rtol=1e-4)
    assert torch.equal(idx, ref.indices)


@pytest.mark.parametrize("k_in_kwargs", [False, True])
def test_loads_saelens_layout(tmp_path, k_in_kwargs):
    w = _weights(dtype=torch.float32)
    cfg = dict(d_in=24, d_sae=40, architecture="topk", apply_b_dec_to_input=False, normalize_activations="none")
    cfg |= dict(activation_fn_kwargs={"k": 6}) if k_in_kwargs else dict(k=6)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in w.items()}, tmp_path / "sae_weights.safetensors")
    sae = sf.TopKSAE.load(tmp_path)
    x = torch.randn(7, 24)
    vals, idx = sae.encode(x)
    ref = _ref_topk(x, w, 6, relu=True, subtract_b_dec=False)
    torch.testing.assert_close(vals.double(), ref.values, atol=1e-4, rtol=1e-4)
    assert torch.equal(idx, ref.indices)


def test_bad_saes_raise_named_errors(tmp_path):
    w = _weights()
    with pytest.raises(errors.ShapeMismatchError, match="W_dec"):
        sf.TopKSAE(**(w | dict(W_dec=torch.randn(40, 25, dtype=torch.float64))), k=3)
    with pytest.raises(errors.ShapeMismatchError, match="b_enc"):
        sf.TopKSAE(**(w | dict(b_enc=torch.randn(41, dtype=torch.float64))), k=3)
    with pytest.raises(errors.InvalidInputError, match="k"):
        sf.TopKSAE(**w, k=41)
    bad = w["W_enc"].clone()
    bad[3, 4] = float("nan")
    with pytest.raises(errors.NonFiniteError, match="W_enc"):
        sf.TopKSAE(**(w | dict(W_enc=bad)), k=3)
    with pytest.raises(errors.ShapeMismatchError, match="24"):
        sf.TopKSAE(**w, k=3).encode(torch.randn(2, 23, dtype=torch.float64))
    f = tmp_path / "x.safetensors"
    sf.TopKSAE(**_weights(dtype=torch.float32), k=3).save(f)
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(errors.CheckpointError, match="x.safetensors"):
        sf.TopKSAE.load(f)
    with pytest.raises(errors.CheckpointError, match="not a TopKSAE"):
        sf.TopKSAE.load(tmp_path / "nowhere")


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_non_finite_input(poison):
    w = _weights()
    sae = sf.TopKSAE(**w, k=5)
    x = torch.randn(6, 24, dtype=torch.float64)
    row = int(torch.randint(0, 6, ()))
    x[row, int(torch.randint(0, 24, ()))] = poison
    with pytest.raises(errors.NonFiniteError, match=f"first row {row}"):
        sae.encode(x)
    x[row] = torch.randn(24, dtype=torch.float64)  # the same SAE goes on working
    vals, idx = sae.encode(x)
    ref = _ref_topk(x, w, 5, relu=False)
    torch.testing.assert_close(vals.double(), ref.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, ref.indices)
