"""`steerfast demo` on reduced sizes: the task and its labeller, the tokenizer, the trained pair as
real Hugging Face checkpoints (same greedy tokens in transformers and steerfast), the cache, and the
whole pipeline down to eval's summary."""
from __future__ import annotations

import argparse
import json
import random

import pytest
import torch

from steerfast.demo import task
from steerfast.demo import train as dtrain
from steerfast.evaluate.answers import extract_answer

TINY = dict(dim=32, layers=2, heads=2, ffn=64, base_steps=4, think_steps=2, batch=8, n_eval=10)


def _rng():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    return random.Random(seed)


def test_step_answers_are_right_and_labelled_by_construction():
    rng = _rng()
    for _ in range(50):
        p = task.Problem(*task.draw(rng))
        sents = task.steps(p)
        text = task.text(sents)
        assert extract_answer(text) == str(p.answer) == extract_answer(task.text(task.direct(p)))
        # the sum written in each column is that column's true sum (with the carry in)
        carry = 0
        for (a, b), col in zip(zip(str(p.a)[::-1], str(p.b)[::-1]), [s for s, k in sents if k == "compute"]):
            assert col.endswith(f"={int(a) + int(b) + carry}.")
            carry = (int(a) + int(b) + carry) // 10
        # the labeller recovers every sentence's kind from its text, as the research splitter cuts it
        from steerfast.research import split_sentences
        pieces = [text[s:e] for s, e in split_sentences(text)]
        assert pieces == [s for s, _ in sents]
        assert task.labeller(pieces) == [k for _, k in sents]
    assert task.label("Something else entirely.") is None


def test_problems_distinct_and_exclusion():
    rng = _rng()
    held = task.problems(30, rng.randrange(1000))
    assert len({(p.a, p.b) for p in held}) == 30
    ex = {(p.a, p.b) for p in held}
    others = task.problems(200, rng.randrange(1000), exclude=ex)
    assert not ex & {(p.a, p.b) for p in others}
    draw = dtrain.sampler(ex)
    r = random.Random(rng.randrange(1000))
    assert all((q.a, q.b) not in ex for q in (draw(r) for _ in range(500)))


def test_tokenizer_round_trip_and_single_digit_tokens():
    tok = task.train_tokenizer(300)
    rng = _rng()
    p = task.Problem(*task.draw(rng))
    for text in (task.BASE_TEMPLATE.format(question=p.question) + task.text(task.steps(p)), task.text(task.direct(p))):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        pieces = [tok.decode([i]) for i in ids]
        assert all(len(x) == 1 for x in pieces if any(c.isdigit() for c in x))  # digits never merge
    chat = tok.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat.endswith("<|assistant|>") and p.question in chat


def test_recipe_key_follows_every_field():
    r = dtrain.Recipe()
    assert r.key() == dtrain.Recipe().key()
    for name, value in (("dim", 64), ("base_steps", 3), ("base_step_share", 0.5), ("n_eval", 7), ("seed", 5)):
        assert dtrain.Recipe(**{name: value}).key() != r.key(), name


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pair")
    info = dtrain.train_pair(dtrain.Recipe(**TINY), out, progress=False)
    return out, info


def test_checkpoints_load_in_transformers_with_the_same_greedy_tokens(pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import steerfast as sf

    out, info = pair
    assert info["params"] > 0
    rng = _rng()
    for name in ("base", "thinking"):
        d = out / name
        assert (d / "config.json").exists() and (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()
        hf = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        assert tok.chat_template and tok.eos_token_id is not None
        m = sf.load_model(str(d), device="cpu", dtype=torch.float32)
        qs = [task.Problem(*task.draw(rng)).question for _ in range(3)]
        prompts = [tok(task.BASE_TEMPLATE.format(question=q), add_special_tokens=False)["input_ids"] for q in qs]
        ours = m.generate(prompts, max_new_tokens=12, eos_token_id=None)
        for p, o in zip(prompts, ours):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
            assert o == ref


def _args(tmp_path, **kw):
    from steerfast.demo import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    argv = ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--small", "--quiet",
            "--n-eval", "12"]
    return p.parse_args(argv + [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
                                for k, v in kw.items()])


def test_demo_small_end_to_end_and_cached(tmp_path, monkeypatch, capsys):
    from steerfast.demo import cli

    torch.set_num_threads(1)
    monkeypatch.setattr(cli, "SMALL_RECIPE", TINY)
    assert cli.run(_args(tmp_path)) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"base", "thinking", "hybrid"}
    for run in summary["runs"].values():
        assert run["n"] == 12 and 0 <= run["accuracy"] <= 1 and run["ci95"][0] - 1e-9 <= run["accuracy"] <= run["ci95"][1] + 1e-9
    assert "gap" in summary and "steered_share" in summary["runs"]["hybrid"]
    md = (out / "summary.md").read_text()
    assert "| hybrid |" in md and md in capsys.readouterr().out
    for f in ("sae.safetensors", "vectors_optimized.safetensors", "vectors_diffmeans.safetensors",
              "taxonomy.json", "taxonomy_grid.json"):
        assert (out / "research" / f).exists(), f
    tax = json.loads((out / "research" / "taxonomy.json").read_text())
    assert tax["n_latents"] in (5, 6, 7) and 0 <= tax["purity"] <= 1
    assert len(list((out / "hybrid" / "traces").glob("*.html"))) == 12
    held = [json.loads(x)["question"] for x in (out / "heldout.jsonl").read_text().splitlines()]
    traced = [json.loads(x)["question"] for x in (out / "research" / "traces.jsonl").read_text().splitlines()]
    assert not set(held) & set(traced)  # the held-out problems choose nothing

    # second run: the cached pair and research outputs, no training, no traces
    def boom(*a, **k):
        raise AssertionError("trained again despite the cache")
    from steerfast.demo import pipeline
    monkeypatch.setattr(dtrain, "train_pair", boom)
    monkeypatch.setattr(pipeline, "traces", boom)
    assert cli.run(_args(tmp_path)) == 0
    assert json.loads((out / "summary.json").read_text())["runs"]["base"]["n"] == 12
    with pytest.raises(AssertionError, match="trained again"):
        cli.run(_args(tmp_path, fresh=True))



def test_span_records_label_every_sentence_under_both_prompts(pair):
    """The research records of a trace: one span per sentence, its text that sentence, its label
    the sentence's kind, the same spans whether the prompt is the base or the thinking model's."""
    from transformers import AutoTokenizer

    from steerfast.demo import cli, pipeline

    out, _ = pair
    tok = AutoTokenizer.from_pretrained(str(out / "thinking"), local_files_only=True)
    rng = _rng()
    probs = [task.Problem(*task.draw(rng)) for _ in range(8)]
    tr = [dict(question=p.question, answer=p.answer, text=task.text(task.steps(p))) for p in probs]
    t_recs = pipeline.span_records(tr, tok, lambda q: cli.thinking_ids(tok, q))
    b_recs = pipeline.span_records(tr, tok, lambda q: cli.base_ids(tok, q))
    for p, tr_, br in zip(probs, t_recs, b_recs):
        sents = task.steps(p)
        assert [s.label for s in tr_.spans] == [s.label for s in br.spans] == [k for _, k in sents]
        for rec, prompt in ((tr_, cli.thinking_ids(tok, p.question)), (br, cli.base_ids(tok, p.question))):
            assert rec.ids[:len(prompt)] == prompt and rec.spans[0].start == len(prompt)
            assert [tok.decode(rec.ids[s.start:s.end]).strip() for s in rec.spans] == [s for s, _ in sents]
