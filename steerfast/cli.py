"""`steerfast` command line: `steerfast generate` loads (or makes) a model, generates (as text with
a tokenizer, streamed for one prompt) and prints tokens/s; `eval` and `research` live beside their code.

A bad flag value, a missing file, an error steerfast raises on purpose or Ctrl-C ends in one
`steerfast <command>: error: ...` line on stderr (exit 2; 130 for Ctrl-C), not a traceback;
STEERFAST_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from contextlib import contextmanager

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# subcommand -> (module with add_arguments(parser) and run(args) -> exit code, help)
SUBCOMMANDS = {
    "eval": ("steerfast.evaluate.cli", "GSM8K / MATH500 accuracy of base, thinking and hybrid runs"),
    "research": ("steerfast.research.cli", "activations, steering vectors, SAE taxonomy, logit lens"),
    "tune": ("steerfast.tuning", "time the decode step's kernel configs on this GPU and keep the fastest"),
    "demo": ("steerfast.demo.cli", "a miniature of the paper: trains a base/thinking pair, steers it, evaluates "
                                   "base, thinking and hybrid"),
}
DEBUG_ENV = "STEERFAST_DEBUG"
EXIT_BAD_INPUT, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(Exception):
    """A flag value found bad after parsing (it needs the model, or several flags together);
    the message starts with the flag."""


# ---------------------------------------------------------------------- flag value types
def _typed(name: str, parse):
    """An argparse type whose failures read `argument --flag: <why>` (not "invalid <func> value")."""
    def convert(text: str):
        try:
            return parse(text)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e) or f"invalid {name}: {text!r}") from None
    convert.__name__ = name
    return convert


def _int_at_least(low: int):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise ValueError(f"must be >= {low}, got {value}")
        return value
    return _typed(f"int >= {low}", parse)


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {text!r}")
    return value


def _temperature(text):
    value = _finite_float(text)
    if value < 0:
        raise ValueError(f"must be >= 0 (0: greedy), got {value}")
    return value


def _probability(text):
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def _token_ids(text):
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():  # also refuses "-1" and "" (a doubled or trailing comma)
            raise ValueError(f"expected comma-separated token ids (ints >= 0), got {part!r} in {text!r}")
        ids.append(int(part))
    return ids


def check_device(spec: str) -> None:
    """`--device` for every subcommand: a device this torch can run on, said before any work."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r}: not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UsageError(f"--device {spec}: this torch ({torch.__version__}, {built}) sees no CUDA GPU; "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec}: steerfast runs on cpu or cuda")


@contextmanager
def flag_context(flag: str):
    """Errors raised while acting on `flag`'s value are reported as that flag's."""
    from .errors import SteerfastError

    try:
        yield
    except (SteerfastError, OSError, ValueError) as e:
        raise UsageError(f"{flag}: {_one_line(e)}") from e


# ---------------------------------------------------------------------- generate
class _Stream:
    """Prints one sequence as it is generated: text through the tokenizer (held back while the
    newest token ends inside a multi-byte character), else ids; nothing after its stop token."""

    def __init__(self, tokenizer, stops: set[int], out=None):
        self.tokenizer, self.stops, self.out = tokenizer, stops, out or sys.stdout
        self.ids: list[int] = []
        self.shown, self.done = "", False

    def __call__(self, step: int, tokens: list[int]) -> None:
        if self.done:  # a finished row stands still; its repeats are not output
            return
        token = tokens[0]
        self.ids.append(token)
        self.done = token in self.stops
        if self.tokenizer is None:
            self.out.write(("" if len(self.ids) == 1 else " ") + str(token))
        else:
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd") and not self.done:
                return
            keep = os.path.commonprefix([text, self.shown])  # decoding may revise the tail it showed
            self.out.write(text[len(keep):] if len(keep) == len(self.shown) else "\n" + text)
            self.shown = text
        self.out.flush()


def _load_tokenizer(path: str, required: bool):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises ValueError, OSError, or its own types here
        if not required:
            return None  # --model's directory without tokenizer files: token ids only
        if not os.path.isdir(path):
            raise UsageError(f"--tokenizer {path}: no such directory") from None
        raise UsageError(f"--tokenizer {path}: no tokenizer could be loaded from it ({_one_line(e)})") from None


