"""The hybrid configurations of Venhoff et al. (2025), Table 1, as named presets.

Numbers from the authors' public repository (thinking-llms-interp, paper_configs/): for each
base / thinking pair, the base layer whose output is steered, the thinking layer the taxonomy SAE
reads, and the number of categories (SAE latents). Layers are 0-based decoder-layer indices, as in
steerfast. Every pair generates up to 2000 new tokens. The seven smaller pairs search the paper's
grid (coefficients 0.1 ... 1.0 x windows 0, -1, -15, -50, -100); the three 32B scripts pass no
grid, so the defaults of the authors' hybrid_token.py apply there (coefficients 0.5 ... 1.0,
window 0: every position).

    cfg = sf.hybrid_config("qwen2.5-math-1.5b")
    h = sf.Hybrid(base, thinking, sae, vectors, bias, **cfg.hybrid_kwargs())
    steerfast eval --paper-config qwen2.5-math-1.5b ...
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import InvalidInputError

PAPER_COEFS = tuple(round(0.1 * i, 1) for i in range(1, 11))
PAPER_WINDOWS = (0, -1, -15, -50, -100)
_DEFAULT_COEFS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # hybrid_token.py's defaults, for scripts passing none
_DEFAULT_WINDOWS = (0,)


@dataclass(frozen=True)
class HybridConfig:
    name: str
    base_model: str  # Hugging Face ids, for reference: steerfast loads only local directories
    thinking_model: str
    steer_layer: int
    sae_layer: int
    n_categories: int
    coefs: tuple[float, ...] = PAPER_COEFS
    windows: tuple[int, ...] = PAPER_WINDOWS
    max_new_tokens: int = 2000

    def hybrid_kwargs(self) -> dict:
        """The keyword arguments of `steerfast.Hybrid` this configuration fixes."""
        return dict(sae_layer=self.sae_layer, steer_layer=self.steer_layer, coefs=list(self.coefs),
                    windows=list(self.windows))

    def to_dict(self) -> dict:
        return asdict(self)


PAPER_CONFIGS: dict[str, HybridConfig] = {c.name: c for c in (
    HybridConfig("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "Open-Reasoner-Zero/Open-Reasoner-Zero-0.5B", 9, 8, 10),
    HybridConfig("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", "Open-Reasoner-Zero/Open-Reasoner-Zero-1.5B", 10, 8, 5),
    HybridConfig("qwen2.5-7b", "Qwen/Qwen2.5-7B", "Open-Reasoner-Zero/Open-Reasoner-Zero-7B", 10, 20, 10),
    HybridConfig("qwen2.5-14b", "Qwen/Qwen2.5-14B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 18, 38, 5),
    HybridConfig("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 12, 6, 15),
    HybridConfig("qwen2.5-32b-qwq", "Qwen/Qwen2.5-32B", "Qwen/QwQ-32B", 24, 27, 10,
                 _DEFAULT_COEFS, _DEFAULT_WINDOWS),
    HybridConfig("qwen2.5-32b-r1", "Qwen/Qwen2.5-32B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 24, 27, 15,
                 _DEFAULT_COEFS, _DEFAULT_WINDOWS),
    HybridConfig("qwen2.5-32b-orz", "Qwen/Qwen2.5-32B", "Open-Reasoner-Zero/Open-Reasoner-Zero-32B", 24, 27, 15,
                 _DEFAULT_COEFS, _DEFAULT_WINDOWS),
    HybridConfig("qwen2.5-math-1.5b", "Qwen/Qwen2.5-Math-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 10, 4, 15),
)}


def hybrid_config(name: str) -> HybridConfig:
    """The paper's configuration for a pair, by name (case-insensitive; see PAPER_CONFIGS)."""
    cfg = PAPER_CONFIGS.get(str(name).strip().lower())
    if cfg is None:
        raise InvalidInputError(f"no paper configuration named {name!r}; known: {', '.join(PAPER_CONFIGS)}")
    return cfg
