"""The evaluation runner: generate in batches, grade, append each finished problem to JSONL,
resume, split problems over processes, merge, summarise.

Layout of an output directory:

    OUT/<run>/config.json             what the run was made with; a resume must match it
    OUT/<run>/results_rank<r>.jsonl   one line per finished problem, appended as batches finish
    OUT/<run>/results.jsonl           all ranks' lines merged, sorted by problem index
    OUT/hybrid/traces/<idx>.html      each hybrid problem's text, steered spans highlighted (Figure 3)
    OUT/summary.json, OUT/summary.md  accuracy (95% Wilson interval), gap recovered, steered share,
                                      steered tokens per category, tokens/s

The steered share is over the tokens the grader reads (up to the cut at the next "Question:" /
"Task:"), what the paper's ~12% measures; the share over every generated token is reported beside
it as steered_share_raw.

Resuming reads every shard (whatever world size wrote it) and skips the problems found there; a
killed run loses at most the batch in flight (each batch's lines are flushed and fsynced), and a
line cut short by the kill is dropped when the shard is next opened.

Several processes (`torchrun --nproc_per_node N`): rank r takes problems r, r + N, ...; ranks
coordinate through torch.distributed with the gloo backend (only a barrier is exchanged; the
models stay on each rank's own device), and rank 0 merges after the barrier.
"""
from __future__ import annotations

import inspect
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol, Sequence

from ..errors import InvalidInputError, SequenceTooLongError
from ..progress import bar as progress_bar
from ..progress import enabled as progress_enabled
from . import lock
from ..trace_html import render_trace_html
from .answers import extract_answer, grade
from .data import (BASE_STOP_STRINGS, BASE_TEMPLATE, THINKING_TEMPLATE, Problem, base_prompt, cut_at_stops,
                   thinking_prompt)

RUNS = ("base", "thinking", "hybrid")


# ---------------------------------------------------------------------------------------- generators

@dataclass
class Completion:
    text: str  # decoded, special tokens skipped (cut at the stop strings for base-prompted runs)
    n_tokens: int  # tokens generated (what compute was spent on)
    stopped: bool  # ended at a stop token, not at max_new_tokens
    n_steered: int = 0
    categories: dict = field(default_factory=dict)  # category -> steered tokens
    trace: str | None = None  # hybrid: the text with steered spans marked [category:...] (the paper's Fig. 3)
    n_graded: int | None = None  # tokens up to the stop-string cut (those the grader reads); None: all
    n_steered_graded: int | None = None  # steered tokens among those
    html: str | None = None  # hybrid: the trace as an HTML page (written to traces/, not to the JSONL)


class Generator(Protocol):
    run: str

    def generate(self, questions: Sequence[str]) -> list[Completion]: ...  # may take on_tokens=, see _Stream

    def config(self) -> dict: ...


class _Stream:
    """A decode loop's callback(step, tokens) -> on_tokens(n): how many sequences, not yet past
    their stop token, gained a token this step (what a tokens bar counts)."""

    def __init__(self, on_tokens, n: int, eos):
        self.on_tokens, self.done, self.eos = on_tokens, [False] * n, set(eos)

    def __call__(self, step, tokens):
        n = 0
        for b, t in enumerate(tokens):
            if not self.done[b]:
                n += 1
                self.done[b] = t in self.eos
        if n:
            self.on_tokens(n)