def _generate(args) -> int:
    import steerfast as sf
    from steerfast.presets import SHAPES, random_model

    from .progress import bar, enabled

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    sampling = args.temperature > 0
    if not sampling and (args.top_k is not None or args.top_p is not None):
        raise UsageError("--top-k / --top-p filter sampling: they need --temperature > 0 (0 is greedy)")
    # an explicit --tokenizer is checked before minutes of model building; --model's own is optional
    # everything that can be checked without the model first: building or loading one takes minutes
    tokenizer = (_load_tokenizer(args.tokenizer, required=True) if args.tokenizer else
                 _load_tokenizer(args.model, required=False) if args.model else None)
    if args.prompt is not None:
        if tokenizer is None:
            where = f"--model {args.model} holds none" if args.model else "none was given"
            raise UsageError(f"--prompt needs a tokenizer ({where}): pass --tokenizer DIR, or use --prompt-ids")
        prompt, source = tokenizer(args.prompt)["input_ids"], "--prompt (tokenized)"
    else:
        prompt, source = args.prompt_ids or list(range(1, 9)), "--prompt-ids"
    if not prompt:
        raise UsageError(f"{source}: the prompt has no tokens")
    vocab = None if args.model else SHAPES[args.random]["vocab_size"]
    if vocab is not None and max(prompt) >= vocab:
        raise UsageError(f"{source}: token id {max(prompt)} is outside the {args.random} preset's vocabulary [0, {vocab})")
    if len(prompt) + args.max_new_tokens > args.max_seq_len:
        raise UsageError(f"--max-seq-len {args.max_seq_len} is too short: the prompt's {len(prompt)} tokens and "
                         f"--max-new-tokens {args.max_new_tokens} need {len(prompt) + args.max_new_tokens}")
    if args.model:
        with flag_context("--model"):  # the loader's messages name the path
            m = sf.load_model(args.model, device=device, dtype=dtype, max_seq_len=args.max_seq_len)
    else:
        m = random_model(args.random, device, dtype, max_seq_len=args.max_seq_len)  # made in place: no HF copy
    vocab = m.args.vocab_size
    if max(prompt) >= vocab:
        raise UsageError(f"{source}: token id {max(prompt)} is outside this model's vocabulary [0, {vocab})")
    prompts = [prompt] * args.batch
    m.check_prompts(prompts, args.max_new_tokens)  # with the user's numbers, before the warm-up's own
    stops = set(m.args.eos_token_ids) if args.stop_at_eos else set()
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed, eos_token_id="default" if args.stop_at_eos else None)
    m.generate(prompts, **{**kw, "max_new_tokens": min(4, args.max_new_tokens)})  # warm-up: graphs, Triton

    stream = _Stream(tokenizer, stops) if args.batch == 1 and not args.quiet else None
    shown = bar(total=args.max_new_tokens, desc="generating", unit="step") if stream is None and enabled() else None
    callback = stream if stream is not None else None if shown is None else (lambda step, tokens: shown.update(1))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = m.generate(prompts, **kw, callback=callback)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if shown is not None:
        shown.close()
    if stream is not None:
        print(flush=True)
    else:
        for i, o in enumerate(out[: args.show]):
            print(f"[{i}] " + (tokenizer.decode(o) if tokenizer else " ".join(map(str, o))))
    n = sum(len(o) for o in out)
    note = " (each step waited for the GPU to stream; --quiet for the undisturbed rate)" if (
        callback is not None and device.startswith("cuda")) else ""
    print(f"{n} tokens in {dt:.3f} s: {n / dt:.1f} tokens/s (batch {args.batch}, {dtype}, {device}){note}")
    return 0


