"""The hybrid trace page (Venhoff et al., Figure 3): steered spans by category, hover details, a
legend; rendered in headless Chromium when it is installed (Debian's `chromium`), checked by
querying the rendered DOM, not by pixels."""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from steerfast.hybrid import HybridResult
from steerfast.trace_html import render_trace_html, trace_segments, write_trace_html
from test_eval import make_tokenizer

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def random_result(tok, n_problems=2, n_tokens=80, n_categories=5):
    """A HybridResult of random text (with characters HTML must escape) and random steering."""
    chars = list("abc xyz<>&\"'\n=+.")
    tokens, steered, category, coef, window = [], [], [], [], []
    for _ in range(n_problems):
        text = "".join(chars[i] for i in torch.randint(0, len(chars), (n_tokens,)).tolist())
        ids = tok.encode(text, add_special_tokens=False)
        s = (torch.rand(len(ids)) < 0.35).tolist()
        c = torch.randint(0, n_categories, (len(ids),)).tolist()
        tokens.append(ids)
        steered.append(s)
        category.append(c)
        coef.append([round(0.1 * int(torch.randint(1, 11, ())), 1) if x else None for x in s])
        window.append([[0, -1, -15][int(torch.randint(0, 3, ()))] if x else None for x in s])
    return HybridResult(tokens, steered, category, coef, window)


class Elements(HTMLParser):
    """Every element's (tag, attributes, text directly inside it)."""

    def __init__(self):
        super().__init__()
        self.elements, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        el = [tag, dict(attrs), ""]
        self.elements.append(el)
        if tag not in ("meta", "br", "img", "link"):
            self.stack.append(el)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2] += data


def query(page: str, tag: str, cls: str | None = None) -> list[tuple[dict, str]]:
    p = Elements()
    p.feed(page)
    return [(a, t) for g, a, t in p.elements if g == tag and (cls is None or cls in (a.get("class") or "").split())]


def expected(res, i):
    """Steered runs (category, coef, window) and per-category steered-token counts, from the result."""
    runs, counts, prev = [], {}, None
    for s, c, k, w in zip(res.steered[i], res.category[i], res.coef[i], res.window[i]):
        key = (c, k, w) if s else None
        if key is not None and key != prev:
            runs.append(key)
        if s:
            counts[c] = counts.get(c, 0) + 1
        prev = key
    return runs, counts


def test_segments_rebuild_the_text_and_the_page_marks_every_steered_run():
    tok = make_tokenizer()
    res = random_result(tok)
    names = ["deduce", "verify <x>", "backtrack", "compute", "plan"]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    for i in range(2):
        segs = trace_segments(res, i, decode)
        assert "".join(s["text"] for s in segs) == decode(res.tokens[i])
        assert sum(s["n_tokens"] for s in segs) == len(res.tokens[i])
        runs, counts = expected(res, i)
        page = render_trace_html(res, i, decode, names, title="problem <1>")
        spans = query(page, "span", "steered")
        assert [(int(a["data-category"]), float(a["data-coef"]), int(a["data-window"])) for a, _ in spans] == runs
        for (a, text), (c, k, w) in zip(spans, runs):
            assert a["title"] == f"{names[c]} · coef {k:g} · window {w}"  # the hover
        legend = query(page, "li", "legend-item")
        assert [int(a["data-category"]) for a, _ in legend] == sorted(counts)
        assert all(names[int(a["data-category"])] in t for a, t in legend)
        assert query(page, "title")[0][1] == "problem <1>"  # escaped in the source, whole in the DOM
        assert "<x>" not in page and "src=" not in page and "href=" not in page  # escaped; self-contained


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(tmp_path):
    tok = make_tokenizer()
    res = random_result(tok, n_problems=1, n_tokens=120)
    path = write_trace_html(res, 0, tmp_path / "trace.html", decode=lambda ids: tok.decode(ids), names=None)
    url = path.resolve().as_uri()
    run = lambda *extra: subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra, url],  # noqa: E731
                                        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    dom = run("--dump-dom", "--virtual-time-budget=2000")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert query(page, "body")[0][0].get("data-rendered") == "true"  # the inline script ran to its end
    runs, counts = expected(res, 0)
    spans = query(page, "span", "steered")
    assert len(spans) == len(runs) > 0
    assert all(a["title"].startswith(f"category {a['data-category']} · coef ") for a, _ in spans)
    legend = query(page, "li", "legend-item")
    assert [int(a["data-category"]) for a, _ in legend] == sorted(counts)
    for a, text in legend:  # data-spans: what the page's script counted in the rendered DOM
        c = int(a["data-category"])
        assert int(a["data-spans"]) == sum(r[0] == c for r in runs)
        assert f"category {c}" in text
    shot = run("--screenshot=" + str(tmp_path / "trace.png"), "--window-size=1000,800")
    assert shot.returncode == 0, shot.stderr[-2000:]
    png = (tmp_path / "trace.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1000


def test_hybrid_result_to_html(tmp_path):
    tok = make_tokenizer()
    res = random_result(tok, n_problems=2)
    decode = lambda ids: tok.decode(ids)  # noqa: E731
    assert res.to_html(1, decode=decode) == render_trace_html(res, 1, decode)
    res.to_html(0, tmp_path / "t.html", decode=decode)
    assert (tmp_path / "t.html").read_text(encoding="utf-8") == render_trace_html(res, 0, decode)
