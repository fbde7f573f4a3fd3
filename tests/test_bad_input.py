"""Bad input: a named exception before any kernel runs, and the model works as before after it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import steerfast as sf
from steerfast import errors
from tiny_models import VOCAB, random_prompts, tiny_hf


@pytest.fixture(scope="module")
def model():
    return sf.load_model(tiny_hf("qwen2", layers=2), device="cpu", dtype=torch.float64, max_seq_len=64)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([6, 4])


def _bad_calls(d, n_layers):
    good = torch.randn(d, dtype=torch.float64)
    return [
        (errors.TokenOutOfRangeError, dict(prompts=[[1, 2, VOCAB]])),
        (errors.TokenOutOfRangeError, dict(prompts=[[1, -1, 2]])),
        (errors.SequenceTooLongError, dict(prompts=[[1] * 60], max_new_tokens=5)),
        (errors.InvalidInputError, dict(prompts=[[]])),
        (errors.InvalidInputError, dict(prompts=[])),
        (errors.InvalidInputError, dict(max_new_tokens=0)),
        (errors.InvalidInputError, dict(temperature=-1.0)),
        (errors.InvalidInputError, dict(top_p=0.0, temperature=1.0)),
        (errors.ShapeMismatchError, dict(steering=sf.Steering(torch.randn(d + 1, dtype=torch.float64), layer=0))),
        (errors.ShapeMismatchError, dict(steering=sf.Steering(torch.randn(3, d, dtype=torch.float64), layer=0))),
        (errors.NonFiniteError, dict(steering=sf.Steering(good.clone().index_fill_(0, torch.tensor([3]), float("nan")), layer=0))),
        (errors.NonFiniteError, dict(steering=sf.Steering(good.clone().index_fill_(0, torch.tensor([0]), float("inf")), layer=1))),
        (errors.LayerIndexError, dict(steering=sf.Steering(good, layer=n_layers))),
        (errors.LayerIndexError, dict(steering=sf.Steering(good, layer=-1))),
        (errors.InvalidInputError, dict(steering=sf.Steering(good, layer=0, positions="prompt"))),
    ]


def test_each_bad_generate_call_raises_its_error_and_loses_nothing(model, prompts):
    before = model.generate(prompts, 20, eos_token_id=None)
    for err, kw in _bad_calls(model.args.dim, model.args.n_layers):
        call = dict(prompts=prompts, max_new_tokens=20, eos_token_id=None) | kw
        with pytest.raises(err) as info:
            model.generate(**call)
        assert str(info.value), "the message must say what was expected"
        assert isinstance(info.value, errors.SteerfastError)
    assert model.generate(prompts, 20, eos_token_id=None) == before


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(errors.UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        sf.load_model(tmp_path, device="cpu")
    with pytest.raises(errors.UnsupportedArchitectureError, match="gpt2"):
        sf.load_model(gpt2, device="cpu")


@pytest.fixture
def saved(tmp_path):
    tiny_hf("llama", layers=2, dtype=torch.float32).save_pretrained(tmp_path)
    return tmp_path


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(errors.CheckpointError, match="model.safetensors"):
        sf.load_model(saved, device="cpu")


def test_corrupt_safetensors_header(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(errors.CheckpointError, match="model.safetensors"):
        sf.load_model(saved, device="cpu")


def test_missing_tensor(saved):
    f = saved / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, f)
    with pytest.raises(errors.CheckpointError, match="missing"):
        sf.load_model(saved, device="cpu")


def test_shape_disagrees_with_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] += 1
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.CheckpointError, match="shape"):
        sf.load_model(saved, device="cpu")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(errors.CheckpointError, match="exists but has no config.json"):
        sf.load_model(tmp_path, device="cpu")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(errors.CheckpointError, match="is a file, not a directory"):
        sf.load_model(tmp_path / "weights.safetensors", device="cpu")


def test_a_path_that_does_not_exist_is_named_as_such(tmp_path):
    hub_id = tmp_path / "Qwen/Qwen2.5-1.5B"  # a hub id is never downloaded
    with pytest.raises(errors.CheckpointError) as info:
        sf.load_model(hub_id, device="cpu")
    assert str(hub_id) in str(info.value) and "does not exist" in str(info.value)
    assert "config.json" not in str(info.value)


@pytest.mark.gpu
def test_too_little_gpu_memory_says_what_fits():
    m = sf.load_model(tiny_hf("llama", layers=2), device="cuda", dtype=torch.float16, max_seq_len=1 << 20)
    free = torch.cuda.mem_get_info()[0]
    per_token = 2 * m.args.n_layers * m.args.n_kv_heads * m.args.head_dim * 2
    batch = int(2 * free / (per_token * (1 << 19))) + 1
    with pytest.raises(errors.InsufficientMemoryError, match="fits"):
        m.generate([[1, 2, 3]] * batch, max_new_tokens=(1 << 19))
    assert len(m.generate([[1, 2, 3]], max_new_tokens=8, eos_token_id=None)[0]) == 8
