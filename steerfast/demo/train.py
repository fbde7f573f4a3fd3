"""Train the miniature's base and thinking models (plain torch loops on `transformers` Llama models)
and save them as Hugging Face checkpoint directories, cached under the user's cache directory by a
hash of the recipe."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import task


@dataclass
class Recipe:
    """Everything the trained pair depends on: its hash names the cache entry."""
    dim: int = 96
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    vocab: int = 400
    base_steps: int = 550
    base_step_share: float = 0.4  # share of step-by-step answers in the base model's mix
    think_steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    think_lr: float = 1.5e-3
    seed: int = 0
    n_eval: int = 200  # held-out problems: never trained on
    heldout_seed: int = 1234
    version: int = 2  # bump when the task or the training code changes

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "steerfast" / "demo"


def new_model(r: Recipe, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(r.seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=r.dim, intermediate_size=r.ffn, num_hidden_layers=r.layers,
                      num_attention_heads=r.heads, num_key_value_heads=r.heads, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


def example(tok, p: task.Problem, mode: str, chat: bool) -> tuple[list[int], int]:
    """(ids, prompt length) of one training sequence: prompt, answer, EOS."""
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": task.THINKING_TEMPLATE.format(question=p.question)}],
                                         add_generation_prompt=True, tokenize=False)
    else:
        prompt = task.BASE_TEMPLATE.format(question=p.question)
    pids = tok(prompt, add_special_tokens=False)["input_ids"]
    sents = task.steps(p) if mode == "steps" else task.direct(p)
    aids = tok(task.text(sents), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return pids + aids, len(pids)


def _batch(seqs, pad):
    T = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, n) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, n:len(s)] = torch.tensor(s[n:])  # loss on the answer only
    return ids, labels


def train(model, make_example, steps: int, batch: int, lr: float, seed: int, desc: str, progress: bool,
          device="cpu") -> list[float]:
    """AdamW with warm-up and cosine decay; make_example(rng) -> (ids, prompt length)."""
    from tqdm.auto import tqdm

    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng, losses = random.Random(seed), []
    pad = model.config.pad_token_id
    for _ in tqdm(range(steps), desc=desc, disable=not progress, unit="step"):
        ids, labels = _batch([make_example(rng) for _ in range(batch)], pad)
        ids, labels = ids.to(device), labels.to(device)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def sampler(exclude: set | None = None):
    """draw(rng) -> a random training problem, never one of `exclude` ((a, b) pairs)."""
    exclude = set(exclude or ())

    def draw(rng):
        while True:
            p = task.Problem(*task.draw(rng))
            if (p.a, p.b) not in exclude:
                return p
    return draw


def train_pair(r: Recipe, out: Path, progress: bool = True, device="cpu", exclude: set | None = None) -> dict:
    """Train the tokenizer, the base model and (from it) the thinking model; save both as HF
    directories out/base and out/thinking. exclude: (a, b) pairs never trained on (held-out set)."""
    tok = task.train_tokenizer(r.vocab, r.seed)
    draw = sampler(exclude)

    def base_ex(rng):
        p = draw(rng)
        return example(tok, p, "steps" if rng.random() < r.base_step_share else "direct", chat=False)

    def think_ex(rng):
        return example(tok, draw(rng), "steps", chat=True)

    t0 = time.perf_counter()
    model = new_model(r, tok)
    base_loss = train(model, base_ex, r.base_steps, r.batch, r.lr, r.seed, "train base model", progress, device)
    _save(model, tok, out / "base")
    t1 = time.perf_counter()
    think_loss = train(model, think_ex, r.think_steps, r.batch, r.think_lr, r.seed + 1, "train thinking model",
                       progress, device)
    _save(model, tok, out / "thinking")
    info = dict(recipe=asdict(r), params=sum(p.numel() for p in model.parameters()),
                base_s=t1 - t0, thinking_s=time.perf_counter() - t1,
                base_final_loss=sum(base_loss[-20:]) / 20, thinking_final_loss=sum(think_loss[-20:]) / 20)
    (out / "train.json").write_text(json.dumps(info, indent=1))
    return info


def _save(model, tok, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(path, safe_serialization=True)
    model.generation_config.save_pretrained(path)
    tok.save_pretrained(path)
