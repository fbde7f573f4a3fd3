"""steerfast.research on tiny random models and synthetic data: every reference is computed here
from transformers' own forward (hidden_states, forward hooks), never from steerfast itself."""
from __future__ import annotations

import json

import pytest
import torch

import steerfast as sf
from steerfast import research as R
from steerfast.research import activations as A
from tiny_models import VOCAB, hf_greedy, random_prompts, tiny_hf

WORDS = ["[UNK]", ".", ",", "?", "Wait", "But", "Hmm", "So", "Let", "me", "check"]


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    return tiny_hf(layers=3)  # float64: the references below are exact to rounding


@pytest.fixture(scope="module")
def model(hf):
    return sf.load_model(hf, device="cpu", dtype=torch.float64)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + [f"w{i}" for i in range(VOCAB - len(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def hidden(hf, seq, layer):
    """Residual stream after decoder `layer` for one sequence, from transformers: hidden_states,
    or a forward hook for the last layer (its hidden_states entry is after the final norm)."""
    ids = torch.tensor([seq])
    if layer < hf.config.num_hidden_layers - 1:
        return hf(ids, output_hidden_states=True).hidden_states[layer + 1][0]
    got = []
    h = hf.model.layers[layer].register_forward_hook(lambda m, i, o: got.append(o[0] if isinstance(o, tuple) else o))
    hf(ids)
    h.remove()
    return got[0][0]


# ---------------------------------------------------------------------- activations
@pytest.mark.parametrize("layer,point", [(0, "output"), (1, "output"), (2, "output"), (0, "input"), (2, "input")])
def test_layer_activations_match_transformers(hf, model, layer, point):
    ids = random_prompts([7, 19, 3, 12, 25])
    got = dict(A.layer_activations(model, ids, layer, point, batch_size=2))  # ragged batches
    for i, seq in enumerate(ids):
        ref = (hidden(hf, seq, layer) if point == "output" else
               hf(torch.tensor([seq]), output_hidden_states=True).hidden_states[layer][0])  # [0]: embeddings
        torch.testing.assert_close(got[i], ref, rtol=1e-9, atol=1e-9)


def test_window_diff_of_means_matches_hidden_states(hf, model):
    ids = random_prompts([30, 14, 22, 9])
    starts = [sorted(torch.randint(0, len(s), (3,)).tolist()) for s in ids]  # some windows fall before 0
    got = R.window_diff_of_means(model, ids, starts, 1, offset=-6, width=4, batch_size=3)
    hs = [hf(torch.tensor([s]), output_hidden_states=True).hidden_states[2][0] for s in ids]
    win = [hs[i][p] for i in range(len(ids)) for s in starts[i] for p in range(s - 6, s - 2) if 0 <= p < len(ids[i])]
    ref = torch.stack(win).mean(0) - torch.cat(hs).mean(0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_label_diff_of_means_matches_hidden_states(hf, model):
    ids = random_prompts([40, 33])
    spans = [[(4, 10, "a"), (10, 25, "b"), (25, 30, "a")], [(2, 8, "b"), (8, 31, "a")]]
    got = R.label_diff_of_means(model, ids, spans, 1)
    hs = [hf(torch.tensor([s]), output_hidden_states=True).hidden_states[2][0] for s in ids]
    overall = torch.stack([h[min(s for s, _, _ in sp):max(e for _, e, _ in sp)].mean(0) for h, sp in zip(hs, spans)]).mean(0)
    for label in "ab":
        means = [h[s - 1:min(e - 1, s + 10)].mean(0) for h, sp in zip(hs, spans) for s, e, lab in sp if lab == label]
        v = torch.stack(means).mean(0) - overall
        torch.testing.assert_close(got[label].double(), v * overall.norm() / v.norm(), rtol=1e-5, atol=1e-6)


def test_extraction_resumes_after_interruption_and_loses_nothing(hf, model, tmp_path, monkeypatch):
    recs = [R.Record(ids, [R.Span(s, s + 4, lab) for s, lab in ((1, "x"), (6, "y"), (len(ids) - 4, None))])
            for ids in random_prompts([int(n) for n in torch.randint(12, 30, (9,))])]
    kw = dict(mode="sentence", shard_size=2, batch_size=3, progress=False)
    full = R.load_activations(R.extract_activations(model, recs, 1, tmp_path / "full", **kw))
    # the sentence means against transformers: mean over [start - 1, end)
    h = hidden(hf, recs[4].ids, 1)
    rows = (full.record == 4).nonzero()[:, 0]
    for r, s in zip(rows.tolist(), recs[4].spans):
        torch.testing.assert_close(full.acts[r].double(), h[s.start - 1:s.end].mean(0), rtol=1e-5, atol=1e-6)
    assert full.labels[:3] == ["x", "y", None] and len(full.labels) == 27

    real, calls = A._write_shard, []

    def crash_on_third(path, *a):
        calls.append(path.name)
        if len(calls) == 3:  # killed while writing shard 2: a partial file, never renamed into place
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        real(path, *a)

    monkeypatch.setattr(A, "_write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        R.extract_activations(model, recs, 1, tmp_path / "cut", **kw)
    with pytest.raises(sf.errors.InvalidInputError, match="did not finish"):
        R.load_activations(tmp_path / "cut")
    calls.clear()
    monkeypatch.setattr(A, "_write_shard", lambda path, *a: (calls.append(path.name), real(path, *a)))
    R.extract_activations(model, recs, 1, tmp_path / "cut", **kw)
    assert calls == [f"shard-{i:05d}.safetensors" for i in range(2, 5)]  # only what was missing
    resumed = R.load_activations(tmp_path / "cut")
    for k in ("acts", "record", "span", "pos"):
        assert torch.equal(getattr(full, k), getattr(resumed, k)), k
    assert full.labels == resumed.labels
    with pytest.raises(sf.errors.InvalidInputError, match="other settings"):
        R.extract_activations(model, recs, 2, tmp_path / "cut", **kw)


# ---------------------------------------------------------------------- optimised vectors
def test_training_loss_is_transformers_loss_with_the_vector_added(hf, model):
    ex = [R.Example(p, t) for p, t in zip(random_prompts([5, 9, 3]), random_prompts([4, 2, 6]))]
    v = torch.randn(model.args.dim, dtype=torch.float64)
    for layer, point, hook_layer in ((1, "output", 1), (1, "input", 0)):
        got = R.eval_loss(model, ex, layer, v, point=point)
        total, n = 0.0, 0
        for e in ex:
            seq, p = e.prefix + e.target, len(e.prefix)

            def add(m, i, o, p=p):  # positions p-1 ... predict the target tokens
                h = (o[0] if isinstance(o, tuple) else o).clone()
                h[:, p - 1:] += v
                return (h, *o[1:]) if isinstance(o, tuple) else h
            hook = hf.model.layers[hook_layer].register_forward_hook(add)
            logits = hf(torch.tensor([seq])).logits[0]
            hook.remove()
            total += float(torch.nn.functional.cross_entropy(logits[p - 1:-1].detach(), torch.tensor(e.target),
                                                             reduction="sum"))
            n += len(e.target)
        assert got == pytest.approx(total / n, rel=1e-9)


def test_optimised_vectors_lower_held_out_loss_bias_held_fixed():
    m = sf.load_model(tiny_hf(layers=2, dtype=torch.float32), device="cpu", dtype=torch.float32)

    def examples(n, pool):  # targets from a small token pool: learnable regardless of the prefix
        return [R.Example(random_prompts([int(torch.randint(3, 9, ()))])[0],
                          pool[torch.randint(0, len(pool), (int(torch.randint(3, 6, ())),))].tolist()) for _ in range(n)]
    pool_a, pool_b = torch.randperm(VOCAB)[:3], torch.randperm(VOCAB)[:3]
    traces, held_traces = examples(24, torch.cat([pool_a, pool_b])), examples(12, torch.cat([pool_a, pool_b]))
    kw = dict(lr=0.3, epochs=15, batch_size=8, patience=3)
    held_a = examples(12, pool_a)
    bias, vecs, res = R.train_bias_and_categories(m, traces, {"a": examples(24, pool_a)}, 0, eval_traces=held_traces,
                                                  eval_examples={"a": held_a}, **kw)
    assert res["bias"].best_loss < 0.8 * res["bias"].baseline_loss, res["bias"].history
    # the category vector trains on top of the fixed bias: its baseline is the bias alone
    assert res["a"].baseline_loss == pytest.approx(R.eval_loss(m, held_a, 0, bias))
    fresh = examples(16, pool_a)  # held out from both training and early stopping
    assert R.eval_loss(m, fresh, 0, bias + vecs["a"]) < 0.9 * R.eval_loss(m, fresh, 0, bias), res["a"].history


# ---------------------------------------------------------------------- SAE taxonomy
def planted(C=5, d=64, N=600):
    centres = torch.randn(C, d) * 3
    truth = torch.randint(0, C, (N,))
    return centres[truth] + torch.randn(N, d) + 5 * torch.randn(d), truth  # shared offset: centring removes it


def test_train_topk_sae_recovers_planted_clusters(tmp_path):
    # more latents than clusters: each cluster's rows must share their argmax latent, on every draw
    C, N = 5, 600
    runs = []
    for _ in range(3):
        x, truth = planted(C, N=N)
        sae = R.train_topk_sae(x, 5 * C, k=3)
        runs.append((R.purity(R.categories(sae, x)[0], truth), sae, x))
    runs.sort(key=lambda r: r[0])
    assert runs[0][0] >= 0.95, [r[0] for r in runs]
    _, sae, x = runs[2]
    cat, _ = R.categories(sae, x)
    assert sae.k == 3 and sae.normalize and (sae.mean - x.mean(0)).norm() < 0.1 * x.mean(0).norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(5 * C))
    assert R.fvu(sae, x) < 0.5
    sae.save(tmp_path / "sae.safetensors")
    assert torch.equal(R.categories(sf.TopKSAE.load(tmp_path / "sae.safetensors"), x)[0], cat)
    asked = []
    scores = R.score_taxonomy(sae, x, [f"s{i}" for i in range(N)], judge=lambda m, tax: asked.append(m) or 0.5)
    assert sum(scores["sizes"]) == N and asked == list(R.JUDGE_METRICS) and scores["judged"]["completeness"] == 0.5
    assert R.purity(cat, cat) == 1.0 and R.purity(torch.zeros(N, dtype=torch.long), cat) < 0.5


def test_train_topk_sae_finds_each_planted_cluster_with_as_many_latents_as_clusters():
    # n_latents = clusters and k = 3: a random init often lets one latent span two clusters; the
    # k-means++ seeding must put one latent on each cluster, on every fresh draw
    for _ in range(3):
        C, d, N = int(torch.randint(5, 9, ())), int(torch.randint(24, 48, ())), 2000
        centres = 3 * torch.randn(C, d)
        truth = torch.randint(0, C, (N,))
        x = centres[truth] + 0.3 * torch.randn(N, d) + 5
        sae = R.train_topk_sae(x, C, k=3, seed=int(torch.randint(0, 2 ** 31, ())))
        cat = R.categories(sae, x)[0]
        # both ways: each latent holds one cluster and each cluster sits in one latent
        assert R.purity(cat, truth) > 0.98 and R.purity(truth, cat) > 0.98, (C, d)
        assert R.fvu(sae, x) < 0.2


# ---------------------------------------------------------------------- analysis
def test_logit_lens_puts_an_unembedding_row_first(model):
    W = model.net.output.weight
    for t in torch.randperm(VOCAB)[:10].tolist():
        assert R.logit_lens(model, W[t] * 3.0, top=3)[0][0] == t


def test_scaled_activation_generation_matches_a_transformers_hook(hf, model):
    prompts = random_prompts([6, 11])
    same = R.generate_scaled(model, prompts, 1, 0.0, 8)
    assert same == model.generate(prompts, 8)
    mag = 300.0  # the residual is RMS-normalised before each later layer: small scalings change little
    got = R.generate_scaled(model, prompts, 1, mag, 8)

    def scale(m, i, o):
        h = o[0] if isinstance(o, tuple) else o
        h = h + mag * h / h.norm(dim=-1, keepdim=True)
        return (h, *o[1:]) if isinstance(o, tuple) else h
    hook = hf.model.layers[1].register_forward_hook(scale)
    ref = [hf_greedy(hf, p, 8) for p in prompts]  # attention_mask given: token 0 in a prompt is not padding
    hook.remove()
    assert got == ref and got != same


def test_emission_sweep_vectors_and_baselines(model, tmp_path):
    t = int(torch.randint(0, VOCAB, ()))
    v = model.net.output.weight[t].clone()
    prompts = random_prompts([5, 8, 4])
    last = model.args.n_layers - 1
    vecs = {"toward_t": v, **R.baselines(v, torch.randn(model.args.dim, dtype=torch.float64))}
    res = R.emission_sweep(model, prompts, vecs, last, [0.0, 200.0], {"t": t}, max_new_tokens=6)
    rows = res["series"]["toward_t"]
    assert rows[1]["rate"] == 1.0 and rows[0]["rate"] < 1.0
    assert set(res["series"]) == {"toward_t", "random", "mean_activation", R.SCALE}
    assert all(res["series"][n][0] == rows[0] for n in res["series"])  # magnitude 0: all unsteered
    R.save_sweep(res, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["series"]["toward_t"][1]["rate"] == 1.0
    pytest.importorskip("matplotlib")
    R.plot_sweep(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_vector_files_load_into_steering_and_hybrid(model, hf, tmp_path):
    v = torch.randn(model.args.dim, dtype=torch.float64)
    R.save_vector(tmp_path / "v.safetensors", v, model="tiny", layer=2, point="input", method="test")
    got, meta = R.load_vector(tmp_path / "v.safetensors")
    assert torch.equal(got, v.float()) and meta["layer"] == 2 and meta["norm"] == pytest.approx(float(v.norm()), rel=1e-6)
    st = R.load_steering(tmp_path / "v.safetensors", coef=2.0)
    assert st.layer == 1  # the input of layer 2 is the output of layer 1
    p = random_prompts([5])
    assert model.generate(p, 6, steering=st) == model.generate(p, 6, steering=sf.Steering(v.float(), 1, 2.0))
    with pytest.raises(sf.errors.InvalidInputError):
        R.steering_layer(0, "input")
    R.save_vector_set(tmp_path / "set.safetensors", {"a": v, "b": -v}, bias=v / 2, layer=1, point="output")
    kw = R.hybrid_vectors(tmp_path / "set.safetensors")
    assert kw["vectors"].shape == (2, model.args.dim) and kw["steer_layer"] == 1
    # trained at the input of layer 2: the authors' hybrid steers the output of layer 2 (default);
    # "exact" steers where the vector was measured, the output of layer 1
    layer = int(torch.randint(1, model.args.n_layers, ()))
    R.save_vector_set(tmp_path / "in.safetensors", {"a": v}, layer=layer, point="input")
    assert R.hybrid_vectors(tmp_path / "in.safetensors")["steer_layer"] == layer
    assert R.hybrid_vectors(tmp_path / "in.safetensors", layer_convention="exact")["steer_layer"] == layer - 1
    with pytest.raises(sf.errors.InvalidInputError):
        R.hybrid_vectors(tmp_path / "in.safetensors", layer_convention="hf")
    d = model.args.dim
    sae = sf.TopKSAE(torch.randn(d, 2), torch.zeros(2), torch.randn(2, d), torch.zeros(d), k=1)
    sf.Hybrid(model, sf.load_model(hf, device="cpu", dtype=torch.float64), sae, sae_layer=0, coefs=[1.0],
              windows=[-1], **kw)
    assert R.load_vectors([tmp_path / "set.safetensors"]).keys() == {"a", "b"}


def test_sentences_spans_and_labeller():
    tok = tiny_tokenizer()
    text = "Let me check w1 w2.  Wait, w3 w4?\nSo w5"
    sents = R.split_sentences(text)
    assert [text[a:b] for a, b in sents] == ["Let me check w1 w2.", "Wait, w3 w4?", "So w5"]
    rec = R.parse_record({"text": text}, tok, labeller=lambda ss: ["back" if s.startswith("Wait") else None for s in ss])
    assert [(s.start, s.end, s.label) for s in rec.spans] == [(0, 6, None), (6, 11, "back"), (11, 13, None)]
    assert tok.decode(rec.ids[6:12]).startswith("Wait")
    rec2 = R.parse_record({"text": text, "spans": [{"start": 21, "end": 26, "label": "w"}]}, tok)
    assert [(s.start, s.end, s.text) for s in rec2.spans] == [(6, 8, "Wait,")]
    with pytest.raises(sf.errors.InvalidInputError):
        R.parse_record({"ids": [1, 2, 3], "spans": [[2, 9, "x"]]})


# ---------------------------------------------------------------------- CLI
def test_cli_end_to_end(tmp_path):
    from steerfast.cli import main

    torch.manual_seed(2)
    mdir = tmp_path / "model"
    tiny_hf(layers=2, dtype=torch.float32).save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(0, 80, (n,)))  # noqa: E731
    traces = [f"{words(5)}. Wait, {words(4)}. So {words(6)}. But {words(3)}." for _ in range(6)]
    (tmp_path / "traces.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in traces))
    (tmp_path / "ex.jsonl").write_text("\n".join(json.dumps({"prefix": words(4), "target": "Wait , " + words(2),
                                                             "label": "backtracking"}) for _ in range(6)))
    M = ["--model", str(mdir)]
    lab = "test_research:label_sentences"  # pytest imports this file as test_research
    assert main(["research", "split", "--input", str(tmp_path / "traces.jsonl"), "--out", str(tmp_path / "ids.jsonl"),
                 "--tokenizer", str(mdir), "--labeller", lab]) == 0
    assert main(["research", "activations", *M, "--input", str(tmp_path / "ids.jsonl"), "--layer", "1",
                 "--out", str(tmp_path / "acts"), "--shard-size", "4"]) == 0
    assert R.load_activations(tmp_path / "acts").acts.shape == (24, 64)
    assert main(["research", "diff-means", *M, "--input", str(tmp_path / "ids.jsonl"), "--layer", "1",
                 "--label", "backtracking", "--offset", "-3", "--width", "2", "--out", str(tmp_path / "w.safetensors")]) == 0
    assert main(["research", "diff-means", *M, "--input", str(tmp_path / "ids.jsonl"), "--layer", "1",
                 "--method", "venhoff", "--out", str(tmp_path / "v.safetensors")]) == 0
    assert R.load_vector(tmp_path / "v.safetensors")[1]["names"] == ["backtracking", "other"]
    assert main(["research", "optimize", *M, "--input", str(tmp_path / "ex.jsonl"), "--layer", "1", "--epochs", "2",
                 "--traces", str(tmp_path / "ex.jsonl"), "--out", str(tmp_path / "o.safetensors")]) == 0
    assert "bias" in R.load_vector(tmp_path / "o.safetensors")[1]
    assert main(["research", "sae", "--activations", str(tmp_path / "acts"), "--n-latents", "5", "--k", "2",
                 "--out", str(tmp_path / "sae")]) == 0
    tax = json.loads((tmp_path / "sae" / "taxonomy.json").read_text())
    assert tax[0]["n_latents"] == 5 and sum(c["size"] for c in tax[0]["categories"]) == 24
    assert any("Wait" in e for c in tax[0]["categories"] for e in c["examples"])  # sentences, not indices
    assert main(["research", "logit-lens", *M, "--vector", str(tmp_path / "w.safetensors"), "--top", "3"]) == 0
    assert main(["research", "sweep", *M, "--vector", str(tmp_path / "w.safetensors"), "--prompts",
                 str(tmp_path / "ids.jsonl"), "--magnitudes", "0,8", "--tokens", " Wait", " But",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "sweep")]) == 0
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(sweep["series"]) == {"backtracking", "random", "mean_activation", R.SCALE}


def label_sentences(sentences):
    """The CLI test's labeller (--labeller test_research:label_sentences)."""
    return ["backtracking" if s.startswith("Wait") else "other" for s in sentences]
