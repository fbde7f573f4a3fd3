"""steerfast's ops: a torch reference, a Triton kernel and (where written) a CUDA kernel each,
behind the dispatch of `backend.choose`, registered as torch.library custom ops so torch.compile
and CUDA graphs see each as one opaque op.

Checks here are cheap shape/dtype asserts on the host: value checks (token ranges, NaN) belong to
the callers, once per request, not per step.
"""
from __future__ import annotations

import importlib.util
import math
from typing import NamedTuple

import torch

from . import backend as _backend
from .errors import InvalidInputError

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ---------------------------------------------------------------- decode attention
def gather_prefix_kv(cache, rows, prefix_rows, prefix_lens, S):
    """[B, S, Hkv, D]: key j of row b from cache row prefix_rows[b] when j < prefix_lens[b], else from
    cache row rows[b] (the hybrid's candidate rows over their sequence's unsteered prefix)."""
    j = torch.arange(S, device=cache.device)[None, :]
    src = torch.where(j < prefix_lens[:, None].long(), prefix_rows[:, None].long(), rows[:, None].long())
    return cache[src, j]


def decode_attention_torch(q, k_cache, v_cache, seq_lens, scale, rows=None, prefix_rows=None, prefix_lens=None):
    """q [B, H, D]; k_cache, v_cache [Bc, S, Hkv, D]; seq_lens [B]: row b attends keys
    0 .. seq_lens[b]-1 of cache row b (of prefix_rows[b] below prefix_lens[b] and of rows[b] above,
    when those are given). Returns [B, H, D] in q.dtype."""
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    if prefix_rows is None:
        k, v = k_cache[:B], v_cache[:B]
    else:
        k = gather_prefix_kv(k_cache, rows, prefix_rows, prefix_lens, S)
        v = gather_prefix_kv(v_cache, rows, prefix_rows, prefix_lens, S)
    mask = torch.arange(S, device=q.device)[None, :] < seq_lens[:, None].to(torch.long)  # [B, S]
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :], scale=scale,
        enable_gqa=H != Hkv)
    return out[:, :, 0, :]


@torch.library.custom_op("steerfast::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                         scale: float, rows: torch.Tensor | None, prefix_rows: torch.Tensor | None,
                         prefix_lens: torch.Tensor | None, query_blocks: torch.Tensor | None,
                         backend: str) -> torch.Tensor:
    if backend == "cuda":  # flash-attn is the CUDA kernel for attention (never given a prefix)
        from flash_attn import flash_attn_with_kvcache
        B = q.shape[0]
        out = flash_attn_with_kvcache(q[:, None], k_cache[:B], v_cache[:B],
                                      cache_seqlens=seq_lens.to(torch.int32), softmax_scale=scale)
        return out[:, 0]
    if backend == "triton" and query_blocks is not None:
        from .kernels.window_attention import window_attention
        return window_attention(q, k_cache, v_cache, seq_lens, scale, rows, prefix_rows, prefix_lens, query_blocks)
    if backend == "triton":
        from .kernels.decode_attention import decode_attention as triton_decode_attention
        return triton_decode_attention(q, k_cache, v_cache, seq_lens, scale, rows=rows, prefix_rows=prefix_rows,
                                       prefix_lens=prefix_lens)
    return decode_attention_torch(q, k_cache, v_cache, seq_lens, scale, rows, prefix_rows, prefix_lens)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, seq_lens, scale, rows, prefix_rows, prefix_lens, query_blocks, backend):
    return torch.empty_like(q)


def window_query_blocks(widths: torch.Tensor) -> torch.Tensor:
    """The query blocks of decode_attention for windows of `widths` rows packed back to back
    (host tensors): [nb, 2] int32 (first row, rows), no block spanning two windows."""
    from .kernels.window_attention import window_query_blocks as blocks
    return blocks(widths)


_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None  # once: compiled graphs can't trace imports


def decode_attention_backends(dtype: torch.dtype = torch.bfloat16) -> tuple[str, ...]:
    """Backends decode attention is implemented in for `dtype`, best first. flash-attn is its
    CUDA kernel (fp16/bf16 only); float64, used to check models against transformers, runs only
    the reference."""
    if dtype == torch.float64:
        return ("torch",)
    if _HAS_FLASH_ATTN and dtype in (torch.float16, torch.bfloat16):
        return ("cuda", "triton", "torch")
    return ("triton", "torch")


