"""The hybrid loop written plainly with transformers, twice: `paper_hybrid`, the paper's loop (no KV
cache, every forward from scratch, steering by a forward hook on the steered layer's output), the
oracle sf.Hybrid is tested against token for token and flag for flag; and `naive_hybrid`, the loop
as researchers write it with hooks and a KV cache, the baseline `bench hybrid` times. Both are
meant to be read, not to be fast, and share their hook and controller."""
from __future__ import annotations

import time

import torch


def _layer_output_hook(layer, fn):
    """fn(h) on the layer's output hidden state: returns the replacement, or None to leave it."""
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h2 = fn(h)
        if h2 is None:
            return None
        return (h2, *output[1:]) if isinstance(output, tuple) else h2
    return layer.register_forward_hook(hook)


def controller(sae, a: torch.Tensor, cat_map=None, threshold: float = float("-inf")):
    """The SAE controller in float64 on residuals a [..., d]: (latent, category; -1 below threshold)."""
    x = a.double()
    if sae.mean is not None:
        x = x - sae.mean.to(x.device, torch.float64)
    if sae.normalize:
        x = x / x.norm(dim=-1, keepdim=True)
    z = (x - sae.b_dec.to(x.device, torch.float64)) @ sae.W_enc.to(x.device, torch.float64) \
        + sae.b_enc.to(x.device, torch.float64)
    zmax, latent = z.max(-1)
    category = latent if cat_map is None else torch.as_tensor(cat_map, device=latent.device)[latent]
    return latent, torch.where(zmax < threshold, -1, category)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _run(hf, ids, steer=None, capture_layer=None):
    """Last-position logits of `ids`; optionally add steer=(layer, vec, first_pos) to that layer's
    output at positions >= first_pos, or capture a layer's output at the last position."""
    handles, captured = [], {}
    if steer is not None:
        layer, vec, first = steer

        def add(h):
            mask = (torch.arange(h.shape[1], device=h.device) >= first)[None, :, None].to(h.dtype)
            return h + vec.to(h.dtype) * mask
        handles.append(_layer_output_hook(hf.model.layers[layer], add))
    if capture_layer is not None:
        def keep(h):
            captured["a"] = h[0, -1].clone()
        handles.append(_layer_output_hook(hf.model.layers[capture_layer], keep))
    try:
        logits = hf(torch.tensor([ids], device=hf.device), use_cache=False).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return logits, captured.get("a")


def paper_hybrid(base, thinking, sae, vectors, bias, sae_layer, steer_layer, coefs, windows, base_prompt,
                 thinking_prompt, max_new_tokens, eos=(), gate="thinking", cat_map=None, threshold=float("-inf"),
                 retokenize=None):
    """One problem through the hybrid loop. Returns (tokens, steered flags)."""
    b_ids, t_ids = list(base_prompt), list(thinking_prompt)
    tokens, steered = [], []
    for _ in range(max_new_tokens):
        lt, a = _run(thinking, t_ids, capture_layer=sae_layer)
        category = int(controller(sae, a, cat_map, threshold)[1])
        y0 = int(_run(base, b_ids)[0].argmax())
        if gate == "thinking":
            steer_now = int(lt.argmax()) != y0
            grid = [(c, w) for c in coefs for w in windows]
        else:
            steer_now = category >= 0
            grid = [(coefs[0], windows[0])]
        tok = y0
        if steer_now and category >= 0:
            logp = torch.log_softmax(lt.double(), -1)
            best = None
            for c, w in grid:
                vec = c * (bias.double() + vectors[category].double()).to(base.device)
                first = 0 if w == 0 else max(0, len(b_ids) - abs(w))
                y = int(_run(base, b_ids, steer=(steer_layer, vec, first))[0].argmax())
                if best is None or logp[y] > best[0]:  # strict: the first of equal candidates wins
                    best = (logp[y], y)
            tok = best[1]
        else:
            steer_now = False
        tokens.append(tok)
        steered.append(steer_now)
        b_ids.append(tok)
        t_ids.extend([tok] if retokenize is None else retokenize(tok))
        if tok in eos:
            break
    return tokens, steered


def _tick(step: int, rate: float) -> bool:
    """sf.Hybrid's synthetic gate: step `step` steers when floor(step * rate) ticks over."""
    return int((step + 1) * rate) > int(step * rate)


def _cache_kwarg(model) -> str:  # transformers renamed past_key_values to cache (5.2x); 5.17 has the old
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


