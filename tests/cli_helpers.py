"""What the subprocess CLI tests share: the environment a user has, the entry point, and the rule
that a bad flag or failure is exactly one `<prog>: error:` line, exit 2, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the CLI as users run it: no Triton interpreter (on a CPU the torch kernels run), no debug tracebacks
ENV = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "STEERFAST_QUIET")} | dict(
    STEERFAST_DEBUG="0", OMP_NUM_THREADS="1")


def run_cli(*args, cwd=ROOT, exe=None, env=None, **kw) -> subprocess.CompletedProcess:
    cmd = [exe] if exe else [sys.executable, "-m", "steerfast"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env or ENV,
                          timeout=300, **kw)


def assert_one_error_line(r: subprocess.CompletedProcess, *names: str, prog: str = "steerfast"):
    """Exit 2, no traceback, exactly one `error:` line, of the failing command, naming `names`."""
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith(f"{prog}: error: "), errors[0]
    for name in names:
        assert name in errors[0], (name, errors[0])
    assert r.returncode == 2, (r.returncode, r.stderr)
