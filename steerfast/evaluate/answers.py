"""Answer extraction and grading for GSM8K and MATH500, rule based (no judge model).

`extract_answer(text)` finds a completion's final answer: the last `\\boxed{...}` (nested braces
allowed), else the last `#### n`, else the last "The answer is ...", else the last number. A
thinking model's trace (`<think> ... </think>`) is dropped first.

`grade(pred, gold, dataset)` says whether a predicted answer equals the reference:
- GSM8K: as numbers (commas, signs, decimals, currency, units, trailing periods, percent), falling
  back to the MATH rules for anything that is not a plain number;
- MATH: after normalising LaTeX (`\\dfrac`/`\\tfrac`, `\\left`/`\\right`, degrees, `\\text{...}`
  units, percent, spacing, `\\frac12`, `\\sqrt2`, `a/b`, `x = ...`), as strings, numbers,
  intervals, tuples, sets, matrices, unordered answer lists, and finally symbolically through
  sympy, with a time limit.
It never raises: odd text grades as wrong.

Symbolic comparison never `eval`s model text: LaTeX is translated into a token stream of numbers,
single-letter symbols, whitelisted function names, operators and parentheses, and only that is
handed to sympy's parser.
"""
from __future__ import annotations

import gc
import math
import re
import signal
import sys
import threading
import time
from fractions import Fraction

__all__ = ["extract_answer", "grade", "gsm8k_equal", "math_equal", "normalize_math", "parse_number",
           "strip_thinking", "gsm8k_gold", "last_boxed"]

SYMPY_TIMEOUT_S = 3.0

# ---------------------------------------------------------------------------------------- extract

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S)


def strip_thinking(text: str) -> str:
    """Drop the thinking trace: everything up to the last `</think>` (chat templates often open
    `<think>` in the prompt, so the completion holds only the closing tag), and any closed
    `<think> ... </think>` block. An unclosed trace is kept (it is all there is)."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return _THINK_BLOCK.sub("", text)


def _braced(text: str, i: int) -> tuple[str, int] | None:
    """The content of the brace group opening at text[i] == '{' and the index after it; None if
    it never closes. `\\{` and `\\}` inside do not count."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j], j + 1
        j += 1
    return None


_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`)."""
    for m in reversed(list(_BOXED.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            got = _braced(text, j)
            if got is not None:
                return got[0].strip()
        elif j > m.end():  # "\boxed 5": the next token
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                return tok.group(0).rstrip(".")
    return None


_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"(?=answer\s*(?:is|:|=)\s*:?\s*([^\n]*))", re.I)  # overlapping: "Answer: the answer is"
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _clean_inline(ans: str) -> str:
    """Tidy a span cut out of prose: markdown bold, math delimiters, a trailing period."""
    ans = ans.strip().replace("**", "").strip()
    ans = re.split(r"\.\s|\.$|;\s", ans, maxsplit=1)[0] if not re.fullmatch(r"-?\d*\.\d+", ans) else ans
    ans = ans.strip()
    for a, b in (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$"), ("$", "$")):
        if ans.startswith(a) and ans.endswith(b) and len(ans) >= len(a) + len(b):
            ans = ans[len(a):len(ans) - len(b)].strip()
    ans = ans.rstrip(".").strip()
    return ans.replace(",", "") if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", ans) else ans


def extract_answer(text) -> str | None:
    """The final answer of a completion (see the module docstring), or None when there is none."""
    if not isinstance(text, str):
        return None
    try:
        text = strip_thinking(text).replace("\u2212", "-")
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed
        hashes = [h.strip() for h in _HASHES.findall(text) if h.strip()]
        if hashes:
            return _clean_inline(hashes[-1])
        for m in reversed(list(_ANSWER_IS.finditer(text))):
            ans = _clean_inline(m.group(1))
            if ans and re.search(r"[\dA-Za-z\\]", ans):
                return ans
        nums = _NUMBER.findall(text)
        if nums:
            return nums[-1].replace(",", "")
    except Exception:  # never raise on odd text
        return None
    return None


def gsm8k_gold(answer: str) -> str:
    """GSM8K's reference: the number after `####` (the whole string if there is none), no commas."""
    m = list(_HASHES.finditer(answer))
    gold = m[-1].group(1) if m else answer
    return gold.strip().replace(",", "").rstrip(".")