def _add_generate(sub) -> None:
    from .presets import SHAPES

    g = sub.add_parser("generate", help="generate from a model and print tokens/s",
                       description="Generate from a local checkpoint or a random model of a preset shape; print the "
                                   "output (text with a tokenizer, streamed for --batch 1) and tokens/s.")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", help="local Hugging Face model directory (config.json + safetensors)")
    src.add_argument("--random", default="small", choices=sorted(SHAPES), metavar="PRESET",
                     help=f"random weights of a preset shape, one of {', '.join(sorted(SHAPES))} (default small)")
    g.add_argument("--tokenizer", metavar="DIR", help="local tokenizer directory: text prompts and text output "
                                                      "(default: --model's directory, when it holds one)")
    g.add_argument("--prompt", help="text prompt (needs a tokenizer)")
    g.add_argument("--prompt-ids", type=_typed("token ids", _token_ids), metavar="IDS", help="comma-separated token ids (default 1..8)")
    g.add_argument("--batch", type=_int_at_least(1), default=1, help="copies of the prompt generated together")
    g.add_argument("--max-new-tokens", type=_int_at_least(1), default=64)
    g.add_argument("--max-seq-len", type=_int_at_least(2), default=4096, help="prompt + new tokens (KV cache size)")
    g.add_argument("--temperature", type=_typed("temperature", _temperature), default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=_int_at_least(1), help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=_typed("probability", _probability), help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--seed", type=_int_at_least(0), default=0)
    g.add_argument("--stop-at-eos", action="store_true", help="stop at the checkpoint's EOS ids")
    g.add_argument("--device", help="cpu or cuda[:n] (default cuda when available)")
    g.add_argument("--dtype", choices=sorted(DTYPES))
    g.add_argument("--show", type=_int_at_least(0), help="print only the first N sequences (default all)")
    g.add_argument("--quiet", action="store_true", help="no progress bars and no streaming: results at the end")
    g.set_defaults(fn=_generate)


# ---------------------------------------------------------------------- the error layer
def _one_line(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]  # str(KeyError) would quote it
    elif isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What bad input, a bad environment or a missing file raise: reported in one line, exit 2."""
    from .errors import SteerfastError

    return (UsageError, SteerfastError, ValueError, LookupError, OSError, ImportError, torch.OutOfMemoryError)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag told in one line (and where the full usage is), not a usage block."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")


def _name_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)parser records its prog, so the error line says which command failed; each command
    that runs (a parser without subcommands) takes --quiet, which main() turns into STEERFAST_QUIET."""
    parser.set_defaults(prog_=parser.prog)
    children = [child for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                for child in action.choices.values()]
    for child in children:
        _name_parsers(child)
    if not children and parser.prog != "steerfast" and "--quiet" not in parser._option_string_actions:
        parser.add_argument("--quiet", action="store_true", help="no progress bars (steerfast.progress)")


def _cwd_importable() -> None:
    """`research ... --labeller mylabels:label` imports from the current directory, as `python -m`
    would. Appended, not prepended: a stray file there cannot shadow a library steerfast imports."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="steerfast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"steerfast {__version__} (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{generate,eval,research,tune,demo}")
    _add_generate(sub)
    for name, (module, help_) in SUBCOMMANDS.items():  # each lives beside the code it drives
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # not installed in this build; anything else is a real error
            if not (module == e.name or module.startswith(f"{e.name}.")):
                raise
            continue
        sp = sub.add_parser(name, help=help_)
        mod.add_arguments(sp)
        sp.set_defaults(fn=mod.run)
    _name_parsers(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # a bad flag: usage and one "error:" line, exit 2
    prog, debug = args.prog_, os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    try:
        if getattr(args, "device", None):
            check_device(args.device)
        if getattr(args, "quiet", False):
            os.environ["STEERFAST_QUIET"] = "1"  # steerfast.progress: every bar, in every module
            if hasattr(args, "no_progress"):  # eval's own switch for its bar
                args.no_progress = True
        if args.cmd == "research":
            _cwd_importable()
        return args.fn(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _expected_errors() as e:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # a bug: still one line, with the way to the traceback
        if debug:
            raise
        print(f"{prog}: error: internal error, {type(e).__name__}: {_one_line(e)} (rerun with {DEBUG_ENV}=1 for the "
              "traceback, and please report it)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
