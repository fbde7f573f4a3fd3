"""Fidelity of `steerfast eval` to the paper (issue 13): the paper's grid by default, its Table 1
pairs as presets, the steered share over the tokens the grader reads, and a trace page per problem."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

import steerfast as sf
from steerfast.evaluate import HybridGenerator, evaluate, load_problems, markdown, summarize
from steerfast.evaluate import cli as eval_cli
from steerfast.evaluate.run import graded_tokens
from steerfast.hybrid import HybridResult
from steerfast.paper_configs import PAPER_CONFIGS, PAPER_WINDOWS
from test_eval import MATH_FILE, make_tokenizer


def parse(*argv):
    p = argparse.ArgumentParser()
    eval_cli.add_arguments(p)
    args = p.parse_args(["--data", "d.jsonl", "--out", "o", *argv])
    eval_cli.apply_paper_config(args)
    return args


def grid(args):
    return eval_cli._numbers(args.coefs, float, "coefs"), eval_cli._numbers(args.windows, int, "windows")


def test_eval_searches_the_papers_grid_unless_told_otherwise():
    coefs, windows = grid(parse())
    assert windows == [0, -1, -15, -50, -100] == list(PAPER_WINDOWS)
    assert coefs == pytest.approx([0.1 * i for i in range(1, 11)])
    assert parse().max_new_tokens == 2000
    assert grid(parse("--windows", "-1"))[1] == [-1]  # the documented fast option
    assert grid(parse("--windows=-1,-4"))[1] == [-1, -4]


def test_paper_config_presets_fill_what_is_not_given():
    cfg = sf.hybrid_config("Qwen2.5-Math-1.5B")
    assert (cfg.steer_layer, cfg.sae_layer, cfg.n_categories) == (10, 4, 15)
    assert cfg.base_model.endswith("Qwen2.5-Math-1.5B") and cfg.thinking_model.endswith("R1-Distill-Qwen-1.5B")
    assert cfg.hybrid_kwargs() == dict(sae_layer=4, steer_layer=10, coefs=list(cfg.coefs), windows=[0, -1, -15, -50, -100])
    assert len(PAPER_CONFIGS) == 9 and all(c.n_categories in (5, 10, 15) for c in PAPER_CONFIGS.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steer_layer = 3
    with pytest.raises(sf.errors.InvalidInputError, match="qwen2.5-math-1.5b"):
        sf.hybrid_config("gpt-2")
    name = list(PAPER_CONFIGS)[int(torch.randint(len(PAPER_CONFIGS), ()))]
    want = PAPER_CONFIGS[name]
    args = parse("--paper-config", name)
    assert (args.sae_layer, args.steer_layer, args.max_new_tokens) == (want.sae_layer, want.steer_layer, 2000)
    assert grid(args) == (pytest.approx(list(want.coefs)), list(want.windows))
    args = parse("--paper-config", name, "--sae-layer", "1", "--windows", "-1", "--max-new-tokens", "7")
    assert (args.sae_layer, args.steer_layer, args.max_new_tokens) == (1, want.steer_layer, 7)
    assert grid(args)[1] == [-1]


class FakeHybrid:
    """Returns fixed per-token results (what sf.Hybrid returns), whatever the prompts."""
    sae_layer, steer_layer, coefs, windows, gate, threshold = 1, 0, [0.5], [-1], "thinking", float("-inf")

    def __init__(self, results: list[tuple[list[int], list[bool], list[int]]]):
        self.results = results

    def generate(self, base_prompts, thinking_prompts, max_new_tokens, eos_token_id=None):
        rows = self.results[:len(base_prompts)]
        return HybridResult([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                            [[0.5 if s else None for s in r[1]] for r in rows],
                            [[-1 if s else None for s in r[1]] for r in rows])


def random_run(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    steered = (torch.rand(len(ids)) < 0.3).tolist()
    return ids, steered, torch.randint(0, 4, (len(ids),)).tolist()


def test_steered_share_counts_the_tokens_the_grader_reads(tmp_path):
    tok = make_tokenizer()
    kept = [f"So x = {int(torch.randint(10, 99, ()))}. The answer is \\boxed{{7}}." for _ in range(2)]
    texts = [kept[0] + "\nQuestion: what is " + "1 + 1 " * int(torch.randint(3, 9, ())),  # cut here
             kept[1]]  # nothing to cut
    runs = [random_run(tok, t) for t in texts]
    for (ids, _, _), text, keep in zip(runs, texts, kept):
        n = graded_tokens(tok, ids, keep)
        assert tok.decode(ids[:n]).startswith(keep) and not tok.decode(ids[:n - 1]).startswith(keep)
    gen = HybridGenerator(FakeHybrid(runs), tok, tok, 64, eos_ids=[tok.eos_token_id], category_names=list("abcd"))
    problems = load_problems(MATH_FILE, limit=2)
    recs = evaluate(problems, gen, tmp_path, batch_size=2, progress=False)
    n_graded = [len(tok.encode(k, add_special_tokens=False)) for k in kept]  # one character, one token
    for r, (ids, steered, _), n, keep in zip(recs, runs, n_graded, kept):
        assert r["completion"] == keep and r["n_tokens"] == len(ids)
        assert r["n_tokens_graded"] == n and r["n_steered_graded"] == sum(steered[:n])
    s = summarize(tmp_path)["runs"]["hybrid"]
    graded_steered = sum(sum(st[:n]) for (_, st, _), n in zip(runs, n_graded))
    all_steered = sum(sum(st) for _, st, _ in runs)
    assert s["steered_share"] == pytest.approx(graded_steered / sum(n_graded))
    assert s["steered_share_raw"] == pytest.approx(all_steered / sum(len(r[0]) for r in runs))
    assert s["steered_share"] != s["steered_share_raw"] or graded_steered == 0
    md = markdown(summarize(tmp_path))
    assert f"{100 * s['steered_share']:.1f}% / {100 * s['steered_share_raw']:.1f}%" in md
    # the trace page of each problem, named in its record
    for r, (ids, steered, cats) in zip(recs, runs):
        page = (tmp_path / "hybrid" / r["trace_html"]).read_text()
        assert page.startswith("<!DOCTYPE html>") and page.count('class="steered"') >= 1 * any(steered)
        assert json.loads(page.split('id="trace-data">')[1].split("</script>")[0])["steered"] == sum(steered)
