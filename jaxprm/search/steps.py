"""Solutions as lists of steps: splitting, joining, cleaning, answer detection.

The solution text format lives in ``jaxprm.data.solution``; these names are re-exported here for
the search code and its users (``jaxprm.search.split_steps`` and friends).
"""
from __future__ import annotations

from jaxprm.data.solution import (
    STEP_SEPARATOR,
    clean_step,
    extract_final_answer,
    has_answer,
    join_steps,
    split_steps,
    split_steps_with_kinds,
)

__all__ = [
    "STEP_SEPARATOR",
    "clean_step",
    "extract_final_answer",
    "has_answer",
    "join_steps",
    "split_steps",
    "split_steps_with_kinds",
]
