"""Reinstalling without the CUDA extension (STEERFAST_NO_CUDA=1) as an editable install removes
the steerfast/_C*.so an earlier install left in the source tree, and nothing else."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_repo_root_never_shadows_an_installed_kernels_package(tmp_path):
    """From the repo root (where `python -m pytest` and `python -m bench` put it first on sys.path)
    `import kernels` is Hugging Face's installed package, which transformers imports, never our
    kernels/ folder; and bare `pytest` finds bench/ as `python -m pytest` does."""
    try:  # installed or not, asked of the installed distributions, not of a sys.path holding the repo
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (`pip install -e .[test]` installs it)")
    pytest_bin = Path(sys.executable).with_name("pytest")
    if not pytest_bin.exists():
        pytest.skip(f"no pytest script beside {sys.executable}")
    code = "import kernels, transformers.modeling_utils; print(kernels.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not Path(r.stdout.strip()).is_relative_to(ROOT), f"kernels imported from the repo: {r.stdout}"
    probe = tmp_path / "test_probe.py"
    probe.write_text("import pathlib\n\ndef test_imports():\n    import bench.common, kernels, steerfast.kernels.steer_add\n"
                     f"    assert not pathlib.Path(kernels.__file__).is_relative_to({str(ROOT)!r}), kernels.__file__\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    r = subprocess.run([str(pytest_bin), "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--rootdir", str(ROOT),
                        "-c", str(ROOT / "pyproject.toml"), str(probe)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
