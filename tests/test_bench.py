"""Smoke test of `python -m bench decode` on the CPU: it runs, prints a table, writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_bench_decode_cpu_smoke(tmp_path):
    out = tmp_path / "d.json"
    cmd = [sys.executable, "-m", "bench", "decode", "--device", "cpu", "--models", "tiny", "--batches", "1,2",
           "--new-tokens", "8", "--prompt-len", "8", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "steerfast tok/s" in r.stdout and "% floor" in r.stdout

    d = json.loads(out.read_text())
    env = d["env"]
    for key in ("device_name", "torch", "triton", "transformers", "git_commit", "date", "command", "dtype",
                "attention_backend"):
        assert key in env, key
    assert "--models tiny" in env["command"]
    assert env["attention_backend"]["chosen"] in ("cuda", "triton", "torch")
    assert d["copy_bandwidth"]["bytes_per_s"] > 0

    assert [(x["model"], x["batch"]) for x in d["results"]] == [("tiny", 1), ("tiny", 2)]
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for x in d["results"]:
        assert "error" not in x, x["error"]
        sf_, hf, floor = x["steerfast"], x["hf"], x["floor"]
        assert sf_["tokens"] == 8 * x["batch"] and sf_["tokens_per_s"] > 0
        lat = sf_["callback_run"]["latency_ms"]
        assert 0 < lat["p50"] <= lat["p99"]
        assert hf["tokens"] == 8 * x["batch"] and hf["tokens_per_s"] > 0
        b = floor["bytes_per_step"]
        assert b["total"] == b["weight_bytes_read"] + b["kv_bytes_read"] > 0
        assert abs(b["modelargs_vs_params"]) < 0.01  # ModelArgs.weight_bytes agrees with the parameters
        assert floor["tokens_per_s"] > 0 and x["fraction_of_floor"] > 0


def test_bench_kernels_cpu_smoke(tmp_path):
    """`python -m bench kernels` on tiny CPU shapes, each section x backend in its own child process
    (--isolate yes: the path a GPU run takes): torch entries with positive times, the JSON's record."""
    import os

    out = tmp_path / "k.json"
    cmd = [sys.executable, "-m", "bench", "kernels", "--device", "cpu", "--backends", "torch",
           "--batches", "1,2", "--dims", "32", "--latents", "15,100", "--ctrl-batches", "1", "--ctrl-latents", "15",
           "--steer-batches", "1", "--steer-new-tokens", "4", "--steer-prompt-len", "4", "--steer-reps", "2",
           "--reps", "5", "--copy-mib", "16", "--isolate", "yes", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "STEERFAST_BACKEND")}
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    for head in ("topk_sae_encode", "sae_controller", "steering overhead", "% copy bw", "vs base"):
        assert head in r.stdout, head

    d = json.loads(out.read_text())
    for key in ("device_name", "torch", "triton", "git_commit", "date", "command", "dtype"):
        assert key in d["env"], key
    assert d["copy_bandwidth"]["bytes_per_s"] > 0
    assert {"us", "bytes", "gbps", "pct_copy_bw", "vs_base", "targets"} <= set(d["definitions"])
    assert [w["rc"] for w in d["workers"]] == [0, 0, 0, 0]

    topk = d["results"]["topk_sae_encode"]
    assert {(x["backend"], x["batch"], x["n"]) for x in topk} == {
        (b, B, n) for b in ("gemm+topk", "torch") for B in (1, 2) for n in (15, 100)}
    for x in topk:
        assert "error" not in x, x["error"]
        assert x["k"] == min(32, x["n"]) and x["us"] > 0 and x["reps"] >= 3
        assert x["bytes"] == 32 * x["n"] * 2 + x["batch"] * 32 * 2 + x["n"] * 2 + 32 * 2 + x["batch"] * x["k"] * 12
        assert x["gbps"] > 0 and x["pct_copy_bw"] > 0 and x["vs_base"] > 0
        if x["backend"] == "torch":
            assert x["idx_ok"] == 1.0 and x["max_err"] == 0.0  # the reference against itself
        else:  # the baseline's agreement is information, not a pass/fail column
            assert "idx_ok" not in x and 0 <= x["idx_agree"] <= 1
    ctrl = d["results"]["sae_controller"]
    assert [(x["backend"], x["batch"], x["n"]) for x in ctrl] == [("torch", 1, 15)]
    assert ctrl[0]["us"] > 0 and ctrl[0]["vs_base"] == 1.0 and ctrl[0]["idx_ok"] == 1.0
    (st,) = d["results"]["steer_add"]
    assert "error" not in st, st["error"]
    assert st["model"] == "tiny" and st["plain_ms_per_token"] > 0 and st["steered_ms_per_token"] > 0
    assert len(st["plain_ms_per_token_all"]) == 2 and isinstance(st["rel_diff"], float)


