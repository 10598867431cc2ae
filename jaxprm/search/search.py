"""Test-time search with a PRM: best-of-N selection and PRM-guided greedy step search.

``best_of_n(prm, image, question, candidates, aggregate="mean")`` scores every candidate solution
with the PRM and keeps the one with the highest aggregated score. Candidates are solution texts
(split into steps with ``jaxprm.data.solution.split_steps``) or lists of steps. ``aggregate`` is one of
``jaxprm.search.aggregate.AGGREGATIONS`` (``mean``, ``min``, ``last``, ``product``,
``length_normalized``) or ``"orm"``: the PRM used as an outcome reward model, i.e. the whole
solution given to it as a single step and that step's probability taken as the score.

``guided_greedy_search(prm, policy, image, question, k=16, max_steps=12)`` builds a solution one
step at a time: each iteration the policy proposes ``k`` next steps, the PRM scores every
candidate prefix (``prm.score_candidates``, which shares the common prefix; or, for a PRM with
``incremental_scorer``, a K/V cache of the prompt and the steps kept so far, extended by the
chosen step each iteration, so only the candidates' own tokens run), and the step whose
prefix aggregates best (by default the new step's own score, ``"last"``: the PRM judges the
correctness of the whole solution up to a step) is kept. It stops when the kept step states a
final answer (``\\boxed{}``), when the policy has nothing more to say (every candidate empty), or
after ``max_steps`` steps.

The PRM is anything with ``score(image, question, steps)``, ``score_batch(items)`` and
``score_candidates(image, question, list_of_step_lists)`` returning per-step probabilities
(``jaxprm.scoring.PRM``), optionally ``incremental_scorer(image, question)`` returning an
object whose ``score_next(steps, candidate_steps)`` scores ``steps + [c]`` for every candidate
(``jaxprm.scoring.IncrementalScorer``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxprm.data.solution import clean_step, extract_final_answer, has_answer, join_steps, split_steps

from . import aggregate as agg_lib

__all__ = ["AGGREGATE_CHOICES", "SearchResult", "aggregate_scores", "best_of_n", "guided_greedy_search",
           "score_candidates", "score_orm"]

AGGREGATE_CHOICES = tuple(agg_lib.AGGREGATIONS) + ("orm",)
EMPTY_SCORE = -1e9  # aggregated score of a candidate without steps (never preferred over a real one)


@dataclasses.dataclass
class SearchResult:
    """What a search returns.

    best_of_n: ``best_index``, ``best`` (the chosen candidate as given), ``scores`` (per-candidate
    step-score arrays; one element each for ``"orm"``), ``aggregated`` (per-candidate scores),
    and ``steps``/``step_scores``/``answer`` of the chosen candidate.
    guided_greedy_search: ``steps`` (cleaned, what the PRM scored), ``raw_steps`` (as the policy
    wrote them), ``step_scores`` (the PRM's scores of the final solution's steps), ``trace`` (one
    dict per iteration: candidates, their scores, the chosen index), ``finished`` (a final answer
    was reached) and ``text``/``answer`` of the solution; ``best``/``best_index``/``aggregated``
    describe the last iteration's choice.
    """

    best_index: int | None = None
    best: Any = None
    scores: list = dataclasses.field(default_factory=list)
    aggregated: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    steps: list = dataclasses.field(default_factory=list)
    step_scores: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    raw_steps: list = dataclasses.field(default_factory=list)
    trace: list = dataclasses.field(default_factory=list)
    finished: bool = False
    text: str = ""
    answer: str | None = None


def _check_how(how: str, allow_orm: bool = True) -> None:
    choices = AGGREGATE_CHOICES if allow_orm else tuple(agg_lib.AGGREGATIONS)
    if not callable(how) and how not in choices:
        raise ValueError(f"unknown aggregation {how!r}; choose one of {list(choices)}")


def _as_steps(candidate) -> list[str]:
    if isinstance(candidate, str):
        return split_steps(candidate)
    if isinstance(candidate, Sequence):
        out = []
        for i, s in enumerate(candidate):
            if not isinstance(s, str):
                raise TypeError(f"a candidate's steps must be strings, step {i} is {type(s).__name__}")
            c = clean_step(s)
            if c:
                out.append(c)
        return out
    raise TypeError(f"a candidate must be a solution string or a list of step strings, got {type(candidate).__name__}")


def _as_text(candidate) -> str:
    return candidate.strip() if isinstance(candidate, str) else join_steps(list(candidate)).strip()


def _checked(got, lists: list[list[str]]) -> list[np.ndarray]:
    """The PRM's score arrays as float64, checked against the step lists they score."""
    got = list(got)
    if len(got) != len(lists):
        raise RuntimeError(f"the PRM returned {len(got)} score arrays for {len(lists)} candidates")
    out = []
    for g, steps in zip(got, lists):
        g = np.asarray(g, np.float64).reshape(-1)
        if g.shape[0] != len(steps):
            raise RuntimeError(f"the PRM returned {g.shape[0]} scores for a candidate with {len(steps)} steps")
        out.append(g)
    return out