@torch.no_grad()
def naive_hybrid(base, thinking, sae, vectors, bias, sae_layer: int, steer_layer: int, coefs, windows,
                 base_prompts, thinking_prompts, max_new_tokens: int, gate="thinking",
                 threshold: float = float("-inf"), budget_s: float = 0.0) -> dict:
    """The hybrid loop with transformers, written plainly: a batch of problems (prompts of equal
    length per model), greedy, no EOS. Unsteered forwards use past_key_values; each steered row
    re-runs the base model over its whole sequence once per (coef, window) candidate with a forward
    hook adding coef * (bias + vectors[category]) to layer steer_layer's output at the window's
    positions. gate: "thinking" or a float rate (the synthetic gate). Stops after budget_s seconds
    (0: never). Returns tokens, steered flags, steps, wall time, and per step its wall time (the
    prefill in step 0's) and whether any row steered."""
    dev_b, dev_t = base.device, thinking.device
    B = len(base_prompts)
    grid = [(c, w) for c in coefs for w in windows]
    directions = (bias.to(dev_b, torch.float64)[None] + vectors.to(dev_b, torch.float64))  # [C, d]

    captured = {}

    def keep(h):
        captured["a"] = h[:, -1]

    handle = _layer_output_hook(thinking.model.layers[sae_layer], keep)
    tokens, steered = [[] for _ in range(B)], [[] for _ in range(B)]
    step_s, step_steered = [], []
    _sync(dev_b)
    t0 = t_prev = time.perf_counter()
    seq = torch.tensor(base_prompts, device=dev_b)  # [B, L]: the base sequences so far
    try:
        out_b = base(seq, use_cache=True)
        out_t = thinking(torch.tensor(thinking_prompts, device=dev_t), use_cache=True)
        pkv_b, pkv_t = _cache_of(out_b), _cache_of(out_t)
        lb, lt = out_b.logits[:, -1], out_t.logits[:, -1]
        steps = 0
        for step in range(max_new_tokens):
            # controller: the SAE's argmax latent on the thinking model's residual
            category = controller(sae, captured["a"], threshold=threshold)[1].tolist()
            y0 = lb.argmax(-1)
            if gate == "thinking":
                steer = (lt.argmax(-1).to(dev_b) != y0).tolist()
            else:
                steer = [_tick(step, gate)] * B
            tok = y0.tolist()
            logp = torch.log_softmax(lt.double(), -1)
            for b in range(B):
                do = steer[b] and category[b] >= 0
                if do:
                    L, best = seq.shape[1], None
                    for c, w in grid:
                        vec = c * directions[category[b]]
                        first = 0 if w == 0 else max(0, L - abs(w))

                        def add(h, vec=vec, first=first):
                            mask = (torch.arange(h.shape[1], device=h.device) >= first)[None, :, None]
                            return h + vec.to(h.dtype) * mask.to(h.dtype)

                        hk = _layer_output_hook(base.model.layers[steer_layer], add)
                        try:
                            y = int(base(seq[b:b + 1], use_cache=False).logits[0, -1].argmax())
                        finally:
                            hk.remove()
                        score = float(logp[b, y])
                        if best is None or score > best[0]:  # the first of equal candidates wins
                            best = (score, y)
                    tok[b] = best[1]
                tokens[b].append(tok[b])
                steered[b].append(bool(do))
            steps += 1
            last = step == max_new_tokens - 1 or bool(budget_s and time.perf_counter() - t0 > budget_s)
            if not last:
                nxt = torch.tensor(tok, device=dev_b)[:, None]
                seq = torch.cat([seq, nxt], 1)
                out_b = base(nxt, **{_cache_kwarg(base): pkv_b}, use_cache=True)
                out_t = thinking(nxt.to(dev_t), **{_cache_kwarg(thinking): pkv_t}, use_cache=True)
                pkv_b, pkv_t = _cache_of(out_b), _cache_of(out_t)
                lb, lt = out_b.logits[:, -1], out_t.logits[:, -1]
            _sync(dev_b)
            now = time.perf_counter()
            step_s.append(now - t_prev)
            step_steered.append(any(steered[b][-1] for b in range(B)))
            t_prev = now
            if last:
                break
    finally:
        handle.remove()
    return dict(tokens=tokens, steered=steered, steps=steps, wall_s=t_prev - t0, step_s=step_s,
                step_steered=step_steered, truncated=steps < max_new_tokens)
