"""Progress bars for long work (model building and loading, generation, research, benchmarks):
tqdm on stderr, shown where someone watches (stderr is a terminal) unless silenced with
STEERFAST_QUIET=1 (which `steerfast ... --quiet` sets) or progress=False."""
from __future__ import annotations

import os
import sys


def enabled(progress: bool | None = None) -> bool:
    """progress True / False wins; None: on when stderr is a terminal and STEERFAST_QUIET is unset."""
    if progress is not None:
        return bool(progress)
    if os.environ.get("STEERFAST_QUIET", "0") not in ("", "0"):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable=None, *, progress: bool | None = None, **tqdm_kw):
    """A tqdm bar (a silent pass-through when not `enabled(progress)`)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled(progress), dynamic_ncols=True, file=sys.stderr, **tqdm_kw)
