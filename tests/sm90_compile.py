"""Compile the decode step's Triton kernels for sm_90 (H100/H200) on a machine without a GPU.

Run as a script in a process without TRITON_INTERPRET (tests/test_sm90_compile.py does): each
launcher of the fused decode step is called with CPU tensors of the presets' real shapes, its launch
is intercepted (JITFunction.run records the arguments instead of running), and the kernel is compiled
for GPUTarget("cuda", 90, 32) with the launch's constexprs and options. Prints one JSON line per
distinct compile: the kernel, its shared memory and whether the PTX carries programmatic dependent
launch. What the interpreter cannot see, this catches: a kernel that does not compile for the GPU,
or a block-size table that asks for more shared memory than the GPU has (an H200 run once died of
`Required: 265216, Hardware limit: 232448` on fp32 models).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, create_function_from_signature

from steerfast import presets
from steerfast.kernels import decode_attention, decode_tail, fused_linear, qkv_rope, sae_controller, steer_add
from steerfast.kernels import sample, topk_sae_encode, window_attention

SM90_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)

launches: list[tuple] = []
group = ["decode"]  # the launches' group: "decode" (launched with PDL under --pdl) or "other"


def _record(self, *args, grid, warmup, **kwargs):
    launches.append((self, args, kwargs, group[0]))


def _source(fn: JITFunction, args, kwargs, backend):
    """What a launch with these arguments compiles, through Triton's own binder: the signature with
    its specialisations (an integer argument equal to 1 becomes a constexpr; 16-byte divisibility of
    pointers and integers enables vector loads and cp.async pipelining), not a hand-made one, which
    compiled a different kernel (it missed a split-K compile error at M = 1 and reported a quarter
    of the shared memory). Returns (ASTSource, options, a key for one compile per variant)."""
    bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    _, sig, consts, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "launch_pdl") if k in kwargs}
    plain = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))}
    return ASTSource(fn, sig, consts, attrs), options, (fn.__name__, repr(spec), repr(sorted(plain.items())))


def _calls(shape: dict, dtype: torch.dtype, M: int):
    """The decode step's launches for one model shape, dtype and row count."""
    d, inter, H, Hkv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], \
        shape["num_key_value_heads"]
    D = d // H
    V, S, Bc = shape["vocab_size"], 4096, M + 1
    e = lambda *s, dt=dtype: torch.empty(s, dtype=dt)  # noqa: E731 -- never touched: no pages
    x, res = e(M, d), e(M, d)
    i32 = lambda n: torch.zeros(n, dtype=torch.int32)  # noqa: E731
    fused_linear.fused_linear(x, e(d, H * D), bias=None, residual=res)  # o projection
    fused_linear.fused_linear(x, e(2 * inter, d), norm_weight=e(d), eps=1e-6, swiglu=True)  # gate/up
    fused_linear.fused_linear(e(M, inter), e(d, inter), residual=res, steer_vectors=e(5, d),
                              steer_idx=i32(M), steer_coef=torch.zeros(M), steer_start=i32(M), steer_bias=e(d),
                              input_pos=i32(M))  # down + residual + steering
    fused_linear.lm_head_argmax(x, e(V, d), norm_weight=e(d), eps=1e-6)
    kc, vc = e(Bc, S, Hkv, D), e(Bc, S, Hkv, D)
    qkv_rope.qkv_rope_kv_write(x, e((H + 2 * Hkv) * D, d), e(d), 1e-6, e((H + 2 * Hkv) * D), e(S, D), e(S, D),
                               i32(M), torch.zeros(M, dtype=torch.int64), kc, vc, H, Hkv)
    rows = torch.zeros(M, dtype=torch.int64)
    for splits in (1, 8):
        decode_attention.decode_attention(e(M, H, D), kc, vc, i32(M), D ** -0.5, num_splits=splits)
        decode_attention.decode_attention(e(M, H, D), kc, vc, i32(M), D ** -0.5, num_splits=splits, rows=rows,
                                          prefix_rows=rows, prefix_lens=i32(M))
    blocks = window_attention.window_query_blocks(torch.tensor([M]))  # the hybrid's packed windows
    window_attention.window_attention(e(M, H, D), kc, vc, i32(M), D ** -0.5, rows, rows, i32(M), blocks)
    decode_tail.decode_tail_(torch.zeros(M, dtype=torch.int64), torch.zeros(M, dtype=torch.bool),
                             torch.zeros(M, dtype=torch.int64), i32(M), i32(M), torch.zeros(M, dtype=torch.int64),
                             torch.zeros(M, 8, dtype=torch.int64), torch.zeros(M, 2, dtype=torch.int64))


