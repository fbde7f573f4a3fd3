"""Reinstalling without the CUDA extension (STEERFAST_NO_CUDA=1) as an editable install removes
the steerfast/_C*.so an earlier install left in the source tree, and nothing else."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LEFTOVERS = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache",
                                    ".benchmarks", "venv", ".venv", "out", "tests")


def _build_editable(src: Path, **env) -> subprocess.CompletedProcess:
    """What `pip install -e .` runs (PEP 660's build_editable), without installing the result."""
    code = "from setuptools import build_meta; print(build_meta.build_editable('dist'))"
    return subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_editable_reinstall_without_cuda_removes_the_stale_extension(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_LEFTOVERS)
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}-x86_64-linux-gnu"
    stale = [src / "steerfast" / f"_C.{tag}.so", src / "steerfast" / "_C.abi3.so"]
    kept = [src / "steerfast" / "other.so", src / "steerfast" / "research" / f"_C.{tag}.so", src / "_C.so"]
    for f in stale + kept:
        f.write_bytes(os.urandom(64))
    r = _build_editable(src, STEERFAST_NO_CUDA="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not [f for f in stale if f.exists()], "a stale steerfast/_C*.so would still import"
    assert all(f.exists() for f in kept), "only steerfast/_C*.so may be removed"
    assert "removed steerfast/_C" in r.stderr
