"""PuzzleVQA / AlgoPuzzleVQA's official answer rule (github.com/declare-lab/LLM-PuzzleTest,
``PuzzleVQA/prompting.py`` and ``AlgoPuzzleVQA/prompting.py``,
``ChainThoughtMultiExtractPrompter.get_answer``; VL-PRM's ``extract_puzzlevqa_answer`` copies it).

The last "(A)".."(D)" in the response names the option; without one, the last capital A, B, C or D
*anywhere* in the text does (also inside words: "All", "Based", "CD"). A letter past the last
option (D with three options) maps to the first option (``mapping.get(letter, options[0])``). No
letter at all gives "Cannot get_answer: ..." (not an option; the official script then asks the
model again with an extraction prompt, which this rule cannot do, so such a response is wrong and
counted as unparseable). The verdict is ``pred == answer`` on the option text (``ExactScorer``).
"""
from __future__ import annotations

import re
from typing import Sequence

__all__ = ["get_answer"]


def get_answer(text: str, options: Sequence[str]) -> tuple[str | None, str | None]:
    """``(option text, letter)`` as ``get_answer`` picks them; ``(None, None)`` when the response
    has no A-D at all (the official "Cannot get_answer" string)."""
    opts = list(options)
    letters = "ABCD"[: len(opts)]
    found = re.findall(r"\(([ABCD])\)", text) or re.findall(r"[ABCD]", text)
    if not found:
        return None, None
    letter = found[-1]
    if letter in letters:
        return opts[letters.index(letter)], letter
    return opts[0], "A"  # mapping.get(letter, options[0])
