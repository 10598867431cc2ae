"""MathVista's official answer rules (github.com/lupantech/MathVista ``evaluation/extract_answer.py``
and ``evaluation/calculate_score.py``), re-implemented with their quirks.

Scoring is two stages. Extraction turns a response into a short answer; the official code tries a
few rules first and otherwise asks an LLM with a few-shot prompt (``DEMO_PROMPT``). Normalisation
(``normalize_extracted_answer``) then maps the extraction onto the answer type, and the verdict is
``prediction == answer`` on strings:

- multiple choice: the first "(x)" in the extraction gives a letter (upper-cased); a letter among
  the first ``len(choices)`` capitals selects that choice; anything else is mapped to the choice
  with the smallest Levenshtein distance (the first on ties), so an empty extraction becomes the
  shortest choice;
- integer: ``str(int(float(x)))`` (truncation: "3.9" -> "3"); float: ``str(round(float(x),
  precision))``; list: ``str(x)``; a value ``float()`` refuses gives ``None`` (never correct).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

__all__ = [
    "DEMO_PROMPT",
    "extraction_prompt",
    "levenshtein",
    "nearest_choice",
    "normalize_extracted_answer",
    "quick_extract",
]

# The few-shot prompt of MathVista's LLM extraction step (``evaluation/prompts/ext_ans.py``,
# ``demo_prompt``): the official extractor sends it, then the query and the response. It is data
# (what the official extractor model reads), reproduced so an OpenAI-compatible extractor sees
# the same input.
DEMO_PROMPT = """
Please read the following example. Then extract the answer from the model response and type it at the end of the prompt.

Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.
Question: Which number is missing?

Model response: The number missing in the sequence is 14.

Extracted answer: 14

Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.
Question: What is the fraction of females facing the camera?

Model response: The fraction of females facing the camera is 0.6, which means that six out of ten females in the group are facing the camera.

Extracted answer: 0.6

Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.
Question: How much money does Luca need to buy a sour apple candy and a butterscotch candy? (Unit: $)

Model response: Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.

Extracted answer: 1.45

Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.
Question: Between which two years does the line  graph saw its maximum peak?

Model response: The line graph saw its maximum peak between 2007 and 2008.

Extracted answer: [2007, 2008]

Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.
Question: What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5

Model response: The correct answer is (B) 8/11.

Extracted answer: B
"""


def extraction_prompt(query: str, response: str) -> str:
    """The text MathVista's ``create_test_prompt`` sends to the extractor model: the demo prompt,
    the problem's ``query`` and the response, ending in "Extracted answer: "."""
    return f"{DEMO_PROMPT.strip()}\n\n{query}\n\n{response}\n\nExtracted answer: "


_QUICK = re.compile(r'The answer is "(.*)"\.')


def quick_extract(response: str, question_type: str, answer_type: str, choices: Sequence[str] | None
                  ) -> str | None:
    """The rule-based part of MathVista's ``extract_answer`` (with ``--quick_extract``), or None
    when it does not apply and the official code would ask its LLM:

    an empty response -> ""; a multiple-choice response that is exactly one of the choices -> it;
    for integer answers a response ``int()`` accepts -> ``str(int(response))``; for float answers
    one ``float()`` accepts -> ``str(float(response))``; a response containing
    ``The answer is "..."`` followed by a period -> the quoted text (greedy, within one line)."""
    if response == "":
        return ""
    if question_type == "multi_choice" and choices and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    m = _QUICK.search(response)
    if m:
        return m.group(1)
    return None


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit costs for insertion, deletion and substitution (what
    ``Levenshtein.distance`` computes)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def nearest_choice(prediction: str, choices: Sequence[str]) -> str:
    """MathVista's ``get_most_similar``: the choice at the smallest edit distance, the first one
    on ties."""
    dists = [levenshtein(prediction, c) for c in choices]
    return choices[dists.index(min(dists))]


def _int_of_float(x: Any) -> str | None:
    try:
        return str(int(float(x)))
    except (ValueError, TypeError, OverflowError):
        return None


def normalize_extracted_answer(extraction: Any, choices: Sequence[str] | None, question_type: str,
                               answer_type: str, precision: Any, ignore_empty_extractions: bool = False
                               ) -> str | None:
    """MathVista's ``normalize_extracted_answer`` (see the module docstring). Returns the string
    that is compared with the gold answer, or None (never correct).

    ``ignore_empty_extractions`` as the official flag: an empty multiple-choice extraction gives
    None instead of the nearest (shortest) choice. An answer type the official code does not handle
    for free-form questions (it raises there) gives None."""
    if question_type == "multi_choice":
        if isinstance(extraction, str):
            extraction = extraction.strip()
        else:
            try:
                extraction = str(extraction)
            except Exception:  # noqa: BLE001 - as the official code
                extraction = ""
        if ignore_empty_extractions and not extraction:
            return None
        letters = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letters:
            extraction = letters[0].upper()
        choices = list(choices or [])
        if not choices:
            return None
        seq = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in seq:
            return choices[seq.index(extraction)]
        return nearest_choice(extraction, choices)
    if answer_type == "integer":
        return _int_of_float(extraction)
    if answer_type == "float":
        try:
            return str(round(float(extraction), int(precision)))
        except (ValueError, TypeError, OverflowError):
            return None
    if answer_type == "list":
        return str(extraction)
    return None


ExtractFn = Callable[[str], str]