def decode_attention(q, k_cache, v_cache, seq_lens, scale=None, backend=None, rows=None, prefix_rows=None,
                     prefix_lens=None, query_blocks=None):
    """One new query per row against that row's cached keys/values, reading only its own length.
    With rows, prefix_rows, prefix_lens ([B] each, all or none), row b's keys below prefix_lens[b]
    come from cache row prefix_rows[b] and the rest from cache row rows[b]. query_blocks ([nb, 2]
    int32, kernels.window_attention.window_query_blocks; with the prefix arguments only) says which
    consecutive rows share their keys (one hybrid candidate window): the Triton backend then serves
    each block in one program, reading each key once per block, not once per row. Same result."""
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
    assert q.shape[2] == k_cache.shape[3]
    assert q.shape[1] % k_cache.shape[2] == 0, "query heads must be a multiple of KV heads"
    assert seq_lens.shape == (q.shape[0],)
    assert (rows is None) == (prefix_rows is None) == (prefix_lens is None), "rows, prefix_rows, prefix_lens: all or none"
    assert rows is not None or q.shape[0] <= k_cache.shape[0]
    assert query_blocks is None or rows is not None, "query_blocks go with rows, prefix_rows, prefix_lens"
    same_device(q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, rows=rows, prefix_rows=prefix_rows,
                prefix_lens=prefix_lens, query_blocks=query_blocks)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    implemented = decode_attention_backends(q.dtype)
    if rows is not None:
        implemented = tuple(b for b in implemented if b != "cuda")  # flash-attn reads one row per query
    b = _backend.choose("decode_attention", q.device, implemented, backend)
    return _decode_attention_op(q, k_cache, v_cache, seq_lens, scale, rows, prefix_rows, prefix_lens,
                                query_blocks, b)


# ---------------------------------------------------------------- steering add
def steer_add_torch(h, input_pos, start, vectors, idx, coef, bias=None):
    """In place: h[b, t] += coef[b] * (vectors[idx[b]] + bias) where idx[b] >= 0 and
    input_pos[b, t] >= start[b]; computed in fp32 (float64 for float64 h), stored in h's dtype.
    h [B, T, d]; input_pos [B, T]; start, idx, coef [B]; vectors [V, d]; bias [d] or None."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    v = vectors[idx.clamp(min=0).long()].to(acc)  # [B, d]
    if bias is not None:
        v = v + bias.to(acc)
    gate = (idx >= 0)[:, None] & (input_pos >= start[:, None])  # [B, T]
    w = coef.to(acc)[:, None] * gate  # [B, T]
    h.copy_((h.to(acc) + w[..., None] * v[:, None, :]).to(h.dtype))


@torch.library.custom_op("steerfast::steer_add_", mutates_args=("h",))
def _steer_add_op(h: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, vectors: torch.Tensor,
                  idx: torch.Tensor, coef: torch.Tensor, bias: torch.Tensor | None, backend: str) -> None:
    if backend == "cuda":
        B, T, d = h.shape
        with torch.cuda.device(h.device):  # _C launches on the current device
            _backend.cuda_extension().steer_add(
                h.data_ptr(), input_pos.data_ptr(), start.data_ptr(), vectors.data_ptr(), idx.data_ptr(),
                coef.data_ptr(), 0 if bias is None else bias.data_ptr(),
                B, T, d, h.stride(0), h.stride(1), _DTYPE_CODE[h.dtype],
                torch.cuda.current_stream(h.device).cuda_stream)
    elif backend == "triton":
        from .kernels.steer_add import steer_add_ as triton_steer_add_
        triton_steer_add_(h, input_pos, start, vectors, idx, coef, bias)
    else:
        steer_add_torch(h, input_pos, start, vectors, idx, coef, bias)


@_steer_add_op.register_fake
def _(h, input_pos, start, vectors, idx, coef, bias, backend):
    return None


def same_device(ref: torch.Tensor, **tensors) -> None:
    """Every tensor on ref's device: a kernel given another device's pointer faults (and an illegal
    address ends the CUDA context) or, where the GPU can map host memory, reads the wrong bytes."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise InvalidInputError(f"{name} is on {t.device}, the op's input on {ref.device}: move it there first")


