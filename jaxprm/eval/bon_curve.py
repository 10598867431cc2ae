"""Best-of-N accuracy as a function of N, with baselines and a plot.

For every problem we have N sampled candidates, each with an aggregated PRM score and whether its
answer is correct. "Best-of-n" draws n of the N candidates and keeps the highest-scoring one.
Rather than one arbitrary draw, accuracy at n is the expectation over all ``C(N, n)`` equally
likely n-subsets (drawn without replacement), computed exactly:

  sort the distinct scores; for a score level s held by ``g`` candidates of which ``c`` are
  correct, with ``L`` candidates scoring strictly below s,

      P(max of a random n-subset == s) = (C(L + g, n) - C(L, n)) / C(N, n)

  and, given that the subset's maximum is s, the kept candidate is uniform over the ``g`` tied
  candidates (the tied members in the subset are a uniform random subset of the g, and the tie is
  broken uniformly among them), so it is correct with probability c / g. Hence

      E[acc@n] = sum_s (C(L_s + g_s, n) - C(L_s, n)) / C(N, n) * c_s / g_s.

This is the same "unbiased estimator over subsets" idea as pass@k (Chen et al. 2021, "Evaluating
Large Language Models Trained on Code", ``1 - C(N - c, k) / C(N, k)``), which gives the oracle
baseline here. ``bon_curve_sampled`` estimates the same quantity by drawing random subsets, and
``majority_curve`` the self-consistency (majority vote) baseline by sampling (vectorised over the
draws and every n, fast enough for each N in 1..64).

Inputs: either ``scores`` and ``correct`` as two lists (one array per problem), or one list of
problems each a sequence of ``(score, correct)`` pairs with ``correct=None``. Problems may have
different N; every requested n must be <= the smallest N.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "bon_curve",
    "bon_curve_sampled",
    "expected_best_of_n",
    "majority_curve",
    "pass_at_n",
    "pass_at_n_curve",
    "plot_bon_curve",
]


# ----------------------------------------------------------------------------- inputs


def _unpack(scores_or_problems: Sequence, correct: Sequence | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if correct is None:
        scores, flags = [], []
        for i, prob in enumerate(scores_or_problems):
            pairs = list(prob)
            if not pairs:
                raise ValueError(f"problem {i} has no candidates")
            try:
                s, c = zip(*pairs)
            except (TypeError, ValueError):
                raise ValueError(f"problem {i}: expected (score, correct) pairs") from None
            scores.append(np.asarray(s, dtype=np.float64))
            flags.append(np.asarray(c, dtype=bool))
    else:
        if len(scores_or_problems) != len(correct):
            raise ValueError(f"got {len(scores_or_problems)} score arrays but {len(correct)} correctness arrays")
        scores = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores_or_problems]
        flags = [np.asarray(c, dtype=bool).reshape(-1) for c in correct]
    if not scores:
        raise ValueError("no problems given")
    for i, (s, c) in enumerate(zip(scores, flags)):
        if s.shape != c.shape:
            raise ValueError(f"problem {i}: {s.shape[0]} scores but {c.shape[0]} correctness flags")
        if s.size == 0:
            raise ValueError(f"problem {i} has no candidates")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"problem {i}: scores must be finite (NaN/inf found)")
    return scores, flags


def _ns(ns: Sequence[int] | None, min_n: int) -> np.ndarray:
    if ns is None:
        return np.arange(1, min_n + 1)
    arr = np.asarray(list(ns), dtype=np.int64).reshape(-1)
    if arr.size == 0:
        raise ValueError("ns is empty")
    if np.any(arr < 1) or np.any(arr > min_n):
        raise ValueError(f"every n must be in [1, {min_n}] (the smallest number of candidates per problem); got {arr.tolist()}")
    return arr


# ----------------------------------------------------------------------------- exact


def expected_best_of_n(scores: Sequence[float], correct: Sequence[bool], n: int) -> float:
    """Exact expected correctness of the top-scoring candidate of a uniformly random n-subset,
    ties broken uniformly at random (see the module docstring for the formula)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    c = np.asarray(correct, dtype=bool).reshape(-1)
    N = s.size
    if c.size != N:
        raise ValueError(f"{N} scores but {c.size} correctness flags")
    if not 1 <= n <= N:
        raise ValueError(f"n must be in [1, {N}], got {n}")
    levels, inverse = np.unique(s, return_inverse=True)  # ascending
    g = np.bincount(inverse, minlength=levels.size)
    cc = np.bincount(inverse, weights=c.astype(np.float64), minlength=levels.size)
    total = math.comb(N, n)
    acc = 0.0
    below = 0
    for k in range(levels.size):
        p_max = (math.comb(below + int(g[k]), n) - math.comb(below, n)) / total
        acc += p_max * cc[k] / g[k]
        below += int(g[k])
    return float(acc)


