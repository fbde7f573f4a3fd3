"""Every Triton kernel compiles for sm_90 (H100/H200) and fits its shared memory, the decode step's
with programmatic dependent launch, at the presets' shapes, bf16 and fp32 (decode: M = 1 and 64):
checked on a machine without a GPU by compiling for the target (tests/sm90_compile.py), which the
interpreter cannot do."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DECODE = {"_fused_linear_kernel", "_argmax_reduce_kernel", "_qkv_rope_kernel", "_decode_attention_kernel",
          "_decode_attention_combine_kernel", "_decode_tail_kernel", "_window_attention_kernel"}
OTHER = {"_topk_sae_encode_kernel", "_topk_sae_merge_kernel", "_sae_controller_kernel", "_steer_add_kernel",
         "_steer_residual_add_kernel", "_sample_kernel"}


@pytest.mark.parametrize("model", ["qwen2.5-1.5b", "llama-3.1-8b"])  # two tests: xdist runs them side by side
def test_kernels_compile_for_sm90_within_shared_memory_decode_ones_with_pdl(model):
    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    r = subprocess.run([sys.executable, str(script), "--pdl", model], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert {row["kernel"] for row in rows if row["group"] == "decode"} == DECODE
    assert {row["kernel"] for row in rows if row["group"] == "other"} == OTHER
    for row in rows:
        assert "error" not in row, row
        assert row["fits"], f"{row['kernel']} {row['constexprs']} needs {row['shared']} bytes of shared memory"
        assert row["pdl"] == row["launch_pdl"] == (row["group"] == "decode"), row
    for kernel in ("_fused_linear_kernel", "_qkv_rope_kernel"):
        splits = {row["constexprs"]["SPLIT_K"] for row in rows if row["kernel"] == kernel}
        assert splits > {1}, f"STEERFAST_SPLIT_K=auto split some {kernel} launch's K (so it compiled above)"
    fp32 = [row for row in rows if row["kernel"] == "_fused_linear_kernel" and row["constexprs"]["SWIGLU"]]
    assert max(row["shared"] for row in fp32) > 64 * 1024  # the fp32 configs are the ones near the limit