# ---------------------------------------------------------------------------------------- GSM8K

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname)\s*(?=\{)")


def _unwrap_commands(s: str, repl=lambda content, before, after: content) -> str:
    """Replace each `\\text{...}`-like group by repl(content, text before, text after)."""
    for _ in range(50):
        m = _TEXT_CMD.search(s)
        if not m:
            return s
        got = _braced(s, m.end())
        if got is None:
            return s[:m.start()] + s[m.end():]
        content, end = got
        s = s[:m.start()] + repl(content, s[:m.start()], s[end:]) + s[end:]
    return s


def _to_fraction(tok: str) -> Fraction | None:
    try:
        return Fraction(tok.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(s) -> Fraction | None:
    """A GSM8K-style answer as an exact number: the last number in it after dropping currency,
    units, percent, thousands separators and LaTeX wrappers; `\\frac{a}{b}` and `a/b` too."""
    if not isinstance(s, str):
        return None
    s = s.replace("\u2212", "-").replace("**", "")
    s = _unwrap_commands(s)
    s = s.replace("\\$", " ").replace("$", " ").replace("\\%", " ").replace("%", " ").replace("\\!", "")
    s = s.replace("{,}", ",")
    s = re.sub(r"\\[dt]?frac\s*\{\s*(-?[\d.]+)\s*\}\s*\{\s*(-?[\d.]+)\s*\}", r"\1/\2", s)
    s = re.sub(r"\\[dt]?frac\s*(\d)(\d)", r"\1/\2", s)
    if re.search(r"\\[a-zA-Z]", s):  # other LaTeX (\sqrt, \pi ...): not a plain number
        return None
    nums = _NUMBER.findall(s)
    if not nums:
        return None
    tok = nums[-1]
    if "/" in tok:
        a, b = tok.split("/")
        fa, fb = _to_fraction(a), _to_fraction(b)
        return None if fa is None or fb in (None, 0) else fa / fb
    return _to_fraction(tok)


def _close(a: Fraction | float, b: Fraction | float, rel: float = 1e-6) -> bool:
    if a == b:
        return True
    a, b = float(a), float(b)
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rel * max(1.0, abs(b))


def gsm8k_equal(pred, gold) -> bool:
    if pred is None or gold is None:
        return False
    gold = gsm8k_gold(str(gold))
    p, g = parse_number(str(pred)), parse_number(gold)
    if p is not None and g is not None:
        return _close(p, g)
    return math_equal(pred, gold)


# ---------------------------------------------------------------------------------------- MATH

_ROW = "\x00"  # a matrix row break (\\) while normalising


def _fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac{a}b` -> `\\frac{a}{b}`, `\\frac1{b}` -> ..."""
    out, i = [], 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j] + "\\frac")
        k = j + 5
        args = []
        for _ in range(2):
            while k < len(s) and s[k] == " ":
                k += 1
            if k >= len(s):
                break
            if s[k] == "{":
                got = _braced(s, k)
                if got is None:
                    break
                args.append(got[0])
                k = got[1]
            elif s[k] == "\\":
                m = re.match(r"\\[a-zA-Z]+", s[k:])
                args.append(m.group(0) if m else s[k:k + 2])
                k += len(args[-1])
            else:
                args.append(s[k])
                k += 1
        if len(args) < 2:
            out.append(s[j + 5:k])
        else:
            out.append("{" + _fix_fracs(args[0]) + "}{" + _fix_fracs(args[1]) + "}")
        i = k


def _unit_or_text(content: str, before: str, after: str) -> str:
    c = content.strip()
    if c in ("and", "or", ","):
        return ","
    # a unit after a quantity ("5\text{ cm}"): drop it; otherwise keep the words themselves
    if before.strip() and re.fullmatch(r"[A-Za-z][A-Za-z .]*", c) and not after.strip().startswith(("=", "+")):
        return ""
    return content


def normalize_math(s) -> str:
    """A canonical string for a MATH answer (the comparisons after it are more forgiving)."""
    if s is None:
        return ""
    s = str(s).strip().replace("\u2212", "-").replace("\n", " ")
    s = s.replace("\\\\", _ROW)
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|bigg|Bigg|big|Big)(?![a-zA-Z])\s*", "", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "").replace("\\ ", " ")
    s = s.replace("~", " ")
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = s.replace("\\le ", "\\leq ").replace("\\ge ", "\\geq ")
    # degrees, percent, dollars
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\circ(?![a-zA-Z])|\u00b0|\\degree(?![a-zA-Z])", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    # \text{...}: units after a quantity go, otherwise the words stay (unit powers go with units)
    s = re.sub(r"(\\(?:text|mathrm|mbox)\s*\{\s*[A-Za-z][A-Za-z .]*\})\s*\^\s*\{?\d\}?", r"\1", s)
    s = _unwrap_commands(s, _unit_or_text)
    s = re.sub(r"\\(?:mathbf|boldsymbol|bm)\s*", "", s)
    s = s.strip().rstrip(".").strip()
    # plain-word units after a number: "20 square units", "16 cm^2"
    s = re.sub(r"(?<=\d)\s+(?:[A-Za-z]{2,}\.?\s*)+(?:\^\s*\{?\d\}?)?$", "", s).strip()
    # "x = 5", "y \in [1, 2]" -> the right-hand side (one short variable on the left)
    m = re.fullmatch(r"\s*[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*(?:=|\\in)\s*(.+)", s)
    if m and "=" not in m.group(1):
        s = m.group(1)
    s = _fix_fracs(s)
    s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    s = re.sub(r"(\\[a-zA-Z]+)\s+([a-zA-Z0-9])", r"\1{\2}", s)  # "\sin x" -> "\sin{x}", not "\sinx"
    s = s.replace(" ", "")
    s = s.replace("{,}", ",")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)  # ".5" -> "0.5"
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    m = re.fullmatch(r"\(([A-Ea-e])\)|\\text\{\(([A-E])\)\}", s)  # "(C)" -> "C"
    if m:
        s = m.group(1) or m.group(2)
    if re.fullmatch(r"-?\d+\.\d*?0+", s):  # "2.50" -> "2.5", "3.0" -> "3"
        s = s.rstrip("0").rstrip(".")
    return s


def _split_top(s: str, sep: str) -> list[str]:
    """Split at `sep` outside any bracket."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            cur.append(s[i:i + 2])
            i += 2
            continue
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if depth == 0 and s.startswith(sep, i):
            parts.append("".join(cur))
            cur = []
            i += len(sep)
            continue
        cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _bracketed(s: str):
    """(open, close, items) for `(a,b)`, `[a,b)`, `\\{a,b\\}` with a comma at the top level."""
    if s.startswith("\\{") and s.endswith("\\}"):
        o, c, inner = "{", "}", s[2:-2]
    elif len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        o, c, inner = s[0], s[-1], s[1:-1]
    else:
        return None
    if _split_top(s, ",") != [s]:  # "(1,2),(3,4)": a list of tuples, not one bracket
        return None
    items = _split_top(inner, ",")
    if o != "{" and len(items) < 2:
        return None
    return o, c, items


def _matrix(s: str):
    m = re.fullmatch(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[^}]*\})?(.*)\\end\{\1\}", s)
    if not m:
        return None
    return [row.split("&") for row in m.group(2).split(_ROW) if row != ""]


def _unordered_equal(xs: list[str], ys: list[str], timeout: float) -> bool:
    if len(xs) != len(ys):
        return False
    left = list(ys)
    for x in xs:
        for k, y in enumerate(left):
            if _equiv(x, y, timeout):
                del left[k]
                break
        else:
            return False
    return True


def _simple_number(s: str) -> Fraction | None:
    if re.fullmatch(r"-?\d+(?:\.\d+)?", s):
        return Fraction(s)
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if m and Fraction(m.group(3)) != 0:
        v = Fraction(m.group(2)) / Fraction(m.group(3))
        return -v if m.group(1) else v
    return None


def _equiv(a: str, b: str, timeout: float) -> bool:
    if a == b:
        return True
    if not a or not b:
        return False
    ma, mb = _matrix(a), _matrix(b)
    if ma is not None or mb is not None:
        if ma is None or mb is None or [len(r) for r in ma] != [len(r) for r in mb]:
            return False
        return all(_equiv(x, y, timeout) for ra, rb in zip(ma, mb) for x, y in zip(ra, rb))
    if "\\cup" in a or "\\cup" in b:
        pa, pb = a.split("\\cup"), b.split("\\cup")
        return len(pa) == len(pb) and all(_equiv(x, y, timeout) for x, y in zip(pa, pb))
    ba, bb = _bracketed(a), _bracketed(b)
    if ba is not None or bb is not None:
        if ba is None or bb is None or ba[:2] != bb[:2] or len(ba[2]) != len(bb[2]):
            return False
        if ba[0] == "{":
            return _unordered_equal(ba[2], bb[2], timeout)
        return all(_equiv(x, y, timeout) for x, y in zip(ba[2], bb[2]))
    la, lb = _split_top(a, ","), _split_top(b, ",")
    if len(la) > 1 or len(lb) > 1:  # several answers: in any order
        return _unordered_equal(la, lb, timeout)
    ea, eb = _split_top(a, "="), _split_top(b, "=")
    if len(ea) == 2 and len(eb) == 2:  # equations: the same sides
        return _equiv(ea[0], eb[0], timeout) and _equiv(ea[1], eb[1], timeout)
    if len(ea) != len(eb):
        return False
    na, nb = _simple_number(a), _simple_number(b)
    if na is not None and nb is not None:
        return _close(na, nb)
    if re.fullmatch(r"[A-Za-z]+", a) and re.fullmatch(r"[A-Za-z]+", b):  # words, choice letters
        return a.lower() == b.lower() if len(a) > 1 else False
    return _sympy_equal(a, b, timeout)


def math_equal(pred, gold, timeout: float = SYMPY_TIMEOUT_S) -> bool:
    """MATH-style equivalence of a predicted and a reference answer (never raises)."""
    if pred is None or gold is None:
        return False
    try:
        a, b = normalize_math(pred), normalize_math(gold)
        return bool(a) and bool(b) and _equiv(a, b, timeout)
    except Exception:  # RecursionError included: odd text is simply wrong
        return False


def grade(pred, gold, dataset: str = "math") -> bool:
    """True when `pred` (an extracted answer) equals `gold`. dataset: "gsm8k" or "math"/"math500".
    Never raises."""
    try:
        if pred is None or gold is None:
            return False
        if str(dataset).lower() == "gsm8k":
            return gsm8k_equal(str(pred), str(gold))
        return math_equal(str(pred), str(gold))
    except Exception:
        return False


# ---------------------------------------------------------------------------------------- sympy

_FUNCS = {"sqrt", "log", "ln", "sin", "cos", "tan", "cot", "sec", "csc", "exp", "arcsin", "arccos", "arctan",
          "sinh", "cosh", "tanh"}
_CONSTS = {"pi": "pi", "infty": "oo", "infinity": "oo"}
_OPS = {"cdot": "*", "times": "*", "div": "/", "ast": "*"}


class _Untranslatable(Exception):
    pass


def _group(s: str, i: int) -> tuple[str, int]:
    """The argument starting at s[i]: a brace group, a command, or one character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise _Untranslatable("missing argument")
    if s[i] == "{":
        got = _braced(s, i)
        if got is None:
            raise _Untranslatable("unclosed brace")
        return got
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if not m:
            raise _Untranslatable("bad command")
        return m.group(0), i + len(m.group(0))
    return s[i], i + 1


def _paren(s: str, i: int) -> tuple[str, int]:
    """The content of the parenthesis group opening at s[i] == '(' and the index after it."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"(": 1, ")": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1:j], j + 1
    raise _Untranslatable("unclosed parenthesis")


def _latex_to_tokens(s: str) -> list[str]:
    """Translate normalised LaTeX into tokens: numbers, single letters, whitelisted names,
    operators and parentheses. Raises _Untranslatable for anything else."""
    out: list[str] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c.isspace():
            i += 1
        elif c.isdigit() or (c == "." and i + 1 < len(s) and s[i + 1].isdigit()):
            m = re.match(r"\d*\.?\d+|\d+", s[i:])
            out.append(m.group(0))
            i += len(m.group(0))
        elif c.isalpha():
            out.append(c)  # letters are single symbols: "xy" is x*y
            i += 1
        elif c in "+-*/":
            out.append(c)
            i += 1
        elif c == "^":
            arg, i = _group(s, i + 1)
            out += ["**", "("] + _latex_to_tokens(arg) + [")"]
        elif c in "({[":
            out.append("(")
            i += 1
        elif c in ")}]":
            out.append(")")
            i += 1
        elif c == "\\":
            m = re.match(r"\\([a-zA-Z]+)", s[i:])
            if not m:
                raise _Untranslatable(s[i:i + 2])
            name, i = m.group(1), i + len(m.group(0))
            if name == "frac":
                num, i = _group(s, i)
                den, i = _group(s, i)
                out += ["(", "("] + _latex_to_tokens(num) + [")", "/", "("] + _latex_to_tokens(den) + [")", ")"]
            elif name == "sqrt":
                root = None
                if s[i:i + 1] == "[":
                    j = s.find("]", i)
                    if j < 0:
                        raise _Untranslatable("sqrt[")
                    root, i = s[i + 1:j], j + 1
                arg, i = _group(s, i)
                inner = ["("] + _latex_to_tokens(arg) + [")"]
                out += (["sqrt", "("] + inner + [")"] if root is None else
                        ["("] + inner + ["**", "(", "1", "/", "("] + _latex_to_tokens(root) + [")", ")", ")"])
            elif name in _CONSTS:
                out.append(_CONSTS[name])
            elif name in _OPS:
                out.append(_OPS[name])
            elif name in _FUNCS:
                fn = {"ln": "log", "arcsin": "asin", "arccos": "acos", "arctan": "atan"}.get(name, name)
                while i < len(s) and s[i] == " ":
                    i += 1
                power = None
                if s[i:i + 1] == "^":  # \sin^2 x = (sin x)^2
                    power, i = _group(s, i + 1)
                    while i < len(s) and s[i] == " ":
                        i += 1
                if s[i:i + 1] in ("(", "{"):
                    arg, i = _group(s, i) if s[i] == "{" else _paren(s, i)
                else:
                    arg, i = _group(s, i)
                call = [fn, "(", "("] + _latex_to_tokens(arg) + [")", ")"]
                out += call if power is None else ["("] + call + [")", "**", "("] + _latex_to_tokens(power) + [")"]
            else:
                raise _Untranslatable(f"\\{name}")
        else:
            raise _Untranslatable(c)
    return out


def _to_python(tokens: list[str]) -> str:
    """Join tokens with explicit multiplication where LaTeX juxtaposes ("2x", "x(y)", ")(")."""
    names = _FUNCS | {"asin", "acos", "atan", "pi", "oo"}
    out: list[str] = []
    prev = None
    for t in tokens:
        is_value_start = t == "(" or t[0].isalnum()
        prev_is_value_end = prev is not None and (prev == ")" or prev[0].isalnum())
        prev_is_func = prev in _FUNCS or prev in ("asin", "acos", "atan")
        if is_value_start and prev_is_value_end and not (prev_is_func and t == "("):
            out.append("*")
        out.append(t)
        prev = t
    expr = " ".join(out)
    # belt and braces: nothing but these tokens can reach the parser
    for tok in expr.split():
        if not (tok in names or tok in "+-*/()" or tok == "**" or re.fullmatch(r"\d*\.?\d+|[A-Za-z]", tok)):
            raise _Untranslatable(tok)
    return expr


def _parse_sympy(s: str):
    import sympy
    from sympy.parsing.sympy_parser import auto_number, parse_expr, rationalize

    expr = _to_python(_latex_to_tokens(s))
    letters = {ch: sympy.Symbol(ch) for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    glb = {name: getattr(sympy, name) for name in (
        "Integer", "Float", "Rational", "Symbol", "Add", "Mul", "Pow", "sqrt", "log", "sin", "cos", "tan", "cot",
        "sec", "csc", "exp", "asin", "acos", "atan", "sinh", "cosh", "tanh", "pi", "oo")}
    glb["__builtins__"] = {}  # the expression holds only whitelisted tokens; no builtins either way
    tree = parse_expr(expr, local_dict=letters, global_dict=glb, transformations=(auto_number, rationalize),
                      evaluate=False)
    _check_size(tree)
    return parse_expr(expr, local_dict=letters, global_dict=glb, transformations=(auto_number, rationalize))


def _check_size(tree) -> None:
    """Refuse towers like 10^{10^{10}} before sympy evaluates them (C-level big-int work cannot
    be interrupted by the time limit)."""
    import sympy

    for node in sympy.preorder_traversal(tree):
        if isinstance(node, sympy.Pow) and node.exp.is_number:
            try:
                e = abs(complex(node.exp.evalf(15)))
            except (TypeError, ValueError, OverflowError):
                raise _Untranslatable("exponent") from None
            if not math.isfinite(e) or e > 10_000:
                raise _Untranslatable("huge exponent")
        if isinstance(node, sympy.Integer) and abs(int(node)) > 10 ** 100:
            raise _Untranslatable("huge number")


class _Timeout(BaseException):
    """BaseException: sympy's own `except Exception` blocks must not swallow it."""


def _with_time_limit(fn, seconds: float):
    """fn(), or raise _Timeout after `seconds`. In the main thread (with no other alarm set) a
    SIGALRM timer; elsewhere a trace function that checks the clock at every Python call (signals
    reach only the main thread, and a helper thread could not be stopped: it would keep burning
    CPU after its answer was given up on). Both stop sympy's pure-Python work; C-level big-number
    work is kept small by _check_size."""
    if (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0):
        def on_alarm(signum, frame):
            raise _Timeout()
        old = signal.signal(signal.SIGALRM, on_alarm)
        # An alarm that lands in a weakref callback or __del__ is swallowed there ("unraisable") and
        # the work runs on: seen when the cyclic collector freed other code's objects (torch's) in the
        # middle of sympy's work. So no collection during the work, and the alarm repeats until one
        # lands in the work itself.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        signal.setitimer(signal.ITIMER_REAL, seconds, 0.2)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            if gc_was_enabled:
                gc.enable()
    deadline = time.monotonic() + seconds

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Timeout()
        return None  # calls only, no per-line tracing
    prev = sys.gettrace()
    sys.settrace(tracer)
    try:
        return fn()
    finally:
        sys.settrace(prev)


def _sympy_equal(a: str, b: str, timeout: float) -> bool:
    def work():
        import sympy

        try:
            x, y = _parse_sympy(a), _parse_sympy(b)
        except Exception:  # untranslatable or unparsable: not equal
            return False
        if x.has(sympy.nan, sympy.zoo) or y.has(sympy.nan, sympy.zoo):
            return False
        if x == y:
            return True
        d = sympy.simplify(x - y)
        if d == 0:
            return True
        if d.is_number:
            v = complex(d.evalf(30))
            scale = max(1.0, abs(complex(y.evalf(30)))) if y.is_number else 1.0
            return math.isfinite(abs(v)) and abs(v) <= 1e-9 * scale
        return False
    try:
        return bool(_with_time_limit(work, timeout))
    except (_Timeout, Exception):  # out of time, or anything sympy throws
        return False
