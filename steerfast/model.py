"""The lean decoder: one Transformer for Llama and Qwen2, one forward for prefill and decode.

gpt-fast's shape: full-size KV buffers allocated once, one indexed write per step, q/k/v and
gate/up each fused into one matmul so every weight is read once per step. Everything a step needs
beyond the tokens (positions, steering, which hidden state to keep) rides in one `Context`.

One token per row (decode) takes `decode_layer`: six fused kernels a layer (fused_ops:
RMSNorm + QKV + bias + RoPE + KV write; split-KV attention and its combine; output projection +
residual; RMSNorm + gate/up + SiLU*up; down projection + residual + steering), with the per-step
invariants (cache rows, attention lengths) computed once, not per layer. Several tokens per row
(prefill, windows) take the plain PyTorch layers, which stay the reference.

Numerics follow transformers exactly where it matters for token-for-token equality: RMSNorm in
float32 then cast back, RoPE tables computed in float32 then cast to the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_ops, ops
from .config import ModelArgs


@dataclass
class Steer:
    """Device-side steering of one layer's output: h[b, t] += coef[b] * (vectors[idx[b]] + bias)
    where idx[b] >= 0 and input_pos[b, t] >= start[b] (see ops.steer_add_)."""
    layer: int
    vectors: torch.Tensor  # [V, d]
    idx: torch.Tensor  # [B] int32, < 0: not steered
    coef: torch.Tensor  # [B] float32
    start: torch.Tensor  # [B] int32
    bias: torch.Tensor | None = None  # [d]


@dataclass
class Add:
    """A plain, differentiable add to one layer's output: research code training vectors with autograd."""
    layer: int
    value: torch.Tensor  # [d] or [B, T, d]


@dataclass
class Capture:
    """Keep one layer's output: forward sets `value` ([B, T, d])."""
    layer: int
    value: torch.Tensor | None = None


Edit = Steer | Add | Capture


@dataclass
class Context:
    """Per-step metadata (nano-vllm style): one object, not arguments threaded through layers.
    Whatever the hybrid and research do to the residual stream is one list of per-layer `edits`:
    after layer L, its Steer rides in the layer's last residual add (fused), then its Add and
    Capture entries apply in order."""
    input_pos: torch.Tensor  # [B, T] int32, absolute position of each token; KV written there
    kv_len: int | None = None  # host bound on the keys any row attends; None: the whole cache
    logits_index: torch.Tensor | None = None  # [B] int64, position whose logits to return; None: all
    edits: tuple[Edit, ...] = ()
    rows: torch.Tensor | None = None  # [B] int64, KV-cache row of each batch row; None: row b is b.
    #   Other rows (the hybrid's scratch rows) only with prefix_rows:
    prefix_rows: torch.Tensor | None = None  # [B]: with prefix_lens, row b attends keys below
    prefix_lens: torch.Tensor | None = None  # prefix_lens[b] in cache row prefix_rows[b] (its sequence's)
    seq_lens: torch.Tensor | None = None  # [B] int32, decode: keys each row attends (default input_pos + 1)
    query_blocks: torch.Tensor | None = None  # [nb, 2] int32, with prefix_rows: rows sharing their keys

    def edits_at(self, layer: int) -> tuple[Steer | None, list[Add | Capture]]:
        steer = next((e for e in self.edits if isinstance(e, Steer) and e.layer == layer), None)
        return steer, [e for e in self.edits if e.layer == layer and not isinstance(e, Steer)]


def apply_edits(x: torch.Tensor, edits: list[Add | Capture]) -> torch.Tensor:
    for e in edits:
        if isinstance(e, Add):
            x = x + e.value
        else:
            e.value = x
    return x


