"""One writer per results shard: an exclusive `flock` on OUT/<run>/.lock-rank<r>, held while a
run appends to results_rank<r>.jsonl.

Two `steerfast eval` processes into the same directory would otherwise both append every problem
to the same shard. The lock is flock, not a pid file: the kernel drops it when its holder dies
(killed, crashed), so a stale lock file never blocks a later run; the pid written into the file
is only there to say who holds it. Each torchrun rank locks its own shard's file, so ranks of one
run never block each other, while a second run's rank r fails at once against the first's.

Within one process the locks are re-entrant (the CLI takes every run's lock before loading any
model, then `evaluate` takes the same lock again): a second flock on a new file description
would block against the process's own first one.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import SteerfastError

_HELD: dict[str, list] = {}  # lock path -> [open file, count] held by this process


class DirectoryLockedError(SteerfastError, RuntimeError):
    """Another live process is writing results into the same output directory."""


def lock_path(run_dir, rank: int = 0) -> Path:
    return Path(run_dir) / f".lock-rank{rank}"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def acquire(run_dir, rank: int = 0) -> str:
    """Take the lock of `run_dir`'s rank-`rank` shard (creating the directory), or raise
    DirectoryLockedError naming the directory and the holder's pid. Returns the key for `release`."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(run_dir, rank)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise DirectoryLockedError(
            f"{run_dir} is in use: {_holder(path)} is writing results there (lock {path.name}); wait for it to "
            "finish or use another --out (two runs into one directory would write every problem twice)") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _HELD[key] = [fh, 1]
    return key


def release(key: str) -> None:
    entry = _HELD.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _HELD[key]
        entry[0].close()  # closing the last descriptor drops the flock


@contextlib.contextmanager
def locked(run_dirs: Iterable, rank: int = 0) -> Iterator[None]:
    """Hold the locks of every directory in `run_dirs` (all or none) for the block."""
    keys = []
    try:
        for d in run_dirs:
            keys.append(acquire(d, rank))
        yield
    finally:
        for k in reversed(keys):
            release(k)
