"""`steerfast eval`: GSM8K / MATH500 accuracy of the base model, the thinking model and the hybrid,
with the gap the hybrid recovers. Resumable (rerun the same command); several GPUs with
`torchrun --nproc_per_node N -m steerfast eval ...`.

    steerfast eval --data math500/test.jsonl --out runs/math500 --paper-config qwen2.5-math-1.5b \\
        --base-model Qwen2.5-Math-1.5B --thinking-model DeepSeek-R1-Distill-Qwen-1.5B \\
        --sae sae.safetensors --vectors vectors.safetensors

The hybrid searches the paper's grid by default: coefficients 0.1 ... 1.0 x windows 0, -1, -15,
-50, -100. `--windows -1` is the fast option (each step wholly on the device).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import paper_configs
from ..errors import InvalidInputError

DTYPES = ("bf16", "fp16", "fp32", "fp64")  # fp64: exact references and tests
PAPER_COEFS = ",".join(f"{c:g}" for c in paper_configs.PAPER_COEFS)
PAPER_WINDOWS = ",".join(str(w) for w in paper_configs.PAPER_WINDOWS)
DEFAULT_MAX_NEW_TOKENS = 2000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group("problems")
    g.add_argument("--data", required=True, help="local GSM8K / MATH500 file: .jsonl, .json or .parquet "
                                                 "(Hugging Face layouts), or a directory holding one")
    g.add_argument("--dataset", choices=["gsm8k", "math500", "math"], help="default: told from the fields")
    g.add_argument("--start", type=int, default=0, help="first problem (row) to evaluate")
    g.add_argument("--limit", type=int, help="evaluate at most this many problems")
    g = p.add_argument_group("runs and output")
    g.add_argument("--runs", default="base,thinking,hybrid",
                   help="comma-separated, of base, thinking, hybrid (default: all three)")
    g.add_argument("--out", required=True, help="output directory; rerunning into it resumes")
    g.add_argument("--batch-size", type=int, default=8, help="problems generated together (per process)")
    g.add_argument("--max-new-tokens", type=int, help=f"default {DEFAULT_MAX_NEW_TOKENS} (or --paper-config's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")
    g.add_argument("--category-names", help="comma-separated names of the vectors' rows, for the table")
    g = p.add_argument_group("models (local Hugging Face directories)")
    g.add_argument("--base-model", help="base model directory (config.json + safetensors)")
    g.add_argument("--thinking-model", help="thinking model directory")
    g.add_argument("--base-tokenizer", help="default: --base-model")
    g.add_argument("--thinking-tokenizer", help="default: --thinking-model")
    g.add_argument("--device", help="default: cuda:<LOCAL_RANK> when CUDA is available, else cpu")
    g.add_argument("--dtype", choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--max-seq-len", type=int, help="cap on prompt + new tokens (sizes the KV cache)")
    g = p.add_argument_group("prompts")
    g.add_argument("--base-template", help="base prompt with {question} (or @file); default: the Task/Step by "
                                           "step answer prompt")
    g.add_argument("--thinking-template", help="user turn for the thinking model's chat template, with "
                                               "{question} (or @file)")
    g.add_argument("--no-stop-strings", action="store_true",
                   help="do not cut base-prompted completions at a following 'Question:' / 'Task:'")
    g = p.add_argument_group("hybrid")
    g.add_argument("--paper-config", choices=sorted(paper_configs.PAPER_CONFIGS), metavar="NAME",
                   help="a Table 1 pair of the paper (steerfast.paper_configs): its steer layer, SAE layer, grid "
                        "and max new tokens, unless given here; the SAE must have its number of categories. "
                        f"One of: {', '.join(paper_configs.PAPER_CONFIGS)}")
    g.add_argument("--sae", help="Top-K SAE on the thinking model (steerfast file, sparsify or SAELens dir)")
    g.add_argument("--sae-hookpoint", help="sub-directory of --sae for one hookpoint")
    g.add_argument("--vectors", help="safetensors file: 'vectors' [categories, d_base] and optional 'bias' [d_base]")
    g.add_argument("--sae-layer", type=int, help="thinking-model decoder layer the SAE reads (0-based)")
    g.add_argument("--steer-layer", type=int, help="base-model decoder layer whose output is steered (0-based)")
    g.add_argument("--coefs", nargs="+",
                   help=f"coefficient grid, comma- or space-separated (default the paper's {PAPER_COEFS})")
    g.add_argument("--windows", nargs="+",
                   help="window grid: -n the last n positions, 0 all; space-separated (--windows -1 -4 0) or "
                        f"--windows={PAPER_WINDOWS} (default the paper's {PAPER_WINDOWS}; -1 alone is the fast path)")
    g.add_argument("--gate", default="thinking", choices=["thinking", "controller"])
    g.add_argument("--threshold", type=float, default=float("-inf"), help="controller latent threshold")


def _template(value, default):
    if value is None:
        return default
    if value.startswith("@"):
        return Path(value[1:]).read_text(encoding="utf-8")
    return value


def _numbers(values, kind, name):
    items = [x.strip() for v in values for x in v.split(",") if x.strip()]
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise InvalidInputError(f"--{name} takes {kind.__name__}s, got {' '.join(values)!r}") from None


def _load_vectors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..errors import CheckpointError

    try:
        t = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"--vectors {path}: not a readable safetensors file ({e})") from None
    if "vectors" not in t:
        raise CheckpointError(f"--vectors {path}: no tensor named 'vectors' (has {sorted(t)}); expected "
                              "'vectors' [categories, d] and optionally 'bias' [d]")
    return t["vectors"], t.get("bias")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def check_tokenizer_dir(path, flag: str, model_flag: str | None = None) -> None:
    """Refuse, naming the flag, a tokenizer directory that is missing or holds no tokenizer file
    (transformers would say only a bare ValueError, after the models were loaded). model_flag: the
    directory came from that model flag, and the message says which tokenizer flag to pass."""
    d = Path(path)
    src = f"{model_flag} {d}" if model_flag else f"{flag} {d}"
    if not d.is_dir():
        raise InvalidInputError(f"{src}: {'not a directory' if d.exists() else 'does not exist'}")
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        hint = f": pass {flag} DIR (a directory holding them)" if model_flag else ""
        raise InvalidInputError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {src}{hint}")


def load_tokenizer(path, flag: str, model_flag: str | None = None):
    check_tokenizer_dir(path, flag, model_flag)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, TypeError, KeyError) as e:  # present but unreadable: say which flag
        raise InvalidInputError(f"{model_flag or flag} {path}: the tokenizer does not load "
                                f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                                ) from None


def apply_paper_config(args) -> paper_configs.HybridConfig | None:
    """Fill the hybrid settings not given on the command line: from --paper-config when named,
    else the paper's grid and 2000 new tokens. Returns the configuration used, if any."""
    cfg = paper_configs.hybrid_config(args.paper_config) if args.paper_config else None
    if cfg is not None:
        args.sae_layer = cfg.sae_layer if args.sae_layer is None else args.sae_layer
        args.steer_layer = cfg.steer_layer if args.steer_layer is None else args.steer_layer
    args.coefs = args.coefs or [",".join(f"{c:g}" for c in cfg.coefs) if cfg else PAPER_COEFS]
    args.windows = args.windows or [",".join(map(str, cfg.windows)) if cfg else PAPER_WINDOWS]
    if args.max_new_tokens is None:
        args.max_new_tokens = cfg.max_new_tokens if cfg else DEFAULT_MAX_NEW_TOKENS
    return cfg