def _check_steer(h, input_pos, start, vectors, idx, coef, bias):
    B, T, d = h.shape
    same_device(h, input_pos=input_pos, start=start, vectors=vectors, idx=idx, coef=coef, bias=bias)
    assert vectors.dtype == h.dtype and (bias is None or bias.dtype == h.dtype)
    assert vectors.dim() == 2 and vectors.shape[1] == d and vectors.is_contiguous()
    assert bias is None or (bias.shape == (d,) and bias.is_contiguous())
    assert input_pos.shape == (B, T) and input_pos.dtype == torch.int32 and input_pos.is_contiguous()
    assert start.shape == idx.shape == coef.shape == (B,)
    assert start.dtype == idx.dtype == torch.int32 and coef.dtype == torch.float32
    assert start.is_contiguous() and idx.is_contiguous() and coef.is_contiguous(), "start, idx, coef: contiguous"


def steer_add_(h, input_pos, start, vectors, idx, coef, bias=None, backend=None):
    """Add steering vectors to the residual stream `h` in place (see `steer_add_torch`)."""
    assert h.stride(2) == 1, "h's last dimension must be contiguous"
    _check_steer(h, input_pos, start, vectors, idx, coef, bias)
    # float64 (used to check models against transformers) runs only the reference
    implemented = ("cuda", "triton", "torch") if h.dtype in _DTYPE_CODE else ("torch",)
    b = _backend.choose("steer_add", h.device, implemented, backend)
    _steer_add_op(h, input_pos, start, vectors, idx, coef, bias, b)


def steer_residual_add_torch(x, y, input_pos, start, vectors, idx, coef, bias=None):
    """out = x + y, then steered as `steer_add_torch` does: the decoder layer's last residual add
    and its steering in one pass over the residual stream. x, y [B, T, d]; returns a new tensor."""
    out = x + y
    steer_add_torch(out, input_pos, start, vectors, idx, coef, bias)
    return out


@torch.library.custom_op("steerfast::steer_residual_add", mutates_args=())
def _steer_residual_add_op(x: torch.Tensor, y: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor,
                           vectors: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor, bias: torch.Tensor | None,
                           backend: str) -> torch.Tensor:
    if backend == "cuda":
        B, T, d = x.shape
        out = torch.empty_like(x)
        with torch.cuda.device(x.device):
            _backend.cuda_extension().steer_residual_add(
                out.data_ptr(), x.data_ptr(), y.data_ptr(), input_pos.data_ptr(), start.data_ptr(),
                vectors.data_ptr(), idx.data_ptr(), coef.data_ptr(), 0 if bias is None else bias.data_ptr(),
                B, T, d, _DTYPE_CODE[x.dtype], torch.cuda.current_stream(x.device).cuda_stream)
        return out
    if backend == "triton":
        from .kernels.steer_add import steer_residual_add as triton_steer_residual_add
        return triton_steer_residual_add(x, y, input_pos, start, vectors, idx, coef, bias)
    return steer_residual_add_torch(x, y, input_pos, start, vectors, idx, coef, bias)


@_steer_residual_add_op.register_fake
def _(x, y, input_pos, start, vectors, idx, coef, bias, backend):
    return torch.empty_like(x)


def steer_residual_add(x, y, input_pos, start, vectors, idx, coef, bias=None, backend=None):
    """x + y, steered (see `steer_residual_add_torch`). x, y contiguous [B, T, d], same dtype."""
    assert y.shape == x.shape and y.dtype == x.dtype and x.is_contiguous() and y.is_contiguous()
    same_device(x, y=y)
    _check_steer(x, input_pos, start, vectors, idx, coef, bias)
    implemented = ("cuda", "triton", "torch") if x.dtype in _DTYPE_CODE else ("torch",)
    b = _backend.choose("steer_residual_add", x.device, implemented, backend)
    return _steer_residual_add_op(x, y, input_pos, start, vectors, idx, coef, bias, b)


