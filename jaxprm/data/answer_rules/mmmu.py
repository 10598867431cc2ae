"""MMMU's official answer rules (github.com/MMMU-Benchmark/MMMU ``mmmu/utils/eval_utils.py``),
re-implemented here with their quirks so that a verdict equals the one ``main_parse_and_eval.py``
gives for the same response.

- Multiple choice: ``parse_multi_choice_response`` finds "(A)" anywhere; else " A " (a letter
  between spaces, case-sensitive); else, only for responses of more than 5 words, every option whose
  text occurs in the response as a case-insensitive *substring* (so option "2" is found inside
  "2.5"); several candidates -> the one found last (``rfind``), ties -> the first in option order;
  none -> a random letter from ``random.Random(42)`` (the module seeds ``random`` with 42 at import
  and calls ``random.choice`` once per unparsed response, in evaluation order). The verdict is
  ``gold == pred``.
- Open questions: ``parse_open_response`` keeps, per line, the shortest tail after an indicator
  word ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ", and "="
  on the last line), adds the numbers in them, and normalises each (numbers -> float rounded to 2
  decimals, strings lower-cased; a one-character string becomes " x" / "x "). ``eval_open`` is
  correct when a float prediction equals a normalised gold number, or a normalised gold *string*
  is a substring of a string prediction.
"""
from __future__ import annotations

import random
import re
from typing import Any, Sequence

__all__ = [
    "MMMU_SEED",
    "eval_multi_choice",
    "eval_open",
    "extract_numbers",
    "normalize_str",
    "parse_multi_choice",
    "parse_open_response",
]

MMMU_SEED = 42  # eval_utils.py: random.seed(42) at import
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_multi_choice(response: str, all_choices: Sequence[str], index2ans: dict[str, str],
                       rng: random.Random) -> tuple[str, bool]:
    """``(letter, guessed)`` as MMMU's ``parse_multi_choice_response`` picks it; ``guessed`` when no
    candidate was found and the letter is ``rng.choice(all_choices)`` (MMMU's random fallback).

    Steps (``eval_utils.parse_multi_choice_response``): strip each of ``, . ! ? ; : '`` from both
    ends once, in that order; pad with one space each side; candidates are the letters written as
    "(X)"; else as " X "; else, when the response has more than 5 whitespace-separated words, the
    letters whose option text occurs (case-insensitive substring) in the response. Several
    candidates: the one whose occurrence (``rfind`` of "(X)", " X " or the option text) starts
    last; equal starts -> the earlier letter (``np.argmax`` keeps the first maximum)."""
    for ch in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(ch)
    response = " " + response + " "
    index_ans, with_brackets = True, False
    candidates: list[str] = []
    for c in all_choices:
        if f"({c})" in response:
            candidates.append(c)
            with_brackets = True
    if not candidates:
        for c in all_choices:
            if f" {c} " in response:
                candidates.append(c)
    low = response.lower()
    if not candidates and len(response.split()) > 5:
        for letter, text in index2ans.items():
            if text.lower() in low:
                candidates.append(letter)
                index_ans = False
    if not candidates:
        return rng.choice(list(all_choices)), True
    if len(candidates) == 1:
        return candidates[0], False
    if index_ans:
        pattern = "({})" if with_brackets else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [low.rfind(index2ans[c].lower()) for c in candidates]
    best = max(range(len(starts)), key=lambda i: (starts[i], -i))  # first maximum
    return candidates[best], False


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def normalize_str(s: str) -> list:
    """MMMU's ``normalize_str``: a string that ``float()`` accepts once commas are removed becomes
    ``[round(float, 2)]``; any other is lower-cased, and a single character ``c`` becomes
    ``[" c", "c "]`` (so it only matches as a separate word)."""
    s = s.strip()
    if _is_float(s.replace(",", "")):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    if len(s) == 1:
        return [" " + s, s + " "]
    return [s]


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(s: str) -> list[str]:
    """MMMU's ``extract_numbers``: numbers with thousands commas, then scientific notation, then
    plain numbers (not followed by an exponent, a comma or a digit), each list in text order."""
    return _NUM_COMMAS.findall(s) + _NUM_SCI.findall(s) + _NUM_SIMPLE.findall(s)


_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = (":", ",", ".", "!", "?", ";", ":", "'")


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # MMMU splits on r"\.\s(?=[A-Z])|\n" *after* lower-casing, so in effect only on newlines
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, part in enumerate(parts):
        indicators = _INDICATORS + (("=",) if i == len(parts) - 1 else ())
        shortest = None
        for ind in indicators:
            if ind in part:
                tail = part.split(ind)[-1].strip()
                if not shortest:  # MMMU: `if not shortest_key_response` (an empty tail is replaced)
                    shortest = tail
                elif len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list:
    """MMMU's ``parse_open_response``: the key sub-responses (see the module docstring) plus the
    numbers in them, each through ``normalize_str``; duplicates removed."""
    keys = _key_subresponses(response)
    preds = list(keys)
    for k in keys:
        preds.extend(extract_numbers(k))
    out: list = []
    for p in preds:
        for v in normalize_str(p):
            if v not in out:
                out.append(v)
    return out


def eval_multi_choice(gold: Any, pred: str) -> bool:
    """MMMU's ``eval_multi_choice``: exact equality with the gold letter (or any of a list)."""
    if isinstance(gold, (list, tuple)):
        return any(g == pred for g in gold)
    return gold == pred


def eval_open(gold: Any, preds: Sequence) -> bool:
    """MMMU's ``eval_open``: the gold (or each of a list) through ``normalize_str``; correct when a
    float prediction equals a gold float, or a gold string is a substring of a string prediction."""
    golds: list = []
    for g in (gold if isinstance(gold, (list, tuple)) else [gold]):
        golds.extend(normalize_str(str(g)))
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False


def letters_for(choices: Sequence) -> list[str]:
    """MMMU's ``get_multi_choice_info``: letters A, B, ... one per option."""
    return list(_LETTERS[: len(choices)])
