"""The figures of issue 13: the taxonomy grid (Venhoff et al., Figure 2) and Ward et al.'s
per-layer logit lens; their numbers against direct computations, their PNGs opened and read."""
from __future__ import annotations

import json
import math

import pytest
import torch

import steerfast as sf
from steerfast import research as R
from tiny_models import VOCAB, tiny_hf

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (matplotlib's own dependency)


def png(path):
    """(width, height, Title text) of a PNG the code wrote."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size[0], im.size[1], im.text.get("Title", "")


def test_balance_and_elbow():
    assert R.balance([10, 10, 10]) == pytest.approx(1.0) and R.balance([30, 0, 0]) == 0.0
    sizes = torch.randint(1, 50, (6,)).tolist()
    p = [s / sum(sizes) for s in sizes]
    assert R.balance(sizes) == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(6))
    for _ in range(5):  # a curve falling steeply to a knee, then flat: the elbow is the knee
        knee = int(torch.randint(2, 8, ()))
        xs = list(range(1, 11))
        drop, floor = float(torch.rand(()) * 5 + 1), float(torch.rand(()))
        ys = [floor + drop * (knee - x) if x < knee else floor - 0.01 * (x - knee) for x in xs]
        assert R.elbow(xs, ys) == knee
    assert R.elbow([5, 10], [1.0, 0.5]) is None


def test_taxonomy_grid_scores_and_figure(tmp_path):
    layers, ns = sorted(torch.randperm(20)[:3].tolist()), [5, 10, 20, 30]
    entries = []
    for layer in layers:
        for n in ns:
            sizes = torch.randint(0, 40, (n,)).tolist()
            entries.append(dict(layer=layer, n_latents=n, scores=dict(fvu=float(torch.rand(())), sizes=sizes)))
    g = R.taxonomy_grid(entries)
    assert g["layers"] == layers and g["n_latents"] == ns and not g["judged"]
    assert g["metrics"] == ["fvu", "balance"]
    e = entries[5]
    li, ni = layers.index(e["layer"]), ns.index(e["n_latents"])
    assert g["scores"]["fvu"][li][ni] == e["scores"]["fvu"]
    assert g["scores"]["balance"][li][ni] == pytest.approx(R.balance(e["scores"]["sizes"]))
    for layer in layers:
        fvus = [x["scores"]["fvu"] for x in entries if x["layer"] == layer]
        assert g["elbow"][str(layer)] == R.elbow(ns, fvus)
    R.save_taxonomy_grid(g, tmp_path / "g.json", tmp_path / "g.png")
    assert json.loads((tmp_path / "g.json").read_text()) == json.loads(json.dumps(g))
    w, h, title = png(tmp_path / "g.png")
    assert w > 400 and h > 200 and "no judge" in title
    judged = [dict(x, scores=dict(x["scores"], judged={m: float(torch.rand(())) for m in R.JUDGE_METRICS}))
              for x in entries]
    g2 = R.taxonomy_grid(judged)
    assert g2["judged"] and g2["metrics"] == ["fvu", "balance", *R.JUDGE_METRICS]
    assert g2["scores"]["consistency"][li][ni] == judged[5]["scores"]["judged"]["consistency"]
    R.plot_taxonomy_grid(g2, tmp_path / "g2.png")
    assert "no judge" not in png(tmp_path / "g2.png")[2] and "completeness" in png(tmp_path / "g2.png")[2]


def test_sae_grid_feeds_the_taxonomy_grid():
    C, N, d = 4, 400, 16
    centres = 3 * torch.randn(C, d)
    truth = torch.randint(0, C, (N,))
    x = centres[truth] + 0.3 * torch.randn(N, d)
    judge = lambda metric, tax: sum(t["size"] > 0 for t in tax) / len(tax)  # noqa: E731
    res = R.sae_grid({3: x}, [2, 4], k=1, judge=judge)
    g = R.taxonomy_grid(res)
    assert g["judged"] and g["layers"] == [3] and g["n_latents"] == [2, 4]
    assert g["scores"]["fvu"][0] == [r.scores["fvu"] for r in res]
    assert g["scores"]["fvu"][0][1] < g["scores"]["fvu"][0][0]  # four latents for four clusters explain more
    assert g["scores"]["balance"][0][1] > 0.8  # the four planted clusters have about equal sizes


def test_logit_lens_by_layer_reads_norm_and_unembedding(tmp_path):
    hf = tiny_hf(layers=3)
    model = sf.load_model(hf, device="cpu", dtype=torch.float64)
    W = hf.lm_head.weight
    chosen = {f"t{t}": t for t in torch.randperm(VOCAB)[:3].tolist()}
    target = list(chosen.values())[0]
    vectors = {0: torch.randn(model.args.dim, dtype=torch.float64), 2: 5.0 * W[target].detach().clone()}
    res = R.logit_lens_by_layer(model, vectors, chosen)
    assert res["layers"] == [0, 2] and res["vocab_size"] == VOCAB
    for i, layer in enumerate(res["layers"]):
        with torch.no_grad():  # transformers' own final norm and head
            ref = hf.lm_head(hf.model.norm(vectors[layer][None]))[0]
        for s, t in chosen.items():
            assert res["tokens"][s]["logit"][i] == pytest.approx(float(ref[t]), rel=1e-9)
            assert res["tokens"][s]["rank"][i] == int((ref > ref[t]).sum())
        assert res["mean_logit"][i] == pytest.approx(float(ref.mean()), rel=1e-9)
    assert res["tokens"][f"t{target}"]["rank"][1] == 0  # its own unembedding row puts it first
    R.plot_logit_lens_by_layer(res, tmp_path / "lens.png")
    w, h, title = png(tmp_path / "lens.png")
    assert w > 400 and h > 200 and "logit lens" in title
    with pytest.raises(sf.errors.InvalidInputError):
        R.logit_lens_by_layer(model, {1: torch.randn(3)}, chosen)


def test_cli_writes_the_grid_and_the_per_layer_lens(tmp_path):
    from steerfast.cli import main

    torch.manual_seed(3)
    mdir = tmp_path / "model"
    hf = tiny_hf(layers=2, dtype=torch.float32)
    hf.save_pretrained(mdir)
    m = sf.load_model(str(mdir), device="cpu", dtype=torch.float32)
    for layer in (0, 1):
        R.save_vector(tmp_path / f"v{layer}.safetensors", torch.randn(m.args.dim), layer=layer, name="bt")
    assert main(["research", "logit-lens", "--model", str(mdir), "--vector", str(tmp_path / "v0.safetensors"),
                 str(tmp_path / "v1.safetensors"), "--token-ids", "4,5", "--out", str(tmp_path / "lens")]) == 0
    lens = json.loads((tmp_path / "lens" / "lens.json").read_text())
    assert lens["bt"]["layers"] == [0, 1] and set(lens["bt"]["tokens"]) == {"4", "5"}
    assert "logit lens" in png(tmp_path / "lens" / "lens.png")[2]
    # the SAE grid from saved sentence activations (two layers)
    from steerfast.research.activations import extract_activations
    from steerfast.research.spans import Record, Span
    recs = [Record(ids=torch.randint(0, VOCAB, (12,)).tolist(), spans=[Span(0, 4), Span(4, 8), Span(8, 12)])
            for _ in range(8)]
    for layer in (0, 1):
        extract_activations(m, recs, layer, tmp_path / f"acts{layer}", mode="sentence", progress=False)
    assert main(["research", "sae", "--activations", str(tmp_path / "acts0"), str(tmp_path / "acts1"),
                 "--n-latents", "2,3,4", "--k", "1", "--out", str(tmp_path / "sae")]) == 0
    grid = json.loads((tmp_path / "sae" / "taxonomy_grid.json").read_text())
    assert grid["layers"] == [0, 1] and grid["n_latents"] == [2, 3, 4] and not grid["judged"]
    assert "no judge" in png(tmp_path / "sae" / "taxonomy_grid.png")[2]
