"""The README's examples run as written: each ```python block runs on tiny checkpoints (its paths
point at them, "cuda" at the CPU, lengths shrink to a few tokens), and each `steerfast ...` command
of its ```bash blocks parses with the real command line.

A block may use names the README leaves to the reader (`prompts`, `vector`, `tokenizer`, ...):
CONTEXT supplies them. A new block with a new free name or path fails here saying which, so that
the README and this table move together.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

import steerfast as sf
from tiny_models import tiny_hf
from tiny_tokenizer import char_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
D, N_LATENTS, LAYERS = 64, 48, 12  # the README's examples steer layer 10 and read SAE layer 4
VOCAB = 151936  # Qwen2.5's: the README's literal token ids (151644, ...) must be in range

# absolute paths in the README -> files of the tiny fixture (relative ones are files in its cwd)
PATHS = {
    "/path/to/Qwen2.5-1.5B": "model",
    "/models/Qwen2.5-Math-1.5B": "model",
    "/models/DeepSeek-R1-Distill-Qwen-1.5B": "model",
    "/sae/taxonomy.safetensors": "taxonomy.safetensors",
}
# what runs instead of the README's text: the CPU for the GPU, a few tokens for thousands
SUBSTITUTIONS = [
    (re.compile(r"""device=(["'])cuda(:\d+)?\1"""), 'device="cpu"'),
    (re.compile(r"max_new_tokens=\d+"), "max_new_tokens=4"),
]


def blocks(lang: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```lang block."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)]


def as_run_here(code: str, root: Path) -> str:
    for path in re.findall(r"""["'](/[^"'\s]+)["']""", code):
        if path not in PATHS:
            pytest.fail(f"README uses the path {path!r}: map it to a tiny fixture in PATHS (tests/test_readme.py)")
        code = code.replace(path, str(root / PATHS[path]))
    for pattern, repl in SUBSTITUTIONS:
        code = pattern.sub(repl, code)
    return code


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The tiny checkpoint, SAE and vector files the examples read."""
    from steerfast import research

    root = tmp_path_factory.mktemp("readme")
    tiny_hf("qwen2", layers=LAYERS, vocab=VOCAB, tied=True, dtype=torch.float32).save_pretrained(root / "model")
    d = D
    sf.TopKSAE(torch.randn(d, 6), torch.randn(6), torch.randn(6, d), torch.randn(d), k=1).save(
        root / "taxonomy.safetensors")
    research.save_vector(root / "bt.safetensors", torch.randn(d), model="tiny", layer=10, point="output",
                         method="diff_of_means_window", name="backtracking")
    research.save_vector_set(root / "vecs.safetensors", {f"c{i}": torch.randn(d) for i in range(6)},
                             bias=torch.randn(d), model="tiny", layer=10, point="output", method="optimized")
    return root


@pytest.fixture(scope="module")
def context(root):
    """The names the README's blocks take as given, in the tiny models' sizes."""
    m = sf.load_model(root / "model", device="cpu", dtype=torch.float32)
    think = sf.load_model(root / "model", device="cpu", dtype=torch.float32)  # its own KV cache
    tok = char_tokenizer(512)
    prompts = [torch.randint(0, 512, (int(n),)).tolist() for n in torch.randint(2, 9, (2,))]
    return dict(
        torch=torch, sf=sf, m=m, base=m, think=think, tokenizer=tok, prompts=prompts,
        base_prompts=prompts, thinking_prompts=[p[::-1] for p in prompts],
        vector=torch.randn(D), vectors=torch.randn(6, D), bias=torch.randn(D),
        sae=sf.TopKSAE.load(root / "taxonomy.safetensors"), x=torch.randn(5, D),
        W_enc=torch.randn(D, N_LATENTS), b_enc=torch.randn(N_LATENTS), W_dec=torch.randn(N_LATENTS, D),
        b_dec=torch.randn(D),
    )


PYTHON = blocks("python")


def test_the_readme_has_python_examples():
    assert len(PYTHON) >= 3, "the README's Use, Hybrid and SAE examples"


@pytest.mark.parametrize("line, code", PYTHON, ids=[f"README.md:{line}" for line, _ in PYTHON])
def test_python_block_runs(line, code, root, context, monkeypatch):
    monkeypatch.chdir(root)
    monkeypatch.setenv("STEERFAST_BACKEND", "torch")  # the examples, not the kernels (tests/test_ops.py)
    namespace = dict(context)
    try:
        exec(compile(as_run_here(code, root), f"README.md:{line}", "exec"), namespace)
    except NameError as e:
        pytest.fail(f"README.md:{line}: {e}: give it a value in CONTEXT (tests/test_readme.py)")
    new = {k: v for k, v in namespace.items() if k not in context or v is not context[k]}
    assert new, "the block defined nothing"
    for name in ("out", "res"):  # what generation examples produce: new tokens per prompt
        if name in new:
            tokens = new[name] if name == "out" else new[name].tokens
            assert len(tokens) == len(context["prompts"]) and all(1 <= len(t) <= 4 for t in tokens), (name, tokens)


def _commands() -> list[tuple[int, str]]:
    out = []
    for line, code in blocks("bash"):
        for i, text in enumerate(code.replace("\\\n", " ").splitlines()):
            for part in text.split("&&"):
                part = part.split("  #")[0].strip()
                if part.startswith("steerfast "):
                    out.append((line + i, part))
    return out


COMMANDS = _commands()


@pytest.mark.parametrize("line, command", COMMANDS, ids=[f"README.md:{line}" for line, _ in COMMANDS])
def test_steerfast_command_parses(line, command):
    from steerfast.cli import build_parser

    argv = shlex.split(command)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"README.md:{line}: `{command}` does not parse (exit {e.code})")
    assert callable(args.fn)
