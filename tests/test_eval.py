"""steerfast.evaluate: answer extraction and grading tables, problem files, metrics, the resumable
runner (interrupted and killed runs), an end-to-end `steerfast eval` on tiny random models, and a
2-process torchrun (gloo) that must merge to the 1-process results."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import steerfast as sf
from steerfast import errors
from steerfast.cli import main as cli_main
from steerfast.evaluate import (BaseGenerator, Completion, HybridGenerator, Problem, ThinkingGenerator, base_prompt,
                                evaluate, extract_answer, gap_recovered, gap_recovered_paper, grade, load_problems,
                                markdown, math_equal, summarize, thinking_prompt, wilson_interval, write_summary)
from tiny_models import tiny_hf

DATA = Path(__file__).parent / "data"
GSM8K_FILE, MATH_FILE = DATA / "gsm8k_mini.jsonl", DATA / "math_mini.jsonl"
ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ grading

GSM8K_PAIRS = [  # prediction, gold, equal
    ("18", "18", True), ("$18", "18", True), ("\\$18.00", "18", True), ("18.", "18", True),
    ("1,000", "1000", True), ("1,234.50", "1234.5", True), ("-3", "-3", True), ("+7", "7", True),
    ("\u22125", "-5", True), ("18 dollars", "18", True), ("\\text{18 apples}", "18", True), ("25%", "25", True),
    ("5 + 3 = 8", "8", True), ("\\frac{3}{2}", "1.5", True), ("3/4", "0.75", True), ("**42**", "42", True),
    ("0.50", ".5", True), ("1000", "Janet has...\n#### 1,000", True), ("7.0", "7", True),
    ("17", "18", False), ("-18", "18", False), ("1,000", "100", False), ("18.5", "18", False), ("", "18", False),
    (None, "18", False), ("eighteen", "18", False), ("0.18", "18", False), ("180", "18", False),
    ("1.8", "18", False), ("\\sqrt{2}", "2", False), ("}{", "3", False), ("3/0", "3", False),
]

MATH_PAIRS = [
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True), ("\\tfrac12", "\\frac{1}{2}", True), ("1/2", "\\frac{1}{2}", True),
    ("0.5", "\\frac12", True), ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\sqrt2", "\\sqrt{2}", True), ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("30^\\circ", "30", True), ("30^{\\circ}", "30", True), ("5\\text{ cm}", "5", True), ("10\\%", "10", True),
    ("\\$5", "5", True), ("x = 5", "5", True), ("\\pi/2", "\\frac{\\pi}{2}", True),
    ("\\frac{3\\pi}{4}", "\\frac34\\pi", True), ("(0.5, 1)", "(\\frac12, 1)", True), ("[2, 5)", "[2,5)", True),
    ("(-\\infty, 3]", "(-\\infty,3]", True), ("\\{1,2\\}", "\\{2,1\\}", True), ("2, 1", "1, 2", True),
    ("\\text{(C)}", "C", True), ("(C)", "\\text{(C)}", True), ("x^2+2x+1", "(x+1)^2", True),
    ("2x", "x\\cdot 2", True), ("10{,}000", "10000", True), ("1,000", "1000", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix} 0.5 & 1 \\end{pmatrix}", "\\begin{pmatrix}\\frac{1}{2}&1\\end{pmatrix}", True),
    ("\\text{Evelyn}", "Evelyn", True), ("20 \\text{ square units}", "20", True), ("16\\text{ cm}^2", "16", True),
    ("(-\\infty,-2)\\cup(3,\\infty)", "(-\\infty, -2) \\cup (3, \\infty)", True), ("y = 2x+3", "2x + 3", True),
    ("\\sqrt[3]{8}", "2", True), ("3.0", "3", True), ("\\frac{6}{4}", "\\frac{3}{2}", True),
    ("2\\pi", "2 \\pi", True), ("\\$1,\\!000", "1000", True), ("8\\sqrt{3}", "\\sqrt{192}", True),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True), ("x \\in [1, 2]", "[1,2]", True),
    ("-\\frac{1}{3}", "\\frac{-1}{3}", True), ("\\dfrac{x+1}{2}", "\\frac{1+x}{2}", True),
    ("\\sin^2 x + \\cos^2 x", "1", True), ("\\tan x", "\\frac{\\sin x}{\\cos x}", True),
    ("2 \\pi r", "2r\\pi", True), ("3 \\cdot 4", "12", True), ("\\left[ 0, 1 \\right)", "[0,1)", True),
    ("\\frac{1}{2}", "\\frac{1}{3}", False), ("(1,2)", "(2,1)", False), ("[1,2)", "[1,2]", False),
    ("\\sqrt{2}", "2", False), ("2\\pi", "\\pi", False), ("x+1", "x-1", False), ("10", "100", False),
    ("-5", "5", False), ("0.5", "0.05", False), ("\\{1,2\\}", "\\{1,3\\}", False), ("B", "C", False),
    ("3", "3\\sqrt{3}", False), ("3.14", "\\pi", False), ("(1,2)", "[1,2]", False), ("1,2", "1,2,3", False),
    ("\\frac{1}{0}", "\\frac{2}{0}", False), ("", "1", False), (None, "1", False), ("\\frac{", "1", False),
    ("10^{10^{10}}", "10^{10^{10}}+1", False), ("Evelyn", "Eve", False), ("__import__('os')", "1", False),
    ("\\boxed{", "1", False), ("x^2", "x^3", False), ("\\infty", "-\\infty", False),
    ("30^\\circ", "60", False), ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", False),
]


def test_the_tables_are_big_and_balanced():
    pairs = GSM8K_PAIRS + MATH_PAIRS
    assert len(pairs) >= 60
    for table in (GSM8K_PAIRS, MATH_PAIRS):
        assert sum(e for *_, e in table) >= 10 and sum(not e for *_, e in table) >= 10


@pytest.mark.parametrize("pred,gold,equal", GSM8K_PAIRS, ids=[f"gsm8k{i}" for i in range(len(GSM8K_PAIRS))])
def test_grade_gsm8k(pred, gold, equal):
    assert grade(pred, gold, "gsm8k") is equal


@pytest.mark.parametrize("pred,gold,equal", MATH_PAIRS, ids=[f"math{i}" for i in range(len(MATH_PAIRS))])
def test_grade_math(pred, gold, equal):
    assert grade(pred, gold, "math500") is equal
    assert grade(gold, pred, "math500") is equal  # symmetric


EXTRACT_CASES = [
    ("So the total is \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last one
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces inside
    ("ans \\boxed{3} and broken \\boxed{4", "3"),  # an unclosed last box is skipped
    ("\\boxed 5.", "5"),
    ("\\fbox{7}", "7"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,000\n", "1000"),
    ("The answer is 42.", "42"),
    ("The answer is $\\frac{1}{2}$. Next we", "\\frac{1}{2}"),
    ("Final Answer: The final answer is $3.5$. I hope it is correct.", "3.5"),
    ("the answer is: **18**", "18"),
    ("The answer is 3.5", "3.5"),
    ("I think 3 apples and 5 pears, 8 total", "8"),  # the last number
    ("costs $1,234.50 in total.", "1234.50"),
    ("temperature drops to \u221212 degrees", "-12"),
    ("<think>maybe \\boxed{1}</think>The result is \\boxed{2}", "2"),  # the trace is stripped
    ("reasoning \\boxed{99} </think> so it is 7", "7"),  # template-opened trace: only the closing tag
    ("<think>unfinished trace with 5", "5"),
    ("no numbers here", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text,want", EXTRACT_CASES, ids=[f"x{i}" for i in range(len(EXTRACT_CASES))])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_reference_solutions_grade_as_correct():
    """Each problem file's own worked solution, extracted and graded, matches its reference."""
    for path in (GSM8K_FILE, MATH_FILE):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        problems = load_problems(path)
        assert len(problems) == len(rows) >= 10
        for p, row in zip(problems, rows):
            pred = extract_answer(row.get("solution", row["answer"]))
            assert grade(pred, p.gold, p.dataset), (p.idx, pred, p.gold)
        others = problems[1:] + problems[:1]  # and each is wrong for the next problem
        for p, q in zip(problems, others):
            assert not grade(p.gold, q.gold, p.dataset), (p.gold, q.gold)


