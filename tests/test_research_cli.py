"""steerfast.research as issue 15 found it: the sweep (same-label vectors of two files, baselines
that coincide, the title's tokens, an all-zero y-axis, the printed header), the logit lens's token
ids, the SAE's FVU in its metadata and in taxonomy.json, progress bars only on a terminal, and bad
flags (a default token that is not one token, --n-latents below --k) as one error line before any
heavy work. Error cases run the real entry point in a subprocess."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import steerfast as sf
from steerfast import research as R
from steerfast.presets import SHAPES, random_hf_model
from tiny_models import VOCAB, random_prompts, tiny_hf
from cli_helpers import assert_one_error_line, run_cli
from tiny_tokenizer import char_tokenizer

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sf.load_model(tiny_hf(layers=2), device="cpu", dtype=torch.float64)


# ---------------------------------------------------------------------- bad flags, before heavy work
def test_bad_tokens_and_k_are_one_line_before_any_heavy_work(tmp_path):
    tok_dir = tmp_path / "tok"
    char_tokenizer(SHAPES["tiny"]["vocab_size"]).save_pretrained(tok_dir)
    broken = tmp_path / "broken"  # a model directory no checkpoint loads from: reaching it fails otherwise
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(dict(model_type="llama")))
    (broken / "model.safetensors").write_bytes(os.urandom(64))
    R.save_vector(tmp_path / "v.safetensors", torch.randn(8), layer=0, name="backtracking")
    (tmp_path / "p.jsonl").write_text(json.dumps({"ids": [5, 6, 7]}) + "\n")
    # the default " Wait" etc. are several characters: several tokens of a character tokenizer
    r = run_cli("research", "sweep", "--model", broken, "--tokenizer", tok_dir, "--vector", tmp_path / "v.safetensors",
                "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "sweep")
    assert_one_error_line(r, "--tokens", "single tokens", "' Wait'", "--token-ids", prog="steerfast research sweep")
    r = run_cli("research", "logit-lens", "--model", broken, "--tokenizer", tok_dir, "--vector",
                tmp_path / "v.safetensors", "--tokens", " Hmm", "--out", tmp_path / "lens")
    assert_one_error_line(r, "--tokens", "' Hmm'", prog="steerfast research logit-lens")
    # a --tokenizer directory without tokenizer files: named, before the model
    r = run_cli("research", "sweep", "--model", broken, "--tokenizer", broken, "--vector", tmp_path / "v.safetensors",
                "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "sweep")
    assert_one_error_line(r, "--tokenizer", str(broken), "tokenizer.json", prog="steerfast research sweep")
    # --k above the smallest --n-latents: refused before the activations are even read
    k = int(torch.randint(3, 6, ()))
    r = run_cli("research", "sae", "--activations", tmp_path / "no_such_dir", "--n-latents", f"{k + 4},{k - 1}",
                "--k", str(k), "--out", tmp_path / "sae")
    assert_one_error_line(r, "--k", "--n-latents", f"n_latents={k - 1}", prog="steerfast research sae")
    assert not (tmp_path / "sae").exists()
    with pytest.raises(sf.errors.InvalidInputError, match=f"n_latents={k - 1}"):
        R.sae_grid({0: torch.randn(20, 4)}, [k + 4, k - 1], k)  # before the first SAE trains


# ---------------------------------------------------------------------- the sweep
def _sweep_result(series: dict, token_strings=None, token_ids=(14, 3)):
    mags = [0.0, 4.0, 16.0]
    return dict(layer=1, magnitudes=mags, token_ids=list(token_ids), token_strings=token_strings, normalize=True,
                series={n: [dict(magnitude=m, rate=r, any=0.0, tokens=10) for m, r in zip(mags, rates)]
                        for n, rates in series.items()})


def test_sweep_figure_shows_every_series_names_the_tokens_and_starts_at_zero():
    import matplotlib.pyplot as plt

    rates = torch.rand(3).mul(0.2).tolist()
    flat = [rates[0]] * 3  # three baselines on the very same line, as in the issue
    res = _sweep_result({"a.safetensors:backtracking": rates, "b.safetensors:backtracking": rates,
                         "random": flat, "mean_activation": flat, R.SCALE: flat},
                        token_strings={" Wait": 14, " But": 3})
    fig = R.sweep_figure(res)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == list(res["series"])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(res["series"])
    styles = [(str(ln.get_linestyle()), ln.get_marker(), ln.get_markersize()) for ln in lines]
    assert len(set(styles)) == len(styles)  # coinciding lines differ in dash, marker or size
    base = [ln for ln in lines if ln.get_label() in ("random", "mean_activation", R.SCALE)]
    assert len({ln.get_marker() for ln in base}) == 3 and len({ln.get_linestyle() for ln in base}) == 3
    # later lines draw smaller and on top, so a line under another one still shows around it
    assert [ln.get_markersize() for ln in lines] == sorted((ln.get_markersize() for ln in lines), reverse=True)
    assert [ln.get_zorder() for ln in lines] == sorted(ln.get_zorder() for ln in lines)
    for ln, rows in zip(lines, res["series"].values()):
        assert list(ln.get_ydata()) == pytest.approx([r["rate"] for r in rows])
    title = ax.get_title()
    assert "' Wait' (id 14)" in title and "' But' (id 3)" in title and "layer 1" in title
    lo, hi = ax.get_ylim()
    assert lo == 0 and hi >= max(rates)
    plt.close(fig)
    zero = R.sweep_figure(_sweep_result({"v": [0.0] * 3, "random": [0.0] * 3}))
    lo, hi = zero.axes[0].get_ylim()
    assert lo == 0 and 0 < hi <= 0.1  # not -0.04 .. 0.04
    assert "id 14, id 3" in zero.axes[0].get_title()  # ids alone when no strings are known
    plt.close(zero)


def test_sweep_table_has_a_magnitude_header():
    res = _sweep_result({"vec": [0.0, 0.25, 0.5], "random": [0.0, 0.0, 0.125]}, {" Wait": 14, " But": 3})
    lines = R.sweep_table(res).splitlines()
    assert "' Wait' (id 14)" in lines[0]
    head = lines[1].split(":")
    assert head[0].strip() == "magnitude" and head[1].split() == ["0", "4", "16"]
    assert lines[2].split(":")[0].strip() == "vec" and lines[2].split(":")[1].split() == ["0.000", "0.250", "0.500"]
    assert len(lines) == 4 and len({len(x) for x in lines[1:]}) == 1  # columns line up


def test_two_files_with_the_same_label_are_two_rows(model, tmp_path):
    d = model.args.dim
    a, b, c = (torch.randn(d) for _ in range(3))
    R.save_vector(tmp_path / "ward.safetensors", a, layer=1, name="backtracking")
    R.save_vector(tmp_path / "mine.safetensors", b, layer=1, name="backtracking")
    R.save_vector_set(tmp_path / "set.safetensors", {"backtracking": c, "other": -c}, layer=1)
    got = R.load_vectors([tmp_path / f for f in ("ward.safetensors", "mine.safetensors", "set.safetensors")],
                         unique=True)
    assert list(got) == ["ward:backtracking", "mine:backtracking", "set:backtracking", "other"]
    assert torch.equal(got["mine:backtracking"], b) and torch.equal(got["other"], -c)
    assert list(R.load_vectors([tmp_path / "ward.safetensors", tmp_path / "mine.safetensors"])) == ["backtracking"]
    (tmp_path / "x").mkdir()  # same stem in two folders: the paths tell them apart
    R.save_vector(tmp_path / "x" / "ward.safetensors", b, layer=1, name="backtracking")
    got = R.load_vectors([tmp_path / "ward.safetensors", tmp_path / "x" / "ward.safetensors"], unique=True)
    assert len(got) == 2 and all(k.endswith(":backtracking") for k in got)


def test_cli_sweep_rows_title_and_header(tmp_path, capsys):
    from steerfast.cli import main

    torch.manual_seed(4)
    mdir = tmp_path / "model"
    hf = tiny_hf(layers=2, dtype=torch.float32)
    hf.save_pretrained(mdir)
    d = hf.config.hidden_size
    for name in ("ward", "mine"):
        R.save_vector(tmp_path / f"{name}.safetensors", torch.randn(d), layer=1, name="backtracking")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"ids": p}) for p in random_prompts([4, 6])))
    ids = sorted(torch.randperm(VOCAB)[:2].tolist())
    assert main(["research", "sweep", "--model", str(mdir), "--vector", str(tmp_path / "ward.safetensors"),
                 str(tmp_path / "mine.safetensors"), "--prompts", str(tmp_path / "p.jsonl"), "--magnitudes", "0,8",
                 "--token-ids", ",".join(map(str, ids)), "--max-new-tokens", "3", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out.splitlines()
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert list(sweep["series"])[:2] == ["ward:backtracking", "mine:backtracking"]
    assert out[1].split(":")[0].strip() == "magnitude" and out[1].split(":")[1].split() == ["0", "8"]
    assert [ln.split(":")[0].strip() for ln in out[2:6]] == ["ward", "mine", "random", "mean_activation"]
    from PIL import Image
    img = Image.open(tmp_path / "s" / "sweep.png")
    assert all(f"id {t}" in img.info["Title"] for t in ids)
    assert list(json.loads(img.info["Description"])["series"]) == list(sweep["series"])


# ---------------------------------------------------------------------- the logit lens's tokens
def test_token_labels_give_the_id_and_say_undecodable(tmp_path, capsys, monkeypatch):
    tok = char_tokenizer(SHAPES["tiny"]["vocab_size"])
    t = int(torch.randint(40, 90, ()))
    assert R.token_label(tok, t) == f"{t} {tok.decode([t])!r}"
    assert R.token_label(None, t) == str(t)

    class Bytes:  # a byte-level tokenizer: a lone byte of a character decodes to nothing or U+FFFD
        def decode(self, ids):
            return {7: "", 8: "\ufffd"}.get(ids[0], "x")
    assert R.token_label(Bytes(), 7) == "<id 7: undecodable>" and R.token_label(Bytes(), 8) == "<id 8: undecodable>"
    # the CLI prints ids beside the text
    from steerfast.cli import main
    mdir = tmp_path / "model"
    random_hf_model("tiny", dtype=torch.float32).save_pretrained(mdir)
    tok.save_pretrained(tmp_path / "tok")
    m = sf.load_model(str(mdir), device="cpu", dtype=torch.float32)
    v = torch.randn(m.args.dim)
    R.save_vector(tmp_path / "v.safetensors", v, layer=0, name="bt")
    assert main(["research", "logit-lens", "--model", str(mdir), "--tokenizer", str(tmp_path / "tok"), "--vector",
                 str(tmp_path / "v.safetensors"), "--top", "4", "--device", "cpu", "--dtype", "fp32"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[0]
    top = R.logit_lens(m, v, 4)
    for i, _ in top:
        assert R.token_label(tok, i) in line, line


# ---------------------------------------------------------------------- the SAE's FVU, saved and reported
def test_sae_metadata_and_taxonomy_report_the_same_fvu(tmp_path):
    from steerfast.cli import main
    from steerfast.research.activations import extract_activations
    from steerfast.research.spans import Record, Span

    torch.manual_seed(int(torch.randint(0, 2 ** 31, ())))
    m = sf.load_model(tiny_hf(layers=2, dtype=torch.float32), device="cpu", dtype=torch.float32)
    recs = [Record(ids=torch.randint(0, VOCAB, (12,)).tolist(), spans=[Span(0, 4), Span(4, 8), Span(8, 12)])
            for _ in range(8)]  # 24 sentences: a held-out split of 2, where the two FVUs of the issue parted
    extract_activations(m, recs, 1, tmp_path / "acts", mode="sentence", progress=False)
    assert main(["research", "sae", "--activations", str(tmp_path / "acts"), "--n-latents", "3,5", "--k", "2",
                 "--out", str(tmp_path / "sae")]) == 0
    acts = R.load_activations(tmp_path / "acts").acts
    for entry in json.loads((tmp_path / "sae" / "taxonomy.json").read_text()):
        sae = sf.TopKSAE.load(entry["path"])
        meta, scores = sae.metadata, entry["scores"]
        assert meta["fvu"] == pytest.approx(scores["fvu"], rel=1e-6)  # one quantity, one number
        assert meta["fvu"] == pytest.approx(R.fvu(sae, acts), rel=1e-5)
        assert meta["fvu_heldout"] == scores["fvu_heldout"] and meta["fvu_definition"] == scores["fvu_definition"]
        n_tr, n_val = meta["n_train"], meta["n_val"]
        assert n_tr + n_val == len(acts) and n_val >= 2
        assert meta["fvu_train"] > 0 and "all rows" in meta["fvu_definition"]


# ---------------------------------------------------------------------- progress bars
def _as_terminal(monkeypatch):
    monkeypatch.delenv("STEERFAST_QUIET", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


def test_research_bars_on_a_terminal_only(model, tmp_path, capsys, monkeypatch):
    from steerfast.research.spans import Example, Record, Span

    recs = [Record(ids=p, spans=[Span(1, 4)]) for p in random_prompts([6, 7, 8])]
    exs = [Example(prefix=p[:3], target=p[3:5]) for p in random_prompts([6, 6, 6, 6])]
    x = torch.randn(40, 8)

    def work(out):
        R.extract_activations(model, recs, 0, out, mode="sentence")
        R.window_diff_of_means(model, [r.ids for r in recs], [[3]] * 3, 1, offset=-2, width=2)
        R.train_vector(model, exs, 1, epochs=1, batch_size=2)
        R.train_topk_sae(x, 4, k=2, epochs=2)
        R.emission_sweep(model, random_prompts([4]), {"v": torch.randn(model.args.dim)}, 1, [0.0, 2.0], [5],
                         max_new_tokens=2)

    work(tmp_path / "a")  # pytest's stderr is a pipe: silent
    assert capsys.readouterr().err == ""
    _as_terminal(monkeypatch)
    work(tmp_path / "b")
    err = capsys.readouterr().err
    for desc in ("activations L0 output", "diff of means L1", "vector L1", "SAE n=4 k=2", "sweep"):
        assert desc in err, (desc, err[-1500:])
    assert "3/3" in err and "2/2" in err  # sequences, batches / runs counted
    monkeypatch.setenv("STEERFAST_QUIET", "1")
    work(tmp_path / "c")
    assert capsys.readouterr().err == ""
