"""Problems from local files, and the prompts each model sees.

Files: JSONL, JSON (a list, or {"data": [...]}) or parquet (needs pyarrow or pandas), in the
Hugging Face datasets layouts: GSM8K (`question`, `answer` ending in `#### n`) and MATH500
(`problem`, `answer`, `solution`, `unique_id`). Nothing is downloaded.

Prompts: the base model gets a plain-text task prompt (the paper's "Task: Answer the question
below. ... Step by step answer:"), the thinking model the question through its tokenizer's chat
template with the generation prompt added. Both templates take `{question}`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInputError
from .answers import gsm8k_gold, last_boxed

DATASETS = ("gsm8k", "math500")
_ALIASES = {"gsm8k": "gsm8k", "math500": "math500", "math": "math500", "math-500": "math500"}

BASE_TEMPLATE = (
    "Task: Answer the question below. Explain your reasoning step by step. "
    "Put your final answer within \\boxed{{}}.\n\n"
    "Question: {question}\n\n"
    "Step by step answer:\n"
)
THINKING_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
# A base model does not stop after its answer: it goes on with a new "Question:" or "Task:".
# Base-prompted completions (base and hybrid runs) are cut at the first of these before grading.
BASE_STOP_STRINGS = ("\nTask:", "\nQuestion:")


@dataclass
class Problem:
    idx: int  # position in the file: the key results are stored under
    question: str
    gold: str  # the reference final answer
    dataset: str
    id: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def qhash(self) -> str:
        """A short hash of the question: resuming checks a stored result belongs to this problem."""
        return hashlib.sha256(self.question.encode()).hexdigest()[:16]


def canonical_dataset(name: str) -> str:
    key = str(name).lower()
    if key not in _ALIASES:
        raise InvalidInputError(f"dataset must be one of {DATASETS} (or 'math'), got {name!r}")
    return _ALIASES[key]


def _find_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".parquet")
                       and not p.name.startswith("."))
        if len(found) == 1:
            return found[0]
        raise InvalidInputError(f"{path} is a directory holding {len(found)} data files "
                                f"({', '.join(str(p.relative_to(path)) for p in found[:6])}"
                                f"{' ...' if len(found) > 6 else ''}): name one file")
    raise InvalidInputError(f"problem file {path} does not exist (problems are read from local files only)")


def read_rows(path) -> list[dict]:
    """The rows of a JSONL, JSON or parquet file (or of the one such file in a directory)."""
    path = _find_file(Path(path))
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        except ImportError:
            try:
                import pandas as pd
            except ImportError:
                raise InvalidInputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow) or pandas; "
                                        "or convert it to JSONL") from None
            return pd.read_parquet(path).to_dict("records")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path}: not valid JSON ({e})") from None
        rows = data.get("data", data.get("rows")) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise InvalidInputError(f"{path}: expected a JSON list of problems or {{'data': [...]}}")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def detect_dataset(rows: list[dict]) -> str:
    if rows and isinstance(rows[0], dict):
        if "problem" in rows[0]:
            return "math500"
        if "question" in rows[0]:
            return "gsm8k"
    raise InvalidInputError("cannot tell the dataset from the rows' fields (GSM8K has 'question' and 'answer', "
                            "MATH500 'problem' and 'answer'): pass dataset=")


def load_problems(path, dataset: str | None = None, limit: int | None = None, start: int = 0) -> list[Problem]:
    """Problems `start .. start+limit` of a local GSM8K or MATH500 file. dataset: "gsm8k" or
    "math500" ("math"), or None to tell from the fields. Problem.idx is the row number."""
    rows = read_rows(path)
    dataset = canonical_dataset(dataset) if dataset else detect_dataset(rows)
    qkey = "question" if dataset == "gsm8k" else "problem"
    end = len(rows) if limit is None else min(len(rows), start + limit)
    problems = []
    for i in range(start, end):
        row = rows[i]
        if not isinstance(row, dict) or qkey not in row:
            raise InvalidInputError(f"{path}: row {i} has no {qkey!r} field (a {dataset} file needs it)")
        if dataset == "gsm8k":
            if "answer" not in row:
                raise InvalidInputError(f"{path}: row {i} has no 'answer' field")
            gold = gsm8k_gold(str(row["answer"]))
        else:
            gold = row.get("answer")
            if gold is None and row.get("solution"):
                gold = last_boxed(str(row["solution"]))
            if gold is None:
                raise InvalidInputError(f"{path}: row {i} has neither 'answer' nor a \\boxed{{}} in 'solution'")
        meta = {k: row[k] for k in ("level", "subject", "type") if k in row}
        problems.append(Problem(idx=i, question=str(row[qkey]), gold=str(gold), dataset=dataset,
                                id=str(row.get("unique_id", row.get("id", i))), meta=meta))
    return problems


# ---------------------------------------------------------------------------------------- prompts

def base_prompt(tokenizer, question: str, template: str = BASE_TEMPLATE) -> list[int]:
    """The base model's prompt ids: the plain-text template, with the tokenizer's BOS if it adds one."""
    return list(tokenizer(template.format(question=question), add_special_tokens=True)["input_ids"])


def thinking_prompt(tokenizer, question: str, template: str = THINKING_TEMPLATE) -> list[int]:
    """The thinking model's prompt ids: the question as a user turn through the chat template,
    with the generation prompt (the template writes BOS itself, so none is added again)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError("the thinking model's tokenizer has no chat_template (tokenizer_config.json / "
                                "chat_template.jinja); the thinking run needs one")
    text = tokenizer.apply_chat_template([{"role": "user", "content": template.format(question=question)}],
                                         add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut_at_stops(text: str, stops=BASE_STOP_STRINGS) -> str:
    """The text before the first stop string."""
    cut = len(text)
    for s in stops or ():
        k = text.find(s)
        if k >= 0:
            cut = min(cut, k)
    return text[:cut]
