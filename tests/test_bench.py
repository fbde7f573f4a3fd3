"""Smoke test of `python -m bench decode` on the CPU: it runs, prints a table, writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_bench_decode_cpu_smoke(tmp_path):
    out = tmp_path / "d.json"
    cmd = [sys.executable, "-m", "bench", "decode", "--device", "cpu", "--models", "tiny", "--batches", "1,2",
           "--new-tokens", "8", "--prompt-len", "8", "--variants", "default,pdl,top-p", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "steerfast tok/s" in r.stdout and "% floor" in r.stdout and "MB read/step" in r.stdout

    d = json.loads(out.read_text())
    env = d["env"]
    for key in ("device_name", "torch", "triton", "transformers", "git_commit", "date", "command", "dtype",
                "attention_backend"):
        assert key in env, key
    assert "--models tiny" in env["command"]
    assert env["attention_backend"]["chosen"] in ("cuda", "triton", "torch")
    assert d["copy_bandwidth"]["bytes_per_s"] > 0

    assert [(x["model"], x["batch"], x["variant"]) for x in d["results"]] == [
        ("tiny", b, v) for b in (1, 2) for v in ("default", "pdl", "top-p")]
    assert d["settings"]["variants"] == {"default": {}, "pdl": {"STEERFAST_PDL": "1"},
                                         "top-p": {"temperature": 1.0, "top_p": 0.9, "seed": 0}}
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for x in d["results"]:
        assert "error" not in x, x["error"]
        sf_, hf, floor = x["steerfast"], x["hf"], x["floor"]
        assert sf_["tokens"] == 8 * x["batch"] and sf_["tokens_per_s"] > 0
        lat = sf_["callback_run"]["latency_ms"]
        assert 0 < lat["p50"] <= lat["p99"]
        assert (hf is None) == (x["variant"] == "top-p")  # HF's generate is greedy: no comparison
        assert hf is None or (hf["tokens"] == 8 * x["batch"] and hf["tokens_per_s"] > 0)
        b = floor["bytes_per_step"]
        assert b["total"] == b["weight_bytes_read"] + b["kv_bytes_read"] > 0
        assert abs(b["modelargs_vs_params"]) < 0.01  # ModelArgs.weight_bytes agrees with the parameters
        assert floor["tokens_per_s"] > 0 and x["fraction_of_floor"] > 0
        c = x["counted_step"]  # one step under launch_count (the torch backend on the CPU)
        assert c["kernels"] > 0 and c["syncs"] == 0 and 1.0 <= x["counted_vs_floor_bytes"] < 1.5


def test_bench_kernels_cpu_smoke(tmp_path):
    """`python -m bench kernels` on tiny CPU shapes, each section x backend in its own child process
    (--isolate yes: the path a GPU run takes): torch entries with positive times, the JSON's record."""
    import os

    out = tmp_path / "k.json"
    cmd = [sys.executable, "-m", "bench", "kernels", "--device", "cpu", "--backends", "torch",
           "--batches", "1,2", "--dims", "32", "--latents", "15,100", "--ctrl-batches", "1", "--ctrl-latents", "15",
           "--gemv-batches", "1", "--sample-batches", "2", "--sample-vocab", "50",
           "--steer-batches", "1", "--steer-new-tokens", "4", "--steer-prompt-len", "4", "--steer-reps", "2",
           "--reps", "5", "--copy-mib", "16", "--isolate", "yes", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "STEERFAST_BACKEND")}
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    for head in ("topk_sae_encode", "sae_controller", "fused_linear", "steering overhead", "% copy bw", "vs base",
                 "sample (temperature 1"):
        assert head in r.stdout, head

    d = json.loads(out.read_text())
    for key in ("device_name", "torch", "triton", "git_commit", "date", "command", "dtype"):
        assert key in d["env"], key
    assert d["copy_bandwidth"]["bytes_per_s"] > 0
    assert {"us", "bytes", "gbps", "pct_copy_bw", "vs_base", "targets"} <= set(d["definitions"])
    assert [(w["section"], w["backend"], w["rc"]) for w in d["workers"]] == [  # every section by default
        ("topk", "gemm+topk", 0), ("topk", "torch", 0), ("ctrl", "torch", 0), ("gemv", "cublas", 0),
        ("gemv", "torch", 0), ("steer", "default", 0), ("sample", "torch", 0)]

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
    gemv = d["results"]["fused_linear"]
    assert [(x["weight"], x["backend"]) for x in gemv] == [
        (w, b) for w in ("qkv", "o", "gate_up", "down", "lm_head") for b in ("cublas", "torch")]
    for x in gemv:
        assert "error" not in x, x["error"]
        assert x["model"] == "tiny" and x["batch"] == 1 and x["us"] > 0 and x["gbps"] > 0 and x["max_err"] < 0.05
    (st,) = d["results"]["steer_add"]
    assert "error" not in st, st["error"]
    assert st["model"] == "tiny" and st["plain_ms_per_token"] > 0 and st["steered_ms_per_token"] > 0
    assert len(st["plain_ms_per_token_all"]) == 2 and isinstance(st["rel_diff"], float)
    (sm,) = d["results"]["sample"]
    assert "error" not in sm, sm["error"]
    assert (sm["batch"], sm["vocab"], sm["bytes"]) == (2, 50, 2 * 50 * 4) and sm["us"] > 0
    assert sm["agree"] == 1.0 and sm["vs_base"] == 1.0  # the reference against itself


def test_bench_kernels_gemv_cpu(tmp_path):
    """`python -m bench kernels --sections gemv` on the tiny preset in one process: the cublas baseline
    (F.linear), the torch reference and the Triton kernel under TRITON_INTERPRET=1, for all five
    decoder-step weights; bytes by the documented formula, GB/s from it, errors vs fp32 small."""
    import os

    from bench import gemv_section, kernels
    from steerfast import backend as sfb

    assert "gemv" in kernels.SECTIONS  # in the default section list
    triton = sfb.triton_available()
    backends = "triton,torch" if triton else "torch"
    out = tmp_path / "g.json"
    cmd = [sys.executable, "-m", "bench", "kernels", "--device", "cpu", "--sections", "gemv", "--backends", backends,
           "--gemv-batches", "2", "--reps", "3", "--warmup", "0", "--max-ms", "1", "--copy-mib", "16",
           "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "STEERFAST_BACKEND"}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    for head in ("fused_linear", "vs cublas", "max err", "xover M", "crossover", "triton / cublas"):
        assert head in r.stdout, head

    d = json.loads(out.read_text())
    assert d["settings"]["gemv_models"] == ["tiny"] and d["settings"]["gemv_batches"] == [2]
    assert {"gemv_bytes", "gemv_cublas", "gemv_max_err", "gemv_crossover_m"} <= set(d["definitions"])
    assert not d["targets"]  # CUDA only
    recs = d["results"]["fused_linear"]
    names = ["cublas", *(["triton"] if triton else []), "torch"]
    assert [(x["weight"], x["backend"]) for x in recs] == [
        (w, b) for w in ("qkv", "o", "gate_up", "down", "lm_head") for b in names]
    # tiny: d=64, 4 heads of 16, 2 kv heads, I=192, V=512, no biases (llama)
    shapes = dict(qkv=(128, 64, 128, False), o=(64, 64, 64, True), gate_up=(384, 64, 192, False),
                  down=(64, 192, 64, True), lm_head=(512, 64, 512, False))
    by = {(x["weight"], x["backend"]): x for x in recs}
    for x in recs:
        assert "error" not in x, x["error"]
        N, K, n_out, res = shapes[x["weight"]]
        assert (x["N"], x["K"], x["batch"], x["residual"], x["bias"]) == (N, K, 2, res, False)
        assert x["norm"] == (x["weight"] in ("qkv", "gate_up")) and x["swiglu"] == (x["weight"] == "gate_up")
        want = N * K * 2 + 2 * K * 2 + 2 * n_out * 2 + (2 * n_out * 2 if res else 0) + (K * 2 if x["norm"] else 0)
        assert x["bytes"] == want == gemv_section.op_bytes(x, 2)
        assert x["us"] > 0 and x["reps"] >= 3
        assert abs(x["gbps"] - x["bytes"] / x["us"] / 1e3) < 1e-9 * x["gbps"] and x["pct_copy_bw"] > 0
        base = by[(x["weight"], "cublas")]
        assert abs(x["vs_base"] - x["us"] / base["us"]) < 1e-9 * x["vs_base"]
        assert 0 <= x["max_err"] < 0.05 * max(1.0, x["ref_absmax"])  # bf16 roundings vs the fp32 reference
        if x["backend"] == "triton":  # the kernel rounds where the reference does
            assert x["max_err"] <= by[(x["weight"], "torch")]["max_err"] + 0.02
            assert "crossover_m" in x
    assert all(by[(w, "cublas")]["vs_base"] == 1.0 for w in shapes)


def test_bench_gemv_crossover_and_targets():
    """The gemv section's crossover (largest M where triton <= cublas) and its CUDA targets, on made-up times."""
    from bench import gemv_section as g

    def rec(weight, backend, M, us):
        return dict(op=g.OP, model="llama-3.1-8b", weight=weight, batch=M, N=4096, K=4096, norm=False, bias=False,
                    residual=True, swiglu=False, backend=backend, us=us)
    times = dict(o=dict(cublas=(10, 12, 20), triton=(9, 11, 30)),  # wins at 1, 16: crossover 16
                 down=dict(cublas=(10, 12, 20), triton=(11, 11, 19)),  # wins at 16, 64 but not 1: MISS
                 qkv=dict(cublas=(10, 12, 20), triton=(11, 13, 21)))  # never: crossover None
    recs = [rec(w, b, M, us) for w, bs in times.items() for b, ts in bs.items() for M, us in zip((1, 16, 64), ts)]
    xo = {c["weight"]: c for c in g.crossover(recs)}
    assert (xo["o"]["crossover_m"], xo["o"]["contiguous"]) == (16, True)
    assert (xo["down"]["crossover_m"], xo["down"]["contiguous"]) == (64, False)
    assert (xo["qkv"]["crossover_m"], xo["qkv"]["contiguous"]) == (None, False)
    bw = dict(bytes_per_s=4e12)
    assert g.postprocess(recs, dict(dtype="bf16", device="cpu"), bw) == []  # targets: CUDA only
    targets = g.postprocess(recs, dict(dtype="bf16", device="cuda:0"), bw)
    xt = {t["weight"]: t for t in targets if "crossover_m" in t}
    assert {w: t["met"] for w, t in xt.items()} == dict(o=True, down=False, qkv=False)
    bt = {t["weight"]: t for t in targets if "crossover_m" not in t}
    assert set(bt) == {"o", "down", "qkv"}  # triton at M = 1
    for w, t in bt.items():
        r = next(x for x in recs if (x["weight"], x["backend"], x["batch"]) == (w, "triton", 1))
        assert t["value"] == r["pct_copy_bw"] / 100 and t["met"] == (t["value"] >= 0.8)
        assert r["bytes"] == 4096 * 4096 * 2 + 4096 * 2 + 2 * 4096 * 2
        assert r["target"].endswith("ok" if t["met"] else "MISS")
    assert [bt[w]["met"] for w in ("o", "down", "qkv")] == [True, False, False]  # 33.6 MB in 9 / 11 us: 93% / 76%
    assert [r["crossover_m"] for r in recs if r["weight"] == "o"] == [16] * 6


def test_bench_hybrid_cpu_smoke(tmp_path):
    """`python -m bench hybrid` on the tiny CPU preset: steerfast, the naive transformers hybrid and the
    paper's loop all run for both configurations, both gates and both batches; the JSON holds positive
    throughputs, the paper loop's per-token times and steerfast's at each context, the floor (bytes and
    candidate FLOPs) and the summary's speedups."""
    out = tmp_path / "h.json"
    cmd = [sys.executable, "-m", "bench", "hybrid", "--device", "cpu", "--model", "tiny", "--batches", "1,2",
           "--base-prompt-len", "6", "--thinking-prompt-len", "7", "--new-tokens", "9", "--naive-new-tokens", "9",
           "--paper-new-tokens", "2", "--warmup-tokens", "9", "--copy-mib", "16", "--contexts", "12,30",
           "--context-new-tokens", "9", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    for head in ("sf tok/s", "naive tok/s", "vs naive", "vs paper", "% floor", "targets", "by context"):
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

    main = [x for x in d["results"] if x["impl"] != "steerfast-context"]
    for x in main:
        if x["impl"] == "steerfast":  # the device-side step (config a) counted; the host loop not
            c = x["counted_step"]
            assert (c is None) == (x["config"] == "b")
            assert c is None or (c["kernels"] > 0 and c["syncs"] == 0 and c["bytes_read"] > 0)
    cells = {(x["impl"], x["config"], x["batch"], x["gate"]) for x in main}
    assert cells == {(i, c, b, g) for i in ("steerfast", "naive") for c in "ab" for b in (1, 2)
                     for g in ("thinking", "0.12")}
    for x in d["results"]:
        assert "error" not in x, x["error"]
        assert x["tokens"] == 9 * x["batch"] and x["tokens_per_s"] > 0 and x["ms_per_token"] > 0
        assert x["impl"] == "steerfast-context" or x["grid_size"] == (10 if x["config"] == "a" else 50)
        assert abs(x["steered_share"] - (1 / 9 if x["gate"] == "0.12" else x["steered_share"])) < 1e-9
    assert [(p["config"], p["context"]) for p in d["paper"]] == [("a", 12), ("b", 12), ("a", 30), ("b", 30)]
    for p in d["paper"]:
        assert "error" not in p, p["error"]
        assert p["t_unsteered_s"] > 0 and p["t_steered_s"] > 0 and p["new_tokens"] == 2
    assert [(r["config"], r["context"]) for r in d["contexts"]] == [(p["config"], p["context"]) for p in d["paper"]]
    assert all(r["sf_tok_s"] > 0 and r["paper_tok_s"] > 0 and r["vs_paper"] > 0 for r in d["contexts"])
    assert [f["batch"] for f in d["floor"]] == [1, 2] and d["matmul_peak"]["flops_per_s"] > 0
    flops = d["floor"][0]["candidate_flops_per_steered_row"]
    assert flops["b"] > 5 * flops["a"] > 0  # the grid's windows re-run many positions
    assert len(d["summary"]) == 8
    for row in d["summary"]:
        assert row["sf_tok_s"] > 0 and row["naive_tok_s"] > 0 and row["vs_naive"] > 0
        assert row["paper_tok_s"] > 0 and row["vs_paper"] > 0 and row["pct_floor"] > 0
    floor = {(r["config"], r["batch"], r["gate"]): r["floor_tok_s"] for r in d["summary"]}
    assert floor[("b", 1, "thinking")] < floor[("b", 1, "0.12")] < floor[("a", 1, "0.12")]  # steering costs FLOPs
    assert [t["checked"] for t in d["targets"]] == [False] * 5


TINY = dict(decode=["--models", "tiny", "--batches", "1,2", "--new-tokens", "4", "--prompt-len", "4", "--no-hf"],
            hybrid=["--model", "tiny", "--batches", "1,2", "--base-prompt-len", "6", "--thinking-prompt-len", "7",
                    "--new-tokens", "6", "--warmup-tokens", "6", "--copy-mib", "16", "--configs", "a", "--gates", "rate",
                    "--sections", "steerfast,floor"])


def _bench(bench, tmp_path, *flags):
    out = tmp_path / f"{bench}.json"
    r = subprocess.run([sys.executable, "-m", "bench", bench, "--device", "cpu", *TINY[bench], *flags, "--out", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    return r, json.loads(out.read_text())


def _tok_s(bench, rec):
    return rec["steerfast"]["tokens_per_s"] if bench == "decode" else rec["tokens_per_s"]


@pytest.mark.parametrize("bench", ["decode", "hybrid"])
def test_a_case_that_loses_the_cuda_context_or_kills_its_worker_leaves_the_rest_to_a_fresh_one(bench, tmp_path):
    """A kernel fault is sticky (nothing after it works in that process, which keeps its memory) or
    kills the process. Under --isolate yes (the default on CUDA) the cases run in a worker: the
    faulting case is recorded with its traceback, a dead worker's case as a death, and the cases
    after either run in a fresh worker, all in one JSON (--fault-case / --die-case stand in for the
    faults on the CPU)."""
    r, d = _bench(bench, tmp_path, "--isolate", "yes", "--fault-case", "0")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # a case failed
    assert "cases 1.. run in a fresh process" in r.stdout
    first, *rest = d["results"]
    assert first["batch"] == 1 and "injected fault" in first["error"] and "Traceback" in first["traceback"]
    assert [x["batch"] for x in rest] == [2] and "error" not in rest[0] and _tok_s(bench, rest[0]) > 0
    assert [x["case"] for x in d["lost_contexts"]] == [0] and "lost_context" not in d
    assert not {"in_flight_case", "next_case", "complete"} & set(d)
    if bench == "hybrid":
        assert [f["batch"] for f in d["floor"]] == [1, 2] and not d["errors"]

    r, d = _bench(bench, tmp_path, "--isolate", "yes", "--die-case", "0")
    assert r.returncode == 1 and "the worker ended in case 0" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert [x["case"] for x in d["worker_deaths"]] == [0] and "without finishing" in d["worker_deaths"][0]["error"]
    assert not {"in_flight_case", "next_case", "complete"} & set(d)
    assert [x["batch"] for x in d["results"]] == [2] and _tok_s(bench, d["results"][0]) > 0


def test_the_supervisor_resumes_after_every_way_a_worker_can_stop(tmp_path):
    """Workers scripted to stop each way: a lost context then an abort at exit (resume after the
    lost case whatever the exit code), an error outside any case (exit 1 as a failed case gives, but
    no `complete`: resume at the next case), a death in a case (that case recorded), a death with no
    progress (stop, saying what did not run), and a worker that finishes."""
    import argparse

    from bench import common

    # each run of the worker: (what it writes besides its records, its exit code), by --resume
    plan = {0: (dict(lost_context=dict(case=1, resume_at=2), complete=True), 134),
            2: (dict(next_case=4), 1),
            4: (dict(in_flight_case=5), -9),
            6: (dict(complete=True), 1)}
    worker = tmp_path / "worker.py"
    worker.write_text(f"""import json, os, sys
a = sys.argv
start, out = int(a[a.index("--resume") + 1]), a[a.index("--out") + 1]
prev = json.load(open(out)) if "--merge-from" in a else dict(results=[])
doc = dict(results=prev["results"] + [dict(case=start)], **{{k: prev[k] for k in ["worker_deaths"] if k in prev}})
extra, rc = {plan!r}[start]
doc.update(extra)
json.dump(doc, open(out, "w"))
os._exit(rc % 256) if rc >= 0 else os.kill(os.getpid(), 9)
""")
    args = argparse.Namespace(out=str(tmp_path / "o.json"))
    assert common.supervise(args, [sys.executable, str(worker)]) == 1
    d = json.loads((tmp_path / "o.json").read_text())
    assert [r["case"] for r in d["results"]] == [0, 2, 4, 6]
    assert [w["case"] for w in d["worker_deaths"]] == [None, 5]
    assert "before case 4" in d["worker_deaths"][0]["error"] and "in case 5" in d["worker_deaths"][1]["error"]
    assert not {"complete", "in_flight_case", "next_case"} & set(d)

    plan = {0: (dict(next_case=0), 1)}  # no progress: it would stop there again
    worker.write_text(worker.read_text().split("extra, rc")[0] + f"extra, rc = {plan!r}[start]\n"
                      "doc.update(extra)\njson.dump(doc, open(out, 'w'))\nsys.exit(rc)\n")
    assert common.supervise(args, [sys.executable, str(worker)]) == 1
    d = json.loads((tmp_path / "o.json").read_text())
    assert "cases 0.. not run" in d["worker_deaths"][0]["error"]

    plan = {0: (dict(in_flight_case=1, cases_total=2), 1)}  # it died in the last case: no worker after it
    worker.write_text(worker.read_text().split("extra, rc")[0] + f"extra, rc = {plan!r}[start]\n"
                      "doc.update(extra)\njson.dump(doc, open(out, 'w'))\nsys.exit(rc)\n")
    assert common.supervise(args, [sys.executable, str(worker)]) == 1
    d = json.loads((tmp_path / "o.json").read_text())
    assert [r["case"] for r in d["results"]] == [0] and [w["case"] for w in d["worker_deaths"]] == [1]


def test_without_isolation_a_lost_context_stops_the_cases_and_says_so(tmp_path):
    r, d = _bench("decode", tmp_path, "--isolate", "no", "--fault-case", "0")
    assert r.returncode == 1 and "fresh" not in r.stdout
    assert [x["batch"] for x in d["results"]] == [1] and "injected fault" in d["results"][0]["error"]
    assert "cases 1..1 not run" in d["lost_context"]["error"] and "in_flight_case" not in d


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


def test_bench_check_stops_a_timed_out_step_whole_and_survives_broken_output(tmp_path):
    """A step that runs out of time is stopped with everything it started (a grandchild left running
    would share the GPU with the next step's timing) and keeps its stderr; a truncated JSON or a
    bench's own error records make the step fail, never the check."""
    from bench import check

    flags = [tmp_path / "grandchild-survived", tmp_path / "deaf-grandchild-survived"]
    # one grandchild shares the step's pipes; the other ignores SIGINT and holds none (a bench worker)
    (tmp_path / "grandchild.py").write_text(
        "import signal, sys, time\nif sys.argv[2] == 'deaf':\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "time.sleep(4)\nopen(sys.argv[1], 'w')\n")
    (tmp_path / "child.py").write_text(
        "import subprocess, sys, time\nsys.stderr.write('started\\n')\nsys.stderr.flush()\n"
        f"subprocess.Popen([sys.executable, {str(tmp_path / 'grandchild.py')!r}, {str(flags[0])!r}, 'plain'])\n"
        f"subprocess.Popen([sys.executable, {str(tmp_path / 'grandchild.py')!r}, {str(flags[1])!r}, 'deaf'], "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\ntime.sleep(60)\n")
    child = str(tmp_path / "child.py")
    rec = check.run_step(dict(name="t", timeout=2.0, cmd=[sys.executable, child]), 1.0)
    assert rec["status"] == "failed" and "timed out" in rec["detail"] and "started" in rec["output_tail"]
    import time
    time.sleep(5)
    assert not any(f.exists() for f in flags), "a grandchild of the step outlived its timeout"

    bad = tmp_path / "bad.json"
    rec = check.run_step(dict(name="j", timeout=30, json=bad, cmd=[
        sys.executable, "-c", f"open({str(bad)!r}, 'w').write('{{\"bench\": \"dec')"]), 1.0)
    assert rec["status"] == "failed" and "bad.json" in rec["detail"] and "result" not in rec

    errs = tmp_path / "errs.json"
    doc = dict(bench="kernels", env=dict(error="not this one"), results=dict(gemv=[
        dict(model="qwen2.5-1.5b", weight="o", batch=1, backend="triton", us=3.0),
        dict(model="qwen2.5-1.5b", weight="down", batch=1, backend="triton", error="OutOfResources: shared\nmore")]))
    rec = check.run_step(dict(name="k", timeout=30, json=errs, cmd=[
        sys.executable, "-c", f"import json; json.dump({doc!r}, open({str(errs)!r}, 'w'))"]), 1.0)
    assert rec["status"] == "failed" and rec["result"] == doc
    (f,) = rec["failures"]
    assert f["error"] == "OutOfResources: shared" and "weight=down" in f["test"] and "results.gemv" in f["test"]


def test_bench_check_keeps_to_its_budget_and_reports_in_one_table(monkeypatch):
    """The whole check has one budget: a step gets its own limit or what is left less the time a
    stop can take, and is not started with too little left; every step, its failures and the
    headlines go in one table."""
    from bench import check

    monkeypatch.setattr(check, "KILL_GRACE_S", 0.5)
    monkeypatch.setattr(check, "MIN_STEP_S", 1.0)
    py = [sys.executable, "-c"]
    todo = [dict(name="fails", timeout=30, cmd=py + ["raise SystemExit(3)"]),
            dict(name="slow", timeout=30, cmd=py + ["import time; time.sleep(30)"]),  # cut to what is left
            dict(name="late", timeout=30, cmd=py + ["pass"])]
    saves = []
    results = check.run_steps(todo, 4.0, 1.0, [], lambda: saves.append(1))
    assert [r["status"] for r in results] == ["failed", "failed", "not run"] and len(saves) == 3
    assert results[1]["wall_s"] < 6 and "timed out after" in results[1]["detail"]
    results[0]["failures"] = [dict(test="tests/test_x.py::test_bad", error="AssertionError: broke")]
    rows = check.summary_rows(results, [dict(what="decode tiny batch 1", value="9 tok/s, 1.0% of floor")])
    assert [(r["check"].strip(), r["status"]) for r in rows] == [
        ("fails", "failed"), ("tests/test_x.py::test_bad", "FAILED"), ("slow", "failed"), ("late", "not run"),
        ("decode tiny batch 1", "measured")]


def test_candidate_flops_counts_the_packed_reruns_matmuls(monkeypatch):
    """bench.hybrid_cost.candidate_flops against Hybrid's packed candidate re-run (float64: the torch
    references): its matmul FLOPs equal those of every F.linear the re-run calls; attention is added
    by arithmetic."""
    import torch

    import steerfast as sf
    from bench.hybrid_cost import candidate_flops
    from tiny_models import tiny_hf

    hf = tiny_hf("qwen2", layers=4, vocab=37, attention_bias=True)
    m = sf.load_model(hf, device="cpu", dtype=torch.float64)
    a, steer_layer, L = m.args, 1, 9
    cfg = dict(coefs=[0.5, 2.0], windows=[0, -1, -4, -20])
    sae = sf.TopKSAE(W_enc=torch.randn(a.dim, 3), b_enc=torch.randn(3), W_dec=torch.randn(3, a.dim),
                     b_dec=torch.randn(a.dim), k=1)
    think = sf.load_model(hf, device="cpu", dtype=torch.float64)
    h = sf.Hybrid(m, think, sae, torch.randn(3, a.dim), None, sae_layer=0, steer_layer=steer_layer,
                  coefs=cfg["coefs"], windows=cfg["windows"])
    m.ensure_cache(1 + 8, 32)
    residual = torch.randn(1, 32, a.dim, dtype=torch.float64)
    linear, flops = torch.nn.functional.linear, []

    def counting_linear(x, W, bias=None):
        flops.append(2 * (x.numel() // W.shape[1]) * W.numel())
        return linear(x, W, bias)
    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    h._candidates([0], [1], [L], residual, [(c, w) for c in cfg["coefs"] for w in cfg["windows"]], 1)
    mm = sum(flops)
    n_upper = a.n_layers - steer_layer - 1
    positions = sum(L if w == 0 else min(-w, L) for w in cfg["windows"])  # per coefficient
    keys = sum(t * L - t * (t - 1) // 2 for t in (L if w == 0 else min(-w, L) for w in cfg["windows"]))
    attention = 4 * a.n_heads * a.head_dim * n_upper * keys * len(cfg["coefs"])
    assert positions == 9 + 1 + 4 + 9
    assert mm > 0 and candidate_flops(m.net, steer_layer, cfg, L) == mm + attention


def test_bench_count_cpu_smoke(tmp_path):
    """`python -m bench count` (a dry run of the Triton path on the CPU) on the tiny preset: the decode
    step within its kernel budget and reading about the floor's bytes, the hybrid step more of both,
    no host sync in either."""
    out = tmp_path / "c.json"
    cmd = [sys.executable, "-m", "bench", "count", "--model", "tiny", "--batches", "1,2", "--context", "12",
           "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    rows = json.loads(out.read_text())["rows"]
    assert [(x["what"].split(",")[0].split(" (")[0], x["batch"]) for x in rows] == [
        ("decode", 1), ("hybrid", 1), ("grid candidates of 1 steered row", 1),
        ("grid candidates of 1 steered row", 1), ("decode", 2), ("hybrid", 2)]
    block, per_row = rows[2:4]  # the paper's grid: packed windows' attention by block, then by row
    assert block["kernels"] == per_row["kernels"] and block["syncs"] == per_row["syncs"] == 0
    assert 0 < block["attn_gb"] < per_row["attn_gb"] / 2 and block["gb_read"] < per_row["gb_read"]
    del rows[2:4]
    layers = 2  # the tiny preset
    for dec, hyb in (rows[:2], rows[2:]):
        assert dec["kernels"] <= 6 * layers + 4 < hyb["kernels"]
        assert 1.0 <= dec["ratio"] < 1.1 and 1.0 <= hyb["ratio"] < 1.2 and hyb["floor_gb"] > dec["floor_gb"]
        assert dec["syncs"] == hyb["syncs"] == 0