ODD = ["", " ", "}", "{", "\\", "\\\\", "$$", "\\frac", "\\frac{1}", "\\sqrt[", "^^^", "((((", "))))", "1/0", "0/0",
       "\\boxed{\\boxed{", "\x00", "\u2603", "9" * 5000, "(" * 3000 + "1" + ")" * 3000, "x_{1}^{2}", "\\begin{pmatrix}",
       "import os", "lambda: 0", "__class__", "1e999999", "nan", "inf", "-", "\\infty\\infty", "10^{10^{10^{10}}}",
       "\\text{", "a=b=c", "[1,2", "\\{", "<think>", "</think>", "\\sin", "\\sqrt{-1}", "1,2,3,4,5,6,7,8,9,10" * 20]


def test_odd_text_never_raises():
    for s in ODD:
        extract_answer(s)
        for gold in ("1", "\\frac{1}{2}", s):
            for ds in ("gsm8k", "math500"):
                assert grade(s, gold, ds) in (True, False)
    assert grade(object(), "1") is False and grade("1", None) is False


def test_sympy_time_limit_in_main_and_other_threads():
    a, b = "(x+y+z+1)^{30}", "x^{30}+1"  # simplifying their difference takes many seconds
    # CPU time, not wall time: the work is what the limit bounds, and a loaded machine (CI beside other
    # jobs) stretches wall time without any more work being done
    t0 = time.process_time()
    assert math_equal(a, b, timeout=0.5) is False
    assert time.process_time() - t0 < 3
    out = {}

    def worker():
        t = time.thread_time()
        out["eq"] = math_equal(a, b, timeout=0.5)
        out["s"] = time.thread_time() - t
    n_threads = threading.active_count()
    th = threading.Thread(target=worker)
    th.start()
    th.join(30)
    assert out["eq"] is False and out["s"] < 3
    assert threading.active_count() == n_threads  # nothing left running in the background
    assert math_equal("(x+1)^2", "x^2+2x+1", timeout=5)  # and within the limit it still works


