"""steerfast.tuning: the search, the correctness gate on every candidate config, and the tuned table
as the launchers and the dispatch read it. GPU timing itself is `steerfast tune`'s job on a GPU;
here the clock is a stand-in and the kernels run in Triton's interpreter."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from steerfast import tuning
from steerfast.config import ModelArgs
from steerfast.fused_ops import FUSED_MAX_M, _implemented
from steerfast.kernels import fused_linear as FL
from steerfast.kernels import qkv_rope as QR

from backends import CPU_TRITON_SKIP, TRITON_SKIP
from cli_helpers import ENV, assert_one_error_line, run_cli

CUDA0 = torch.device("cuda", 0)  # only a key here: device_slug is replaced, nothing touches a GPU


@pytest.fixture
def tuned_file(tmp_path, monkeypatch):
    """A tuned table at a temp path, for a made-up GPU that every device maps to."""
    path = tmp_path / "tuned.json"
    monkeypatch.setenv(tuning.PATH_ENV, str(path))
    monkeypatch.delenv(tuning.OFF_ENV, raising=False)
    monkeypatch.delenv("STEERFAST_SPLIT_K", raising=False)
    monkeypatch.delenv("STEERFAST_BACKEND", raising=False)
    monkeypatch.setattr(tuning, "device_slug", lambda device: "test-gpu")
    tuning.forget()
    yield path
    tuning.forget()


def _config(op, **values):
    """A whole config of `op` (every axis; what the launchers need), with `values` set."""
    return {k: v[0] for k, v in tuning.AXES[op].items()} | values


def _record(op, M, N, K, us, reference_us, elt=2, **values):
    return dict(op=op, weight="w", M=M, N=N, K=K, elt=elt, config=_config(op, **values), us=us, table_us=us,
                reference_us=reference_us)


def test_coordinate_search_reaches_a_separable_optimum_and_skips_what_cannot_run():
    axes = dict(a=(1, 2, 3, 4), b=(10, 20, 30), c=(0, 1))
    best = dict(a=3, b=10, c=1)

    def cost(cfg):
        if cfg["a"] == 4:
            return math.inf  # cannot run
        return sum(abs(cfg[k] - best[k]) for k in axes) + 0.5

    found, c, measured = tuning.coordinate_search(dict(a=1, b=30, c=0), axes, cost)
    assert found == best and c == 0.5
    assert measured <= 1 + sum(len(v) for v in axes.values())
    # a start that cannot be beaten stays
    found, c, _ = tuning.coordinate_search(best, axes, cost)
    assert found == best


def test_row_buckets_and_keys():
    assert [tuning.row_bucket(m) for m in (1, 2, 3, 16, 17, 176)] == [1, 2, 4, 16, 32, 256]
    assert tuning.key("fused_linear", 3, 64, 128, 2) == tuning.key("fused_linear", 4, 64, 128, 2)
    assert tuning.key("fused_linear", 3, 64, 128, 2) != tuning.key("fused_linear", 5, 64, 128, 2)


def _small_args(qkv_bias=True):
    # K = 256 for the down weight: split-K has room there (two BLOCK_K = 64 steps per split)
    return ModelArgs(model_type="qwen2", vocab_size=160, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32,
                     intermediate_size=256, norm_eps=1e-6, max_position_embeddings=64, qkv_bias=qkv_bias)


def _clock(step):
    """A stand-in for the GPU timer that runs the op: each call `step` µs later than the one before
    (step < 0: every new config is faster, so the search moves to each it can run; step > 0: none
    is, so it tries every one-axis change of the start)."""
    t = itertools.count(1e9, step)
    return lambda fn: (fn(), next(t))[1]


@pytest.mark.skipif(CPU_TRITON_SKIP is not None, reason=str(CPU_TRITON_SKIP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_config_the_search_reaches_computes_the_op(dtype):
    """Every config the search launches is checked against the fp32 reference (the gate behind which
    `tune` keeps configs); none may fail it: each one-axis change of the table's config, split-K
    included, and the walk through the configs a search that accepts everything takes."""
    a, cpu = _small_args(), torch.device("cpu")
    seed = torch.randint(0, 2 ** 31, ()).item()
    still = tuning.tune(a, [3], dtype, cpu, time_us=_clock(+1.0), seed=seed)
    assert [r["weight"] for r in still] == ["qkv", "o", "gate_up", "down", "lm_head"]
    for r in still:
        case = next(c for c in tuning._cases(a, 4, dtype, cpu, seed) if c.weight == r["weight"])
        start = tuning.table_config(case, cpu)
        fitting = {tuple(sorted((start | {k: v}).items())) for k, vs in tuning.AXES[r["op"]].items() for v in vs
                   if tuning._fits(r["op"], start | {k: v}, 4, r["N"], r["K"], case.elt)}
        assert r["failed"] == [] and r["config"] == start and r["tried"] == len(fitting), r
    assert any(r["K"] >= 256 for r in still)  # split-K had room somewhere (two BLOCK_K = 64 steps a split)
    moving = tuning.tune(a, [3], dtype, cpu, time_us=_clock(-1.0), seed=seed)
    for r in moving:
        assert r["failed"] == [] and r["us"] < r["table_us"], r


@pytest.mark.skipif(CPU_TRITON_SKIP is not None, reason=str(CPU_TRITON_SKIP))
def test_a_wrong_config_is_refused_by_the_reference_check(monkeypatch):
    """Mutation check of the gate: a launcher that drops the last K block when SPLIT_K > 1 must
    fail every split config, and the search must never pick one."""
    real = FL.fused_linear

    def broken(x, W, *args, config=None, **kw):
        if config and config.get("SPLIT_K", 1) > 1:
            x = x.clone()
            x[:, -config["BLOCK_K"]:] = 0
        return real(x, W, *args, config=config, **kw)

    monkeypatch.setattr(FL, "fused_linear", broken)
    recs = tuning.tune(_small_args(), [1], torch.float32, torch.device("cpu"), time_us=_clock(+1.0))
    down = next(r for r in recs if r["weight"] == "down")
    assert down["config"]["SPLIT_K"] == 1 and any("error" in f for f in down["failed"]), down


def test_tuned_configs_reach_the_launchers(tuned_file, monkeypatch):
    M, N, K = 1, 1536, 8960
    path = tuning.save([_record("fused_linear", M, N, K, 10.0, 30.0, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4,
                                num_warps=8, num_stages=5),
                        _record("qkv_rope", 16, 2048, 1536, 12.0, 40.0, BLOCK_J=16, BLOCK_K=64, SPLIT_K=2,
                                num_warps=4, num_stages=3),
                        _record("lm_head_argmax", 1, 151936, 1536, math.inf, 1.0, BLOCK_N=8, BLOCK_K=64,
                                num_warps=4, num_stages=2)], "test-gpu")
    assert path == tuned_file
    want = dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=8, num_stages=5)
    assert FL.gpu_config(M, N, K, device=CUDA0) == want
    assert FL.gpu_config(M, N, K) == FL._gpu_config_16bit(M, N, K, False, False) | dict(SPLIT_K=1)  # no device
    assert FL.gpu_config(M, N, K, swiglu=True, device=CUDA0) != want  # another op's key
    assert FL.gpu_config(M, N, K, elt=4, device=CUDA0) != want  # another dtype's
    assert QR._config(9, False, 2, 2048, 1536, CUDA0) == dict(BLOCK_J=16, BLOCK_K=64, SPLIT_K=2, num_warps=4,
                                                              num_stages=3)  # 9 rows: the 16-row bucket
    # a non-finite time is never stored: the table stays for that shape
    assert FL.gpu_config(1, 151936, 1536, argmax=True, device=CUDA0) == FL._gpu_config_16bit(1, 151936, 1536,
                                                                                               False, True)
    monkeypatch.setenv("STEERFAST_SPLIT_K", "1")  # an explicit split-K setting overrides the tuned one
    assert FL.gpu_config(M, N, K, device=CUDA0)["SPLIT_K"] == 1
    assert "SPLIT_K" not in QR._config(16, False, 2, 2048, 1536, CUDA0)
    monkeypatch.delenv("STEERFAST_SPLIT_K")
    monkeypatch.setenv(tuning.OFF_ENV, "0")
    assert FL.gpu_config(M, N, K, device=CUDA0) != want
    monkeypatch.delenv(tuning.OFF_ENV)
    # CPU tensors never read the file
    assert tuning.lookup("fused_linear", torch.device("cpu"), M, N, K, 2) is None


def test_where_tuning_timed_both_the_measurement_picks_the_implementation(tuned_file, monkeypatch):
    tuning.save([_record("fused_linear", 1, 64, 64, 10.0, 5.0, BLOCK_N=16),    # cuBLAS faster at 1 row
                 _record("fused_linear", 512, 64, 64, 10.0, 50.0, BLOCK_N=16)], "test-gpu")  # fused at 512
    wins = lambda M: tuning.reference_wins("fused_linear", CUDA0, M, 64, 64, 2)  # noqa: E731
    assert wins(1) is True and wins(400) is False and wins(16) is None
    assert _implemented(torch.bfloat16, 1, None, wins(1)) == ("torch",)
    assert _implemented(torch.bfloat16, 400, None, wins(400)) == ("triton", "torch")  # past FUSED_MAX_M
    assert _implemented(torch.bfloat16, 16, None, wins(16)) == ("triton", "torch")
    assert _implemented(torch.bfloat16, FUSED_MAX_M + 1, None, None) == ("torch",)
    assert _implemented(torch.bfloat16, 1, "triton", wins(1)) == ("triton", "torch")  # a named backend rules


def test_save_merges_and_a_broken_file_falls_back_to_the_table(tuned_file):
    tuning.save([_record("fused_linear", 1, 64, 64, 10.0, 50.0, BLOCK_N=16)], "test-gpu")
    tuning.save([_record("fused_linear", 1, 128, 64, 10.0, 50.0, BLOCK_N=32),
                 _record("fused_linear", 1, 64, 64, 10.0, 50.0, elt=4, BLOCK_N=64)], "test-gpu")
    doc = json.loads(tuned_file.read_text())
    assert doc["slug"] == "test-gpu" and len(doc["entries"]) == 3
    assert tuning.lookup("fused_linear", CUDA0, 1, 64, 64, 2) == _config("fused_linear", BLOCK_N=16)
    assert tuning.lookup("fused_linear", CUDA0, 1, 64, 64, 4) == _config("fused_linear", BLOCK_N=64)
    # entries the launchers could not take (a missing or stray key, a non-integer, no time) are dropped
    good = doc["entries"]
    one = next(iter(good.values()))
    bad = {k: json.loads(json.dumps(one)) for k in ("fused_linear|M1|N8|K8|e2", "fused_linear|M1|N9|K8|e2",
                                                    "fused_linear|M1|N10|K8|e2", "qkv_rope|M1|N8|K8|e2")}
    bad["fused_linear|M1|N8|K8|e2"]["config"] = {k: v for k, v in _config("fused_linear").items() if k != "SPLIT_K"}
    bad["fused_linear|M1|N9|K8|e2"]["config"] = _config("fused_linear", BLOCK_N=16.5)
    del bad["fused_linear|M1|N10|K8|e2"]["us"]
    tuned_file.write_text(json.dumps(dict(doc, entries=good | bad)))  # qkv_rope's: fused_linear's keys
    tuning.forget()
    with pytest.warns(UserWarning, match="ignoring 4 malformed"):
        assert tuning.lookup("fused_linear", CUDA0, 1, 64, 64, 2) == _config("fused_linear", BLOCK_N=16)
    assert tuning.lookup("fused_linear", CUDA0, 1, 8, 8, 2) is None
    assert tuning.lookup("qkv_rope", CUDA0, 1, 8, 8, 2) is None
    # a file of another GPU model is not this one's
    tuned_file.write_text(json.dumps(dict(doc, slug="other-gpu")))
    tuning.forget()
    assert tuning.lookup("fused_linear", CUDA0, 1, 64, 64, 2) is None
    tuned_file.write_text("{not json")
    tuning.forget()
    with pytest.warns(UserWarning, match="steerfast tune"):
        assert tuning.lookup("fused_linear", CUDA0, 1, 64, 64, 2) is None


@pytest.mark.skipif(CPU_TRITON_SKIP is not None, reason=str(CPU_TRITON_SKIP))
def test_the_decode_step_and_the_launchers_ask_for_the_keys_tune_writes(monkeypatch):
    """What `tune` stores for each weight of a model (op, row bucket, N, K, element size) is what a
    decode step's dispatch (reference_wins) and each kernel's launcher (lookup) ask for: a launcher
    passing N for a SwiGLU's N_out, or no device, would never meet a tuned config, silently."""
    from steerfast import fused_ops

    import steerfast as sf
    from tiny_models import random_prompts, tiny_hf

    def spy(record, real):
        return lambda *a: (record.append((a[0], tuning.row_bucket(a[2]), *a[3:])), real(*a))[1]

    asked, launched = [], []
    monkeypatch.setattr(fused_ops, "reference_wins", spy(asked, tuning.reference_wins))
    hf = tiny_hf("qwen2", n_heads=4, n_kv_heads=2, dtype=torch.float32, attention_bias=True)
    m = sf.load_model(hf, device="cpu", dtype=torch.float32)
    m.generate(random_prompts([3, 4, 5]), 3, eos_token_id=None)  # decode steps of 3 rows (bucket 4)
    a = ModelArgs.from_hf(hf.config.to_dict())
    cases = tuning._cases(a, 4, torch.float32, torch.device("cpu"), seed=0)
    written = {(c.op, c.M, c.N, c.K, c.elt) for c in cases}
    assert set(asked) == written

    for mod in (FL, QR):  # the launchers' GPU path (their table, then the kernel: interpreted here)
        monkeypatch.setattr(mod, "lookup", spy(launched, tuning.lookup))
        monkeypatch.setattr(mod, "triton_interpret", lambda: False)
    for c in cases:
        c.run(None)
    assert set(launched) == written


def test_tune_cli_refuses_what_it_cannot_measure(tmp_path):
    prog = "steerfast tune"
    assert_one_error_line(run_cli("tune", "--device", "cpu", "--random", "tiny"), "TRITON_INTERPRET", prog=prog)
    # flags are checked before the device: the same messages on a GPU machine
    assert_one_error_line(run_cli("tune", "--rows", "1,x"), "--rows", prog=prog)
    assert_one_error_line(run_cli("tune", "--rows", "0"), "--rows", prog=prog)
    assert_one_error_line(run_cli("tune", "--model", tmp_path), "--model", prog=prog)


@pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))  # its subprocess sets TRITON_INTERPRET
def test_tune_cli_dry_run_on_the_interpreter(tmp_path):
    r = run_cli("tune", "--random", "tiny", "--device", "cpu", "--rows", "2", "--dtype", "fp32",
                env=ENV | dict(TRITON_INTERPRET="1", XDG_CACHE_HOME=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[2:7]] == ["qkv", "o", "gate_up", "down", "lm_head"]
    assert "nothing written" in lines[-1] and not any(tmp_path.iterdir())
