"""The decode step's kernel budget (docs/architecture.md, "The decode step"), checked without a GPU:
inside a CUDA graph each kernel node costs ~2 us however little it reads, so a greedy step may launch at
most 6 kernels per decoder layer + 4 outside the layers, and no host sync. Counted on the Triton
backend (interpreted on the CPU): every Triton launch and every aten op that does work."""
from __future__ import annotations

import pytest
import torch

import steerfast as sf
from backends import CPU_TRITON_SKIP
from steerfast.launch_count import count_launches
from tiny_models import random_prompts, tiny_hf

pytestmark = pytest.mark.skipif(CPU_TRITON_SKIP is not None, reason=str(CPU_TRITON_SKIP))

PER_LAYER, PER_STEP = 6, 4


def _one_step(m, B, steering=None, mode="greedy"):
    """Counts of one decode step of `m` at batch B, on buffers set up as generate leaves them."""
    prompts = random_prompts([5] * B)
    m.generate(prompts, 3, eos_token_id=None, steering=steering)  # cache, buffers
    _, s = m._runner(B, 4, None if steering is None else steering.layer, mode)
    s.pos.fill_(5), s.seq_lens.fill_(6), s.done.zero_(), s.step.fill_(1)
    if steering is not None:
        s.steer.vectors.copy_(steering.vector.expand(B, -1)), s.steer.coef.fill_(steering.coef)
    with count_launches() as n:
        m._decode_step(s, mode)
    return n


@pytest.mark.parametrize("family,layers,B", [("qwen2", 3, 1), ("llama", 2, 4)])
def test_greedy_decode_step_launch_budget(family, layers, B, monkeypatch):
    monkeypatch.setenv("STEERFAST_BACKEND", "triton")
    hf = tiny_hf(family, layers=layers, dtype=torch.float32)  # qwen2: qkv bias
    m = sf.load_model(hf, device="cpu", dtype=torch.float32)
    n = _one_step(m, B)
    assert n.syncs == 0, f"a host sync inside the decode step: {n}"
    assert n.total <= PER_LAYER * layers + PER_STEP, f"{layers} layers: {n}"


def test_steering_adds_at_most_a_few_kernels(monkeypatch):
    monkeypatch.setenv("STEERFAST_BACKEND", "triton")
    hf = tiny_hf("llama", layers=3, dtype=torch.float32)
    m = sf.load_model(hf, device="cpu", dtype=torch.float32)
    plain = _one_step(m, 2)
    steered = _one_step(m, 2, sf.Steering(torch.randn(hf.config.hidden_size), layer=1, coef=2.0))
    assert steered.syncs == 0
    # the steering itself rides in the down projection's epilogue; the overflow flag costs a few
    assert steered.total - plain.total <= 5, f"plain: {plain}\nsteered: {steered}"


def test_the_counter_sees_an_unfused_step():
    """The count is able to fail: the plain PyTorch layers (the prefill path) launch far more."""
    hf = tiny_hf("llama", layers=2, dtype=torch.float32)
    m = sf.load_model(hf, device="cpu", dtype=torch.float32)
    m.ensure_cache(1, 16)
    from steerfast.model import Context

    tokens, pos = torch.tensor([[3, 4]]), torch.tensor([[0, 1]], dtype=torch.int32)
    with count_launches() as n:
        m.net(tokens, Context(input_pos=pos, kv_len=2))
        torch.tensor([1.0]).item()
    assert n.total > PER_LAYER * 2 + PER_STEP and n.syncs == 1, n


def test_counted_bytes_are_the_weights_and_kv_and_little_else(monkeypatch):
    """launch_count's bytes read by one greedy step (Triton path) against the floor's arithmetic
    (bench.decode.bytes_per_step: weights once, the KV cache at the rows' length): every weight is
    read once, the KV cache only up to each row's length, activations add a few percent."""
    from bench.decode import bytes_per_step

    monkeypatch.setenv("STEERFAST_BACKEND", "triton")
    hf = tiny_hf("qwen2", layers=3, dtype=torch.float32)
    m = sf.load_model(hf, device="cpu", dtype=torch.float32)
    n = _one_step(m, 2)  # at position 5: 6 keys a row
    floor = bytes_per_step(m, 2, 6)
    assert floor["total"] <= n.total_bytes <= 1.1 * floor["total"], (n.total_bytes, floor)
    kv_rows = 2 * 6 * 2 * hf.config.num_key_value_heads * 16 * 4  # rows x keys x (k, v) x heads x D x fp32
    assert n.bytes_read["_decode_attention_kernel"] >= 3 * kv_rows  # three layers' caches, up to 6 keys
    assert n.bytes_read["_decode_attention_kernel"] < 3 * kv_rows * 1.5  # not the whole 5-D cache