# ---------------------------------------------------------------- Top-K SAE encode
class EncodeOutput(NamedTuple):
    values: torch.Tensor  # [B, k] float32, descending
    indices: torch.Tensor  # [B, k] int64; among equal values the lower latent index comes first


def sae_preactivations_torch(x, W_enc, b_enc, b_dec):
    """(x - b_dec) W_enc + b_enc in fp32 (float64 stays float64). x [B, d]; W_enc [d, n]."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(acc) - b_dec.to(acc)) @ W_enc.to(acc) + b_enc.to(acc)


def topk_sae_encode_torch(x, W_enc, b_enc, b_dec, k, relu=False):
    z = sae_preactivations_torch(x, W_enc, b_enc, b_dec)
    if relu:
        z = z.clamp(min=0)
    # a stable descending sort makes ties go to the lower index, the order the kernels promise
    values, indices = z.sort(dim=-1, descending=True, stable=True)
    return EncodeOutput(values[:, :k].float(), indices[:, :k])


@torch.library.custom_op("steerfast::topk_sae_encode", mutates_args=())
def _topk_sae_encode_op(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
                        relu: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        B, d = x.shape
        n = W_enc.shape[1]
        values = torch.empty(B, k, dtype=torch.float32, device=x.device)
        indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
        ws = torch.empty(_backend.cuda_extension().topk_sae_encode_workspace(B, n, k), dtype=torch.uint8,
                         device=x.device)
        with torch.cuda.device(x.device):
            _backend.cuda_extension().topk_sae_encode(
                values.data_ptr(), indices.data_ptr(), x.data_ptr(), W_enc.data_ptr(), b_enc.data_ptr(),
                b_dec.data_ptr(), ws.data_ptr(), B, d, n, k, relu, _DTYPE_CODE[x.dtype],
                torch.cuda.current_stream(x.device).cuda_stream)
        return values, indices
    if backend == "triton":
        from .kernels.topk_sae_encode import topk_sae_encode as triton_topk_sae_encode
        return tuple(triton_topk_sae_encode(x, W_enc, b_enc, b_dec, k, relu))
    return tuple(topk_sae_encode_torch(x, W_enc, b_enc, b_dec, k, relu))


@_topk_sae_encode_op.register_fake
def _(x, W_enc, b_enc, b_dec, k, relu, backend):
    B = x.shape[0]
    return (x.new_empty(B, k, dtype=torch.float32), x.new_empty(B, k, dtype=torch.int64))


def _check_sae(x, W_enc, b_enc, b_dec):
    same_device(x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)
    assert x.dim() == 2 and W_enc.dim() == 2 and x.shape[1] == W_enc.shape[0]
    assert b_enc.shape == (W_enc.shape[1],) and b_dec.shape == (x.shape[1],)
    assert x.dtype == W_enc.dtype == b_enc.dtype == b_dec.dtype
    assert x.is_contiguous() and W_enc.is_contiguous() and b_enc.is_contiguous() and b_dec.is_contiguous()


def topk_sae_encode(x, W_enc, b_enc, b_dec, k, relu=False, backend=None) -> EncodeOutput:
    """Top-k of (x - b_dec) W_enc + b_enc (after ReLU when `relu`), without writing the [B, n]
    pre-activations to memory on the fast paths. x [B, d]; W_enc [d, n]. fp32 semantics for every
    input dtype: x - b_dec is formed in fp32 and the products accumulate in fp32 (a kernel that
    rounds x - b_dec to 16 bits first fails the tests). The CUDA kernel covers k <= 128 and
    B <= 65535; outside that the dispatch uses Triton (any k, slower for large k)."""
    _check_sae(x, W_enc, b_enc, b_dec)
    assert 1 <= k <= W_enc.shape[1]
    implemented = ("cuda", "triton", "torch") if x.dtype in _DTYPE_CODE else ("torch",)
    if k > 128 or x.shape[0] > 65535:  # outside the CUDA kernel's range (see csrc/topk_sae_encode.cu)
        implemented = tuple(b for b in implemented if b != "cuda")
    b = _backend.choose("topk_sae_encode", x.device, implemented, backend)
    return EncodeOutput(*_topk_sae_encode_op(x, W_enc, b_enc, b_dec, int(k), bool(relu), b))


# ---------------------------------------------------------------- controller
class ControllerOutput(NamedTuple):
    category: torch.Tensor  # [B] int32, -1: no steering
    coef: torch.Tensor  # [B] float32, cat_coef[category] (0 where category is -1)
    latent: torch.Tensor  # [B] int64, argmax latent (lowest index among ties)
    value: torch.Tensor  # [B] float32, its pre-activation


def sae_controller_torch(x, W_enc, b_enc, b_dec, cat_map, threshold, cat_coef):
    z = sae_preactivations_torch(x, W_enc, b_enc, b_dec)
    value, latent = z.max(dim=-1)  # torch's max returns the first maximal index
    category = torch.where(value >= threshold, cat_map[latent], -1).to(torch.int32)
    coef = torch.where(category >= 0, cat_coef[category.clamp(min=0).long()].float(), 0.0)
    return ControllerOutput(category, coef.float(), latent, value.float())


@torch.library.custom_op("steerfast::sae_controller", mutates_args=())
def _sae_controller_op(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                       cat_map: torch.Tensor, threshold: float, cat_coef: torch.Tensor,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        B, d = x.shape
        n = W_enc.shape[1]
        category = torch.empty(B, dtype=torch.int32, device=x.device)
        coef = torch.empty(B, dtype=torch.float32, device=x.device)
        latent = torch.empty(B, dtype=torch.int64, device=x.device)
        value = torch.empty(B, dtype=torch.float32, device=x.device)
        with torch.cuda.device(x.device):
            _backend.cuda_extension().sae_controller(
                category.data_ptr(), coef.data_ptr(), latent.data_ptr(), value.data_ptr(), x.data_ptr(),
                W_enc.data_ptr(), b_enc.data_ptr(), b_dec.data_ptr(), cat_map.data_ptr(), float(threshold),
                cat_coef.data_ptr(), B, d, n, _DTYPE_CODE[x.dtype], torch.cuda.current_stream(x.device).cuda_stream)
        return category, coef, latent, value
    if backend == "triton":
        from .kernels.sae_controller import sae_controller as triton_sae_controller
        return tuple(triton_sae_controller(x, W_enc, b_enc, b_dec, cat_map, threshold, cat_coef))
    return tuple(sae_controller_torch(x, W_enc, b_enc, b_dec, cat_map, threshold, cat_coef))


@_sae_controller_op.register_fake
def _(x, W_enc, b_enc, b_dec, cat_map, threshold, cat_coef, backend):
    B = x.shape[0]
    return (x.new_empty(B, dtype=torch.int32), x.new_empty(B, dtype=torch.float32),
            x.new_empty(B, dtype=torch.int64), x.new_empty(B, dtype=torch.float32))


def sae_controller(x, W_enc, b_enc, b_dec, cat_map, threshold=float("-inf"), cat_coef=None,
                   backend=None) -> ControllerOutput:
    """Per row: the argmax latent of (x - b_dec) W_enc + b_enc, its category cat_map[latent]
    (int32 [n], -1: none), or -1 when its value is below `threshold`; and cat_coef[category]
    (float32 [C]; default all ones). One fused pass for the hybrid's small SAEs (n up to ~4096).
    cat_coef must cover every category cat_map holds: callers check that once, on the host (the
    kernels do not; a per-call check would sync the hot loop)."""
    _check_sae(x, W_enc, b_enc, b_dec)
    n = W_enc.shape[1]
    assert cat_map.shape == (n,) and cat_map.dtype == torch.int32 and cat_map.is_contiguous()
    same_device(x, cat_map=cat_map, cat_coef=cat_coef)
    if cat_coef is None:
        cat_coef = torch.ones(max(int(n), 1), dtype=torch.float32, device=x.device)
    assert cat_coef.dtype == torch.float32 and cat_coef.dim() == 1 and cat_coef.is_contiguous()
    implemented = ("cuda", "triton", "torch") if x.dtype in _DTYPE_CODE else ("torch",)
    b = _backend.choose("sae_controller", x.device, implemented, backend)
    return ControllerOutput(*_sae_controller_op(x, W_enc, b_enc, b_dec, cat_map, float(threshold), cat_coef, b))
