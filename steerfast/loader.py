"""Load a Hugging Face checkpoint (local directory or in-memory transformers model) into the lean
Transformer, one tensor at a time, so peak memory stays near the weights' own size.

Every header is read and every shape checked before a byte of weight moves: a corrupt or
mismatched checkpoint fails with a CheckpointError naming the file and tensor, and nothing is
half-loaded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import ModelArgs
from .errors import CheckpointError, UnsupportedArchitectureError
from .model import Transformer

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# HF names that carry no weights we need (older checkpoints store RoPE buffers)
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_to_ours(a: ModelArgs) -> Callable[[str], tuple[str, int, tuple[int, ...]] | None]:
    """HF tensor name -> (our parameter name, row offset into it, expected HF shape), or None."""
    H, Hkv, D, d, inter = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.head_dim, a.dim, a.intermediate_size
    del D
    per_layer = {
        "self_attn.q_proj": ("attn.wqkv", 0, H, d),
        "self_attn.k_proj": ("attn.wqkv", H, Hkv, d),
        "self_attn.v_proj": ("attn.wqkv", H + Hkv, Hkv, d),
        "self_attn.o_proj": ("attn.wo", 0, d, H),
        "mlp.gate_proj": ("mlp.w13", 0, inter, d),
        "mlp.up_proj": ("mlp.w13", inter, inter, d),
        "mlp.down_proj": ("mlp.w2", 0, d, inter),
        "input_layernorm": ("attn_norm", 0, d, None),
        "post_attention_layernorm": ("ffn_norm", 0, d, None),
    }
    top = {"model.embed_tokens.weight": ("tok_embeddings.weight", (a.vocab_size, d)),
           "model.norm.weight": ("norm.weight", (d,)),
           "lm_head.weight": ("output.weight", (a.vocab_size, d))}
    layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")

    def resolve(name: str):
        if name in top:
            ours, shape = top[name]
            if ours == "output.weight" and a.tie_word_embeddings:
                return None  # tied checkpoints may still store a copy; the embedding is the one used
            return ours, 0, shape
        m = layer_re.match(name)
        if not m or m.group(2) not in per_layer or int(m.group(1)) >= a.n_layers:
            return None
        ours, off, rows, cols = per_layer[m.group(2)]
        kind = m.group(3)
        shape = (rows,) if kind == "bias" or cols is None else (rows, cols)
        return f"layers.{m.group(1)}.{ours}.{kind}", off, shape

    return resolve


def _check_and_map(a: ModelArgs, model: Transformer, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                   where: Callable[[str], str]) -> dict[str, tuple[str, int]]:
    """Check every tensor's shape and dtype and that nothing is missing; return name -> (ours, offset)."""
    resolve = hf_to_ours(a)
    plan, unknown = {}, []
    for name, (shape, dtype) in shapes.items():
        r = resolve(name)
        if r is None:
            if not _IGNORED.match(name) and not (name == "lm_head.weight" and a.tie_word_embeddings):
                unknown.append(name)
            continue
        ours, off, want = r
        if tuple(shape) != tuple(want):
            raise CheckpointError(f"{where(name)}: tensor {name!r} has shape {tuple(shape)}, "
                                  f"config.json implies {tuple(want)}")
        if dtype not in _SAFETENSORS_DTYPES.values():
            raise CheckpointError(f"{where(name)}: tensor {name!r} has dtype {dtype}; expected a float type")
        plan[name] = (ours, off)
    if unknown:
        raise UnsupportedArchitectureError(
            f"checkpoint holds tensors this {a.model_type} decoder does not know, e.g. {unknown[:3]}; "
            "refusing rather than silently ignoring them")
    params = dict(model.named_parameters())
    covered = {ours: 0 for ours in params}
    for name, (ours, _) in plan.items():
        covered[ours] += shapes[name][0][0]
    missing = [p for p, n in covered.items() if n != params[p].shape[0]]
    if missing:
        raise CheckpointError(f"checkpoint is missing tensors for {missing[:5]} ({len(missing)} in all)")
    return plan


def _load_into(model: Transformer, plan, tensors: Iterator[tuple[str, torch.Tensor]], desc: str):
    from .progress import bar

    params = dict(model.named_parameters())
    with torch.no_grad(), bar(total=len(plan), desc=desc, unit="tensor") as shown:
        for name, t in tensors:
            if name not in plan:
                continue
            ours, off = plan[name]
            p = params[ours]
            p[off:off + t.shape[0]].copy_(t, non_blocking=False)
            shown.update(1)


def _build(a: ModelArgs, device, dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(a)
    model = model.to(dtype=dtype).to_empty(device=device)  # allocate once, in the final dtype
    return model.eval().requires_grad_(False)


def load_dir(path: str | Path, device, dtype) -> Transformer:
    """A local HF directory: config.json + model.safetensors or sharded with an index."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist (expected a local Hugging Face model directory; "
                              "nothing is downloaded, so a hub id must be a downloaded directory's path)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file, not a directory (expected a local Hugging Face model directory "
                              "holding config.json + safetensors)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: exists but has no config.json (expected a local Hugging Face model directory)")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    a = ModelArgs.from_hf(cfg)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (.bin checkpoints are not supported)")

    shapes, owner = {}, {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in model.safetensors.index.json but missing")
        try:
            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    dt = _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
                    shapes[k], owner[k] = (tuple(sl.get_shape()), dt), f
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file, truncated or corrupt ({e})") from None
    model = _build(a, device, dtype)
    plan = _check_and_map(a, model, shapes, lambda n: str(owner[n]))

    def stream():
        for f in files:
            with safe_open(f, framework="pt", device="cpu") as fh:
                for k in fh.keys():
                    if k in plan:
                        yield k, fh.get_tensor(k)
    try:
        _load_into(model, plan, stream(), desc=f"loading {path.name}")
    except SafetensorError as e:
        raise CheckpointError(f"{path}: failed reading tensor data ({e})") from None
    return model


def load_hf_model(hf_model, device, dtype) -> Transformer:
    """An in-memory transformers model (LlamaForCausalLM, Qwen2ForCausalLM, ...)."""
    a = ModelArgs.from_hf(hf_model.config.to_dict())
    state = hf_model.state_dict()
    model = _build(a, device, dtype)
    plan = _check_and_map(a, model, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, lambda n: "model")
    _load_into(model, plan, iter(state.items()), desc=f"loading {type(hf_model).__name__}")
    return model