# ------------------------------------------------------------------------------------------ problems, metrics

def test_load_problems_layouts(tmp_path):
    g = load_problems(GSM8K_FILE)
    assert g[0].dataset == "gsm8k" and g[0].gold == "26" and g[5].gold == "-7" and g[0].idx == 0
    m = load_problems(MATH_FILE, limit=3, start=2)
    assert [p.idx for p in m] == [2, 3, 4] and m[0].dataset == "math500" and m[0].gold == "2, 3"
    assert m[0].id.startswith("test/") and m[0].meta["level"] == 2
    rows = [json.loads(line) for line in MATH_FILE.read_text().splitlines()]
    for r in rows:
        r.pop("answer")  # the gold then comes from the solution's box
    (tmp_path / "m.json").write_text(json.dumps(rows))
    assert [p.gold for p in load_problems(tmp_path / "m.json", "math")] == [p.gold for p in load_problems(MATH_FILE)]
    d = tmp_path / "dir"
    d.mkdir()
    (d / "test.jsonl").write_text(GSM8K_FILE.read_text())
    assert len(load_problems(d)) == len(g)
    (d / "train.jsonl").write_text(GSM8K_FILE.read_text())
    with pytest.raises(errors.InvalidInputError, match="name one file"):
        load_problems(d)
    with pytest.raises(errors.InvalidInputError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(errors.InvalidInputError, match="'question'"):
        load_problems(MATH_FILE, "gsm8k")


def test_load_problems_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [json.loads(line) for line in GSM8K_FILE.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    assert [(p.question, p.gold) for p in load_problems(tmp_path / "test-00000-of-00001.parquet")] == \
        [(p.question, p.gold) for p in load_problems(GSM8K_FILE)]


def test_metrics():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert gap_recovered(0.4, 0.6, 0.8) == pytest.approx(0.5)
    assert gap_recovered(0.4, 0.3, 0.8) == pytest.approx(-0.25)  # worse than base: negative, unclipped
    assert gap_recovered(0.4, 0.9, 0.8) == pytest.approx(1.25)
    assert gap_recovered(0.5, 0.7, 0.5) is None
    assert gap_recovered_paper(0.4, 0.6, 0.8) == pytest.approx(0.5)
    assert gap_recovered_paper(0.4, 0.3, 0.8) == 0.0  # clipped
    assert gap_recovered_paper(0.8, 0.6, 0.4) == pytest.approx(0.5)  # measured from min(thinking, base)
    assert gap_recovered(0.8, 0.6, 0.4) == pytest.approx(0.5)
    assert gap_recovered_paper(0.8, 0.9, 0.4) == pytest.approx(1.25)
    assert gap_recovered(0.8, 0.9, 0.4) == pytest.approx(-0.25)
    assert gap_recovered_paper(0.5, 0.7, 0.5) is None


# ------------------------------------------------------------------------------------------ the runner, without models

class FakeGenerator:
    """Answers problem i right when i is even; counts what it was asked; can be made to stop."""
    run = "base"

    def __init__(self, fail_after_batches=None, how="interrupt"):
        self.asked, self.batches, self.fail_after, self.how = [], 0, fail_after_batches, how

    def generate(self, questions):
        if self.fail_after is not None and self.batches == self.fail_after:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt
        self.batches += 1
        self.asked += list(questions)
        out = []
        for q in questions:
            p = _BY_QUESTION[q]
            ans = p.gold if p.idx % 2 == 0 else "12345"
            out.append(Completion(f"so the answer is \\boxed{{{ans}}}", 10 + p.idx, True))
        return out

    def config(self):
        return {"run": "base", "fake": True}


_PROBLEMS = load_problems(MATH_FILE)
_BY_QUESTION = {p.question: p for p in _PROBLEMS}


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in ("gen_s", "rank")} for r in recs]