def default_eos(model, tokenizer) -> list[int]:
    """Stop ids: the checkpoint's EOS ids and the tokenizer's."""
    ids = set(getattr(model.args, "eos_token_ids", ()) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def graded_tokens(tokenizer, ids: Sequence[int], kept: str) -> int:
    """How many leading tokens hold the text `kept` (a prefix of their decoded text, cut at a stop
    string): the fewest whose decoded text reaches len(kept), the token the cut falls in included."""
    lo, hi = 0, len(ids)
    while lo < hi:  # decoded length grows with the prefix: bisect on it
        mid = (lo + hi) // 2
        if len(_decode(tokenizer, ids[:mid])) >= len(kept):
            hi = mid
        else:
            lo = mid + 1
    return lo


class BaseGenerator:
    """The base model alone, on its plain-text prompt, greedy."""
    run = "base"

    def __init__(self, model, tokenizer, max_new_tokens: int, template: str = BASE_TEMPLATE,
                 stop_strings: Sequence[str] | None = BASE_STOP_STRINGS, eos_ids: Sequence[int] | None = None,
                 info: dict | None = None):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.template, self.stop_strings = template, tuple(stop_strings or ())
        self.eos = list(eos_ids) if eos_ids is not None else default_eos(model, tokenizer)
        self.info = dict(info or {})  # model paths, dtype ...: recorded, and a resume must match

    def prompt(self, question: str) -> list[int]:
        return base_prompt(self.tokenizer, question, self.template)

    def generate(self, questions, on_tokens=None):
        """on_tokens(n): called as tokens are made (a callback that syncs each step: only for a bar)."""
        cb = None if on_tokens is None else _Stream(on_tokens, len(questions), self.eos)
        outs = self.model.generate([self.prompt(q) for q in questions], self.max_new_tokens,
                                   eos_token_id=self.eos or None, callback=cb)
        return [Completion(cut_at_stops(_decode(self.tokenizer, o), self.stop_strings), len(o),
                           bool(o) and o[-1] in self.eos) for o in outs]

    def config(self):
        return dict(run=self.run, max_new_tokens=self.max_new_tokens, template=self.template,
                    stop_strings=list(self.stop_strings), eos_ids=self.eos, **self.info)


class ThinkingGenerator(BaseGenerator):
    """The thinking model alone, on its chat template, greedy."""
    run = "thinking"

    def __init__(self, model, tokenizer, max_new_tokens: int, template: str = THINKING_TEMPLATE,
                 eos_ids: Sequence[int] | None = None, info: dict | None = None):
        super().__init__(model, tokenizer, max_new_tokens, template, None, eos_ids, info)

    def prompt(self, question: str) -> list[int]:
        return thinking_prompt(self.tokenizer, question, self.template)


class HybridGenerator:
    """`steerfast.Hybrid`: the base model writes, steered where the thinking model decides."""
    run = "hybrid"

    def __init__(self, hybrid, base_tokenizer, thinking_tokenizer, max_new_tokens: int,
                 base_template: str = BASE_TEMPLATE, thinking_template: str = THINKING_TEMPLATE,
                 stop_strings: Sequence[str] | None = BASE_STOP_STRINGS, eos_ids: Sequence[int] | None = None,
                 info: dict | None = None, category_names: Sequence[str] | None = None):
        self.hybrid, self.base_tok, self.think_tok = hybrid, base_tokenizer, thinking_tokenizer
        self.category_names = category_names  # for the traces only: not a setting that resuming checks
        self.max_new_tokens, self.base_template, self.thinking_template = max_new_tokens, base_template, thinking_template
        self.stop_strings = tuple(stop_strings or ())
        self.eos = list(eos_ids) if eos_ids is not None else default_eos(hybrid.base, base_tokenizer)
        self.info = dict(info or {})

    def generate(self, questions, on_tokens=None):
        """on_tokens(n): tokens made, per step where `Hybrid.generate` takes a callback, else per batch."""
        bp = [base_prompt(self.base_tok, q, self.base_template) for q in questions]
        tp = [thinking_prompt(self.think_tok, q, self.thinking_template) for q in questions]
        stream = on_tokens is not None and _accepts(self.hybrid.generate, "callback")
        kw = dict(callback=_Stream(on_tokens, len(questions), self.eos)) if stream else {}
        res = self.hybrid.generate(bp, tp, self.max_new_tokens, eos_token_id=self.eos or None, **kw)
        if on_tokens is not None and not stream:
            on_tokens(sum(len(t) for t in res.tokens))
        decode = lambda ids: _decode(self.base_tok, ids)  # noqa: E731
        out = []
        for i, (toks, steered, cats) in enumerate(zip(res.tokens, res.steered, res.category)):
            counts = Counter(c for c, s in zip(cats, steered) if s)
            full = decode(toks)
            text = cut_at_stops(full, self.stop_strings)
            n_graded = len(toks) if text == full else graded_tokens(self.base_tok, toks, text)
            out.append(Completion(text, len(toks), bool(toks) and toks[-1] in self.eos, sum(steered),
                                  {str(k): v for k, v in sorted(counts.items())},
                                  res.trace(i, decode=decode, names=self.category_names),
                                  n_graded, sum(steered[:n_graded]),
                                  render_trace_html(res, i, decode, self.category_names, title="hybrid trace",
                                                    note=questions[i])))
        return out

    def config(self):
        h = self.hybrid
        return dict(run=self.run, max_new_tokens=self.max_new_tokens, base_template=self.base_template,
                    thinking_template=self.thinking_template, stop_strings=list(self.stop_strings), eos_ids=self.eos,
                    sae_layer=h.sae_layer, steer_layer=h.steer_layer, coefs=list(h.coefs), windows=list(h.windows),
                    gate=h.gate if isinstance(h.gate, str) else float(h.gate),
                    threshold=h.threshold if h.threshold > float("-inf") else None,  # strict JSON: no -Infinity
                    **self.info)


# ---------------------------------------------------------------------------------------- files

def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """Records of a JSONL file, and whether every line was whole (a kill mid-write leaves a
    partial last line: it is skipped)."""
    if not path.exists():
        return [], True
    raw = path.read_bytes()
    recs, clean = [], raw.endswith(b"\n") or not raw
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            clean = False
            continue
        if isinstance(rec, dict) and isinstance(rec.get("idx"), int):
            recs.append(rec)
        else:
            clean = False
    return recs, clean


def _dumps(recs) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


def shard_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"results_rank{rank}.jsonl"


def read_results(run_dir) -> dict[int, dict]:
    """Every finished problem of a run directory (all shards and the merged file), by index."""
    run_dir = Path(run_dir)
    out: dict[int, dict] = {}
    paths = sorted(run_dir.glob("results_rank*.jsonl")) + [run_dir / "results.jsonl"]
    for p in paths:
        for rec in _read_jsonl(p)[0]:
            out.setdefault(rec["idx"], rec)
    return out


def merge(run_dir) -> list[dict]:
    """Write OUT/<run>/results.jsonl: every shard's records, one per problem, sorted by index."""
    run_dir = Path(run_dir)
    by_idx = read_results(run_dir)
    recs = [by_idx[k] for k in sorted(by_idx)]
    _atomic_write(run_dir / "results.jsonl", _dumps(recs))
    return recs


def _check_config(run_dir: Path, config: dict, rank: int) -> None:
    path = run_dir / "config.json"
    config = json.loads(json.dumps(config))  # normalise tuples, keys
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise InvalidInputError(
                f"{run_dir} holds results made with different settings ({', '.join(diff)}: "
                f"{', '.join(f'{k}={old.get(k)!r} then, {config.get(k)!r} now' for k in diff[:3])}); "
                "resuming would mix them: use another output directory, or delete that run's directory")
    elif rank == 0:
        _atomic_write(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------- distributed

def init_distributed(timeout_min: float = 24 * 60) -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group). Under torchrun
    (WORLD_SIZE > 1) the group is made with the gloo backend: only a barrier goes through it. The
    timeout is long because ranks finish their problems at different times."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_min))
    return dist.get_rank(), dist.get_world_size(), True


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def _rank_world(rank, world):
    if rank is not None and world is not None:
        return rank, world
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------- the runner

def _record(p: Problem, run: str, c: Completion | None, gen_s: float, rank: int, error: str | None = None) -> dict:
    pred = extract_answer(c.text) if c is not None else None
    rec = dict(idx=p.idx, id=p.id, qhash=p.qhash, run=run, dataset=p.dataset, gold=p.gold, pred=pred,
               correct=bool(c is not None and grade(pred, p.gold, p.dataset)),
               n_tokens=c.n_tokens if c else 0, stopped=bool(c and c.stopped),
               n_steered=c.n_steered if c else 0, categories=dict(c.categories) if c else {},
               gen_s=round(gen_s, 6), rank=rank, completion=c.text if c else "")
    if c is not None and c.trace is not None:
        rec["trace"] = c.trace
    if c is not None and c.n_graded is not None:
        rec.update(n_tokens_graded=c.n_graded, n_steered_graded=c.n_steered_graded)
    if error is not None:
        rec["error"] = error
    return rec


def _generate(generator, batch: list[Problem], rank: int, run_dir: Path, **kw) -> list[dict]:
    """Records for a batch (a completion's HTML trace goes to run_dir/traces/<idx>.html); a prompt
    too long for the cache is retried alone and recorded as an error (graded wrong) rather than
    stopping the run. kw: on_tokens, for generators that stream their progress."""
    t0 = time.perf_counter()
    try:
        comps = generator.generate([p.question for p in batch], **kw)
    except SequenceTooLongError as e:
        if len(batch) == 1:
            return [_record(batch[0], generator.run, None, time.perf_counter() - t0, rank, f"{type(e).__name__}: {e}")]
        return [r for p in batch for r in _generate(generator, [p], rank, run_dir, **kw)]
    dt = time.perf_counter() - t0
    if len(comps) != len(batch):
        raise RuntimeError(f"{type(generator).__name__}.generate returned {len(comps)} completions for {len(batch)}")
    recs = []
    for p, c in zip(batch, comps):
        rec = _record(p, generator.run, c, dt / len(batch), rank)
        if c.html is not None:
            rel = Path("traces") / f"{p.idx}.html"
            (run_dir / "traces").mkdir(exist_ok=True)
            _atomic_write(run_dir / rel, c.html)
            rec["trace_html"] = rel.as_posix()
        recs.append(rec)
    return recs


def _accepts(fn, name: str) -> bool:
    """Whether `fn` takes keyword `name` (generators written before it existed do not)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def evaluate(problems: Sequence[Problem], generator: Generator, out_dir, *, batch_size: int = 8,
             progress: bool | None = None, rank: int | None = None, world: int | None = None) -> list[dict] | None:
    """Run `generator` over the problems not yet finished in OUT/<generator.run>/, appending each
    batch's records as it finishes; then (rank 0) merge and return every problem's record, in
    problem order. Under torch.distributed each rank takes its share and returns None but rank 0.

    The shard is locked for the run (`lock`): a second process writing the same shard fails at once.
    progress (rank 0): a bar of problems and, when the generator takes `on_tokens`, one of the
    tokens of the batch in flight; None: on when stderr is a terminal (`steerfast.progress`)."""
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = _rank_world(rank, world)
    run_dir = Path(out_dir) / generator.run
    with lock.locked([run_dir], rank):
        return _evaluate(problems, generator, run_dir, batch_size, progress, rank, world)


def _evaluate(problems, generator, run_dir: Path, batch_size: int, progress, rank: int, world: int):
    run = generator.run
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_config(run_dir, dict(generator.config(), dataset=problems[0].dataset if problems else None), rank)

    done = read_results(run_dir)
    for p in problems:
        rec = done.get(p.idx)
        if rec is not None and rec.get("qhash") != p.qhash:
            raise InvalidInputError(f"{run_dir} holds a result for problem {p.idx} with a different question: "
                                    "another problem file? use another output directory")
    mine = list(problems)[rank::world]
    pending = [p for p in mine if p.idx not in done]

    shard = shard_path(run_dir, rank)
    recs, clean = _read_jsonl(shard)
    if not clean:  # a line cut short by a kill: keep the whole ones
        _atomic_write(shard, _dumps(recs))

    finished = [done[p.idx] for p in mine if p.idx in done]
    n_correct = sum(bool(r.get("correct")) for r in finished)
    n_done, tokens, secs = len(finished), 0, 0.0
    show = rank == 0 and progress_enabled(progress)
    desc = run if world == 1 else f"{run} [rank 0 of {world}]"
    bar = progress_bar(total=len(mine), initial=len(mine) - len(pending), desc=desc, unit="problem",
                       progress=show, position=0)
    # a hybrid problem can take minutes: the second bar moves with its tokens, not only at its end
    streams = show and _accepts(generator.generate, "on_tokens")
    tok_bar = progress_bar(total=None, desc="tokens", unit="tok", progress=streams, position=1, leave=False)
    n_batches = -(-len(pending) // batch_size)
    try:
        for b, s in enumerate(range(0, len(pending), batch_size)):
            batch = pending[s:s + batch_size]
            kw = {}
            if streams:
                limit = getattr(generator, "max_new_tokens", None)
                tok_bar.reset(total=len(batch) * limit if limit else None)
                tok_bar.set_description(f"batch {b + 1}/{n_batches} tokens", refresh=False)
                kw["on_tokens"] = tok_bar.update
            new = _generate(generator, batch, rank, run_dir, **kw)
            with open(shard, "a", encoding="utf-8") as fh:
                fh.write(_dumps(new))
                fh.flush()
                os.fsync(fh.fileno())
            n_done += len(new)
            n_correct += sum(r["correct"] for r in new)
            tokens += sum(r["n_tokens"] for r in new)
            secs += sum(r["gen_s"] for r in new)
            bar.set_postfix(acc=f"{n_correct / n_done:.1%}", tok_s=f"{tokens / secs if secs else 0:.0f}",
                            refresh=False)
            bar.update(len(new))
    finally:
        tok_bar.close()
        bar.close()
    _barrier(world)
    if rank != 0:
        return None
    wanted = {p.idx for p in problems}
    return [r for r in merge(run_dir) if r["idx"] in wanted]