def _score_lists(prm, image, question, step_lists: list[list[str]]) -> list[np.ndarray]:
    idx = [i for i, s in enumerate(step_lists) if s]
    out = [np.zeros(0, np.float64) for _ in step_lists]
    if not idx:
        return out
    lists = [step_lists[i] for i in idx]
    if hasattr(prm, "score_candidates"):
        got = prm.score_candidates(image, question, lists)
    else:
        got = prm.score_batch([(image, question, s) for s in lists])
    for i, g in zip(idx, _checked(got, lists)):
        out[i] = g
    return out


def score_candidates(prm, image, question: str, candidates: Sequence) -> tuple[list[list[str]], list[np.ndarray]]:
    """Split the candidates into steps and score them: ``(step lists, per-step score arrays)``.
    A candidate without steps gets an empty array."""
    step_lists = [_as_steps(c) for c in candidates]
    return step_lists, _score_lists(prm, image, question, step_lists)


def score_orm(prm, image, question: str, candidates: Sequence) -> np.ndarray:
    """PRM as ORM: each whole solution scored as one step; returns one probability per candidate
    (``EMPTY_SCORE`` for an empty candidate)."""
    texts = [_as_text(c) for c in candidates]
    got = _score_lists(prm, image, question, [[t] if t else [] for t in texts])
    return np.asarray([float(g[-1]) if g.size and np.isfinite(g[-1]) else EMPTY_SCORE for g in got], np.float64)


def aggregate_scores(step_scores: Sequence, how: str = "mean", **kwargs) -> np.ndarray:
    """One aggregated score per candidate (``EMPTY_SCORE`` for an empty one). Non-finite step
    scores (steps a PRM dropped for length, NaN) are left out."""
    _check_how(how, allow_orm=False)
    out = []
    for s in step_scores:
        s = np.asarray(s, np.float64).reshape(-1)
        s = s[np.isfinite(s)]  # a PRM reports steps it had to drop (max_length) as NaN
        out.append(agg_lib.aggregate(s, how, **kwargs) if s.size else EMPTY_SCORE)
    return np.asarray(out, np.float64)


def best_of_n(prm, image, question: str, candidates: Sequence, aggregate: str = "mean", **agg_kwargs) -> SearchResult:
    """Pick the best of ``candidates`` by aggregated PRM score (first one on ties)."""
    _check_how(aggregate)
    candidates = list(candidates)
    if not candidates:
        raise ValueError("best_of_n needs at least one candidate")
    if aggregate == "orm":
        step_lists = [_as_steps(c) for c in candidates]
        aggregated = score_orm(prm, image, question, candidates)
        scores = [np.asarray([a]) if a != EMPTY_SCORE else np.zeros(0) for a in aggregated]
    else:
        step_lists, scores = score_candidates(prm, image, question, candidates)
        aggregated = aggregate_scores(scores, aggregate, **agg_kwargs)
    best = int(np.argmax(aggregated))
    chosen = candidates[best]
    text = _as_text(chosen)
    return SearchResult(best_index=best, best=chosen, scores=scores, aggregated=aggregated, steps=step_lists[best],
                        step_scores=scores[best], text=text, answer=extract_final_answer(text),
                        finished=has_answer(text))