def test_runner_records_summary_and_progress(tmp_path, capsys):
    recs = evaluate(_PROBLEMS, FakeGenerator(), tmp_path, batch_size=3, progress=True)
    err = capsys.readouterr().err
    assert "acc=" in err and "tok_s=" in err  # the live postfix
    assert [r["idx"] for r in recs] == list(range(len(_PROBLEMS)))
    assert [r["correct"] for r in recs] == [i % 2 == 0 for i in range(len(_PROBLEMS))]
    assert all(r["pred"] == extract_answer(r["completion"]) for r in recs)
    s = write_summary(tmp_path, _PROBLEMS)
    b = s["runs"]["base"]
    assert b["n"] == len(_PROBLEMS) and b["correct"] == 6 and b["accuracy"] == pytest.approx(6 / 11)
    assert b["ci95"] == list(wilson_interval(6, 11)) and b["complete"]
    assert b["tokens"] == sum(10 + i for i in range(11)) and b["tokens_per_s"] > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    md = (tmp_path / "summary.md").read_text()
    assert "| base | 54.5% |" in md and "6 / 11" in md
    assert "gap" not in s  # needs all three runs


def test_runner_resumes_after_an_interrupt(tmp_path):
    full = evaluate(_PROBLEMS, FakeGenerator(), tmp_path / "ref", batch_size=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        evaluate(_PROBLEMS, FakeGenerator(fail_after_batches=3), tmp_path / "cut", batch_size=2, progress=False)
    kept = [json.loads(line) for line in (tmp_path / "cut/base/results_rank0.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in kept] == list(range(6))  # three whole batches survived
    again = FakeGenerator()
    recs = evaluate(_PROBLEMS, again, tmp_path / "cut", batch_size=2, progress=False)
    assert [_BY_QUESTION[q].idx for q in again.asked] == list(range(6, 11))  # only what was missing
    assert _strip(recs) == _strip(full)
    assert evaluate(_PROBLEMS, FakeGenerator(fail_after_batches=0), tmp_path / "cut", progress=False) is not None


def test_runner_resumes_after_a_kill(tmp_path):
    """A real SIGKILL mid-run (the process kills itself on its 4th batch), a torn last line,
    then a resume: nothing finished is lost, nothing is done twice."""
    script = f"""
import os, signal
from steerfast.evaluate import Completion, evaluate, load_problems

class Killed:  # FakeGenerator's answers; SIGKILLs its own process on the 4th batch
    run, batches = "base", 0

    def generate(self, questions):
        if self.batches == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        self.batches += 1
        by_q = {{p.question: p for p in problems}}
        return [Completion("so the answer is \\\\boxed{{" + (by_q[q].gold if by_q[q].idx % 2 == 0 else "12345") + "}}",
                           10 + by_q[q].idx, True) for q in questions]

    def config(self):
        return {{"run": "base", "fake": True}}

problems = load_problems({str(MATH_FILE)!r})
evaluate(problems, Killed(), {str(tmp_path)!r}, batch_size=2, progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    shard = tmp_path / "base" / "results_rank0.jsonl"
    lines = shard.read_text().splitlines()
    assert len(lines) == 6 and not (tmp_path / "base" / "results.jsonl").exists()
    with open(shard, "a") as fh:  # as if killed halfway through writing a line
        fh.write('{"idx": 6, "qhash": "tor')
    again = FakeGenerator()
    recs = evaluate(_PROBLEMS, again, tmp_path, batch_size=2, progress=False)
    assert [_BY_QUESTION[q].idx for q in again.asked] == list(range(6, 11))
    assert [r["idx"] for r in recs] == list(range(11))
    assert [json.loads(x) for x in lines] == recs[:6]  # the survivors, unchanged
    assert _strip(recs) == _strip(evaluate(_PROBLEMS, FakeGenerator(), tmp_path / "ref", progress=False))
    merged = (tmp_path / "base" / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["idx"] for x in merged] == list(range(11))
    assert "tor" not in shard.read_text()


def test_runner_refuses_to_mix_settings_or_problems(tmp_path):
    evaluate(_PROBLEMS[:3], FakeGenerator(), tmp_path, progress=False)
    other = FakeGenerator()
    other.config = lambda: {"run": "base", "fake": False}
    with pytest.raises(errors.InvalidInputError, match="different settings"):
        evaluate(_PROBLEMS[:3], other, tmp_path, progress=False)
    moved = [Problem(p.idx, p.question + " (changed)", p.gold, p.dataset) for p in _PROBLEMS[:3]]
    with pytest.raises(errors.InvalidInputError, match="different question"):
        evaluate(moved, FakeGenerator(), tmp_path, progress=False)
    with pytest.raises(errors.InvalidInputError, match="batch_size"):
        evaluate(_PROBLEMS, FakeGenerator(), tmp_path, batch_size=0, progress=False)


def test_a_prompt_too_long_is_recorded_not_fatal(tmp_path):
    class TooLong(FakeGenerator):
        def generate(self, questions):
            if any(_BY_QUESTION[q].idx == 2 for q in questions):
                raise errors.SequenceTooLongError("prompt too long")
            return super().generate(questions)
    recs = evaluate(_PROBLEMS[:5], TooLong(), tmp_path, batch_size=4, progress=False)
    assert [r["idx"] for r in recs] == [0, 1, 2, 3, 4]
    assert "error" in recs[2] and recs[2]["correct"] is False and recs[2]["n_tokens"] == 0
    assert recs[0]["correct"] and "error" not in recs[3]


def test_summary_gap_and_categories(tmp_path):
    def write(run, correct, steered=None):
        d = tmp_path / run
        d.mkdir()
        recs = [dict(idx=i, qhash="h", dataset="gsm8k", correct=c, n_tokens=10, gen_s=0.5,
                     n_steered=(steered or [0] * 10)[i], categories={"1": (steered or [0] * 10)[i]} if steered else {})
                for i, c in enumerate(correct)]
        (d / "results_rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    write("base", [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    write("thinking", [1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    write("hybrid", [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], steered=[1, 2, 0, 0, 0, 0, 0, 0, 0, 3])
    s = summarize(tmp_path, category_names=["deduce", "verify"])
    assert s["gap"]["gap_recovered"] == pytest.approx(0.5) and s["gap"]["gap_recovered_paper"] == pytest.approx(0.5)
    h = s["runs"]["hybrid"]
    assert h["steered_tokens"] == 6 and h["steered_share"] == pytest.approx(0.06)
    assert h["category_counts"] == {"1": 6} and h["category_names"] == {"1": "verify"}
    assert h["tokens_per_s"] == pytest.approx(20.0)
    md = markdown(s)
    assert "Gap recovered" in md and "**50.0%**" in md and "| verify | 6 | 100.0% |" in md


# ------------------------------------------------------------------------------------------ tiny models, end to end

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")


def make_tokenizer():
    """A character-level tokenizer with BOS/EOS, `<think>` / `</think>` and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AddedToken, PreTrainedTokenizerFast

    units = ["<pad>", "<s>", "</s>", "<unk>", "\n"] + [chr(c) for c in range(32, 127)]
    vocab = {u: i for i, u in enumerate(units)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Local checkpoint directories (a Llama base, a Qwen2 thinking model, the same tokenizer),
    an SAE file and a vectors file."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    V = len(tok)
    base = tiny_hf("llama", n_heads=4, n_kv_heads=2, head_dim=8, layers=2, vocab=V)  # float64: greedy
    think = tiny_hf("qwen2", n_heads=4, n_kv_heads=2, head_dim=12, layers=2, vocab=V)  # margins far from ties
    for name, m in (("base", base), ("thinking", think)):
        m.save_pretrained(root / name)
    # its own directory: next to a config.json, transformers 5's AutoTokenizer would rebuild it as
    # that model type's tokenizer class (byte-level BPE), which a character-level vocabulary is not
    tok.save_pretrained(root / "tokenizer")
    d_b, d_t, n = base.config.hidden_size, think.config.hidden_size, 4
    sae = sf.TopKSAE(*(torch.randn(*shape, dtype=torch.float64) for shape in ((d_t, n), (n,), (n, d_t), (d_t,))), k=1)
    sae.save(root / "sae.safetensors")
    from safetensors.torch import save_file
    save_file({"vectors": torch.randn(n, d_b, dtype=torch.float64), "bias": 0.3 * torch.randn(d_b, dtype=torch.float64)},
              str(root / "vectors.safetensors"))
    return root


def _cli_args(tiny, out, data=MATH_FILE, runs="base,thinking,hybrid", limit=6, extra=()):
    return ["eval", "--data", str(data), "--out", str(out), "--runs", runs, "--limit", str(limit),
            "--base-model", str(tiny / "base"), "--thinking-model", str(tiny / "thinking"),
            "--base-tokenizer", str(tiny / "tokenizer"), "--thinking-tokenizer", str(tiny / "tokenizer"),
            "--sae", str(tiny / "sae.safetensors"), "--vectors", str(tiny / "vectors.safetensors"),
            "--sae-layer", "1", "--steer-layer", "0", "--coefs", "0.5,2", "--windows", "-1", "-3",
            "--max-new-tokens", "12", "--batch-size", "2", "--no-progress", "--max-seq-len", "512", "--dtype", "fp64",
            *extra]


def _results(out, run):
    return [json.loads(line) for line in (Path(out) / run / "results.jsonl").read_text().splitlines()]


def test_end_to_end_cli_on_tiny_models(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(_cli_args(tiny, out, extra=["--category-names", "a,b,c,d"])) == 0
    printed = capsys.readouterr().out
    assert "| run | accuracy |" in printed and "| hybrid |" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["dataset"] == "math500" and s["n_problems"] == 6 and set(s["runs"]) == {"base", "thinking", "hybrid"}
    assert "gap" in s and (out / "summary.md").read_text() == markdown(s)
    problems = load_problems(MATH_FILE, limit=6)
    tok = make_tokenizer()
    base = sf.load_model(str(tiny / "base"), device="cpu", dtype=torch.float64, max_seq_len=512)
    think = sf.load_model(str(tiny / "thinking"), device="cpu", dtype=torch.float64, max_seq_len=512)
    for run in ("base", "thinking", "hybrid"):
        recs = _results(out, run)
        r = s["runs"][run]
        assert [x["idx"] for x in recs] == list(range(6)) and r["complete"] and r["n"] == 6
        assert all(x["pred"] == extract_answer(x["completion"]) for x in recs)
        assert all(x["correct"] == grade(x["pred"], x["gold"], "math500") for x in recs)
        assert r["correct"] == sum(x["correct"] for x in recs) and r["tokens_per_s"] > 0
        assert r["tokens"] == sum(x["n_tokens"] for x in recs) > 0
    # the runner's prompts and decoding are the models' own
    p = problems[1]
    b_ids = base_prompt(tok, p.question)
    assert tok.decode(b_ids[1:]).startswith("Task: Answer the question below.") and b_ids[0] == tok.bos_token_id
    want = base.generate([b_ids], 12, eos_token_id=[tok.eos_token_id])[0]
    assert _results(out, "base")[1]["completion"] == BaseGenerator(base, tok, 12).generate([p.question])[0].text
    assert _results(out, "base")[1]["n_tokens"] == len(want)
    t_ids = thinking_prompt(tok, p.question)
    assert tok.decode(t_ids).startswith("<|user|>" + p.question) and tok.decode(t_ids).endswith("<|assistant|><think>\n")
    want = think.generate([t_ids], 12, eos_token_id=[tok.eos_token_id])[0]
    assert _results(out, "thinking")[1]["completion"] == tok.decode(want, skip_special_tokens=True)
    sae = sf.TopKSAE.load(tiny / "sae.safetensors")
    from safetensors.torch import load_file
    v = load_file(str(tiny / "vectors.safetensors"))
    h = sf.Hybrid(base, think, sae, v["vectors"], v["bias"], sae_layer=1, steer_layer=0, coefs=[0.5, 2.0],
                  windows=[-1, -3])
    res = h.generate([b_ids], [t_ids], 12, eos_token_id=[tok.eos_token_id])
    hyb = _results(out, "hybrid")[1]
    assert hyb["n_tokens"] == len(res.tokens[0]) and hyb["n_steered"] == sum(res.steered[0])
    # the readable trace: steered spans marked with the names given by --category-names
    assert hyb["trace"] == res.trace(0, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                                     names=list("abcd"))
    assert ("[" in hyb["trace"]) == (hyb["n_steered"] > 0)
    page = (out / "hybrid" / hyb["trace_html"]).read_text(encoding="utf-8")  # Figure 3, one page a problem
    assert page.count('class="steered"') >= (hyb["n_steered"] > 0) and p.question[:20] in page
    assert hyb["n_tokens_graded"] <= hyb["n_tokens"] and hyb["n_steered_graded"] <= hyb["n_steered"]
    hr = s["runs"]["hybrid"]
    assert 0 < hr["steered_share"] <= 1 and sum(hr["category_counts"].values()) == hr["steered_tokens"] > 0
    assert set(hr["category_names"].values()) <= set("abcd")
    assert ThinkingGenerator(think, tok, 12).config()["template"].startswith("{question}")
    assert HybridGenerator(h, tok, tok, 12).config()["coefs"] == [0.5, 2.0]
    # a rerun resumes: nothing is generated again, the results stay the same
    before = {run: _results(out, run) for run in ("base", "thinking", "hybrid")}
    assert cli_main(_cli_args(tiny, out)) == 0
    assert {run: _results(out, run) for run in before} == before
    # bad input: a clear error, exit code 2
    capsys.readouterr()
    assert cli_main(["eval", "--data", str(MATH_FILE), "--out", str(tmp_path / "o2"), "--runs", "hybrid",
                     "--base-model", str(tiny / "base"), "--thinking-model", str(tiny / "thinking")]) == 2
    assert "need --sae, --vectors, --sae-layer, --steer-layer" in capsys.readouterr().err
    assert cli_main(_cli_args(tiny, tmp_path / "o4", runs="hybrid", extra=["--paper-config", "qwen2.5-math-1.5b"])) == 2
    assert "has 15 categories but --sae" in capsys.readouterr().err  # the tiny SAE has 4 latents
    assert cli_main(["eval", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o3"), "--runs", "base",
                     "--base-model", str(tiny / "base"), "--base-tokenizer", str(tiny / "tokenizer")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_two_process_gloo_run_merges_to_the_one_process_results(tiny, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    cpu = ["--device", "cpu"]  # gloo's processes on the CPU: a one-GPU machine has no cuda:1 for rank 1
    args = _cli_args(tiny, one, data=GSM8K_FILE, limit=7, extra=cpu)
    assert cli_main(args) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "steerfast", *_cli_args(tiny, two, data=GSM8K_FILE, limit=7, extra=cpu)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in ("base", "thinking", "hybrid"):
        shards = sorted(p.name for p in (two / run).glob("results_rank*.jsonl"))
        assert shards == ["results_rank0.jsonl", "results_rank1.jsonl"]
        ranks = {r["idx"]: r["rank"] for r in _results(two, run)}
        assert ranks == {i: i % 2 for i in range(7)}  # rank r took problems r, r + 2, ...
        assert _strip(_results(two, run)) == _strip(_results(one, run))
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    for run in ("base", "thinking", "hybrid"):
        for key in ("n", "correct", "accuracy", "tokens", "steered_tokens", "category_counts"):
            assert s1["runs"][run][key] == s2["runs"][run][key]
