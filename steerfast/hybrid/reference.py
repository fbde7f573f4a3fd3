"""The paper's hybrid loop written plainly with transformers: no KV cache, every forward from
scratch, steering by a forward hook on the steered layer's output. It is the oracle sf.Hybrid
is tested against (token for token, steered flag for flag) and the baseline `bench hybrid`
times; it is meant to be read, not to be fast."""
from __future__ import annotations

import torch


def _layer_output_hook(layer, fn):
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = fn(h)
        return (h, *output[1:]) if isinstance(output, tuple) else h
    return layer.register_forward_hook(hook)


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
            return h
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
        x = a.double()
        if sae.mean is not None:
            x = x - sae.mean.double()
        if sae.normalize:
            x = x / x.norm()
        z = (x - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
        latent = int(z.argmax())
        category = latent if cat_map is None else int(cat_map[latent])
        if z[latent] < threshold:
            category = -1
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
