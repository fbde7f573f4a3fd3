"""`steerfast eval` as a user meets it (issue 15): a model directory without a tokenizer is one
error line before any model loads; two runs into one output directory cannot both write (an
flock that a dead holder does not keep); a token bar moves within a batch; summary.png holds the
summary's numbers. Error cases run the real entry point in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import steerfast as sf
from steerfast.evaluate import BaseGenerator, Completion, evaluate, load_problems, write_summary
from steerfast.evaluate import lock
from steerfast.evaluate.summary import figure_data, summary_figure
from steerfast.presets import SHAPES, random_hf_model
from cli_helpers import ENV, ROOT, assert_one_error_line, run_cli
from tiny_tokenizer import char_tokenizer

DATA = Path(__file__).parent / "data" / "gsm8k_mini.jsonl"
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tokenizer directory, and a 'model' directory whose weights are garbage: a run that reached
    model loading would fail on the checkpoint, so an error about anything else came first."""
    root = tmp_path_factory.mktemp("evalcli")
    char_tokenizer(SHAPES["tiny"]["vocab_size"]).save_pretrained(root / "tok")
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text(json.dumps(dict(model_type="llama", architectures=["LlamaForCausalLM"])))
    (root / "broken" / "model.safetensors").write_bytes(os.urandom(64))
    return root


def test_a_model_directory_without_a_tokenizer_is_one_line_before_any_model_loads(dirs):
    r = run_cli("eval", "--data", DATA, "--out", dirs / "out1", "--runs", "base", "--base-model", dirs / "broken")
    assert_one_error_line(r, "no tokenizer files", str(dirs / "broken"), "--base-tokenizer", "--base-model", prog="steerfast eval")
    assert "checkpoint" not in r.stderr.lower() and not (dirs / "out1").exists()
    # an explicit tokenizer flag pointing at nothing usable is named as that flag
    r = run_cli("eval", "--data", DATA, "--out", dirs / "out1", "--runs", "thinking", "--thinking-model",
                dirs / "broken", "--thinking-tokenizer", dirs / "broken")
    assert_one_error_line(r, "--thinking-tokenizer", str(dirs / "broken"), prog="steerfast eval")
    r = run_cli("eval", "--data", DATA, "--out", dirs / "out1", "--runs", "base", "--base-model", dirs / "nowhere")
    assert_one_error_line(r, "--base-model", str(dirs / "nowhere"), "does not exist", prog="steerfast eval")


def test_a_second_run_into_a_locked_directory_fails_at_once_naming_the_holder(dirs, tmp_path):
    out = tmp_path / "out"
    key = lock.acquire(out / "base", 0)  # this process plays the first run
    try:
        t0 = time.monotonic()
        r = run_cli("eval", "--data", DATA, "--out", out, "--runs", "base", "--base-model", dirs / "broken",
                    "--base-tokenizer", dirs / "tok")
        assert_one_error_line(r, str(out / "base"), f"pid {os.getpid()}", "in use", prog="steerfast eval")
        assert time.monotonic() - t0 < 60  # failed at once: no waiting on the lock
        assert "checkpoint" not in r.stderr.lower()  # before the model loaded
        assert not (out / "base" / "results_rank0.jsonl").exists()
    finally:
        lock.release(key)
    # released: now the run gets past the lock (and fails on the garbage checkpoint instead)
    r = run_cli("eval", "--data", DATA, "--out", out, "--runs", "base", "--base-model", dirs / "broken",
                "--base-tokenizer", dirs / "tok")
    assert r.returncode == 2 and "in use" not in r.stderr, r.stderr


class Answers:
    """Answers every problem with its gold answer; optionally blocks until told to go on."""
    run = "base"

    def __init__(self, gate: Path | None = None):
        self.gate = gate

    def generate(self, questions):
        while self.gate is not None and not self.gate.exists():
            time.sleep(0.05)
        by_q = {p.question: p for p in PROBLEMS}
        return [Completion(f"\\boxed{{{by_q[q].gold}}}", 3, True) for q in questions]

    def config(self):
        return {"run": "base", "answers": True}


PROBLEMS = load_problems(DATA)


