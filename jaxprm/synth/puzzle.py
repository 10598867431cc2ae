"""Ground truth for solutions of the embedded puzzle task, and a library of wrong solutions.

A puzzle question carries its scene in ``meta`` (see ``questions.synthetic_question``), so its
correct solution is ``jaxprm.data.synthetic.solve``. Every wrong solution the scripted policy
writes comes from ``synthetic.inject_error``, whose solutions agree with the correct one up to
the injected error and differ from that step on (it only accepts errors whose first changed step
is the error step). The ground-truth first error of such a solution is therefore its first step
that differs from the correct solution (``ground_truth_first_error``).

That comparison is only ground truth for solutions written in the task's own phrasing (the
scripted policy, also when served over HTTP as in the tests); a real VLM's rollouts on puzzle images
phrase steps differently and get ``None``.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from jaxprm.data import synthetic as S
from jaxprm.data.schema import NEGATIVE, POSITIVE


def is_puzzle(meta: dict | None) -> bool:
    return bool(meta) and all(k in meta for k in ("scene", "question_type", "params", "grid", "image_size"))


def puzzle_from_question(q) -> S.Puzzle:
    """The ``Puzzle`` of a ``Question`` (``synthetic.puzzle_from_record``: anything with ``meta``,
    ``question``, ``answer``)."""
    if not is_puzzle(q.meta):
        raise ValueError(f"question {getattr(q, 'id', '?')!r} is not an embedded puzzle (no scene in meta)")
    return S.puzzle_from_record(q)


def _key(meta: dict) -> str:
    import json

    return json.dumps({k: meta[k] for k in ("scene", "question_type", "params", "grid", "image_size")}, sort_keys=True)


@functools.lru_cache(maxsize=4096)
def _clean_flat(key: str, question: str, answer: str) -> tuple[tuple[str, str], ...]:
    import json

    p = S.puzzle_from_meta(json.loads(key), question, answer)
    return tuple((s.kind, s.text) for s in S.solve(p))


def correct_flat(q) -> list[tuple[str, str]]:
    """The correct solution of a puzzle question as ``[(kind, text)]``."""
    return list(_clean_flat(_key(q.meta), q.question, str(q.answer)))


def ground_truth_first_error(q, flat: Sequence[tuple[str, str]]) -> int | None:
    """Index of the first step of ``flat`` that departs from the correct solution (None when the
    solution is the correct one). Raises ``ValueError`` for a non-puzzle question."""
    clean = correct_flat(q)
    flat = [(k, t.strip()) for k, t in flat]
    for i, (a, b) in enumerate(zip(flat, clean)):
        if a != b:
            return i
    if len(flat) == len(clean):
        return None
    return min(len(flat), len(clean))


def ground_truth_labels(first_error: int | None, n: int) -> list[int]:
    """The synthetic task's convention: 1 before the first error, 0 at it and after it."""
    if first_error is None:
        return [POSITIVE] * n
    return [POSITIVE] * first_error + [NEGATIVE] * (n - first_error)


class WrongSolutions:
    """For one puzzle: wrong solutions indexed by their error step, built once and deterministic
    in ``(seed, question id)``: for each step, up to ``variants`` solutions whose first error is
    that step (perception errors on perception steps, slips on reasoning steps that compute)."""

    def __init__(self, q, seed: int = 0, variants: int = 3):
        from jaxprm.synth.questions import stable_hash

        self.question = q
        self.puzzle = puzzle_from_question(q)
        self.clean_steps = S.solve(self.puzzle)
        self.clean = [(s.kind, s.text) for s in self.clean_steps]
        self.by_step: dict[int, list[list[tuple[str, str]]]] = {}
        for j, s in enumerate(self.clean_steps):
            found: list[list[tuple[str, str]]] = []
            for v in range(variants):
                rng = np.random.default_rng(stable_hash("wrong", seed, q.id, j, v))
                try:
                    bad, _ = S.inject_error(self.puzzle, self.clean_steps, rng, kind=s.kind, step=j)
                except S.InjectionError:
                    break  # no error at this step changes the answer
                flat = [(b.kind, b.text) for b in bad]
                if flat not in found:
                    found.append(flat)
            if found:
                self.by_step[j] = found
        self.all = [sol for j in sorted(self.by_step) for sol in self.by_step[j]]

    @property
    def answer(self) -> str:
        return self.puzzle.answer

    def matching(self, prefix: Sequence[tuple[str, str]]) -> list[tuple[str, str]] | None:
        """The correct or a wrong solution that starts with ``prefix`` (correct one first)."""
        k = len(prefix)
        pre = [(a, b.strip()) for a, b in prefix]
        if self.clean[:k] == pre:
            return self.clean
        for sol in self.all:
            if sol[:k] == pre:
                return sol
        return None


def wrong_answer(gold: Any) -> str:
    """An answer that is certainly not ``gold`` for the puzzle task (used when a continuation
    must end wrong but no derivation is known)."""
    g = str(gold)
    try:
        return str(int(g) + 1)
    except ValueError:
        return "none" if g != "none" else "unknown"


__all__ = [
    "WrongSolutions",
    "correct_flat",
    "ground_truth_first_error",
    "ground_truth_labels",
    "is_puzzle",
    "puzzle_from_question",
    "wrong_answer",
]
