"""A hybrid generation as a self-contained HTML page (Venhoff et al. 2025, Figure 3): the text,
each steered span highlighted in its category's colour, its coefficient and window on hover, and
a legend of the categories with their steered-token counts. Inline CSS and script, no external
asset, so the file opens anywhere offline.

    from steerfast.trace_html import write_trace_html
    write_trace_html(result, 0, "trace.html", decode=tokenizer.decode, names=category_names)
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Callable, Sequence

# 20 colours that stay readable behind black text; category c takes PALETTE[c % 20], so a category
# keeps its colour across problems and pages
PALETTE = ("#8ecae6", "#ffb703", "#90be6d", "#f28482", "#cdb4db", "#f6bd60", "#84a59d", "#f7a072",
           "#a0c4ff", "#caffbf", "#ffd6a5", "#bdb2ff", "#fdffb6", "#9bf6ff", "#ffc6ff", "#b5e48c",
           "#e9c46a", "#a8dadc", "#f4acb7", "#d4a373")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #111; }
h1 { font-size: 1.3em; }
#stats { color: #444; }
#legend { display: flex; flex-wrap: wrap; gap: .4em 1.2em; padding: 0; list-style: none; }
.legend-item { cursor: default; }
.swatch { display: inline-block; width: 1em; height: 1em; margin-right: .35em; vertical-align: -.15em;
          border: 1px solid #0003; border-radius: 2px; }
#trace { white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.6;
         border: 1px solid #ddd; padding: 1em; border-radius: 4px; }
.steered { border-radius: 2px; }
#trace.focus .steered:not(.hit) { background: none !important; }
"""

# hovering a legend entry leaves only that category's spans highlighted
_SCRIPT = """
(function () {
  var trace = document.getElementById('trace');
  document.querySelectorAll('.legend-item').forEach(function (item) {
    var spans = trace.querySelectorAll('.steered[data-category="' + item.dataset.category + '"]');
    item.dataset.spans = spans.length;
    item.addEventListener('mouseenter', function () {
      trace.classList.add('focus'); spans.forEach(function (s) { s.classList.add('hit'); });
    });
    item.addEventListener('mouseleave', function () {
      trace.classList.remove('focus'); spans.forEach(function (s) { s.classList.remove('hit'); });
    });
  });
  document.body.dataset.rendered = 'true';
})();
"""


def _ids_text(ids) -> str:
    return " ".join(map(str, ids)) + " "


def _category_name(cat: int, names: Sequence[str] | None) -> str:
    return str(names[cat]) if names is not None and 0 <= cat < len(names) else f"category {cat}"


def trace_segments(result, i: int, decode: Callable | None = None) -> list[dict]:
    """Problem i's generation as runs of tokens sharing (steered, category, coef, window): dicts
    with text, n_tokens, steered, category, coef, window. Each run's text is the difference of
    the decoded prefixes, so multi-token characters and merged spaces come out as the tokenizer
    writes the whole text."""
    tokens = result.tokens[i]
    keys = [(bool(s), c if s else None, k if s else None, w if s else None)
            for s, c, k, w in zip(result.steered[i], result.category[i], result.coef[i], result.window[i])]
    decode = decode or _ids_text
    out, start, prev = [], 0, ""
    for end in range(1, len(tokens) + 1):
        if end < len(tokens) and keys[end] == keys[start]:
            continue
        text = decode(tokens[:end])
        steered, cat, coef, window = keys[start]
        out.append(dict(text=text[len(prev):], n_tokens=end - start, steered=steered, category=cat, coef=coef,
                        window=window))
        prev, start = text, end
    return out


def render_trace_html(result, i: int, decode: Callable | None = None, names: Sequence[str] | None = None,
                      title: str = "steerfast hybrid trace", note: str | None = None) -> str:
    """The HTML page of problem i of a `HybridResult`. decode(ids) -> str (default: the ids);
    names[c]: category c's name (default "category c"); note: a line shown under the title."""
    if not 0 <= i < len(result.tokens):
        raise IndexError(f"problem {i} of {len(result.tokens)}")
    segments = trace_segments(result, i, decode)
    n = len(result.tokens[i])
    counts: dict[int, int] = {}
    for s in segments:
        if s["steered"]:
            counts[s["category"]] = counts.get(s["category"], 0) + s["n_tokens"]
    n_steered = sum(counts.values())
    legend = "".join(
        f'<li class="legend-item" data-category="{c}"><span class="swatch" style="background:{PALETTE[c % 20]}">'
        f'</span>{html.escape(_category_name(c, names))} <span class="count">({counts[c]} tokens)</span></li>'
        for c in sorted(counts))
    body = []
    for s in segments:
        text = html.escape(s["text"])
        if not s["steered"]:
            body.append(text)
            continue
        c = s["category"]
        hover = f"{_category_name(c, names)} · coef {s['coef']:g} · window {s['window']}"
        body.append(f'<span class="steered" data-category="{c}" data-coef="{s["coef"]:g}" data-window="{s["window"]}" '
                    f'title="{html.escape(hover)}" style="background:{PALETTE[c % 20]}">{text}</span>')
    share = f"{100 * n_steered / n:.1f}%" if n else "–"
    stats = f"{n} tokens generated, {n_steered} steered ({share})"
    meta = json.dumps(dict(tokens=n, steered=n_steered, categories={str(c): v for c, v in sorted(counts.items())}))
    meta = meta.replace("</", "<\\/")  # never closes the script element it sits in
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_STYLE}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n'
            + (f'<p id="note">{html.escape(note)}</p>\n' if note else "")
            + f'<p id="stats">{html.escape(stats)}; steered spans are highlighted by category (hover for the '
            f'coefficient and window)</p>\n<ul id="legend">{legend}</ul>\n<div id="trace">{"".join(body)}</div>\n'
            f'<script type="application/json" id="trace-data">{meta}</script>\n'
            f'<script>{_SCRIPT}</script>\n</body></html>\n')


def write_trace_html(result, i: int, path, decode: Callable | None = None, names: Sequence[str] | None = None,
                     title: str = "steerfast hybrid trace", note: str | None = None) -> Path:
    """Write `render_trace_html(...)` to path (parents made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_trace_html(result, i, decode, names, title, note), encoding="utf-8")
    return path
