"""Random-weight transformers models in the shapes of real checkpoints, for benchmarks and demos
(no weights can be downloaded: shape is what decode speed depends on, not the values)."""
from __future__ import annotations

import contextlib

import torch

SHAPES = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "small": dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False, max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
}


def hf_config(name: str):
    """The transformers config of a preset shape."""
    from transformers import LlamaConfig, Qwen2Config

    if name not in SHAPES:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(SHAPES)}")
    kw = dict(SHAPES[name])
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kw.pop("model_type")]
    rope = kw.pop("rope_scaling", None)
    theta = kw.pop("rope_theta", 10000.0)
    kw["rope_parameters"] = rope or dict(rope_type="default", rope_theta=theta)
    return cls(eos_token_id=None, bos_token_id=None, pad_token_id=None, **kw)


def _no_init_weights():
    """transformers' context that skips weight initialisation (we fill the weights ourselves)."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()  # slower (HF initialises, then we overwrite), still correct


def random_hf_model(name: str, device="cpu", dtype=torch.bfloat16, std: float = 0.02, seed: int = 0,
                    progress: bool | None = None):
    """A transformers model of preset shape `name`, allocated on `device` in `dtype`, with
    N(0, std) weights and biases and unit norm weights, filled on the device (seconds for 8B on a
    GPU; about a minute for 1.5B on a CPU, hence the progress bar: see steerfast.progress)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(name)
    cfg.initializer_range = std
    with _no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if cfg.tie_word_embeddings and head.weight is not emb.weight:  # skipping init skipped the tying too
        model.tie_weights()
        if head.weight is not emb.weight:
            head.weight = emb.weight
    _fill_random(list(model.named_parameters()), f"random {name}", device, dtype, std, seed, progress)
    return model.eval().requires_grad_(False)


def random_model(name: str, device=None, dtype=torch.bfloat16, *, std: float = 0.02, seed: int = 0,
                 max_seq_len: int | None = None, progress: bool | None = None):
    """A steerfast `Model` of preset shape `name` with random weights made in place: no transformers
    model in between, so half `load_model(random_hf_model(...))`'s peak memory and no copy (what the
    CLI uses). The same distribution as `random_hf_model`, not the same values (the layouts differ)."""
    from .config import ModelArgs
    from .engine import Model
    from .loader import _build

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = _build(ModelArgs.from_hf(hf_config(name).to_dict()), device, dtype)
    _fill_random(list(net.named_parameters()), f"random {name}", device, dtype, std, seed, progress)
    return Model(net, max_seq_len=max_seq_len)


def _fill_random(params, desc: str, device, dtype, std: float, seed: int, progress: bool | None) -> None:
    """Norm weights 1, everything else N(0, std), filled on the device, with a bar counted in
    parameters (one embedding can take as long as several layers). Tied weights appear once."""
    from .progress import bar

    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    with torch.no_grad(), bar(total=sum(p.numel() for _, p in params), progress=progress, unit="param",
                              unit_scale=True, desc=f"{desc} ({torch.device(device).type}, "
                                                    f"{str(dtype).removeprefix('torch.')})") as shown:
        for pname, p in params:
            if p.dim() == 1 and "norm" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
            shown.update(p.numel())