class KVCache(nn.Module):
    """Keys and values of every layer, [n_layers, max_batch, max_seq_len, n_kv_heads, head_dim]
    (flash-attn's layout); batch row b holds sequence b of the current batch."""

    def __init__(self, n_layers, max_batch, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (n_layers, max_batch, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]


class LayerwiseKVCache(nn.Module):
    """One K/V buffer per layer, [max_batch, max_seq_len, n_kv_heads, head_dim] each, for forwards that
    autograd differentiates: in KVCache every layer writes into one buffer whose version bump would
    invalidate the earlier layers' saved views (Model.autograd_cache)."""

    def __init__(self, n_layers, max_batch, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        self.k = [torch.zeros(max_batch, max_seq_len, n_kv_heads, head_dim, dtype=dtype, device=device)
                  for _ in range(n_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.max_batch, self.max_seq_len = max_batch, max_seq_len


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return fused_ops.rms_norm_torch(x, self.weight, self.eps)  # the one definition of its numerics


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.wqkv = nn.Linear(a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=a.qkv_bias)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=a.o_bias)
        self.scale = a.head_dim ** -0.5

    def forward(self, x, ctx: Context, k_cache, v_cache, cos, sin, attn_mask):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        q = q * cos + fused_ops.rotate_half(q) * sin
        k = k * cos + fused_ops.rotate_half(k) * sin
        rows = torch.arange(B, device=x.device) if ctx.rows is None else ctx.rows
        k_cache[rows[:, None], ctx.input_pos] = k
        v_cache[rows[:, None], ctx.input_pos] = v
        if ctx.kv_len is not None:
            k_cache, v_cache = k_cache[:, :ctx.kv_len], v_cache[:, :ctx.kv_len]
        if ctx.prefix_rows is not None:
            S = k_cache.shape[1]
            kc = ops.gather_prefix_kv(k_cache, rows, ctx.prefix_rows, ctx.prefix_lens, S)
            vc = ops.gather_prefix_kv(v_cache, rows, ctx.prefix_rows, ctx.prefix_lens, S)
        else:
            kc, vc = k_cache[:B], v_cache[:B]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
            attn_mask=attn_mask, scale=self.scale, enable_gqa=H != Hkv).transpose(1, 2)
        return self.wo(y.reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(a.dim, 2 * a.intermediate_size, bias=a.mlp_bias)  # gate, up
        self.w2 = nn.Linear(a.intermediate_size, a.dim, bias=a.mlp_bias)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(a.dim, a.norm_eps)
        self.attn = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, ctx, k_cache, v_cache, cos, sin, attn_mask, steer: Steer | None = None):
        h = x + self.attn(self.attn_norm(x), ctx, k_cache, v_cache, cos, sin, attn_mask)
        y = self.mlp(self.ffn_norm(h))
        if steer is None:
            return h + y
        # the last residual add and the steering in one pass over the residual stream
        return ops.steer_residual_add(h, y, ctx.input_pos, steer.start, steer.vectors, steer.idx, steer.coef,
                                      steer.bias)


def decode_layer(layer: DecoderLayer, x, ctx: Context, k_cache, v_cache, cos_table, sin_table, steer: Steer | None):
    """One token per row through one decoder layer: x [B, d] -> [B, d], six fused kernels."""
    a, B = layer.attn, x.shape[0]
    pos = ctx.input_pos[:, 0]
    q = fused_ops.qkv_rope_kv_write(x, a.wqkv.weight, layer.attn_norm.weight, layer.attn_norm.eps, a.wqkv.bias,
                                    cos_table, sin_table, pos, ctx.rows, k_cache, v_cache, a.n_heads, a.n_kv_heads)
    if ctx.prefix_rows is not None:  # the hybrid's candidate rows: their sequence's prefix, in place
        y = ops.decode_attention(q, k_cache, v_cache, ctx.seq_lens, a.scale, rows=ctx.rows,
                                 prefix_rows=ctx.prefix_rows, prefix_lens=ctx.prefix_lens,
                                 query_blocks=ctx.query_blocks)
    else:
        y = ops.decode_attention(q, k_cache[:B], v_cache[:B], ctx.seq_lens, a.scale)
    h = fused_ops.fused_linear(y.view(B, -1), a.wo.weight, bias=a.wo.bias, residual=x)
    m = layer.mlp
    g = fused_ops.fused_linear(h, m.w13.weight, norm_weight=layer.ffn_norm.weight, eps=layer.ffn_norm.eps,
                               bias=m.w13.bias, swiglu=True)
    st = None if steer is None else (steer.vectors, steer.idx, steer.coef, steer.start, steer.bias)
    return fused_ops.fused_linear(g, m.w2.weight, bias=m.w2.bias, residual=h, steer=st, input_pos=pos)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.kv: KVCache | None = None

    def setup_cache(self, max_batch: int, max_seq_len: int):
        """Allocate the KV cache and RoPE tables once; a later call only to grow them."""
        p = self.tok_embeddings.weight
        a = self.args
        self.kv = None  # free the old cache before allocating the new one
        self.kv = KVCache(a.n_layers, max_batch, max_seq_len, a.n_kv_heads, a.head_dim, p.dtype, p.device)
        freqs = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * a.inv_freq()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_table", emb.cos().to(p.dtype).to(p.device), persistent=False)
        self.register_buffer("sin_table", emb.sin().to(p.dtype).to(p.device), persistent=False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def lm_head(self, x):
        return F.linear(x, self.head_weight)

    def forward(self, idx: torch.Tensor, ctx: Context, head: str = "logits", start_layer: int = 0) -> torch.Tensor:
        """idx [B, T] at positions ctx.input_pos [B, T] -> logits [B, V] (at ctx.logits_index) or
        [B, T, V]; head="argmax" (T == 1): the greedy token ids [B] instead, without materialising
        the logits. Writes the new keys/values into the cache. From start_layer > 0, idx is instead
        the residual stream [B, T, d] entering that layer (the hybrid's candidate re-runs)."""
        if idx.shape[1] == 1:
            x = self.tok_embeddings(idx[:, 0]) if start_layer == 0 else idx[:, 0]
            x = self.decode_layers(x, ctx, start_layer, len(self.layers))
            return self.decode_head(x, head, ctx.logits_index is not None)
        assert head == "logits", "head='argmax' is for one token per row"
        B, T = idx.shape[:2]
        pos = ctx.input_pos
        cos, sin = self.cos_table[pos][:, :, None, :], self.sin_table[pos][:, :, None, :]  # [B, T, 1, D]
        attn_mask = None
        if T > 1:  # causal over absolute positions; keys past a row's own tokens are never attended
            S = self.kv.max_seq_len if ctx.kv_len is None else ctx.kv_len
            attn_mask = (torch.arange(S, device=idx.device)[None, None, :] <= pos[:, :, None])[:, None]
        x = self.tok_embeddings(idx) if start_layer == 0 else idx
        for i in range(start_layer, len(self.layers)):
            steer, edits = ctx.edits_at(i)
            x = apply_edits(self.layers[i](x, ctx, self.kv.k[i], self.kv.v[i], cos, sin, attn_mask, steer), edits)
        if ctx.logits_index is not None:
            x = x[torch.arange(B, device=idx.device), ctx.logits_index]
        return self.lm_head(self.norm(x))

    def decode_layers(self, x: torch.Tensor, ctx: Context, start: int, end: int) -> torch.Tensor:
        """One token per row, x [B, d]: the residual stream entering layer `start` -> leaving layer
        end - 1, on the fused decode path (the hybrid runs its candidate rows from steer_layer + 1)."""
        B = x.shape[0]
        if ctx.rows is None:  # once a step, not once a layer
            ctx.rows = torch.arange(B, device=x.device)
        if ctx.seq_lens is None:
            ctx.seq_lens = ctx.input_pos[:, 0] + 1
        for i in range(start, end):
            steer, edits = ctx.edits_at(i)
            x = decode_layer(self.layers[i], x, ctx, self.kv.k[i], self.kv.v[i], self.cos_table, self.sin_table, steer)
            x = apply_edits(x[:, None], edits)[:, 0] if edits else x  # edits see [B, T=1, d], as in prefill
        return x

    def decode_head(self, x: torch.Tensor, head: str = "logits", flat: bool = True) -> torch.Tensor:
        """x [B, d] after the last layer -> greedy ids [B] (head="argmax", no [B, V] logits in memory)
        or logits [B, V] (flat) / [B, 1, V]."""
        if head == "argmax":
            return fused_ops.lm_head_argmax(x, self.head_weight, self.norm.weight, self.norm.eps)
        logits = self.lm_head(self.norm(x))
        return logits if flat else logits[:, None]
