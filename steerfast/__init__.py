"""steerfast: fused kernels and a lean KV-cached decoder for steered decoding."""
from __future__ import annotations

import torch


def _map_source_kernels():
    """In a source checkout (editable install) steerfast.kernels is the top-level kernels/ folder,
    which has no __init__.py so that it never hides Hugging Face's `kernels` (setup.py); a wheel
    carries it as a regular subpackage and this finds it there and does nothing."""
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec(f"{__name__}.kernels") is not None:
        return
    src = Path(__file__).resolve().parent.parent / "kernels"
    if src.is_dir():
        spec = importlib.machinery.ModuleSpec(f"{__name__}.kernels", None, is_package=True)
        spec.submodule_search_locations = [str(src)]
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)


_map_source_kernels()

from . import errors  # noqa: E402
from .config import ModelArgs
from .engine import Model
from .hybrid import Hybrid, HybridResult
from .paper_configs import hybrid_config
from .sae import TopKSAE
from .steering import Steering

__version__ = "0.1.0"
__all__ = ["load_model", "Model", "Hybrid", "HybridResult", "ModelArgs", "Steering", "TopKSAE", "errors", "hybrid_config"]


def load_model(path_or_hf_model, device=None, dtype=torch.bfloat16, max_seq_len: int | None = None,
               eager: bool | None = None) -> Model:
    """Load a Llama / Qwen2 checkpoint from a local Hugging Face directory (config.json +
    safetensors, sharded or not) or from an in-memory transformers model.

    device: default CUDA when available, else CPU. max_seq_len caps prompt + new tokens (default
    the checkpoint's max_position_embeddings). eager: True disables CUDA graphs (default: graphs
    on CUDA, eager on CPU). Nothing is downloaded: a hub id that is not a local directory fails.
    """
    from .loader import load_dir, load_hf_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise errors.InvalidInputError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(path_or_hf_model, (str, bytes)) or hasattr(path_or_hf_model, "__fspath__"):
        net = load_dir(path_or_hf_model, device, dtype)
    elif hasattr(path_or_hf_model, "config") and hasattr(path_or_hf_model, "state_dict"):
        net = load_hf_model(path_or_hf_model, device, dtype)
    else:
        raise errors.InvalidInputError(
            f"load_model takes a local directory path or a transformers model, got {type(path_or_hf_model).__name__}")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise errors.InvalidInputError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    return Model(net, max_seq_len=max_seq_len, eager=eager)
