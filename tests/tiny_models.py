"""Tiny random Llama / Qwen2 checkpoints built from transformers configs (nothing downloaded).

initializer_range 0.2 makes greedy outputs vary and keeps top-2 logit margins far from ties, so
token-for-token comparisons test the arithmetic, not luck.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 97


def tiny_hf(family="llama", n_heads=4, n_kv_heads=2, head_dim=16, layers=3, tied=False, llama3_rope=False,
            vocab=VOCAB, max_pos=512, dtype=torch.float64, attention_bias=False):
    common = dict(hidden_size=n_heads * head_dim, intermediate_size=3 * n_heads * head_dim, num_hidden_layers=layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
                  initializer_range=0.2, max_position_embeddings=max_pos, tie_word_embeddings=tied,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if family == "llama":
        if llama3_rope:
            common["rope_parameters"] = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=32)
        cfg, cls = LlamaConfig(attention_bias=attention_bias, **common), LlamaForCausalLM
    else:
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    model = cls(cfg).to(dtype).eval()
    with torch.no_grad():  # HF zero-initialises biases; random ones make the qkv-bias path count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    return model


def hf_greedy(hf, prompt, max_new_tokens, eos_token_id=None):
    """transformers' own greedy generate, one prompt at a time (no padding in the reference)."""
    ids = torch.tensor([prompt], device=hf.device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def random_prompts(lengths, vocab=VOCAB):
    return [torch.randint(0, vocab, (n,)).tolist() for n in lengths]


def greedy_regret(hf, prompt, tokens) -> float:
    """How far the greedy continuation `tokens` of `prompt` strays from transformers' float64 argmax,
    step by step along `tokens` itself (teacher forced): the largest gap between a step's best logit
    and the chosen token's. 0 when every token is the float64 argmax. Float32 runs on a GPU sum in
    another order than transformers' float32 and may pick either of two near-tied tokens (and then
    continue differently), which an exact comparison would call a bug; a regret above float32's
    error is one."""
    import copy

    hf64 = copy.deepcopy(hf).double()
    ids = torch.tensor([list(prompt) + list(tokens)], device=hf.device)
    with torch.no_grad():
        logits = hf64(ids).logits[0, len(prompt) - 1:-1]  # [n, V]: the logits each token was chosen from
    chosen = logits.gather(1, torch.tensor(tokens, device=hf.device)[:, None])[:, 0]
    return (logits.max(-1).values - chosen).max().item()