def run(args) -> int:
    from . import lock
    from .run import init_distributed

    paper = apply_paper_config(args)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in ("base", "thinking", "hybrid")]
    if bad or not runs:
        raise InvalidInputError(f"--runs takes base, thinking, hybrid; got {args.runs!r}")
    need_base = "base" in runs or "hybrid" in runs
    need_think = "thinking" in runs or "hybrid" in runs
    missing = [f for f, ok in (("--base-model", not need_base or args.base_model),
                               ("--thinking-model", not need_think or args.thinking_model)) if not ok]
    if "hybrid" in runs:
        missing += [f for f, v in (("--sae", args.sae), ("--vectors", args.vectors), ("--sae-layer", args.sae_layer),
                                   ("--steer-layer", args.steer_layer)) if v is None]
    if missing:
        raise InvalidInputError(f"runs {','.join(runs)} need {', '.join(missing)}")
    # the tokenizers before anything heavy: a directory without them fails in a second, not after loading
    tok_src = []
    if need_base:
        tok_src.append((args.base_tokenizer or args.base_model, "--base-tokenizer",
                        None if args.base_tokenizer else "--base-model"))
    if need_think:
        tok_src.append((args.thinking_tokenizer or args.thinking_model, "--thinking-tokenizer",
                        None if args.thinking_tokenizer else "--thinking-model"))
    for src in tok_src:
        check_tokenizer_dir(*src)
    # --quiet (steerfast.cli) sets STEERFAST_QUIET; None: bars only on a terminal
    progress = False if (args.no_progress or getattr(args, "quiet", False)) else None

    rank, world, owned = init_distributed()
    try:
        # every run's shard locked before any model loads: a second eval into --out fails at once
        with lock.locked([Path(args.out) / r for r in runs], rank):
            return _run(args, runs, paper, need_base, need_think, progress, rank, world)
    finally:
        if owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, runs, paper, need_base, need_think, progress, rank, world) -> int:
    import torch

    import steerfast as sf

    from . import data
    from .run import BaseGenerator, HybridGenerator, ThinkingGenerator, evaluate
    from .summary import markdown, write_summary

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[dtype_name]
    problems = data.load_problems(args.data, args.dataset, args.limit, args.start)
    if not problems:
        raise InvalidInputError(f"no problems in --data {args.data} from row {args.start}")
    base_t = _template(args.base_template, data.BASE_TEMPLATE)
    think_t = _template(args.thinking_template, data.THINKING_TEMPLATE)
    stops = () if args.no_stop_strings else data.BASE_STOP_STRINGS

    def model(path):
        return sf.load_model(path, device=device, dtype=dtype, max_seq_len=args.max_seq_len)

    base = base_tok = think = think_tok = None
    if need_base:
        base_tok = load_tokenizer(args.base_tokenizer or args.base_model, "--base-tokenizer",
                                  None if args.base_tokenizer else "--base-model")
    if need_think:
        think_tok = load_tokenizer(args.thinking_tokenizer or args.thinking_model, "--thinking-tokenizer",
                                   None if args.thinking_tokenizer else "--thinking-model")
    if need_base:
        base = model(args.base_model)
    if need_think:
        think = model(args.thinking_model)
    info = dict(dtype=dtype_name)
    names = [n.strip() for n in args.category_names.split(",")] if args.category_names else None
    gens = []
    for r in runs:
        if r == "base":
            gens.append(BaseGenerator(base, base_tok, args.max_new_tokens, base_t, stops,
                                      info=dict(info, model=str(args.base_model))))
        elif r == "thinking":
            gens.append(ThinkingGenerator(think, think_tok, args.max_new_tokens, think_t,
                                          info=dict(info, model=str(args.thinking_model))))
        else:
            sae = sf.TopKSAE.load(args.sae, hookpoint=args.sae_hookpoint)
            vectors, bias = _load_vectors(args.vectors)
            if paper is not None and sae.n_latents != paper.n_categories:
                raise InvalidInputError(f"--paper-config {paper.name} has {paper.n_categories} categories but "
                                        f"--sae {args.sae} has {sae.n_latents} latents")
            h = sf.Hybrid(base, think, sae, vectors, bias, sae_layer=args.sae_layer, steer_layer=args.steer_layer,
                          coefs=_numbers(args.coefs, float, "coefs"), windows=_numbers(args.windows, int, "windows"),
                          gate=args.gate, threshold=args.threshold, tokenizers=(base_tok, think_tok))
            gens.append(HybridGenerator(h, base_tok, think_tok, args.max_new_tokens, base_t, think_t, stops,
                                        info=dict(info, base_model=str(args.base_model),
                                                  thinking_model=str(args.thinking_model), sae=str(args.sae),
                                                  vectors=str(args.vectors),
                                                  **({"paper_config": paper.name} if paper else {})),
                                        category_names=names))
    for g in gens:
        evaluate(problems, g, args.out, batch_size=args.batch_size, progress=progress, rank=rank, world=world)
    if rank == 0:
        summary = write_summary(args.out, problems, names)
        print(markdown(summary), end="")
        written = [Path(args.out) / f for f in ("summary.json", "summary.md", "summary.png")]
        print(f"results: {', '.join(str(f) for f in written if f.exists())}")
    return 0