def test_bench_hybrid_cpu_smoke(tmp_path):
    """`python -m bench hybrid` on the tiny CPU preset: steerfast, the naive transformers hybrid and the
    paper's loop all run for both configurations, both gates and both batches; the JSON holds positive
    throughputs, the paper loop's per-token times, the floor and the summary's speedups."""
    out = tmp_path / "h.json"
    cmd = [sys.executable, "-m", "bench", "hybrid", "--device", "cpu", "--model", "tiny", "--batches", "1,2",
           "--base-prompt-len", "6", "--thinking-prompt-len", "7", "--new-tokens", "9", "--naive-new-tokens", "9",
           "--paper-new-tokens", "2", "--warmup-tokens", "9", "--copy-mib", "16", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    for head in ("sf tok/s", "naive tok/s", "vs naive", "vs paper", "% floor", "targets"):
        assert head in r.stdout, head

    d = json.loads(out.read_text())
    assert d["bench"] == "hybrid" and not d["errors"]
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Warning" not in r.stderr, r.stderr  # e.g. transformers' past_key_values deprecation
    for key in ("device_name", "torch", "triton", "transformers", "git_commit", "date", "command", "dtype"):
        assert key in d["env"], key
    assert "--model tiny" in d["env"]["command"]
    assert d["copy_bandwidth"]["bytes_per_s"] > 0
    s = d["settings"]
    assert s["configs"]["a"]["windows"] == [-1] and len(s["configs"]["a"]["coefs"]) == 10
    assert s["configs"]["b"]["windows"] == [0, -1, -15, -50, -100]

    cells = {(x["impl"], x["config"], x["batch"], x["gate"]) for x in d["results"]}
    assert cells == {(i, c, b, g) for i in ("steerfast", "naive") for c in "ab" for b in (1, 2)
                     for g in ("thinking", "0.12")}
    for x in d["results"]:
        assert "error" not in x, x["error"]
        assert x["tokens"] == 9 * x["batch"] and x["tokens_per_s"] > 0 and x["ms_per_token"] > 0
        assert x["grid_size"] == (10 if x["config"] == "a" else 50)
        assert abs(x["steered_share"] - (1 / 9 if x["gate"] == "0.12" else x["steered_share"])) < 1e-9
    assert [p["config"] for p in d["paper"]] == ["a", "b"]
    for p in d["paper"]:
        assert "error" not in p, p["error"]
        assert p["t_unsteered_s"] > 0 and p["t_steered_s"] > 0 and p["new_tokens"] == 2
    assert [f["batch"] for f in d["floor"]] == [1, 2] and all(f["tokens_per_s"] > 0 for f in d["floor"])
    assert len(d["summary"]) == 8
    for row in d["summary"]:
        assert row["sf_tok_s"] > 0 and row["naive_tok_s"] > 0 and row["vs_naive"] > 0
        assert row["paper_tok_s"] > 0 and row["vs_paper"] > 0 and row["pct_floor"] > 0
    assert [t["checked"] for t in d["targets"]] == [False, False]


def test_bench_check_without_a_gpu_says_so_in_one_line():
    env = {k: v for k, v in __import__("os").environ.items()}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-m", "bench", "check"], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().count("\n") == 0 and "no CUDA GPU" in r.stdout


def test_bench_check_step_reports_failing_tests_and_goes_on(tmp_path):
    """A check step's record: failing test names with their first error line from pytest's JUnit XML,
    a timeout reported as a failure, and the decode headline figures read from the bench's JSON."""
    from bench import check

    (tmp_path / "test_x.py").write_text(
        "def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 + 1 == 3, 'arithmetic broke'\n")
    junit = tmp_path / "j.xml"
    step = dict(name="t", timeout=60, junit=junit,
                cmd=[sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_x.py"),
                     f"--junitxml={junit}"])
    rec = check.run_step(step, scale=1.0)
    assert rec["status"] == "failed" and rec["rc"] == 1
    assert [f["test"].split("::")[-1] for f in rec["failures"]] == ["test_bad"]
    assert "arithmetic broke" in rec["failures"][0]["error"]
    slow = check.run_step(dict(name="s", timeout=0.5, cmd=[sys.executable, "-c", "import time; time.sleep(5)"]), 1.0)
    assert slow["status"] == "failed" and "timed out" in slow["detail"]

    out = tmp_path / "d.json"
    dec = check.run_step(dict(name="decode", timeout=120, json=out, cmd=[
        sys.executable, "-m", "bench", "decode", "--device", "cpu", "--models", "tiny", "--batches", "1",
        "--new-tokens", "4", "--prompt-len", "4", "--no-hf", "--out", str(out)]), 1.0)
    assert dec["status"] == "passed", dec["output_tail"]
    (row,) = check.headlines([dec])
    assert row["what"] == "decode tiny batch 1" and "tok/s" in row["value"] and "% of floor" in row["value"]