def _holder(out: Path):
    """A child process holding OUT/base's lock until killed."""
    code = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from steerfast.evaluate import lock\n"
            f"lock.acquire({str(out / 'base')!r}, 0); print('locked', flush=True); time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_the_api_refuses_a_live_holder_and_ignores_a_dead_ones_lock(tmp_path):
    out = tmp_path / "out"
    p = _holder(out)
    try:
        with pytest.raises(lock.DirectoryLockedError, match=f"pid {p.pid}") as info:
            evaluate(PROBLEMS, Answers(), out, progress=False)
        assert str(out / "base") in str(info.value)
        assert isinstance(info.value, sf.errors.SteerfastError)
        # another rank's shard is another lock: torchrun ranks never block each other
        assert evaluate(PROBLEMS[:4], Answers(), tmp_path / "ranks", progress=False, rank=1, world=2) is None
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # the holder died without cleaning up: its lock file stays, its flock does not
    assert (out / "base" / ".lock-rank0").read_text().strip() == str(p.pid)
    recs = evaluate(PROBLEMS, Answers(), out, progress=False)
    assert [r["idx"] for r in recs] == [p.idx for p in PROBLEMS] and all(r["correct"] for r in recs)
    lines = (out / "base" / "results_rank0.jsonl").read_text().splitlines()
    assert len(lines) == len(PROBLEMS)  # each problem once
    # within one process the lock is re-entrant (the CLI holds it around evaluate), and it is let go
    with lock.locked([out / "base"]):
        evaluate(PROBLEMS, Answers(), out, progress=False)
    assert lock._HELD == {}


def test_two_concurrent_api_runs_write_each_problem_once(tmp_path):
    """The issue's case: two runs at once into one directory. The second fails; the first finishes."""
    gate = tmp_path / "go"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_eval_cli import Answers, PROBLEMS\nfrom pathlib import Path\n"
            "from steerfast.evaluate import evaluate\n"
            f"evaluate(PROBLEMS, Answers(Path({str(gate)!r})), {str(tmp_path)!r}, batch_size=2, progress=False)\n")
    first = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "base" / "config.json").exists():  # written under the lock
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(lock.DirectoryLockedError, match=f"pid {first.pid}"):
            evaluate(PROBLEMS, Answers(), tmp_path, progress=False)
        gate.touch()
        assert first.wait(timeout=120) == 0, first.communicate()
    finally:
        first.kill()
    idx = [json.loads(x)["idx"] for x in (tmp_path / "base" / "results_rank0.jsonl").read_text().splitlines()]
    assert sorted(idx) == [p.idx for p in PROBLEMS]


# ---------------------------------------------------------------------- progress within a batch
@pytest.fixture(scope="module")
def tiny_model():
    tok = char_tokenizer(SHAPES["tiny"]["vocab_size"])
    model = sf.load_model(random_hf_model("tiny", dtype=torch.float32), device="cpu", dtype=torch.float32)
    return model, tok


def test_the_token_bar_counts_every_token_as_it_is_made(tiny_model, tmp_path, capsys, monkeypatch):
    from steerfast.evaluate import run as run_mod

    bar = run_mod.progress_bar  # every update drawn (tqdm's default skips those within 0.1 s)
    monkeypatch.setattr(run_mod, "progress_bar", lambda *a, **kw: bar(*a, mininterval=0, **kw))
    model, tok = tiny_model
    n_new = int(torch.randint(5, 12, ()))
    eos = [int(t) for t in torch.randint(5, 90, (3,))]  # a random model stops at some of these, or not
    gen = BaseGenerator(model, tok, n_new, eos_ids=eos)
    seen = []
    comps = gen.generate([p.question for p in PROBLEMS[:3]], on_tokens=seen.append)
    assert sum(seen) == sum(c.n_tokens for c in comps) and len(seen) >= min(c.n_tokens for c in comps)
    assert [c.text for c in comps] == [c.text for c in gen.generate([p.question for p in PROBLEMS[:3]])]
    recs = evaluate(PROBLEMS[:4], gen, tmp_path, batch_size=2, progress=True)
    err = capsys.readouterr().err
    for i in (0, 1):  # each batch's bar reached that batch's tokens, out of 2 x max_new_tokens
        made = sum(r["n_tokens"] for r in recs[2 * i:2 * i + 2])
        assert f"batch {i + 1}/2 tokens" in err and f"| {made}/{2 * n_new} [" in err, err[-3000:]
    assert "acc=" in err
    evaluate(PROBLEMS[:6], gen, tmp_path / "quiet", batch_size=2, progress=None)  # not a terminal: no bars
    assert capsys.readouterr().err == ""


def test_progress_off_in_a_pipe_and_the_summary_png_written(dirs, tmp_path):
    """The CLI with stderr piped draws no bar; its output directory gets summary.png."""
    mdir = tmp_path / "model"
    random_hf_model("tiny", dtype=torch.float32).save_pretrained(mdir)
    r = run_cli("eval", "--data", DATA, "--out", tmp_path / "out", "--runs", "base", "--base-model", mdir,
                "--base-tokenizer", dirs / "tok", "--limit", "2", "--max-new-tokens", "4", "--max-seq-len", "1024")
    assert r.returncode == 0, r.stderr
    assert "problem" not in r.stderr and "tok/s" not in r.stderr and "%|" not in r.stderr, r.stderr
    png = tmp_path / "out" / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "summary.png" in r.stdout


