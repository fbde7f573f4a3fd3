"""The command line as a newcomer meets it: a bad flag value or a failure ends in ONE
`steerfast <cmd>: error:` line naming the flag (exit 2), never a traceback; Ctrl-C exits 130;
generate prints text (streamed for one prompt) with a tokenizer; progress bars only on a terminal.

Error cases run the real entry point in a subprocess (each costs a torch import); output checks
run `main` in-process against the same model built in-process.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import steerfast as sf
from steerfast.cli import build_parser, main
from steerfast.presets import SHAPES, random_hf_model, random_model
from cli_helpers import ENV, assert_one_error_line, run_cli
from tiny_tokenizer import char_tokenizer

TINY_VOCAB = SHAPES["tiny"]["vocab_size"]
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    char_tokenizer(TINY_VOCAB).save_pretrained(path)
    return path


# ---------------------------------------------------------------------- bad values: one line, exit 2
no_cuda = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("flags, names", [
    (["--random", "huge"], ["--random", "huge", "tiny", "qwen2.5-1.5b"]),
    (["--batch", "0"], ["--batch", ">= 1"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--prompt-ids", "1,2,x"], ["--prompt-ids", "'x'"]),
    (["--device", no_cuda], ["--device", no_cuda]),
    # the user's numbers, not the 4-token warm-up's (the "max_new_tokens=4")
    (["--random", "tiny", "--max-seq-len", "4", "--max-new-tokens", "8"], ["--max-seq-len 4", "--max-new-tokens 8", "16"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("--") else None)
def test_generate_bad_flag_values(flags, names):
    assert_one_error_line(run_cli("generate", *flags), *names, prog="steerfast generate")


def test_more_bad_values_in_process(tmp_path, tok_dir, capsys, monkeypatch):
    """The same error layer, called in-process (cheaper than a subprocess per case)."""
    def one_line(argv, *names, prog="steerfast generate"):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
        assert all(n in err[0] for n in names), (names, err[0])

    bad_id = TINY_VOCAB + int(torch.randint(0, 100, ()))
    one_line(["generate", "--random", "tiny", "--prompt-ids", f"3,{bad_id}"], "--prompt-ids", str(bad_id),
             str(TINY_VOCAB))
    one_line(["generate", "--top-k", "5"], "--top-k", "--temperature")
    one_line(["generate", "--random", "tiny", "--prompt", "hello"], "--prompt", "--tokenizer")
    one_line(["generate", "--tokenizer", str(tmp_path / "none")], "--tokenizer", str(tmp_path / "none"))
    missing = tmp_path / "Qwen2.5-1.5B"
    one_line(["generate", "--model", str(missing)], "--model", str(missing), "does not exist")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "One. Two."}) + "\n")
    one_line(["research", "split", "--input", "t.jsonl", "--tokenizer", str(tok_dir), "--labeller", "nolabels:f",
              "--out", "o.jsonl"], "nolabels", prog="steerfast research split")


@pytest.fixture(scope="module")
def research_files(tmp_path_factory, tok_dir):
    """A sentence-mode activations directory, a vector file and a prompts file for the tiny preset."""
    from steerfast import research as R

    root = tmp_path_factory.mktemp("research")
    model = sf.load_model(random_hf_model("tiny", dtype=torch.float32), device="cpu", dtype=torch.float32)
    recs = [R.parse_record({"ids": torch.randint(5, TINY_VOCAB, (12,)).tolist(), "spans": [[0, 4, None], [4, 12, None]]})
            for _ in range(6)]
    R.extract_activations(model, recs, 1, root / "acts", mode="sentence", progress=False)
    R.save_vector(root / "v.safetensors", torch.randn(model.args.dim), model="random:tiny", layer=0, point="output",
                  method="test", name="backtracking")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps({"ids": r.ids[:6]}) for r in recs))
    return root


def test_research_failures_are_one_line(research_files, tok_dir):
    r = run_cli("research", "sae", "--activations", research_files / "acts", "--n-latents", "2", "--k", "3",
                "--out", research_files / "sae")
    assert_one_error_line(r, "k", "n_latents=2", prog="steerfast research sae")
    # the default tokens (" Wait", " But", " Hmm") are several characters, so several tokens here
    r = run_cli("research", "sweep", "--random", "tiny", "--tokenizer", tok_dir, "--vector",
                research_files / "v.safetensors", "--prompts", research_files / "prompts.jsonl",
                "--out", research_files / "sweep")
    assert_one_error_line(r, "single tokens", " Wait", prog="steerfast research sweep")


def test_research_split_imports_the_labeller_from_the_current_directory(tmp_path, tok_dir):
    exe = shutil.which("steerfast", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the steerfast console script is not installed beside this python")
    marker = f"label{int(torch.randint(0, 10**6, ()))}"
    (tmp_path / "mylabels.py").write_text(f"def label(sentences):\n    return [{marker!r} for _ in sentences]\n")
    (tmp_path / "traces.jsonl").write_text(json.dumps({"text": "First one. Then two. Wait, three."}) + "\n")
    r = run_cli("research", "split", "--input", "traces.jsonl", "--tokenizer", tok_dir, "--labeller",
                "mylabels:label", "--out", "spans.jsonl", cwd=tmp_path, exe=exe)
    assert r.returncode == 0, r.stderr
    spans = json.loads((tmp_path / "spans.jsonl").read_text().splitlines()[0])["spans"]
    assert len(spans) == 3 and all(marker in json.dumps(s) for s in spans)


# ---------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_in_eval_is_one_line_and_exit_130(tmp_path, tok_dir):
    random_hf_model("tiny", dtype=torch.float32).save_pretrained(tmp_path / "model")
    questions = [dict(question=f"What is {a} + {b}?", answer=f"#### {a + b}") for a, b in torch.randint(0, 50, (20, 2))
                 .tolist()]
    (tmp_path / "gsm8k.jsonl").write_text("\n".join(map(json.dumps, questions)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "steerfast", "eval", "--data", tmp_path / "gsm8k.jsonl", "--out", tmp_path / "out",
         "--runs", "base", "--base-model", tmp_path / "model", "--base-tokenizer", tok_dir, "--batch-size", "1",
         "--max-new-tokens", "1500", "--max-seq-len", "2048"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "out" / "base").is_dir():  # made inside main(): the run has begun
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "eval did not start"
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "steerfast eval: interrupted" in err
    assert proc.returncode == 130, (proc.returncode, err)


# ---------------------------------------------------------------------- output (in-process)
def test_a_bug_is_one_line_too_and_debug_shows_the_traceback(capsys, monkeypatch):
    import steerfast.cli as cli

    def fails(args):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(cli, "_generate", fails)
    monkeypatch.delenv("STEERFAST_DEBUG", raising=False)
    assert main(["generate"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["steerfast generate: error: internal error, RuntimeError: boom second line (rerun with "
                   "STEERFAST_DEBUG=1 for the traceback, and please report it)"]
    monkeypatch.setenv("STEERFAST_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["generate"])

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_generate", interrupted)
    monkeypatch.setenv("STEERFAST_DEBUG", "0")
    assert main(["generate"]) == 130 and "steerfast generate: interrupted" in capsys.readouterr().err


def test_every_command_takes_quiet():
    parser = build_parser()
    args = parser.parse_args(["research", "sae", "--activations", "a", "--out", "o", "--quiet"])
    assert args.quiet and args.prog_ == "steerfast research sae"
    assert parser.parse_args(["eval", "--data", "d", "--out", "o", "--quiet"]).quiet
    assert not parser.parse_args(["generate"]).quiet


def test_version_and_the_presets_in_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and f"steerfast {sf.__version__}" in capsys.readouterr().out
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert all(name in gen.format_help() for name in SHAPES)


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    """In-process runs check the CLI, not the kernels: no Triton interpreter (pytest's TRITON_INTERPRET=1)."""
    monkeypatch.setenv("STEERFAST_BACKEND", "torch")


@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny", "cpu", torch.float32, max_seq_len=4096)  # what `generate --random tiny` runs


def test_generate_streams_text_for_one_prompt(tiny, tok_dir, capsys, monkeypatch):
    monkeypatch.delenv("STEERFAST_QUIET", raising=False)
    tok = char_tokenizer(TINY_VOCAB)
    words = " ".join(f"w{int(i)}" for i in torch.randint(0, 100, (3,)))
    n = int(torch.randint(5, 20, ()))
    want = tok.decode(tiny.generate([tok(words)["input_ids"]], n, eos_token_id=None)[0])
    assert main(["generate", "--random", "tiny", "--tokenizer", str(tok_dir), "--prompt", words,
                 "--max-new-tokens", str(n), "--device", "cpu"]) == 0  # the fixture's device and dtype
    out = capsys.readouterr().out.splitlines()
    assert out[0] == want and "tokens/s" in out[1]


def test_generate_sampling_prints_every_row_as_text(tiny, tok_dir, capsys, monkeypatch):
    monkeypatch.setenv("STEERFAST_QUIET", "0")
    tok = char_tokenizer(TINY_VOCAB)
    batch, n, seed = int(torch.randint(3, 6, ())), 8, int(torch.randint(0, 1000, ()))
    ids = torch.randint(5, TINY_VOCAB, (6,)).tolist()
    want = tiny.generate([ids] * batch, n, temperature=0.9, top_k=20, top_p=0.8, seed=seed, eos_token_id=None)
    assert len({tuple(w) for w in want}) > 1, "sampled rows should differ"
    argv = ["generate", "--random", "tiny", "--tokenizer", str(tok_dir), "--prompt-ids", ",".join(map(str, ids)),
            "--batch", str(batch), "--max-new-tokens", str(n), "--temperature", "0.9", "--top-k", "20",
            "--top-p", "0.8", "--seed", str(seed), "--device", "cpu"]  # the fixture's device and dtype
    assert main(argv) == 0
    out = capsys.readouterr().out  # every row by default (a row's text may hold newlines)
    assert out.startswith("".join(f"[{i}] {tok.decode(w)}\n" for i, w in enumerate(want)))
    assert main(argv[:3] + argv[5:] + ["--show", "2", "--quiet"]) == 0  # no tokenizer: ids
    rows = capsys.readouterr().out.splitlines()
    assert rows[:2] == [f"[{i}] " + " ".join(map(str, w)) for i, w in enumerate(want[:2])]
    assert "tokens/s" in rows[2] and os.environ["STEERFAST_QUIET"] == "1"


def test_progress_bars_show_on_a_terminal_only():
    """Model building and generation draw bars when stderr is a terminal; --quiet silences them."""
    import fcntl
    import pty
    import struct
    import termios

    def stderr_on_a_terminal(*flags) -> str:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 wide
        proc = subprocess.Popen([sys.executable, "-m", "steerfast", "generate", "--random", "tiny", "--batch", "2",
                                 "--max-new-tokens", "8", *flags], stdout=subprocess.PIPE, stderr=slave, env=ENV)
        os.close(slave)
        chunks = []

        def drain():
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    return
                if not data:
                    return
                chunks.append(data)
        reader = threading.Thread(target=drain)
        reader.start()
        proc.wait(timeout=300)
        reader.join(timeout=10)
        os.close(master)
        assert proc.returncode == 0, b"".join(chunks)
        return b"".join(chunks).decode(errors="replace")

    shown = stderr_on_a_terminal()
    assert "random tiny" in shown and "generating" in shown and "100%" in shown


def test_quiet_silences_the_bars_on_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("STEERFAST_QUIET", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stream, posing as a terminal
    argv = ["generate", "--random", "tiny", "--batch", "2", "--max-new-tokens", "4"]
    assert main(argv) == 0
    assert "random tiny" in capsys.readouterr().err, "the bars must show on a terminal"
    monkeypatch.delenv("STEERFAST_QUIET", raising=False)
    assert main(argv + ["--quiet"]) == 0
    err = capsys.readouterr().err
    assert "random tiny" not in err and "generating" not in err, err


def test_stream_holds_split_characters_and_stops_at_the_stop_token():
    import io

    from steerfast.cli import _Stream

    class ByteTokenizer:  # token id = one UTF-8 byte, as byte-level BPE vocabularies have them
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "".join(chr(int(c)) for c in torch.randint(0xE0, 0x17F, (5,))) + "a"  # two-byte characters
    ids, stop = list(text.encode()), 0
    out = io.StringIO()
    stream = _Stream(ByteTokenizer(), {stop}, out)
    written = []
    for step, t in enumerate(ids + [stop, stop, stop]):  # a finished row repeats its last token
        stream(step, [t])
        written.append(out.getvalue())
    assert "\ufffd" not in "".join(written), "half a character must wait for its second byte"
    assert out.getvalue() == text + "\x00"
    ids_out = io.StringIO()
    plain = _Stream(None, {stop}, ids_out)
    for step, t in enumerate([5, 7, stop, stop]):
        plain(step, [t])
    assert ids_out.getvalue() == "5 7 0"
