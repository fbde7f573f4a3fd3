"""`TopKSAE`: a Top-K sparse autoencoder over residual-stream activations.

encode(x) = top-k of (x' - b_dec) W_enc + b_enc, where x' is x optionally centred by a stored
mean and L2-normalised (how the hybrid paper's taxonomy SAEs are trained); a fused kernel on the
GPU. Loads its own safetensors layout, EleutherAI sparsify's and SAELens's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import ops
from .errors import CheckpointError, InvalidInputError, NonFiniteError, ShapeMismatchError
from .ops import ControllerOutput, EncodeOutput

FORMAT = "steerfast.topk_sae.v1"
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


class TopKSAE:
    """W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d]; k latents kept per row.

    mean [d] (optional): subtracted from inputs first. normalize: then scale each input to unit L2
    norm. relu: clamp pre-activations at 0 (sparsify and SAELens Top-K SAEs do). subtract_b_dec:
    encode (x' - b_dec) rather than x' (SAELens's apply_b_dec_to_input=False turns it off).
    """

    def __init__(self, W_enc, b_enc, W_dec, b_dec, k: int, *, mean=None, normalize: bool = False,
                 relu: bool = False, subtract_b_dec: bool = True, metadata: dict | None = None):
        tensors = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec) | ({} if mean is None else dict(mean=mean))
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise InvalidInputError(f"TopKSAE.{name} must be a floating-point tensor, got {type(t).__name__}")
        if W_enc.dim() != 2:
            raise ShapeMismatchError(f"TopKSAE.W_enc must be [d, n], got shape {tuple(W_enc.shape)}")
        d, n = W_enc.shape
        want = dict(W_enc=(d, n), b_enc=(n,), W_dec=(n, d), b_dec=(d,), mean=(d,))
        for name, t in tensors.items():
            if tuple(t.shape) != want[name]:
                raise ShapeMismatchError(f"TopKSAE.{name} has shape {tuple(t.shape)}; with W_enc [{d}, {n}] "
                                         f"it must be {list(want[name])}")
            if not torch.isfinite(t).all():
                raise NonFiniteError(f"TopKSAE.{name} holds NaN or Inf")
        if not isinstance(k, int) or not 1 <= k <= n:
            raise InvalidInputError(f"TopKSAE.k must be an int in [1, {n}] (n latents), got {k!r}")
        dtype, device = W_enc.dtype, W_enc.device
        cast = lambda t: t.detach().to(device=device, dtype=dtype).contiguous()  # noqa: E731
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = cast(W_enc), cast(b_enc), cast(W_dec), cast(b_dec)
        self.mean = None if mean is None else cast(mean)
        self.k, self.normalize, self.relu, self.subtract_b_dec = k, bool(normalize), bool(relu), bool(subtract_b_dec)
        self.metadata = dict(metadata or {})
        # what the kernels subtract before W_enc: b_dec, or zeros when the SAE does not
        self._b_in = self.b_dec if self.subtract_b_dec else torch.zeros_like(self.b_dec)

    @property
    def d(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[1]

    def to(self, device=None, dtype=None) -> "TopKSAE":
        t = lambda x: None if x is None else x.to(device=device or x.device, dtype=dtype or x.dtype)  # noqa: E731
        return TopKSAE(t(self.W_enc), t(self.b_enc), t(self.W_dec), t(self.b_dec), self.k, mean=t(self.mean),
                       normalize=self.normalize, relu=self.relu, subtract_b_dec=self.subtract_b_dec,
                       metadata=self.metadata)

    # ---------------------------------------------------------------- encode / decode
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """The input the encoder sees: centred by `mean`, then L2-normalised, as configured."""
        if self.mean is not None:
            x = x - self.mean
        if self.normalize:
            x = x / x.float().norm(dim=-1, keepdim=True).clamp(min=1e-12).to(x.dtype)
        return x

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.d,):
            raise ShapeMismatchError(f"SAE input must be [..., {self.d}], got "
                                     f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        return self.preprocess(x.reshape(-1, self.d).to(self.W_enc.dtype)).contiguous()

    def encode(self, x: torch.Tensor, backend: str | None = None) -> EncodeOutput:
        """x [..., d] -> (values [B, k] fp32 descending, indices [B, k] int64), B = rows of x.

        NaN / Inf in x raise NonFiniteError (top-k of NaN is meaningless). The check syncs with the
        device, so it lives here, in the user's entry point, and not in `controller` or the ops the
        hybrid's graphed decode step calls."""
        rows = self._rows(x)
        if not torch.isfinite(rows).all():
            bad = (~torch.isfinite(rows)).any(-1).nonzero()[:, 0]
            raise NonFiniteError(f"SAE input holds NaN or Inf (in {len(bad)} of {rows.shape[0]} rows, first row "
                                 f"{int(bad[0])})")
        return ops.topk_sae_encode(rows, self.W_enc, self.b_enc, self._b_in, self.k, self.relu, backend)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reconstruction of the preprocessed input: sum_j values[:, j] W_dec[indices[:, j]] + b_dec."""
        rows = self.W_dec[indices]  # [B, k, d]
        return (values.to(rows.dtype)[..., None] * rows).sum(-2) + self.b_dec

    def controller(self, x: torch.Tensor, cat_map: torch.Tensor | None = None, threshold: float = float("-inf"),
                   cat_coef: torch.Tensor | None = None, backend: str | None = None) -> ControllerOutput:
        """Per row, the category of the argmax latent (cat_map[latent]; by default the latent
        itself), or -1 when its pre-activation is below `threshold`; and cat_coef[category]."""
        x = self._rows(x)
        if cat_map is None:
            cat_map = torch.arange(self.n_latents, dtype=torch.int32, device=x.device)
        return ops.sae_controller(x, self.W_enc, self.b_enc, self._b_in, cat_map, threshold, cat_coef, backend)

    # ---------------------------------------------------------------- files
    def save(self, path: str | Path) -> None:
        """One safetensors file: the tensors, and k / normalize / relu / metadata as its metadata."""
        from safetensors.torch import save_file

        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        if self.mean is not None:
            tensors["mean"] = self.mean.contiguous()
        meta = dict(format=FORMAT, k=str(self.k), normalize=str(self.normalize), relu=str(self.relu),
                    subtract_b_dec=str(self.subtract_b_dec), metadata=json.dumps(self.metadata))
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, hookpoint: str | None = None, device=None, dtype=None) -> "TopKSAE":
        """Own file (.safetensors written by `save`), or a directory in sparsify's layout
        (cfg.json + sae.safetensors, possibly one sub-directory per hookpoint) or SAELens's
        (cfg.json + sae_weights.safetensors)."""
        path = Path(path)
        if hookpoint is not None:
            path = path / hookpoint
        if path.is_file():
            sae = _load_own(path)
        elif (path / "sae.safetensors").is_file():
            sae = _load_sparsify(path)
        elif (path / "sae_weights.safetensors").is_file():
            sae = _load_saelens(path)
        elif path.is_dir() and any((p / "sae.safetensors").is_file() for p in path.iterdir() if p.is_dir()):
            hooks = sorted(p.name for p in path.iterdir() if (p / "sae.safetensors").is_file())
            raise InvalidInputError(f"{path} holds SAEs for several hookpoints {hooks}; pass hookpoint=")
        else:
            raise CheckpointError(f"{path}: not a TopKSAE file, nor a sparsify (cfg.json + sae.safetensors) "
                                  "or SAELens (cfg.json + sae_weights.safetensors) directory")
        return sae.to(device, dtype) if device is not None or dtype is not None else sae


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def _cfg(path: Path) -> dict:
    try:
        return json.loads((path / "cfg.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'cfg.json'}: missing or not valid JSON ({e})") from None


def _need(tensors: dict, names, where: Path) -> list[torch.Tensor]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"{where}: missing tensors {missing} (has {sorted(tensors)})")
    return [tensors[n] for n in names]


def _load_own(path: Path) -> TopKSAE:
    tensors, meta = _read(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a steerfast TopKSAE file (metadata format {meta.get('format')!r})")
    W_enc, b_enc, W_dec, b_dec = _need(tensors, _TENSORS, path)
    return TopKSAE(W_enc, b_enc, W_dec, b_dec, int(meta["k"]), mean=tensors.get("mean"),
                   normalize=meta.get("normalize") == "True", relu=meta.get("relu") == "True",
                   subtract_b_dec=meta.get("subtract_b_dec", "True") == "True",
                   metadata=json.loads(meta.get("metadata", "{}")))


def _load_sparsify(path: Path) -> TopKSAE:
    """EleutherAI sparsify: encoder = nn.Linear(d, n) (weight [n, d]); relu(encoder(x - b_dec)), top-k."""
    cfg = _cfg(path)
    tensors, _ = _read(path / "sae.safetensors")
    if cfg.get("skip_connection") or "W_skip" in tensors:
        raise CheckpointError(f"{path}: sparsify SAEs with a skip connection (transcoders) are not supported")
    enc_w, enc_b, W_dec, b_dec = _need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
    return TopKSAE(enc_w.T, enc_b, W_dec, b_dec, int(cfg["k"]), relu=True,
                   metadata=dict(source="sparsify", path=str(path), cfg=cfg))


def _load_saelens(path: Path) -> TopKSAE:
    cfg = _cfg(path)
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if arch != "topk" and cfg.get("activation_fn_str", cfg.get("activation_fn")) != "topk":
        raise CheckpointError(f"{path}: SAELens architecture {arch!r} is not a Top-K SAE")
    if k is None:
        raise CheckpointError(f"{path}: cfg.json names no k (expected 'k' or activation_fn_kwargs.k)")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise CheckpointError(f"{path}: normalize_activations={cfg['normalize_activations']!r} is not supported")
    tensors, _ = _read(path / "sae_weights.safetensors")
    W_enc, b_enc, W_dec, b_dec = _need(tensors, _TENSORS, path)
    return TopKSAE(W_enc, b_enc, W_dec, b_dec, int(k), relu=True,
                   subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
                   metadata=dict(source="saelens", path=str(path), cfg=cfg))
