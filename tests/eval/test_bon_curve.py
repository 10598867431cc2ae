import itertools

import numpy as np
import pytest

from jaxprm.eval.bon_curve import (
    bon_curve,
    bon_curve_sampled,
    expected_best_of_n,
    majority_curve,
    pass_at_n,
    pass_at_n_curve,
    plot_bon_curve,
)


def brute_force_bon(scores, correct, n):
    """Average over every n-subset of the correctness of its top candidate; ties split evenly."""
    total = 0.0
    subsets = list(itertools.combinations(range(len(scores)), n))
    for sub in subsets:
        best = max(scores[i] for i in sub)
        tied = [i for i in sub if scores[i] == best]
        total += sum(correct[i] for i in tied) / len(tied)
    return total / len(subsets)


def brute_force_pass(correct, n):
    subsets = list(itertools.combinations(range(len(correct)), n))
    return sum(any(correct[i] for i in sub) for sub in subsets) / len(subsets)


def test_hand_computed_small_case():
    # scores 0.9 (wrong), 0.5 (right), 0.1 (right); n=2 subsets: {0,1}->wrong {0,2}->wrong {1,2}->right
    assert expected_best_of_n([0.9, 0.5, 0.1], [False, True, True], 2) == pytest.approx(1 / 3)
    assert expected_best_of_n([0.9, 0.5, 0.1], [False, True, True], 1) == pytest.approx(2 / 3)
    assert expected_best_of_n([0.9, 0.5, 0.1], [False, True, True], 3) == 0.0
    # all tied: best-of-n is the base rate for every n
    for n in (1, 2, 3, 4):
        assert expected_best_of_n([0.5] * 4, [True, False, False, True], n) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(12))
def test_exact_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(1, 9))
    scores = rng.integers(0, 4, size=N) / 4.0  # few levels -> many ties
    correct = rng.random(N) < 0.5
    for n in range(1, N + 1):
        assert expected_best_of_n(scores, correct, n) == pytest.approx(brute_force_bon(scores.tolist(), correct.tolist(), n), abs=1e-12)
        assert pass_at_n(correct, n) == pytest.approx(brute_force_pass(correct.tolist(), n), abs=1e-12)


def test_curve_shapes_inputs_and_monotone_oracle():
    rng = np.random.default_rng(1)
    scores = [rng.random(8) for _ in range(5)]
    correct = [rng.random(8) < 0.4 for _ in range(5)]
    ns, acc = bon_curve(scores, correct)
    assert ns.tolist() == list(range(1, 9)) and acc.shape == (8,)
    # n=1 is the base rate (average correctness)
    assert acc[0] == pytest.approx(np.mean([c.mean() for c in correct]))
    # pair format gives the same result
    problems = [list(zip(s, c)) for s, c in zip(scores, correct)]
    ns2, acc2 = bon_curve(problems, ns=[1, 2, 4, 8])
    np.testing.assert_allclose(acc2, acc[[0, 1, 3, 7]])
    _, oracle = pass_at_n_curve(correct)
    assert np.all(np.diff(oracle) >= -1e-12) and np.all(oracle >= acc - 1e-12)


def test_perfect_prm_reaches_oracle():
    correct = [np.array([False, True, False, False]), np.array([False, False, False, False])]
    scores = [c.astype(float) + 0.1 * np.arange(4) / 4 for c in correct]
    _, acc = bon_curve(scores, correct)
    _, oracle = pass_at_n_curve(correct)
    np.testing.assert_allclose(acc, oracle)


def test_sampled_estimate_close_to_exact():
    rng = np.random.default_rng(2)
    scores = [np.round(rng.random(10), 1) for _ in range(6)]  # ties included
    correct = [rng.random(10) < 0.5 for _ in range(6)]
    ns, exact = bon_curve(scores, correct, ns=[1, 3, 5, 10])
    ns2, sampled = bon_curve_sampled(scores, correct, ns=[1, 3, 5, 10], num_samples=2000, seed=0)
    assert ns.tolist() == ns2.tolist()
    np.testing.assert_allclose(sampled, exact, atol=0.03)
    # deterministic with a fixed seed
    np.testing.assert_array_equal(sampled, bon_curve_sampled(scores, correct, ns=[1, 3, 5, 10], num_samples=2000, seed=0)[1])


