"""`GraphRunner`: the one owner of CUDA graphs, the memory pool they share and the buffers they read.

PyTorch's caching allocator keeps a graph pool alive while some graph captured into it lives. When
the last of them is destroyed the pool is retired, and its handle must never be passed to a capture
again: `torch.cuda.graph(g, pool=stale)` dies on `use_count > 0 INTERNAL ASSERT FAILED`. So the
handle lives here and nowhere else: the first capture into an empty runner opens a fresh pool, later
captures share it, and `release()` of the last graph retires the handle with the graphs. Whoever
needs graphs (the decode loop, the hybrid, the benches) holds a runner, never a pool.

The lifecycle is testable without CUDA: a runner takes a `backend` (capture, pool_of); tests give
it one that models the allocator's pool bookkeeping and replays steps eagerly.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Iterator


class CudaGraphBackend:
    """Capture with torch.cuda.graph on `device`."""

    def __init__(self, device):
        import torch

        self.torch, self.device, self._stream = torch, device, None

    def capture(self, step: Callable[[], None], reset: Callable[[], None], pool, warmup: int):
        torch = self.torch
        # the model's device current throughout, and a capture stream of its own: torch.cuda.graph's
        # default stream is made once, on whichever device was current then
        with torch.cuda.device(self.device):
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            # warm-up on a side stream, as torch.cuda.graphs requires: Triton compiles, cuBLAS picks
            # its kernels and the allocator learns the sizes; `reset` puts the buffers back after each
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step()
                    reset()
            torch.cuda.current_stream(self.device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=self._stream):
                step()
        return g

    @staticmethod
    def pool_of(graph):
        return graph.pool()


class GraphRunner:
    """Captured steps by key, each with the fixed buffers it reads and writes, in one shared pool."""

    def __init__(self, device, backend=None):
        self.device = device
        self._backend = backend if backend is not None else CudaGraphBackend(device)
        self._entries: dict[Hashable, tuple[Any, Any]] = {}
        self._pool = None  # valid exactly while self._entries is non-empty

    def sibling(self) -> "GraphRunner":
        """An empty runner on the same device and capture backend, with a pool of its own: for graphs
        with another lifetime (a Hybrid's step graphs, which read two models' caches)."""
        return GraphRunner(self.device, self._backend)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> Iterator[Hashable]:
        return iter(list(self._entries))

    def get(self, key: Hashable):
        """(graph, buffers) captured under `key`, or None."""
        return self._entries.get(key)

    def capture(self, key: Hashable, step: Callable[[], None], buffers: Any = None,
                reset: Callable[[], None] = lambda: None, warmup: int = 2):
        """Capture `step` (which reads and writes `buffers`) under `key`; returns (graph, buffers).
        `step` runs `warmup` times eagerly first, each run followed by `reset`."""
        if key in self._entries:
            raise KeyError(f"a graph is already captured under {key!r}; release it first")
        graph = self._backend.capture(step, reset, self._pool, warmup)
        if self._pool is None:
            self._pool = self._backend.pool_of(graph)
        self._entries[key] = (graph, buffers)
        return graph, buffers

    def release(self, where: Callable[[Hashable], bool] | None = None) -> int:
        """Drop the graphs whose key satisfies `where` (default: all); returns how many. When none
        is left the pool handle goes with them: the next capture opens a fresh pool."""
        keys = [k for k in self._entries if where is None or where(k)]
        for k in keys:
            del self._entries[k]
        if not self._entries:
            self._pool = None
        return len(keys)
