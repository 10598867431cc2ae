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