def test_majority_curve():
    answers = [["4", "4", "5", None], ["x", "y", "y", "y"]]
    correct = [[True, True, False, False], [True, False, False, False]]
    ns, acc = majority_curve(answers, correct, ns=[1, 4], num_samples=400, seed=0)
    # n=1: a random candidate (None counts as wrong): (2/4 + 1/4) / 2
    assert acc[0] == pytest.approx(0.375, abs=0.06)
    # n=4: majority is "4" (problem 1) and "y" (problem 2)
    assert acc[1] == pytest.approx(0.5)
    # weighted vote can flip the winner
    _, accw = majority_curve(answers, correct, ns=[4], num_samples=10, weights=[[1, 1, 1, 1], [10, 1, 1, 1]])
    assert accw[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        majority_curve([["a"]], [[True, False]])


def test_input_validation():
    with pytest.raises(ValueError, match=r"every n must be in \[1, 3\]"):
        bon_curve([[0.1, 0.2, 0.3]], [[True, False, True]], ns=[4])
    with pytest.raises(ValueError, match="2 scores but 1"):
        bon_curve([[0.1, 0.2]], [[True]])
    with pytest.raises(ValueError, match="finite"):
        bon_curve([[float("nan")]], [[True]])
    with pytest.raises(ValueError, match="no problems"):
        bon_curve([], [])
    with pytest.raises(ValueError, match="n must be"):
        expected_best_of_n([0.1], [True], 2)


def test_plot_png(tmp_path):
    rng = np.random.default_rng(3)
    scores = [rng.random(64) for _ in range(3)]
    correct = [rng.random(64) < 0.3 for _ in range(3)]
    ns = [1, 2, 4, 8, 16, 32, 64]
    curves = {
        "PRM best-of-N": bon_curve(scores, correct, ns=ns),
        "oracle (pass@N)": pass_at_n_curve(correct, ns=ns),
    }
    out = tmp_path / "plots" / "bon.png"
    assert plot_bon_curve(curves, str(out), title="test") == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError):
        plot_bon_curve({}, str(out))


# ----------------------------------------------------------------------------- majority vote: fast == slow


def majority_curve_reference(answers, correct, ns, num_samples=200, seed=0, weights=None):
    """The original (pre-vectorisation) majority_curve, kept verbatim as the slow reference: one
    Python loop per draw, a fresh ``rng.choice`` subset per (n, problem, draw)."""
    from collections import Counter

    probs = []
    for a, c, i in zip(answers, correct, range(len(answers))):
        c = np.asarray(c, dtype=bool).reshape(-1)
        w = np.ones(c.size) if weights is None else np.asarray(weights[i], dtype=np.float64).reshape(-1)
        probs.append((list(a), c, w))
    rng = np.random.default_rng(seed)
    acc = np.zeros(len(ns))
    for j, n in enumerate(ns):
        per_problem = []
        for a, c, w in probs:
            hits = 0.0
            for _ in range(num_samples):
                idx = rng.choice(c.size, size=int(n), replace=False)
                votes = Counter()
                members = {}
                for k in idx:
                    if a[k] is None:
                        continue
                    votes[a[k]] += w[k]
                    members.setdefault(a[k], []).append(k)
                if not votes:
                    continue
                best = max(votes.values())
                winners = [ans for ans, v in votes.items() if v == best]
                win = winners[rng.integers(len(winners))] if len(winners) > 1 else winners[0]
                hits += float(np.mean(c[members[win]]))
            per_problem.append(hits / num_samples)
        acc[j] = float(np.mean(per_problem))
    return np.asarray(ns), acc


def majority_from_draws(answers, correct, weights, ns, perms, ties):
    """The reference's per-draw loop on given draws: draw s's n-subset is perms[s, :n] (in that
    order) and a tie among W answers goes to the floor(ties[s, j] * W)-th in order of first appearance
    in ``answers``. Returns (S, len(ns)) hits."""
    from collections import Counter

    order = {}
    for x in answers:
        if x is not None:
            order.setdefault(x, len(order))
    c = np.asarray(correct, bool)
    w = np.ones(c.size) if weights is None else np.asarray(weights, np.float64)
    out = np.zeros((perms.shape[0], len(ns)))
    for s in range(perms.shape[0]):
        for j, n in enumerate(ns):
            votes, members = Counter(), {}
            for k in perms[s, :n]:
                if answers[k] is None:
                    continue
                votes[answers[k]] += w[k]
                members.setdefault(answers[k], []).append(k)
            if not votes:
                continue
            best = max(votes.values())
            winners = sorted((x for x, v in votes.items() if v == best), key=order.get)
            win = winners[int(ties[s, j] * len(winners))]
            out[s, j] = float(np.mean(c[members[win]]))
    return out


def _random_votes(rng, n_cands, n_answers=4, p_none=0.2):
    raw = rng.integers(0, n_answers, n_cands)
    answers = [None if rng.random() < p_none else f"a{x}" for x in raw]
    correct = (raw == 0) ^ (rng.random(n_cands) < 0.1)  # mostly agrees with the answer, not always
    return answers, correct