def bon_curve(
    scores_or_problems: Sequence,
    correct: Sequence | None = None,
    ns: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best-of-n accuracy (exact expectation over n-subsets) averaged over problems.

    Returns ``(ns, acc)``; ``ns`` defaults to 1..min N."""
    scores, flags = _unpack(scores_or_problems, correct)
    ns_arr = _ns(ns, min(s.size for s in scores))
    acc = np.array([np.mean([expected_best_of_n(s, c, int(n)) for s, c in zip(scores, flags)]) for n in ns_arr])
    return ns_arr, acc


def pass_at_n(correct: Sequence[bool], n: int) -> float:
    """Unbiased pass@n: probability a random n-subset contains a correct candidate
    ``1 - C(N - c, n) / C(N, n)``."""
    c = np.asarray(correct, dtype=bool).reshape(-1)
    N, k = c.size, int(c.sum())
    if not 1 <= n <= N:
        raise ValueError(f"n must be in [1, {N}], got {n}")
    return 1.0 - math.comb(N - k, n) / math.comb(N, n)


def pass_at_n_curve(correct: Sequence[Sequence[bool]], ns: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Oracle (pass@n) accuracy curve averaged over problems."""
    flags = [np.asarray(c, dtype=bool).reshape(-1) for c in correct]
    if not flags or any(f.size == 0 for f in flags):
        raise ValueError("every problem needs at least one candidate")
    ns_arr = _ns(ns, min(f.size for f in flags))
    return ns_arr, np.array([np.mean([pass_at_n(f, int(n)) for f in flags]) for n in ns_arr])


# ----------------------------------------------------------------------------- sampled


def bon_curve_sampled(
    scores_or_problems: Sequence,
    correct: Sequence | None = None,
    ns: Sequence[int] | None = None,
    num_samples: int = 200,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo estimate of ``bon_curve``: for each problem and n, ``num_samples`` random
    n-subsets (without replacement), keep the top score (random tie-break), average correctness."""
    scores, flags = _unpack(scores_or_problems, correct)
    ns_arr = _ns(ns, min(s.size for s in scores))
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rng = np.random.default_rng(seed)
    acc = np.zeros(ns_arr.size)
    for j, n in enumerate(ns_arr):
        per_problem = []
        for s, c in zip(scores, flags):
            N = s.size
            # random n-subsets as the first n columns of random permutations
            subsets = np.argsort(rng.random((num_samples, N)), axis=1)[:, :n]
            sub_scores = s[subsets]
            # random tie-break: add a tiny random key only among exact ties
            is_max = sub_scores == sub_scores.max(axis=1, keepdims=True)
            tie_key = np.where(is_max, rng.random(is_max.shape), -1.0)
            picked = subsets[np.arange(num_samples), np.argmax(tie_key, axis=1)]
            per_problem.append(c[picked].mean())
        acc[j] = float(np.mean(per_problem))
    return ns_arr, acc


def _running_sum(x: np.ndarray) -> np.ndarray:
    """In-place cumulative sum along axis 0, one vectorised add per row (numpy's ``cumsum`` along a
    leading axis is many times slower); the additions run left to right, as ``cumsum``'s."""
    for i in range(1, x.shape[0]):
        np.add(x[i - 1], x[i], out=x[i])
    return x


def _majority_hits(classes: np.ndarray, correct: np.ndarray, weights: np.ndarray | None, ns: np.ndarray,
                   perms: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Majority-vote correctness of sampled subsets of one problem, every n at once: (S, len(ns)).

    ``classes`` (N,): each candidate's answer as an index 0..G-1, -1 for no answer (no vote);
    ``weights`` (N,) or None (one vote each); ``perms`` (S, >= max(ns)): row s lists the candidates of
    draw s, its first n being draw s's n-subset; ``ties`` (S, len(ns)) uniforms in [0, 1): among the
    W answers tied for the most votes, draw s at ``ns[j]`` takes the ``floor(ties[s, j] * W)``-th in
    class order. The winner's correctness is the mean correctness of the subset's candidates that
    gave it; a subset without any answer scores 0. Vote totals are summed in the subset's order, as
    a running sum over the permutation (adding 0 for other answers leaves a float sum unchanged)."""
    g = int(classes.max()) + 1 if classes.size else 0
    if g == 0:  # nobody answered
        return np.zeros((perms.shape[0], ns.size))
    m = int(ns.max())
    sub = np.ascontiguousarray(perms[:, :m].T)  # (m, S): running sums along the first axis
    onehot = classes[sub][..., None] == np.arange(g)  # (m, S, G)
    every = ns.size == m and bool(np.all(ns == np.arange(1, m + 1)))

    def at_ns(x):  # (m, S, G) running sums -> (J, S, G) at the requested n
        return x if every else x[ns - 1]

    small = np.int16 if m < 2**15 else np.int32
    count = at_ns(_running_sum(onehot.astype(small)))  # (J, S, G) the subset's members of each answer
    right = at_ns(_running_sum((onehot & correct[sub][..., None]).astype(small)))  # ... the correct ones
    if weights is None:  # integer votes; an answer is in the subset iff it has a vote
        best = count.max(axis=-1, keepdims=True)
        win = (count == best) & (best > 0)
    else:
        votes = at_ns(_running_sum(np.where(onehot, weights[sub][..., None], 0.0)))
        votes[count == 0] = -np.inf
        win = (votes == votes.max(axis=-1, keepdims=True)) & (count > 0)  # answers tied for the most votes
    rank = _running_sum(np.moveaxis(win.astype(small), -1, 0))  # (G, J, S) view: 1-based rank of each winner
    rank = np.moveaxis(rank, 0, -1)  # (J, S, G), in class order
    n_win = rank[..., -1]  # 0 only when the subset has no answer
    pick = np.minimum((ties.T * n_win).astype(np.int32), np.maximum(n_win - 1, 0))  # (J, S)
    idx = np.argmax(win & (rank == pick[..., None] + 1), axis=-1)[..., None]
    hit = np.take_along_axis(right, idx, -1)[..., 0] / np.maximum(np.take_along_axis(count, idx, -1)[..., 0], 1)
    return np.where(n_win > 0, hit, 0.0).T  # (S, J)


def majority_curve(
    answers: Sequence[Sequence[Any]],
    correct: Sequence[Sequence[bool]],
    ns: Sequence[int] | None = None,
    num_samples: int = 200,
    seed: int = 0,
    weights: Sequence[Sequence[float]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Self-consistency baseline: majority vote over the extracted answers of random n-subsets.

    ``answers[i][j]`` is candidate j's (normalised) final answer, ``None`` for no answer (it
    does not vote); ``correct[i][j]`` its correctness. With ``weights`` (e.g. PRM scores) the vote
    is weighted. Ties between answers are broken uniformly at random; the winning answer's
    correctness is the mean correctness of the candidates that gave it (they normally agree).
    A subset with no answers at all counts as wrong. Sampled with ``num_samples`` subsets per
    problem and n (drawn without replacement).

    Vectorised over draws and n: per problem, ``num_samples`` random permutations of the candidates
    are drawn once and the n-subset of draw s is the first n candidates of permutation s (so each
    n still averages ``num_samples`` uniformly random n-subsets; the estimates at different n share
    their draws), and running vote totals give every n in one pass. Cheap enough for every n in
    1..64 on hundreds of problems (``ns`` defaults to 1..min N).
    """
    if len(answers) != len(correct):
        raise ValueError(f"got {len(answers)} answer lists but {len(correct)} correctness lists")
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"got {len(answers)} answer lists but {len(weights)} weight lists")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    probs = []
    for i, (a, c) in enumerate(zip(answers, correct)):
        a = list(a)
        c = np.asarray(c, dtype=bool).reshape(-1)
        if len(a) != c.size or c.size == 0:
            raise ValueError(f"problem {i}: {len(a)} answers but {c.size} correctness flags")
        w = None if weights is None else np.asarray(weights[i], dtype=np.float64).reshape(-1)
        if w is not None and w.size != c.size:
            raise ValueError(f"problem {i}: {w.size} weights for {c.size} candidates")
        ids: dict = {}
        classes = np.asarray([-1 if x is None else ids.setdefault(x, len(ids)) for x in a], dtype=np.int64)
        probs.append((classes, c, w))
    if not probs:
        raise ValueError("no problems given")
    ns_arr = _ns(ns, min(c.size for _, c, _ in probs))
    rng = np.random.default_rng(seed)
    m = int(ns_arr.max())
    per_problem = np.zeros((len(probs), ns_arr.size))
    for i, (classes, c, w) in enumerate(probs):
        perms = rng.permuted(np.broadcast_to(np.arange(c.size), (num_samples, c.size)), axis=1)[:, :m]
        ties = rng.random((num_samples, ns_arr.size))
        per_problem[i] = _majority_hits(classes, c, w, ns_arr, perms, ties).mean(axis=0)
    return ns_arr, per_problem.mean(axis=0)


# ----------------------------------------------------------------------------- plot


def plot_bon_curve(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    path: str,
    title: str | None = None,
    xlabel: str = "N (candidates per problem)",
    ylabel: str = "accuracy",
    log2_x: bool = True,
    percent: bool = True,
    dpi: int = 120,
) -> str:
    """Save accuracy-vs-N curves (``{name: (ns, acc)}``) as a PNG at ``path``; returns the path.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change)."""
    if not curves:
        raise ValueError("curves is empty")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    all_ns: set[int] = set()
    for name, (ns, acc) in curves.items():
        ns = np.asarray(ns, dtype=np.float64).reshape(-1)
        acc = np.asarray(acc, dtype=np.float64).reshape(-1)
        if ns.shape != acc.shape:
            raise ValueError(f"curve {name!r}: {ns.size} ns but {acc.size} accuracies")
        y = acc * 100.0 if percent else acc
        ax.plot(ns, y, marker="o", markersize=3, linewidth=1.5, label=str(name))
        all_ns.update(int(v) for v in ns)
    if log2_x and all_ns and min(all_ns) >= 1:
        ax.set_xscale("log", base=2)
        ticks = [t for t in (2**k for k in range(0, 12)) if min(all_ns) <= t <= max(all_ns)]
        if ticks:
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel} (%)" if percent else ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path
