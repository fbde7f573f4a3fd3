"""The hybrid model of Venhoff et al. (2025): a base model generates while a thinking model, read
through a Top-K SAE, decides which reasoning behaviour to steer toward (docs/architecture.md,
"The hybrid loop").

  loop.py       `Hybrid`: checks, the host loop (prepare, prefill, choose, advance, record)
  step.py       the device-side step of the fast path (windows [-1]): one CUDA graph per bucket
  result.py     `HybridResult`: tokens, steered flags, categories, candidates; shares, traces, HTML
  reference.py  the paper's plain loop (the oracle) and the naive hooks-and-KV-cache loop (the baseline)
"""
from .loop import GATES, Hybrid
from .result import HybridResult

__all__ = ["GATES", "Hybrid", "HybridResult"]
