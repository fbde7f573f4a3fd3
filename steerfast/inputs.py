"""Token-id prompts in the shapes users actually hold them, turned into list[list[int]].

Accepted: a list or tuple of prompts, each a list/tuple of ints (Python or numpy), a 1-D integer
numpy array or torch tensor; a 2-D integer array or tensor (one row per prompt); a 1-D one (a
single prompt); or what a transformers tokenizer returns (`BatchEncoding` or a dict holding
"input_ids", single or batched; its "attention_mask", when present, drops the padding).
Anything else raises InvalidInputError naming what was received. Range checks (vocabulary,
cache length) stay with the model, which knows its sizes.
"""
from __future__ import annotations

from numbers import Integral

from .errors import InvalidInputError

_EXPECTED = "a list of token-id lists (or an int tensor / numpy array, or a tokenizer's input_ids)"


def _type_name(x) -> str:
    if hasattr(x, "dtype") and hasattr(x, "shape"):  # numpy arrays and torch tensors
        return f"{type(x).__module__.split('.')[0]}.{type(x).__name__} of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


def _is_array(x) -> bool:
    """A numpy array or torch tensor (both have .tolist(), .dtype and .ndim / .dim())."""
    return hasattr(x, "tolist") and hasattr(x, "dtype") and hasattr(x, "shape")


def _is_integer_array(x) -> bool:
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.integer)


def _mapping_ids(prompts, name: str):
    """input_ids of a BatchEncoding / dict, with the padding its attention_mask marks removed."""
    if "input_ids" not in prompts:
        raise InvalidInputError(f"{name} is a {type(prompts).__name__} without 'input_ids' "
                                f"(keys {sorted(map(str, prompts.keys()))}); expected {_EXPECTED}")
    ids, mask = prompts["input_ids"], prompts.get("attention_mask")
    if _is_array(ids):
        if not _is_integer_array(ids):
            raise InvalidInputError(f"{name}['input_ids'] is a {_type_name(ids)}; expected integer token ids")
        ids = ids.tolist()
    single = isinstance(ids, (list, tuple)) and len(ids) > 0 and isinstance(ids[0], Integral)
    if single:  # one encoded text (apply_chat_template / tokenizer(text) without batching)
        ids, mask = [ids], None if mask is None else [mask.tolist() if _is_array(mask) else mask]
    if mask is None:
        return ids
    mask = mask.tolist() if _is_array(mask) else mask
    if not isinstance(ids, (list, tuple)) or len(mask) != len(ids):
        raise InvalidInputError(f"{name}: attention_mask has {len(mask)} rows for {len(ids)} input_ids rows")
    as_list = lambda r: r.tolist() if _is_array(r) else r  # noqa: E731
    return [[t for t, keep in zip(as_list(row), as_list(mrow)) if keep] for row, mrow in zip(ids, mask)]


def _row(p, where: str) -> list[int]:
    if _is_array(p):
        if not _is_integer_array(p) or len(p.shape) != 1:
            raise InvalidInputError(f"{where} is a {_type_name(p)}; a prompt must be a 1-D integer sequence")
        p = p.tolist()
    if isinstance(p, (str, bytes)):
        raise InvalidInputError(f"{where} is a {type(p).__name__}; prompts are token ids: tokenize the text first "
                                "(e.g. tokenizer(text)['input_ids'])")
    if not isinstance(p, (list, tuple)):
        raise InvalidInputError(f"{where} is a {_type_name(p)}; expected a non-empty list of ints")
    if not p:
        raise InvalidInputError(f"{where} is empty; each prompt needs at least one token")
    for j, t in enumerate(p):
        if isinstance(t, bool) or not isinstance(t, Integral):
            raise InvalidInputError(f"{where}[{j}] is a {_type_name(t)} ({t!r}); token ids must be ints")
    return [int(t) for t in p]


def as_token_lists(prompts, name: str = "prompts") -> list[list[int]]:
    """prompts in any accepted form (module docstring) -> list[list[int]] of Python ints."""
    if isinstance(prompts, (str, bytes)):
        raise InvalidInputError(f"{name} is a {type(prompts).__name__}; steerfast takes token ids: tokenize the "
                                "text first (e.g. tokenizer(text)['input_ids'])")
    if hasattr(prompts, "keys") and hasattr(prompts, "__getitem__"):  # dict, transformers BatchEncoding
        prompts = _mapping_ids(prompts, name)
    if _is_array(prompts):
        if not _is_integer_array(prompts) or len(prompts.shape) not in (1, 2):
            raise InvalidInputError(f"{name} is a {_type_name(prompts)}; expected a 1-D (one prompt) or 2-D "
                                    "(one row per prompt) integer array")
        prompts = prompts.tolist()
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
    elif isinstance(prompts, (list, tuple)) and prompts and all(
            isinstance(t, Integral) and not isinstance(t, bool) for t in prompts):
        raise InvalidInputError(f"{name} is a flat list of {len(prompts)} ints; expected {_EXPECTED}: "
                                f"wrap a single prompt in a list, [ids]")
    if not isinstance(prompts, (list, tuple)):
        raise InvalidInputError(f"{name} is a {_type_name(prompts)}; expected {_EXPECTED}")
    if not prompts:
        raise InvalidInputError(f"{name} is empty; expected at least one prompt")
    return [_row(p, f"{name}[{i}]") for i, p in enumerate(prompts)]
