"""steerfast.progress: bars where someone watches (a terminal), silent in pipes, logs and under
STEERFAST_QUIET=1; model building and loading draw one."""
from __future__ import annotations

import sys

import torch

import steerfast as sf
from steerfast.presets import random_hf_model
from steerfast.progress import enabled
from tiny_models import tiny_hf


def as_terminal(monkeypatch):
    """stderr (capsys's stream: patch it in the test body, where capsys has installed it) posing
    as a terminal, with no quiet switch set."""
    monkeypatch.delenv("STEERFAST_QUIET", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


def test_on_for_a_terminal_off_for_a_pipe_or_quiet(capsys, monkeypatch):
    monkeypatch.delenv("STEERFAST_QUIET", raising=False)
    assert not enabled(), "pytest's captured stderr is no terminal"
    assert enabled(True) and not enabled(False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert enabled()
    for quiet, on in (("1", False), ("0", True), ("", True)):
        monkeypatch.setenv("STEERFAST_QUIET", quiet)
        assert enabled() is on
    assert enabled(True), "an explicit progress=True wins over the environment"


def test_building_a_random_model_shows_progress_on_a_terminal(capsys, monkeypatch):
    as_terminal(monkeypatch)
    random_hf_model("tiny", dtype=torch.float32)
    err = capsys.readouterr().err
    assert "random tiny" in err and "100%" in err
    monkeypatch.setenv("STEERFAST_QUIET", "1")
    random_hf_model("tiny", dtype=torch.float32)
    assert capsys.readouterr().err == ""


def test_loading_a_checkpoint_shows_progress_on_a_terminal(tmp_path, capsys, monkeypatch):
    as_terminal(monkeypatch)
    hf = tiny_hf("qwen2", layers=int(torch.randint(1, 4, ())), dtype=torch.float32)
    hf.save_pretrained(tmp_path)
    n_tensors = len(hf.state_dict()) - (1 if hf.config.tie_word_embeddings else 0)
    sf.load_model(tmp_path, device="cpu", dtype=torch.float32)
    err = capsys.readouterr().err
    assert f"loading {tmp_path.name}" in err and f"{n_tensors}/{n_tensors}" in err, err
    sf.load_model(hf, device="cpu", dtype=torch.float32)
    assert "loading Qwen2ForCausalLM" in capsys.readouterr().err
