"""VL-PRM's own answer check for its test-time-scaling results (github.com/theogbrand/vlprm,
``eval/tts_eval/reward_guided_search``): how its published best-of-N / guided-search numbers were
scored, which is *not* the benchmarks' official rule.

- The prediction is the content of the last ``\\boxed{...}`` of the final text (``utils.extract_boxed``:
  nested braces counted, whitespace kept, a ``\\b`` mangled into the backspace character accepted);
  without one the whole text is kept for the evaluation stage.
- The gold is the option letter for multiple-choice problems, else the answer.
- MathVision (``calc_score_mathvision.py``): MATH-V's ``is_equal`` against the gold letter or the
  gold option text.
- PuzzleVQA / AlgoPuzzleVQA (``puzzlevqa_judge_evaluation.py``): a one-character prediction is
  compared case-insensitively with the gold letter; anything longer goes to an LLM judge that maps
  it onto an option letter (or "Z"), correct when that equals the gold letter.
- MMMU, MathVista and others (``collate_final_eval_results.py``): a gold made only of digits
  (``str.isnumeric``) is compared with ``math_verify``; any other gold case-insensitively with the
  whole prediction.

``math_verify`` is not a dependency here: ``numeric_equal`` parses both sides (numbers, fractions,
LaTeX arithmetic) and compares their values, which is what ``math_verify.verify`` decides for the
numeric golds this branch sees.
"""
from __future__ import annotations

import math

__all__ = ["JUDGE_PROMPT", "extract_boxed_vlprm", "judge_prompt", "numeric_equal"]

_PATTERNS = ("\\boxed{", "\x08oxed{")


def extract_boxed_vlprm(s: str) -> str | None:
    """VL-PRM's ``extract_boxed``: scan left to right for ``\\boxed{`` (or ``\\x08oxed{``), take the
    brace-balanced content (every "{" / "}" counts, escaped or not), continue after it; an
    unbalanced one is skipped. Returns the last content found, unstripped, or None."""
    if not s:
        return None
    results = []
    i = 0
    while i < len(s):
        starts = [(s.find(p, i), p) for p in _PATTERNS]
        starts = [(pos, p) for pos, p in starts if pos != -1]
        if not starts:
            break
        pos, pat = min(starts)
        j = pos + len(pat)
        depth = 1
        while j < len(s) and depth > 0:
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
            j += 1
        if depth == 0:
            results.append(s[pos + len(pat): j - 1])
            i = j
        else:
            i = pos + 1
    return results[-1] if results else None


# The judge prompt of ``puzzlevqa_judge_evaluation.PuzzleVQAJudgeModel._construct_judge_prompt``
# (prompt data, reproduced so an OpenAI-compatible judge reads the same text).
JUDGE_PROMPT = (
    "You are an AI assistant who will help me to match "
    "an answer with several options of a single-choice question. "
    "You are provided with a question, several options, and an answer, "
    "and you need to find which option is most similar to the answer. "
    "If the meaning of all options are significantly different from the answer, output Z. "
    "Your should output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n"
    "Example 1: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3: \n"
    "Question: {}?\nOptions: {}\nAnswer: {}\nYour output: "
)


def judge_prompt(question: str, options, answer_text: str) -> str:
    """The judge's input: the question, the options as "A. x B. y ..." and the answer text."""
    formatted = " ".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
    return JUDGE_PROMPT.format(question, formatted, answer_text)


def numeric_equal(gold: str, pred: str) -> bool:
    """Stand-in for ``math_verify.verify(parse(gold), parse(pred))`` on a numeric gold: both sides
    read as numbers (plain, with thousands separators, fractions, ``\\frac``, LaTeX arithmetic) and
    compared after rounding to 6 decimals (math-verify's default float precision)."""
    from jaxprm.data.answer_rules.mathvision import latex_value
    from jaxprm.data.answers import clean_answer, parse_number

    def value(s: str) -> float | None:
        v = parse_number(s)
        if v is not None:
            return v
        try:
            return latex_value(clean_answer(s))
        except ValueError:
            return None

    g, p = value(gold), value(pred)
    if g is None or p is None or not (math.isfinite(g) and math.isfinite(p)):
        return False
    return round(g, 6) == round(p, 6)