def guided_greedy_search(prm, policy, image, question: str, k: int = 16, max_steps: int = 12,
                         aggregate: str = "last", dedupe: bool = True, progress: bool = False,
                         incremental: bool | None = None, **sampling) -> SearchResult:
    """Greedy step-level search guided by the PRM (see the module docstring).

    ``sampling`` goes to ``policy.sample_next_steps`` (temperature, top_p, max_new_tokens, ...).
    ``dedupe`` scores identical candidate steps once. Each ``trace`` entry holds ``step`` (the
    iteration), ``candidates`` (raw texts), ``scores`` (each candidate prefix's step scores),
    ``aggregated`` and ``chosen`` (index into ``candidates``; None when all were empty).

    ``incremental``: score through ``prm.incremental_scorer(image, question)`` (``jaxprm.scoring.PRM`` has
    it: the prompt and the steps already chosen stay in a K/V cache, each iteration runs only the
    candidates' turns; same scores as scoring every candidate prefix from scratch). ``None`` (default)
    uses it when the PRM has it, ``True`` requires it, ``False`` scores every iteration from scratch
    with ``prm.score_candidates``.
    """
    _check_how(aggregate, allow_orm=False)
    if k < 1 or max_steps < 1:
        raise ValueError(f"k and max_steps must be >= 1, got k={k}, max_steps={max_steps}")
    session = None
    if incremental is None or incremental:
        make = getattr(prm, "incremental_scorer", None)
        if make is not None:
            session = make(image, question)
        elif incremental:
            raise TypeError(f"incremental=True needs a PRM with incremental_scorer(image, question); "
                            f"{type(prm).__name__} has none")
    raw: list[str] = []
    clean: list[str] = []
    step_scores = np.zeros(0)
    trace: list[dict] = []
    finished = False
    last = (None, None, np.zeros(0))
    it = range(max_steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="guided search", unit="step", leave=False)
    for t in it:
        cands = list(policy.sample_next_steps(image, question, list(raw), k, **sampling))
        uniq: list[str] = []
        for c in cands:
            if not isinstance(c, str):
                raise TypeError(f"policy returned a {type(c).__name__} instead of a step string")
            if clean_step(c) and (not dedupe or c not in uniq):
                uniq.append(c)
        if not uniq:
            trace.append({"step": t, "candidates": cands, "scores": [], "aggregated": [], "chosen": None})
            break
        lists = [clean + [clean_step(c)] for c in uniq]
        if session is not None:
            scores = _checked(session.score_next(list(clean), [sl[-1] for sl in lists]), lists)
        else:
            scores = _score_lists(prm, image, question, lists)
        agg = aggregate_scores(scores, aggregate)
        j = int(np.argmax(agg))
        trace.append({"step": t, "candidates": uniq, "scores": [s.tolist() for s in scores],
                      "aggregated": agg.tolist(), "chosen": j})
        raw.append(uniq[j])
        clean.append(clean_step(uniq[j]))
        step_scores = scores[j]
        last = (j, uniq[j], agg)
        if has_answer(uniq[j]):
            finished = True
            break
    text = join_steps(raw)
    return SearchResult(best_index=last[0], best=last[1], aggregated=last[2], steps=clean, raw_steps=raw,
                        step_scores=step_scores, trace=trace, finished=finished, text=text,
                        answer=extract_final_answer(text))
