"""Aggregate per-step PRM probabilities into one solution score.

Every function takes a 1-D array-like of per-step probabilities (``PRM.score`` output: the
probability that each step is correct) and returns a Python ``float``. Empty inputs, non 1-D
inputs and non-finite values raise ``ValueError`` with a message that says what was wrong.

Aggregations
------------
``mean``     average of the step scores. VisualPRM (arXiv 2503.10291, Sec. 3.2: "we average the
             scores of each step as the response score") and the VL-PRM repo's step-aggregation
             search (``eval/tts_eval/step_aggregation_search/prm_tts_eval.py`` in
             github.com/theogbrand/vlprm, ``get_agg_reward`` returns ``total_score / len(steps)``)
             both use this.
``min``      the weakest step (a chain is only as good as its worst step).
``last``     the score of the final step. The VL-PRM prompt asks the PRM to judge "the
             cumulative correctness of the entire solution up to each step", so the last step's
             score judges the whole solution.
``product``  product of the step probabilities (all steps correct, treating them as independent).
``length_normalized``
             the VL-PRM "normalized reward score" used to rank candidates in PRM-guided search.
             Source: ``VisualPRM.inference_single`` in
             ``eval/tts_eval/reward_guided_search/VisualPRMv2.py`` (github.com/Tej-Deep/mmr-eval,
             the VL-PRM eval code; the same code is in ``prm_tts_eval.py`` of
             github.com/theogbrand/vlprm)::

                 if the PRM's argmax over {"+", "-"} is "-":  reward = -1
                 else:                                         reward = p(+) ** 0.3 / L ** 0.6

             where ``p(+)`` is the softmax over the ("+", "-") logits at the step being judged
             and ``L`` is the number of input tokens of the PRM prompt (``input_ids.shape[1]``).
             Here ``p(+)`` is the *last* step's probability (the PRM there scores the newest step
             given all earlier ones, i.e. the whole prefix). Pass ``length`` = the PRM prompt's
             token count to reproduce VL-PRM exactly; without it, the number of steps is used as
             the length (an adaptation: token counts are not available from step scores alone).
             The "-" argmax test is ``p(+) < 0.5`` (with two classes, argmax picks "+" on a tie
             because it is index 0 in VL-PRM's ``[pos, neg]`` order).

``aggregate(scores, how="mean", **kwargs)`` dispatches by name through ``AGGREGATIONS``;
``aggregate_batch(list_of_arrays, how=...)`` does it for many solutions at once.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "aggregate_batch",
    "last",
    "length_normalized",
    "mean",
    "min_score",
    "product",
]

# VL-PRM's exponents: reward = p ** 0.3 / length ** 0.6 (see the module docstring).
VLPRM_ALPHA = 0.3
VLPRM_BETA = 0.6
VLPRM_REJECT = -1.0


def _as_scores(scores, name: str = "scores") -> np.ndarray:
    """Validate and convert to a 1-D float64 array (non-empty, finite)."""
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got {type(scores).__name__}: {e}") from None
    if arr.ndim == 0:
        raise ValueError(f"{name}: expected a 1-D array of per-step scores, got a scalar")
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of per-step scores, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: cannot aggregate an empty array of step scores (a solution needs at least one step)")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name}: step {bad} has a non-finite score {arr[bad]!r}")
    return arr


def _check_probabilities(arr: np.ndarray, name: str) -> None:
    if np.any(arr < 0.0) or np.any(arr > 1.0):
        bad = int(np.flatnonzero((arr < 0.0) | (arr > 1.0))[0])
        raise ValueError(f"{name}: step {bad} has score {arr[bad]!r}, outside [0, 1]; this aggregation needs probabilities")


def mean(scores) -> float:
    """Arithmetic mean of the step scores."""
    return float(np.mean(_as_scores(scores)))


def min_score(scores) -> float:
    """Minimum step score (also available as ``aggregate.min``)."""
    return float(np.min(_as_scores(scores)))


def last(scores) -> float:
    """Score of the final step."""
    return float(_as_scores(scores)[-1])


def product(scores) -> float:
    """Product of the step probabilities (computed in log space for long chains)."""
    arr = _as_scores(scores)
    _check_probabilities(arr, "scores")
    if np.any(arr == 0.0):
        return 0.0
    return float(math.exp(float(np.sum(np.log(arr)))))


def length_normalized(
    scores,
    length: int | float | None = None,
    alpha: float = VLPRM_ALPHA,
    beta: float = VLPRM_BETA,
    reject_value: float = VLPRM_REJECT,
) -> float:
    """VL-PRM's length-normalised reward: ``p_last ** alpha / length ** beta``, or ``reject_value``
    when the last step is judged incorrect (``p_last < 0.5``).

    ``length``: the PRM prompt's token count as in VL-PRM; defaults to the number of steps.
    """
    arr = _as_scores(scores)
    _check_probabilities(arr, "scores")
    if length is None:
        length = arr.size
    length = float(length)
    if not math.isfinite(length) or length <= 0:
        raise ValueError(f"length must be a positive number (the PRM prompt's token count), got {length!r}")
    p = float(arr[-1])
    if p < 0.5:  # argmax over (+, -) is "-"
        return float(reject_value)
    return float(p**alpha / length**beta)


AGGREGATIONS: dict[str, Callable[..., float]] = {
    "mean": mean,
    "min": min_score,
    "last": last,
    "product": product,
    "length_normalized": length_normalized,
}

# Module attribute named like the registry key; not exported by ``*`` so it never shadows the builtin.
min = min_score  # noqa: A001


def _lookup(how: str) -> Callable[..., float]:
    if callable(how):
        return how
    try:
        return AGGREGATIONS[how]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown aggregation {how!r}; choose one of {sorted(AGGREGATIONS)}"
        ) from None


def aggregate(scores, how: str = "mean", **kwargs) -> float:
    """Aggregate one solution's per-step scores with the aggregation named ``how``.

    Extra keyword arguments go to the aggregation (e.g. ``length=`` for ``length_normalized``).
    """
    return _lookup(how)(scores, **kwargs)


def aggregate_batch(
    batch: Iterable,
    how: str = "mean",
    lengths: Sequence[int | float] | None = None,
    **kwargs,
) -> np.ndarray:
    """Aggregate many solutions; returns a float64 array with one score per solution.

    ``lengths`` (only for ``length_normalized``) gives each solution's length.
    """
    fn = _lookup(how)
    items = list(batch)
    if lengths is not None:
        if fn is not length_normalized:
            raise ValueError(f"lengths= is only meaningful for 'length_normalized', not {how!r}")
        if len(lengths) != len(items):
            raise ValueError(f"got {len(items)} score arrays but {len(lengths)} lengths")
    out = np.empty(len(items), dtype=np.float64)
    for i, scores in enumerate(items):
        try:
            if lengths is not None:
                out[i] = fn(scores, length=lengths[i], **kwargs)
            else:
                out[i] = fn(scores, **kwargs)
        except ValueError as e:
            raise ValueError(f"solution {i}: {e}") from None
    return out