def _other_calls(dtype: torch.dtype):
    """The SAE and steering kernels at the shapes the hybrid and research use (no PDL)."""
    e = lambda *s, dt=dtype: torch.empty(s, dtype=dt)  # noqa: E731
    i32 = lambda n: torch.zeros(n, dtype=torch.int32)  # noqa: E731
    for B, d, n, k in ((1, 1536, 16384, 32), (256, 4096, 16384, 32), (16, 1536, 15, 1), (256, 4096, 65536, 64)):
        topk_sae_encode.topk_sae_encode(e(B, d), e(d, n), e(n), e(d), k)
    for B, d, n in ((1, 1536, 15), (64, 4096, 50)):
        sae_controller.sae_controller(e(B, d), e(d, n), e(n), e(d), i32(n), 0.0, torch.zeros(n))
    for B, V in ((1, 151936), (64, 128256)):  # sampling at the presets' vocabularies
        f32 = torch.zeros(B)
        for flt in (False, True):
            sample.sample(e(B, V), f32, torch.zeros(B, dtype=torch.int64), f32, torch.zeros(B, dtype=torch.int64),
                          i32(B), flt)
    for B, T, d in ((1, 1, 1536), (16, 128, 4096)):
        steer_add.steer_add_(e(B, T, d), i32(B * T).view(B, T), i32(B), e(5, d), i32(B), torch.zeros(B), e(d))
        steer_add.steer_residual_add(e(B, T, d), e(B, T, d), i32(B * T).view(B, T), i32(B), e(5, d), i32(B),
                                     torch.zeros(B), None)


def main(argv: list[str]) -> int:
    pdl = "--pdl" in argv
    models = [a for a in argv if not a.startswith("--")] or ["qwen2.5-1.5b", "llama-3.1-8b"]
    JITFunction.run = _record
    for mod in (decode_attention, decode_tail, fused_linear, qkv_rope, window_attention):
        if pdl:
            mod.pdl_launch = lambda device: dict(USE_PDL=True, launch_pdl=True)
    for name in models:
        for dtype in (torch.bfloat16, torch.float32):
            for M in (1, 64):
                _calls(presets.SHAPES[name], dtype, M)
        # split-K as STEERFAST_SPLIT_K=auto picks it on a 132-SM H100/H200 (the small layers at M = 1)
        os.environ["STEERFAST_SPLIT_K"] = "auto"
        fused_linear.num_sms = qkv_rope.num_sms = lambda device: 132
        for dtype in (torch.bfloat16, torch.float32):
            _calls(presets.SHAPES[name], dtype, 1)
        del os.environ["STEERFAST_SPLIT_K"]
    group[0] = "other"
    for dtype in (torch.bfloat16, torch.float32):
        _other_calls(dtype)
    seen, target = set(), GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    for fn, args, kwargs, grp in launches:
        src, options, key = _source(fn, args, kwargs, backend)
        if key in seen:
            continue
        seen.add(key)
        shown = {k: v for k, v in kwargs.items() if isinstance(v, (int, str, bool)) and k not in options}
        out = dict(kernel=fn.__name__, group=grp, constexprs=shown, options=options)
        try:
            c = triton.compile(src, target=target, options=options)
            out |= dict(shared=c.metadata.shared, fits=c.metadata.shared <= SM90_SHARED_LIMIT,
                        pdl="griddepcontrol.wait" in c.asm["ptx"], launch_pdl=bool(c.metadata.launch_pdl))
        except Exception as e:  # noqa: BLE001 -- reported, the test fails on it
            out |= dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
