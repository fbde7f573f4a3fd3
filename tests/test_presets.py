"""Preset models: random_model builds a steerfast Model of a preset's shape in place (what
`steerfast generate --random` runs), with random_hf_model's distribution."""
from __future__ import annotations

import pytest
import torch

from steerfast.presets import SHAPES, random_model


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_random_model_has_the_presets_shape_and_distribution(name):
    shape, seed = SHAPES[name], int(torch.randint(0, 1000, ()))
    m = random_model(name, "cpu", torch.float32, seed=seed, max_seq_len=64)
    a = m.args
    assert (a.dim, a.n_layers, a.vocab_size) == (shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"])
    assert m.max_seq_len == 64 and m.device.type == "cpu" and m.dtype == torch.float32
    for pname, p in m.net.named_parameters():
        if p.dim() == 1 and "norm" in pname:
            assert torch.equal(p, torch.ones_like(p)), pname
        elif p.numel() >= 4096:  # enough samples for the std to be within 10%
            assert abs(float(p.std()) / 0.02 - 1) < 0.1, (pname, float(p.std()))
    prompt = torch.randint(0, a.vocab_size, (5,)).tolist()
    out = m.generate([prompt], 6, eos_token_id=None)
    assert out == random_model(name, "cpu", torch.float32, seed=seed).generate([prompt], 6, eos_token_id=None)
    other = random_model(name, "cpu", torch.float32, seed=seed + 1)
    assert not torch.equal(other.net.tok_embeddings.weight, m.net.tok_embeddings.weight)