@pytest.mark.parametrize("seed", range(8))
def test_majority_hits_equal_the_per_draw_loop(seed):
    from jaxprm.eval.bon_curve import _majority_hits

    rng = np.random.default_rng(seed)
    N = int(rng.integers(1, 13))
    answers, correct = _random_votes(rng, N, n_answers=int(rng.integers(1, 5)), p_none=[0.0, 0.3, 1.0][seed % 3])
    ns = np.arange(1, N + 1) if seed % 2 else np.unique(rng.integers(1, N + 1, 3))
    S = 64
    perms = np.stack([rng.permutation(N) for _ in range(S)])
    ties = rng.random((S, ns.size))
    ids = {}
    classes = np.asarray([-1 if x is None else ids.setdefault(x, len(ids)) for x in answers])
    weight_sets = [None, rng.integers(1, 3, N).astype(float),  # integer weights: weighted ties happen
                   rng.random(N), rng.normal(size=N), np.zeros(N)]  # negative and zero weights too
    for w in weight_sets:
        got = _majority_hits(classes, np.asarray(correct), w, ns, perms, ties)
        ref = majority_from_draws(answers, correct, w, ns.tolist(), perms, ties)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_majority_curve_equals_the_slow_loop_on_the_same_draws():
    """majority_curve == the reference's loop fed with majority_curve's own draws (same RNG use)."""
    rng = np.random.default_rng(5)
    answers, correct, weights = [], [], []
    for i in range(6):
        a, c = _random_votes(rng, 10 + i, n_answers=3)
        answers.append(a), correct.append(c), weights.append(rng.integers(1, 4, len(a)).astype(float))
    ns = [1, 2, 3, 5, 8, 10]
    for w in (None, weights):
        _, acc = majority_curve(answers, correct, ns, num_samples=50, seed=7, weights=w)
        draws = np.random.default_rng(7)
        per_problem = []
        for i, (a, c) in enumerate(zip(answers, correct)):
            perms = draws.permuted(np.broadcast_to(np.arange(len(a)), (50, len(a))), axis=1)[:, :max(ns)]
            ties = draws.random((50, len(ns)))
            per_problem.append(majority_from_draws(a, c, None if w is None else w[i], ns, perms, ties).mean(0))
        np.testing.assert_allclose(acc, np.mean(per_problem, axis=0), rtol=0, atol=1e-12)


def test_majority_curve_agrees_with_the_original_implementation():
    """Same estimator as the original loop: equal where a subset's vote is certain, and within
    Monte-Carlo error elsewhere (the two draw their random subsets differently)."""
    rng = np.random.default_rng(11)
    answers, correct = [], []
    for _ in range(5):
        a, c = _random_votes(rng, 9, n_answers=3, p_none=0.15)
        answers.append(a), correct.append(c)
    weights = [rng.random(9) for _ in range(5)]
    ns = [1, 3, 5, 9]
    for w in (None, weights):
        _, new = majority_curve(answers, correct, ns, num_samples=2000, seed=1, weights=w)
        _, old = majority_curve_reference(answers, correct, ns, num_samples=2000, seed=2, weights=w)
        np.testing.assert_allclose(new, old, atol=0.035, rtol=0)  # ~4 standard errors
    # n = N with distinct weights: every draw is the whole set, the vote is certain
    _, new = majority_curve(answers, correct, [9], num_samples=5, weights=weights)
    _, old = majority_curve_reference(answers, correct, [9], num_samples=5, weights=weights)
    assert new[0] == old[0]
    # the hand-made case of test_majority_curve, exactly where it is certain
    a, c = [["4", "4", "5", None], ["x", "y", "y", "y"]], [[True, True, False, False], [True, False, False, False]]
    assert majority_curve(a, c, [4], num_samples=3)[1][0] == majority_curve_reference(a, c, [4], num_samples=3)[1][0]


def test_majority_curve_every_n_on_many_problems():
    """Every N = 1..64 for 200 problems x 64 candidates in one call (was: powers of two only)."""
    rng = np.random.default_rng(0)
    answers, correct, weights = [], [], []
    for _ in range(200):
        a, c = _random_votes(rng, 64, n_answers=int(rng.integers(2, 12)))
        answers.append(a), correct.append(c), weights.append(rng.random(64))
    ns, acc = majority_curve(answers, correct, num_samples=200, seed=0)
    assert ns.tolist() == list(range(1, 65)) and acc.shape == (64,)
    assert np.all((acc >= 0) & (acc <= 1))
    # N=1: a random candidate's correctness (no answer counts as wrong)
    base = np.mean([np.mean([ci and ai is not None for ai, ci in zip(a, c)]) for a, c in zip(answers, correct)])
    assert acc[0] == pytest.approx(base, abs=0.01)
    _, accw = majority_curve(answers, correct, num_samples=200, seed=0, weights=weights)
    assert accw.shape == (64,) and np.all((accw >= 0) & (accw <= 1))
    # deterministic for a seed
    few = (answers[:5], correct[:5])
    np.testing.assert_array_equal(majority_curve(*few, seed=3)[1], majority_curve(*few, seed=3)[1])