# ---------------------------------------------------------------------- summary.png
def _fake_run(out: Path, run: str, correct: list[bool], steered: list[int]):
    d = out / run
    d.mkdir(parents=True)
    recs = [dict(idx=i, qhash="h", dataset="gsm8k", correct=c, n_tokens=20, gen_s=0.1, n_steered=s,
                 n_tokens_graded=10, n_steered_graded=min(s, 10), categories={"0": s} if s else {})
            for i, (c, s) in enumerate(zip(correct, steered))]
    (d / "results_rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_summary_png_plots_accuracy_intervals_and_steered_share(tmp_path):
    from PIL import Image

    n = int(torch.randint(8, 30, ()))
    runs = {r: (torch.rand(n) < p).tolist() for r, p in (("base", 0.3), ("thinking", 0.7), ("hybrid", 0.5))}
    steered = torch.randint(0, 6, (n,)).tolist()
    for r, c in runs.items():
        _fake_run(tmp_path, r, c, steered if r == "hybrid" else [0] * n)
    s = write_summary(tmp_path)
    img = Image.open(tmp_path / "summary.png")
    assert img.format == "PNG" and img.size[0] > 500
    data = json.loads(img.info["Description"])
    assert data == json.loads(json.dumps(figure_data(s)))
    assert data["runs"] == ["base", "thinking", "hybrid"]
    for i, r in enumerate(data["runs"]):
        assert data["accuracy"][i] == pytest.approx(sum(runs[r]) / n)
        assert data["ci95"][i] == pytest.approx(s["runs"][r]["ci95"])
    assert list(data["steered_share"]) == ["hybrid"]
    assert data["steered_share"]["hybrid"]["all"] == pytest.approx(sum(steered) / (20 * n))
    assert data["steered_share"]["hybrid"]["graded"] == pytest.approx(sum(min(x, 10) for x in steered) / (10 * n))
    # the drawn bars and error bars are those numbers
    fig = summary_figure(s)
    acc_ax, share_ax = fig.axes[:2]
    heights = [p.get_height() for p in acc_ax.patches]
    assert heights == pytest.approx(data["accuracy"])
    (lo_hi,) = [c for c in acc_ax.collections if c.get_segments()]  # the error bars' vertical segments
    segs = lo_hi.get_segments()
    assert [sorted((a[1], b[1])) for a, b in segs] == [pytest.approx(ci) for ci in data["ci95"]]
    shares = sorted(p.get_height() for p in share_ax.patches)
    assert shares == pytest.approx(sorted(data["steered_share"]["hybrid"].values()))
    import matplotlib.pyplot as plt
    plt.close(fig)


class StubHybrid:
    """Stands in for sf.Hybrid: random tokens, each row stopping at its EOS; streams through
    callback(step, tokens) when `streams`, as the issue asks Hybrid.generate to."""

    def __init__(self, streams: bool, n_new: int, eos: int):
        self.streams, self.n_new, self.eos = streams, n_new, eos
        if not streams:  # the signature HybridGenerator inspects: no callback parameter
            self.generate = lambda bp, tp, n, eos_token_id=None: self._generate(bp, tp, n, eos_token_id)

    def generate(self, bp, tp, n, eos_token_id=None, callback=None):
        return self._generate(bp, tp, n, eos_token_id, callback)

    def _generate(self, bp, tp, n, eos_token_id, callback=None):
        B = len(bp)
        rows = [[] for _ in range(B)]
        for step in range(n):
            toks = torch.randint(40, 50, (B,)).tolist()
            toks = [self.eos if t == 40 else t for t in toks]
            for b in range(B):
                if not rows[b] or rows[b][-1] != self.eos:
                    rows[b].append(toks[b])
            if callback is not None:
                callback(step, toks)
        steered = [[bool(i % 2) for i in range(len(r))] for r in rows]
        return sf.HybridResult(rows, steered, [[0] * len(r) for r in rows],
                               [[0.5 if x else None for x in s] for s in steered],
                               [[-1 if x else None for x in s] for s in steered])


@pytest.mark.parametrize("streams", [True, False])
def test_the_hybrid_generator_reports_tokens_per_step_or_per_batch(streams):
    from steerfast.evaluate import HybridGenerator

    tok = char_tokenizer(SHAPES["tiny"]["vocab_size"])
    n_new, eos = int(torch.randint(4, 10, ())), 40
    gen = HybridGenerator(StubHybrid(streams, n_new, eos), tok, tok, n_new, eos_ids=[eos])
    seen = []
    comps = gen.generate([p.question for p in PROBLEMS[:3]], on_tokens=seen.append)
    assert sum(seen) == sum(c.n_tokens for c in comps)
    if streams:  # a step after every row stopped adds nothing, and is not reported
        assert 1 <= len(seen) <= n_new and len(seen) >= max(c.n_tokens for c in comps)
    else:
        assert len(seen) == 1
