"""`steerfast research <tool>`: the research workflow from the command line.

  split       text JSONL -> token-id JSONL with sentence spans (labelled by --labeller module:function)
  activations capture activations after/before a layer into resumable safetensors shards
  diff-means  a steering vector by difference of means (ward: window before span starts; venhoff: per label)
  optimize    optimised vectors (bias on whole traces, then one per label) by cross-entropy
  sae         Top-K SAE taxonomy over sentence-mean activations (grid over n_latents), with examples,
              and the grid figure (taxonomy_grid.png: scores per layer and cluster count, elbow marked)
  logit-lens  the tokens a vector promotes; with --out, chosen tokens' logits per layer (lens.json/png)
  sweep       emission rate of chosen tokens over a steering-magnitude sweep, vectors vs baselines
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _model_args(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face model directory (its tokenizer is used when present)")
    src.add_argument("--random", help="random weights of a preset shape (steerfast.presets), for trying things out")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model's)")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batch-size", type=int, default=16)


def _tokenizer(args):
    """--tokenizer's tokenizer (an error naming the flag if it does not load), else --model's when
    its directory has one, else None (token-id inputs only). Loaded before the model: cheap checks first."""
    from transformers import AutoTokenizer

    if args.tokenizer:
        return _load_tokenizer(args.tokenizer)
    if args.model:
        try:
            return AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        except Exception:  # a model directory without tokenizer files: token-id inputs only
            return None
    return None


def _load_tokenizer(path, flag: str = "--tokenizer"):
    """The tokenizer in `path`, or an error naming the flag and the directory (not transformers' bare one)."""
    from transformers import AutoTokenizer

    from ..errors import InvalidInputError
    if not Path(path).is_dir():
        raise InvalidInputError(f"{flag} {path}: {'not a directory' if Path(path).exists() else 'does not exist'}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, TypeError, KeyError) as e:
        raise InvalidInputError(f"{flag} {path}: no tokenizer loads from it (tokenizer.json / tokenizer_config.json "
                                f"missing or unreadable: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})"
                                ) from None


def _model(args):
    import steerfast as sf
    from steerfast.cli import DTYPES

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    if args.model:
        return sf.load_model(args.model, device=device, dtype=dtype)
    from steerfast.presets import random_hf_model
    return sf.load_model(random_hf_model(args.random, device=device, dtype=dtype), device=device, dtype=dtype)


def _load(args):
    tokenizer = _tokenizer(args)
    return _model(args), tokenizer, args.model or f"random:{args.random}"


def _callable(spec: str | None):
    """module:function -> the callable (a labeller of one trace's sentences, see
    steerfast.research.spans; or a taxonomy judge, see steerfast.research.sae_train)."""
    if not spec:
        return None
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="tool", required=True)

    p = sub.add_parser("split", help="text JSONL -> token-id JSONL with (labelled) sentence spans")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--labeller", help="module:function labelling one trace's sentences (list[str] -> list[label])")
    p.set_defaults(tool_fn=_split)

    p = sub.add_parser("activations", help="capture activations into resumable safetensors shards")
    _model_args(p)
    p.add_argument("--input", required=True, help="JSONL records (ids or text, with spans)")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--point", choices=["output", "input"], default="output")
    p.add_argument("--mode", choices=["sentence", "window", "all"], default="sentence")
    p.add_argument("--offset", type=int, default=-12)
    p.add_argument("--width", type=int, default=5)
    p.add_argument("--shard-size", type=int, default=256, help="records per shard")
    p.add_argument("--labeller")
    p.add_argument("--out", required=True)
    p.set_defaults(tool_fn=_activations)

    p = sub.add_parser("diff-means", help="difference-of-means steering vector(s)")
    _model_args(p)
    p.add_argument("--input", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--point", choices=["output", "input"], default="output")
    p.add_argument("--method", choices=["ward", "venhoff"], default="ward")
    p.add_argument("--label", help="ward: the label whose span starts count (default: every span)")
    p.add_argument("--offset", type=int, default=-12)
    p.add_argument("--width", type=int, default=5)
    p.add_argument("--out", required=True)
    p.set_defaults(tool_fn=_diff_means)

    p = sub.add_parser("optimize", help="optimised vectors: bias on traces, then one per label")
    _model_args(p)
    p.add_argument("--input", required=True, help="JSONL examples: prefix/target (text or _ids) and label")
    p.add_argument("--traces", help="JSONL whole traces (prefix/target) for the bias vector")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--point", choices=["output", "input"], default="output")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--eval-frac", type=float, default=0.2, help="held out for early stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(tool_fn=_optimize)

    p = sub.add_parser("sae", help="Top-K SAE taxonomy over sentence-mean activations")
    p.add_argument("--activations", required=True, nargs="+", help="directories from `activations --mode sentence`")
    p.add_argument("--n-latents", type=_ints, default=list(range(5, 55, 5)))
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--examples", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge", help="module:function scoring a taxonomy: judge(metric, categories) -> float, for "
                                   "completeness, independence, consistency (default: not judged)")
    p.add_argument("--out", required=True, help="directory: SAEs, taxonomy.json, taxonomy_grid.json/png")
    p.set_defaults(tool_fn=_sae)

    p = sub.add_parser("logit-lens", help="the tokens a vector promotes; per layer with --out")
    _model_args(p)
    p.add_argument("--vector", required=True, nargs="+", help="vector files, e.g. one per layer")
    p.add_argument("--name", help="which vector of a set")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--tokens", nargs="+", default=[" Wait", " But", " Hmm"], help="single-token strings (--out)")
    p.add_argument("--token-ids", type=_ints, help="token ids instead of --tokens")
    p.add_argument("--out", help="directory: lens.json and lens.png, the chosen tokens' logits at each "
                                 "vector's layer")
    p.set_defaults(tool_fn=_logit_lens)

    p = sub.add_parser("sweep", help="emission rate of chosen tokens over a magnitude sweep")
    _model_args(p)
    p.add_argument("--vector", required=True, nargs="+", help="vector files (every vector of a set is swept)")
    p.add_argument("--prompts", required=True, help="JSONL prompts (ids or text)")
    p.add_argument("--layer", type=int, help="default: the first vector's steering layer")
    p.add_argument("--magnitudes", type=_floats, default=[0, 2, 4, 8, 16])
    p.add_argument("--tokens", nargs="+", default=[" Wait", " But", " Hmm"], help="single-token strings")
    p.add_argument("--token-ids", type=_ints, help="token ids instead of --tokens")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory: sweep.json and sweep.png")
    p.set_defaults(tool_fn=_sweep)


def run(args) -> int:
    return args.tool_fn(args)


# ---------------------------------------------------------------------- tools
def _split(args) -> int:
    from .spans import read_jsonl, write_jsonl
    tok = _load_tokenizer(args.tokenizer)
    recs = read_jsonl(args.input, tok, _callable(args.labeller))
    write_jsonl(args.out, recs)
    print(f"{len(recs)} records, {sum(len(r.spans) for r in recs)} spans -> {args.out}")
    return 0


def _activations(args) -> int:
    from .activations import extract_activations
    from .spans import read_jsonl
    model, tok, name = _load(args)
    recs = read_jsonl(args.input, tok, _callable(args.labeller))
    out = extract_activations(model, recs, args.layer, args.out, mode=args.mode, point=args.point,
                              offset=args.offset, width=args.width, shard_size=args.shard_size,
                              batch_size=args.batch_size, model_name=name)
    print(f"activations of {len(recs)} records -> {out}")
    return 0


def _diff_means(args) -> int:
    from .spans import read_jsonl
    from .vectors import label_diff_of_means, save_vector, save_vector_set, window_diff_of_means
    model, tok, name = _load(args)
    recs = read_jsonl(args.input, tok)
    meta = dict(model=name, layer=args.layer, point=args.point)
    ids = [r.ids for r in recs]
    if args.method == "ward":
        starts = [[s.start for s in r.spans if args.label is None or s.label == args.label] for r in recs]
        v = window_diff_of_means(model, ids, starts, args.layer, args.offset, args.width, point=args.point,
                                 batch_size=args.batch_size)
        save_vector(args.out, v, method="diff_of_means_window", offset=args.offset, width=args.width,
                    name=args.label or "spans", **meta)
        print(f"vector (norm {float(v.norm()):.4g}) -> {args.out}")
    else:
        vs = label_diff_of_means(model, ids, [r.spans for r in recs], args.layer, point=args.point,
                                 batch_size=args.batch_size)
        save_vector_set(args.out, vs, method="diff_of_means_label", **meta)
        print(f"{len(vs)} vectors {sorted(vs)} -> {args.out}")
    return 0


def _split_eval(examples, frac, seed):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n = int(len(examples) * frac) if len(examples) >= 5 else 0
    return [examples[i] for i in order[n:]], [examples[i] for i in order[:n]] or None


def _optimize(args) -> int:
    from .optimize import train_vector
    from .spans import read_examples
    from .vectors import save_vector_set
    model, tok, name = _load(args)
    kw = dict(point=args.point, lr=args.lr, epochs=args.epochs, patience=args.patience, seed=args.seed,
              batch_size=args.batch_size)
    by_label: dict = {}
    for e in read_examples(args.input, tok):
        by_label.setdefault(e.label or "vector", []).append(e)
    bias, report = None, {}
    if args.traces:
        train, held = _split_eval(read_examples(args.traces, tok), args.eval_frac, args.seed)
        r = train_vector(model, train, args.layer, eval_examples=held, **kw)
        bias, report["bias"] = r.vector, dict(baseline=r.baseline_loss, best=r.best_loss)
    vectors = {}
    for label, exs in by_label.items():
        train, held = _split_eval(exs, args.eval_frac, args.seed)
        r = train_vector(model, train, args.layer, bias=bias, eval_examples=held, **kw)
        vectors[label], report[label] = r.vector, dict(baseline=r.baseline_loss, best=r.best_loss)
    save_vector_set(args.out, vectors, bias, model=name, layer=args.layer, point=args.point, method="optimized",
                    losses=report)
    print(json.dumps(report, indent=1))
    return 0


def _sae(args) -> int:
    from ..errors import InvalidInputError
    from .activations import load_activations
    from .figures import save_taxonomy_grid, taxonomy_grid
    from .sae_train import sae_grid, taxonomy
    if args.k < 1 or not args.n_latents or min(args.n_latents) < args.k:  # before any training
        raise InvalidInputError(f"--k {args.k} with --n-latents {','.join(map(str, args.n_latents)) or '(none)'}: "
                                f"k must be in [1, n_latents={min(args.n_latents, default=0)}] (each SAE keeps its "
                                "k largest latents); lower --k or raise --n-latents")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for d in args.activations:
        acts = load_activations(d)
        if acts.meta["mode"] != "sentence":
            raise InvalidInputError(f"--activations {d} holds mode {acts.meta['mode']!r} activations; the taxonomy "
                                    "uses sentence means (activations --mode sentence)")
        sentences = [t if t is not None else f"record {r} span {s}" for t, r, s in
                     zip(acts.texts, acts.record.tolist(), acts.span.tolist())]
        layer = acts.meta["layer"]
        for res in sae_grid({layer: acts.acts}, args.n_latents, args.k, sentences=sentences,
                            judge=_callable(args.judge), seed=args.seed):
            res.sae.metadata.update(model=acts.meta.get("model"), point=acts.meta["point"])
            path = out / f"sae_L{layer}_n{res.n_latents}.safetensors"
            res.sae.save(path)
            tax = taxonomy(res.sae, acts.acts, sentences, args.examples)
            summary.append(dict(layer=layer, n_latents=res.n_latents, path=str(path), scores=res.scores,
                                categories=tax))
            print(f"layer {layer} n={res.n_latents}: fvu {res.scores['fvu']:.4f}, {res.scores['used']} used -> {path}")
    (out / "taxonomy.json").write_text(json.dumps(summary, indent=1))
    grid = taxonomy_grid(summary)
    try:
        save_taxonomy_grid(grid, out / "taxonomy_grid.json", out / "taxonomy_grid.png")
    except ImportError as e:  # the JSON is written first; the plot is optional
        print(f"note: {e}; wrote {out / 'taxonomy_grid.json'} only", file=sys.stderr)
    print(f"elbow of FVU by layer: {grid['elbow']} -> {out / 'taxonomy_grid.png'}")
    return 0


def _chosen_tokens(args, tok, decode_ids: bool = False) -> dict:
    """{string: id} from --token-ids or --tokens; an error naming the flag when a string is not one
    token or there is no tokenizer to encode it. --token-ids are keyed by the id ("4"), or with
    decode_ids by their text when every one decodes to a distinct non-empty text (a plot's names)."""
    from ..errors import InvalidInputError
    from .analysis import token_ids_for
    if args.token_ids:
        texts = [tok.decode([t]) for t in args.token_ids] if decode_ids and tok is not None else []
        if texts and all(texts) and len(set(texts)) == len(texts):
            return dict(zip(texts, args.token_ids))
        return {str(t): t for t in args.token_ids}
    if tok is None:
        raise InvalidInputError("--tokens needs a tokenizer (--tokenizer, or one in --model's directory); "
                                "pass --token-ids instead")
    try:
        return token_ids_for(tok, args.tokens)
    except InvalidInputError as e:
        raise InvalidInputError(f"--tokens {' '.join(map(repr, args.tokens))}: {e}; pass single-token strings "
                                "with --tokens or ids with --token-ids") from None


def _logit_lens(args) -> int:
    from .analysis import logit_lens
    from .figures import logit_lens_by_layer, plot_logit_lens_by_layer
    from .analysis import token_label
    from .vectors import load_vector
    tok = _tokenizer(args)
    token_ids = _chosen_tokens(args, tok) if args.out else None  # a bad --tokens fails before the model loads
    model = _model(args)
    by_name: dict = {}  # name -> {layer: vector}
    for path in args.vector:
        v, meta = load_vector(path)
        if v.dim() == 2:
            names = meta.get("names", list(range(v.shape[0])))
            pick = names if args.name is None else [args.name]
            rows = {n: v[names.index(n)] for n in pick}
        else:
            rows = {meta.get("name", "vector"): v}
        for n, vec in rows.items():
            print(f"{n} (layer {meta.get('layer')}): " + ", ".join(
                f"{token_label(tok, t[0])} {t[-1]:.2f}" for t in logit_lens(model, vec, args.top)))
            by_name.setdefault(str(n), {})[int(meta.get("layer", -1))] = vec
    if not args.out:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lens = {n: logit_lens_by_layer(model, layers, token_ids) for n, layers in by_name.items()}
    (out / "lens.json").write_text(json.dumps(lens, indent=1))
    try:
        for i, (n, res) in enumerate(lens.items()):
            plot_logit_lens_by_layer(res, out / ("lens.png" if i == 0 else f"lens_{n}.png"),
                                     title=f"logit lens of {n!r} at each layer")
    except ImportError as e:
        print(f"note: {e}; wrote {out / 'lens.json'} only", file=sys.stderr)
    print(f"per-layer logit lens of {', '.join(lens)} -> {out / 'lens.json'}")
    return 0


def _sweep(args) -> int:
    from .activations import layer_activations
    from .analysis import baselines, emission_sweep, save_sweep, sweep_table
    from .spans import read_jsonl
    from .vectors import load_vector, load_vectors, steering_layer
    tok = _tokenizer(args)
    token_ids = _chosen_tokens(args, tok, decode_ids=True)  # a bad --tokens fails before the model loads
    vectors = load_vectors(args.vector, unique=True)  # two files' "backtracking" stay two rows
    _, meta = load_vector(args.vector[0])
    layer = args.layer if args.layer is not None else steering_layer(int(meta["layer"]), meta.get("point", "output"))
    prompts = [r.ids for r in read_jsonl(args.prompts, tok)]
    model = _model(args)
    sweep = dict(vectors)
    if not args.no_baselines:
        first = next(iter(vectors.values()))
        acts = [a.float().mean(0) for _, a in layer_activations(model, prompts, layer, batch_size=args.batch_size)]
        sweep.update(baselines(first, torch.stack(acts).mean(0), seed=args.seed))
    res = emission_sweep(model, prompts, sweep, layer, args.magnitudes, token_ids, max_new_tokens=args.max_new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        save_sweep(res, out / "sweep.json", out / "sweep.png")
    except ImportError as e:  # the JSON is written first; the plot is optional
        print(f"note: {e}; wrote {out / 'sweep.json'} only", file=sys.stderr)
    print(sweep_table(res), end="")
    return 0
