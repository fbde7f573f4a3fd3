"""The miniature's task: two-digit addition. A direct answer ("The answer is 132.") asks a tiny
model to resolve the carry and the hundreds digit in one forward pass; a step-by-step answer makes
each token local (one column, one carry, then a copy). Every sentence of a step-by-step answer has
a kind known by construction, which serves as the research pipeline's labeller.

    Question: What is 47+85?
    direct:        The answer is 132.
    step by step:  We add 47 and 85.              restate
                   Ones: 7+5=12.                  compute
                   Carry 1.                       carry
                   Tens: 4+8+1=13.                compute
                   So the answer is 132.          answer

The step-by-step answer ends with its own phrase ("So the answer is"), so a model that has
mostly seen direct answers still copies its result there instead of guessing afresh.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ("restate", "compute", "carry", "answer")
DIGITS = 2  # operands in [10, 99]
COLUMNS = ("Ones", "Tens", "Hundreds")
# the base model's prompt (the paper's "Task: ... Step by step answer:", miniature) and the thinking
# model's user turn; both are what `steerfast eval` formats with {question}
BASE_TEMPLATE = ("Task: Answer the question below. Explain your reasoning step by step.\n\n"
                 "Question: {question}\n\nStep by step answer:\n")
THINKING_TEMPLATE = "{question}"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
EOS, SPECIAL = "<|endoftext|>", ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|pad|>"]


@dataclass
class Problem:
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"What is {self.a}+{self.b}?"

    @property
    def answer(self) -> int:
        return self.a + self.b


def problems(n: int, seed: int, exclude: set | None = None) -> list[Problem]:
    """n distinct problems with operands of DIGITS digits, none in `exclude` ((a, b) pairs)."""
    rng, out, seen = random.Random(seed), [], set(exclude or ())
    while len(out) < n:
        a, b = draw(rng)
        if (a, b) not in seen:
            seen.add((a, b))
            out.append(Problem(a, b))
    return out


def draw(rng) -> tuple[int, int]:
    lo, hi = 10 ** (DIGITS - 1), 10 ** DIGITS - 1
    return rng.randint(lo, hi), rng.randint(lo, hi)


def direct(p: Problem) -> list[tuple[str, str]]:
    return [(f"The answer is {p.answer}.", "answer")]


def steps(p: Problem) -> list[tuple[str, str]]:
    """(sentence, kind) of the step-by-step answer."""
    out = [(f"We add {p.a} and {p.b}.", "restate")]
    da, db, carry = str(p.a)[::-1], str(p.b)[::-1], 0
    for i, col in enumerate(COLUMNS[:len(da)]):
        s = int(da[i]) + int(db[i]) + carry
        out.append((f"{col}: {da[i]}+{db[i]}{f'+{carry}' if carry else ''}={s}.", "compute"))
        carry = s // 10
        if carry and i < len(da) - 1:
            out.append((f"Carry {carry}.", "carry"))
    out.append((f"So the answer is {p.answer}.", "answer"))
    return out


def text(sentences: list[tuple[str, str]]) -> str:
    return " ".join(s for s, _ in sentences)


def label(sentence: str) -> str | None:
    """The kind of a sentence of this task (the labeller: labels are known by construction)."""
    s = sentence.strip()
    for prefix, kind in (("We add", "restate"), ("Carry", "carry"), ("So the answer", "answer"),
                         ("The answer", "answer")):
        if s.startswith(prefix):
            return kind
    return "compute" if any(s.startswith(c + ":") for c in COLUMNS) else None


def labeller(sentences: list[str]) -> list[str | None]:
    return [label(s) for s in sentences]


def train_tokenizer(vocab_size: int = 160, seed: int = 0):
    """A byte-level BPE (digits always single tokens) trained with `tokenizers` on the task's text,
    wrapped as a transformers fast tokenizer with the chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for p in problems(400, seed + 99):
        corpus.append(BASE_TEMPLATE.format(question=p.question) + text(steps(p)))
        corpus.append(BASE_TEMPLATE.format(question=p.question) + text(direct(p)))
        corpus.append(THINKING_TEMPLATE.format(question=p.question))
    tok = Tokenizer(models.BPE())
    # pieces end at punctuation (a token never spans two sentences), digits are single tokens, and
    # phrases merge across spaces: the prompt and the step words become a few tokens each
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[.?:\n]"), behavior="merged_with_previous"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast
