"""`HybridResult`: what the hybrid generated, one entry per token, and the views researchers read."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class HybridResult:
    """Per problem, one entry per generated token."""
    tokens: list[list[int]]
    steered: list[list[bool]]
    category: list[list[int]]  # the controller's category at that step (-1: none)
    coef: list[list[float | None]]  # the chosen candidate's coefficient; None when not steered
    window: list[list[int | None]]
    elapsed_s: float = 0.0
    extras: dict = field(default_factory=dict)

    @property
    def steered_share(self) -> float:
        n = sum(len(s) for s in self.steered)
        return sum(sum(s) for s in self.steered) / n if n else 0.0

    @property
    def steered_share_per_sequence(self) -> list[float]:
        return [sum(s) / len(s) if s else 0.0 for s in self.steered]

    @property
    def category_counts(self) -> dict[int, int]:
        """How many steered tokens each category produced."""
        return dict(Counter(c for cs, ss in zip(self.category, self.steered) for c, s in zip(cs, ss) if s))

    def trace(self, i: int, decode=None, names: Sequence[str] | None = None) -> str:
        """Problem i's text with steered spans marked by category, as in the paper's Figure 3:
        `[category:text]`. decode(ids) -> str turns tokens into text (default: the ids)."""
        decode = decode or (lambda ids: " ".join(map(str, ids)) + " ")
        out, span, span_cat = [], [], None
        for tok, s, c in zip(self.tokens[i], self.steered[i], self.category[i]):
            cat = c if s else None
            if cat != span_cat and span:
                out.append(_mark(decode(span), span_cat, names))
                span = []
            span_cat = cat
            span.append(tok)
        if span:
            out.append(_mark(decode(span), span_cat, names))
        return "".join(out)

    def record(self, b: int, tok: int, steered: bool, category: int, candidate: tuple[float, int] | None):
        """Append sequence b's next token: both loops record through here."""
        c, w = candidate if steered else (None, None)
        self.tokens[b].append(tok)
        self.steered[b].append(steered)
        self.category[b].append(category)
        self.coef[b].append(c)
        self.window[b].append(w)

    @classmethod
    def empty(cls, batch: int) -> "HybridResult":
        return cls(*([[] for _ in range(batch)] for _ in range(5)))

    def to_html(self, i: int, path=None, decode=None, names: Sequence[str] | None = None):
        """Problem i as a self-contained HTML page (the paper's Figure 3: steered spans by category,
        coefficient and window on hover, a legend): the page's text, or written to path (returned)."""
        from ..trace_html import render_trace_html, write_trace_html

        if path is None:
            return render_trace_html(self, i, decode, names)
        return write_trace_html(self, i, path, decode, names)


def _mark(text, cat, names):
    if cat is None:
        return text
    return f"[{names[cat] if names else cat}:{text}]"
