"""GSM8K / MATH500 evaluation: accuracy of base, thinking and hybrid runs, the gap recovered, the
share of steered tokens, tokens/s; resumable and data parallel (torchrun). The command line is
`steerfast eval` (steerfast.evaluate.cli).

    from steerfast.evaluate import load_problems, BaseGenerator, evaluate, write_summary
    problems = load_problems("gsm8k/test.jsonl")
    evaluate(problems, BaseGenerator(model, tokenizer, max_new_tokens=512), "runs/gsm8k")
    write_summary("runs/gsm8k", problems)
"""
from .answers import extract_answer, grade, gsm8k_equal, math_equal, normalize_math, parse_number, strip_thinking
from .data import (BASE_STOP_STRINGS, BASE_TEMPLATE, THINKING_TEMPLATE, Problem, base_prompt, load_problems,
                   thinking_prompt)
from .lock import DirectoryLockedError
from .metrics import gap_recovered, gap_recovered_paper, wilson_interval
from .run import (BaseGenerator, Completion, HybridGenerator, ThinkingGenerator, evaluate, init_distributed, merge,
                  read_results)
from .summary import markdown, plot_summary, summarize, summary_figure, write_summary

__all__ = ["extract_answer", "grade", "gsm8k_equal", "math_equal", "normalize_math", "parse_number", "strip_thinking",
           "BASE_STOP_STRINGS", "BASE_TEMPLATE", "THINKING_TEMPLATE", "Problem", "base_prompt", "load_problems",
           "thinking_prompt", "gap_recovered", "gap_recovered_paper", "wilson_interval", "BaseGenerator",
           "Completion", "HybridGenerator", "ThinkingGenerator", "evaluate", "init_distributed", "markdown", "merge",
           "read_results", "summarize", "write_summary", "DirectoryLockedError", "plot_summary", "summary_figure"]
