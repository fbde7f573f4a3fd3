"""The one command a GPU machine runs after the install: does everything work, and how fast is it?

  python -m bench check            (about 5 minutes on one H100/H200; writes bench/out/check.json)

Each step runs in its own process under its own time limit, and a failure never stops the rest:
  extension   steerfast._C imports and was built for this GPU (else every CUDA-kernel test skips)
  gpu-tests   python -m pytest -m gpu (pytest-xdist's -n when it is installed)
  memcheck    compute-sanitizer --tool memcheck over the CUDA-kernel op tests, small shapes, bf16 (when
              it is on PATH and steerfast._C imports)
  decode      bench decode, short: Qwen2.5-1.5B at batch 1 and 16, Llama-3.1-8B at batch 1
  kernels     bench kernels, short: the Qwen2.5-1.5B shapes at batch 1
  hybrid      bench hybrid, short: windows [-1] and the paper's grid at batch 1 and 16, the 12% gate
  decode-ab   Qwen2.5-1.5B batch 1 as is and with the opt-in kernel settings (--variants default, pdl,
              splitk and both: programmatic dependent launch, split-K), to decide their defaults
The whole check has 300 s (--budget): each step gets its own limit or what is left, whichever is
less (the limits sum to more: most are not yet timed on a GPU; --scale stretches them all), and a
step with too little left is reported as not run. A step that runs out is stopped whole (its
process group), and a bench's own error records count as failures. Then one table: each step
passed/failed, the failing test names (or bench cases) with the first line of each error, and the
headline figures (tok/s and % of the floor per preset and batch, hybrid tok/s and % of its floor).
Without a GPU it says so in one line and exits 0.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import common

OUT = common.REPO_ROOT / "bench" / "out"
BUDGET_S = 300.0  # the whole check
KILL_GRACE_S = 15.0  # what stopping a timed-out step can take beyond its limit (see _run)
MIN_STEP_S = 10.0  # less than this left: the step is not started


def add_arguments(p) -> None:
    p.add_argument("--out", default=str(OUT / "check.json"))
    p.add_argument("--only", type=common.str_list, default=None,
                   help="comma-separated steps to run (extension, gpu-tests, memcheck, decode, decode-8b, "
                        "decode-ab, kernels, hybrid)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step's time limit and the budget")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")


def steps(out_dir: Path) -> list[dict]:
    py = sys.executable
    xdist = _has_module("xdist")
    return [
        dict(name="extension", timeout=10, cmd=[py, "-c", EXTENSION_CHECK]),
        # the Triton kernels compile for the GPU here (one to a few hundred ms each): every core
        dict(name="gpu-tests", timeout=110, junit=out_dir / "check-gpu-tests.xml",
             cmd=[py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                  *(["-n", str(min(16, os.cpu_count() or 1))] if xdist else []),
                  f"--junitxml={out_dir / 'check-gpu-tests.xml'}"]),
        # steerfast._C's kernels at small shapes, bf16. Without torch's caching allocator, so an overrun
        # past a tensor's end is not hidden inside a cached block (which rules out graph capture)
        dict(name="memcheck", timeout=40, junit=out_dir / "check-memcheck.xml", needs="compute-sanitizer",
             needs_extension=True,
             env=dict(PYTORCH_NO_CUDA_MEMORY_CACHING="1"),
             cmd=["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "99", py, "-m", "pytest", "-q",
                  "-p", "no:cacheprovider", "-o", "addopts=", "-k", MEMCHECK_TESTS,
                  f"--junitxml={out_dir / 'check-memcheck.xml'}",
                  "tests/test_ops.py", "tests/test_sae_ops.py"]),
        # each bench in one process (--isolate no): the check already gives each its own, and a worker
        # process would spend the limit importing torch again
        dict(name="decode", timeout=28, json=out_dir / "check-decode.json",  # 25 s on an H200
             cmd=[py, "-m", "bench", "decode", "--isolate", "no", "--models", "qwen2.5-1.5b", "--batches", "1,16",
                  "--new-tokens", "64", "--no-hf", "--out", str(out_dir / "check-decode.json")]),
        dict(name="decode-8b", timeout=24, json=out_dir / "check-decode-8b.json",  # 21 s
             cmd=[py, "-m", "bench", "decode", "--isolate", "no", "--models", "llama-3.1-8b", "--batches", "1",
                  "--new-tokens", "64", "--no-hf", "--out", str(out_dir / "check-decode-8b.json")]),
        dict(name="kernels", timeout=28, json=out_dir / "check-kernels.json",
             cmd=[py, "-m", "bench", "kernels", "--isolate", "no", "--sections", "topk,gemv", "--batches", "1",
                  "--dims", "1536",
                  "--latents", "16384", "--gemv-models", "qwen2.5-1.5b", "--gemv-batches", "1", "--reps", "20",
                  "--out", str(out_dir / "check-kernels.json")]),
        dict(name="hybrid", timeout=48, json=out_dir / "check-hybrid.json",  # a (both gates) took ~25 s; b untimed
             cmd=[py, "-m", "bench", "hybrid", "--isolate", "no", "--sections", "steerfast,floor", "--batches", "1,16",
                  "--configs", "a,b", "--gates", "rate", "--new-tokens", "32",
                  "--out", str(out_dir / "check-hybrid.json")]),
        # opt-in settings, last: the budget cuts it first. The baseline in the same process as the
        # variants: the same clocks and compile cache
        dict(name="decode-ab", timeout=30, json=out_dir / "check-decode-ab.json",  # not yet timed
             cmd=[py, "-m", "bench", "decode", "--isolate", "no", "--models", "qwen2.5-1.5b", "--batches", "1",
                  "--new-tokens", "32", "--no-hf", "--variants", "default,pdl,splitk,pdl+splitk",
                  "--out", str(out_dir / "check-decode-ab.json")]),
    ]


MEMCHECK_TESTS = ("cuda and bf16 and not graph and not decode_attention and not n131072 and not B256 and not d8192 "
                  "and not n16384")  # 41 tests; decode_attention's cuda backend is flash-attn's, not ours

# on a GPU machine an install without _C is a failure: every CUDA-kernel test would skip, not fail
EXTENSION_CHECK = """
import torch, steerfast.backend as b
C = b.cuda_extension()
assert C is not None, "steerfast._C was not built: reinstall with `python -m pip install --no-build-isolation --no-deps -e .` and read its output"
cap = "%d%d" % torch.cuda.get_device_capability()
assert any(a.startswith("sm_" + cap) for a in C.cuda_archs().split()), f"_C holds {C.cuda_archs()}, not sm_{cap}"
print("steerfast._C", C.cuda_archs())
"""


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _run(cmd, limit: float, env: dict | None) -> tuple[int | None, str]:
    """(exit code or None on timeout, stdout + stderr). The step runs in its own process group: on
    timeout all of it stops (compute-sanitizer's pytest, xdist workers, bench workers), first with
    SIGINT so pytest still writes its JUnit file, then SIGKILL; nothing is left using the GPU while
    the next step is timed."""
    p = subprocess.Popen(cmd, cwd=common.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         errors="replace", start_new_session=True, env=None if env is None else os.environ | env)
    try:
        out, err = p.communicate(timeout=limit)
        return p.returncode, out + err
    except subprocess.TimeoutExpired:
        _signal_group(p.pid, signal.SIGINT)
        try:
            out, err = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            out, err = "", ""
        # whatever is left of the group, whether or not the step's own process has gone (a worker
        # ignoring SIGINT, or stuck in a CUDA call, holds the GPU and perhaps none of the pipes)
        _signal_group(p.pid, signal.SIGKILL)
        try:
            more = p.communicate(timeout=10)
            out, err = out + more[0], err + more[1]
        except (subprocess.TimeoutExpired, ValueError):  # ValueError: the pipes were read to the end
            pass
        return None, out + err


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the group is empty
        pass


def run_step(step: dict, scale: float = 1.0, left: float = float("inf")) -> dict:
    """Run one step under its limit (times scale) or `left` seconds, whichever is less."""
    rec = dict(name=step["name"], command=" ".join(map(str, step["cmd"])))
    if step.get("needs") and shutil.which(step["needs"]) is None:
        return dict(rec, status="skipped", detail=f"{step['needs']} is not on PATH")
    for f in (step.get("junit"), step.get("json")):
        if f is not None and Path(f).exists():
            Path(f).unlink()  # a stale file must not pass for this run's result
    limit = min(step["timeout"] * scale, left)
    t0 = time.perf_counter()
    try:
        rc, out = _run(step["cmd"], limit, step.get("env"))
    except OSError as e:  # the command itself could not start
        rc, out = -1, f"{type(e).__name__}: {e}"
    rec.update(wall_s=round(time.perf_counter() - t0, 1), rc=rc, output_tail=out[-6000:])
    failures, broken = [], []
    if step.get("junit"):
        try:
            failures = junit_failures(step["junit"])
        except ET.ParseError as e:  # cut off mid-write
            broken.append(f"{Path(step['junit']).name}: {e}")
    if step.get("json") and Path(step["json"]).exists():
        try:
            rec["result"] = json.loads(Path(step["json"]).read_text())
            failures += result_errors(rec["result"])
        except ValueError as e:
            broken.append(f"{Path(step['json']).name}: {e}")
    rec["failures"] = failures
    if rc is None:
        rec.update(status="failed", detail=f"timed out after {limit:.0f} s")
    elif rc == 0 and not failures and not broken:
        rec.update(status="passed", detail="")
    else:
        first = next((ln for ln in reversed(out.strip().splitlines()) if ln.strip()), "")
        rec.update(status="failed", detail="; ".join(broken) or f"exit {rc}" + (f": {first[:200]}" if not failures
                                                                                  else ""))
    return rec


def result_errors(doc, where: str = "") -> list[dict]:
    """The bench's own error records (a case that raised is recorded, not fatal), as failures: where
    in the JSON, and the first line of the error."""
    out = []
    if isinstance(doc, dict):
        if isinstance(doc.get("error"), str):
            what = " ".join(f"{k}={doc[k]}" for k in ("model", "op", "weight", "config", "batch", "backend", "gate",
                                                        "variant", "section") if k in doc)
            out.append(dict(test=f"{where} {what}".strip(), error=(doc["error"].strip().splitlines() or [""])[0][:200]))
        for k, v in doc.items():
            if k not in ("error", "env"):
                out += result_errors(v, f"{where}.{k}" if where else k)
    elif isinstance(doc, list):
        for v in doc:
            out += result_errors(v, where)
    return out


def junit_failures(path: Path) -> list[dict]:
    """Failed or errored tests in a JUnit XML file: name and the first line of the error."""
    if not Path(path).exists():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                out.append(dict(test=f"{case.get('classname')}::{case.get('name')}", error=msg[0][:200] if msg else tag))
    return out


def headlines(results: list[dict]) -> list[dict]:
    """tok/s and % of the floor per preset and batch (decode), tok/s and % of its floor per configuration (hybrid)."""
    rows = []
    for rec in results:
        doc = rec.get("result") or {}
        if doc.get("bench") == "decode":
            for r in doc.get("results", []):
                what = f"decode {r['model']} batch {r['batch']}" + (
                    f" {r['variant']}" if r.get("variant", "default") != "default" else "")
                if "error" in r:
                    rows.append(dict(what=what, value="error"))
                    continue
                rows.append(dict(what=what,
                                 value=f"{r['steerfast']['tokens_per_s']:.0f} tok/s, "
                                       f"{100 * r['fraction_of_floor']:.1f}% of floor"))
        elif doc.get("bench") == "hybrid":
            for r in doc.get("summary", []):
                v, pct = r.get("sf_tok_s"), r.get("pct_floor")
                rows.append(dict(what=f"hybrid config {r.get('config')} batch {r.get('batch')} gate {r.get('gate')}",
                                 value="error" if not isinstance(v, float) else f"{v:.0f} tok/s" + (
                                     "" if pct is None else f", {pct:.1f}% of floor")))
    return rows


def run_steps(todo: list[dict], budget: float, scale: float, results: list[dict], save) -> list[dict]:
    """Each step in turn, never stopping at a failure, within `budget` seconds in all: a step gets
    its limit or what is left (less the time stopping it may take), whichever is less, and is not
    started with under MIN_STEP_S left. Appends to `results`, calling save() after every step."""
    deadline = time.perf_counter() + budget
    for step in todo:
        print(f"  {step['name']} ...", end=" ", flush=True)
        left = deadline - time.perf_counter() - KILL_GRACE_S
        if step.get("needs_extension") and any(r["name"] == "extension" and r["status"] != "passed" for r in results):
            # every test it would run skips without _C: a pass would check nothing
            rec = dict(name=step["name"], status="skipped", detail="steerfast._C did not import (see extension)")
        elif left < MIN_STEP_S:
            rec = dict(name=step["name"], status="not run", detail=f"the check's {budget:.0f} s were spent (--budget)")
        else:
            rec = run_step(step, scale, left)
        results.append(rec)
        print(f"{rec['status']} ({rec.get('wall_s', 0)} s)", flush=True)
        save()  # after every step: a later crash loses nothing
    return results


def summary_rows(results: list[dict], heads: list[dict]) -> list[dict]:
    """The one table: each step, under it its failures (test or bench case, first error line), then
    the headline figures."""
    rows = []
    for r in results:
        rows.append(dict(check=r["name"], status=r["status"], wall=r.get("wall_s"), detail=r["detail"]))
        rows += [dict(check=f"  {f['test']}", status="FAILED", wall=None, detail=f["error"])
                 for f in r.get("failures", [])]
    rows += [dict(check=h["what"], status="measured", wall=None, detail=h["value"]) for h in heads]
    return rows


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench check: no CUDA GPU is visible (torch.cuda.is_available() is False); nothing to check.")
        return 0
    out_path = Path(args.out).resolve()  # the steps run in the repository root
    out_path.parent.mkdir(parents=True, exist_ok=True)
    todo = [s for s in steps(out_path.parent) if args.only is None or s["name"] in args.only]
    env = common.environment(common.resolve_device(None), torch.bfloat16, getattr(args, "argv", ["check"]))
    print(f"bench check on {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {(env['git_commit'] or '?')[:10]}", flush=True)
    results = []
    doc = dict(bench="check", env=env, steps=results)
    run_steps(todo, args.budget * args.scale, args.scale, results, lambda: common.write_json(out_path, doc))
    doc["headlines"] = headlines(results)
    common.write_json(out_path, doc)
    print()
    print(common.format_table(summary_rows(results, doc["headlines"]),
                              [("check", "check"), ("status", "status"), ("wall", "s"), ("detail", "detail")]))
    print(f"\nwrote {out_path}")
    return 0 if all(r["status"] in ("passed", "skipped") for r in results) else 1
