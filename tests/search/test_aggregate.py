import math

import numpy as np
import pytest

from jaxprm.search import aggregate as agg


SCORES = [0.9, 0.5, 0.8, 0.6]


def test_basic_aggregations_hand_computed():
    assert agg.mean(SCORES) == pytest.approx(0.7)
    assert agg.min(SCORES) == pytest.approx(0.5)
    assert agg.min_score(SCORES) == pytest.approx(0.5)
    assert agg.last(SCORES) == pytest.approx(0.6)
    assert agg.product(SCORES) == pytest.approx(0.9 * 0.5 * 0.8 * 0.6)  # 0.216
    assert agg.product(SCORES) == pytest.approx(0.216)


def test_single_step_and_numpy_input():
    for how in ("mean", "min", "last", "product"):
        assert agg.aggregate(np.array([0.25]), how=how) == pytest.approx(0.25)
    assert isinstance(agg.mean(np.float32([0.1, 0.2])), float)


def test_product_zero_and_long_chain():
    assert agg.product([0.5, 0.0, 1.0]) == 0.0
    long = np.full(2000, 0.999)
    assert agg.product(long) == pytest.approx(0.999**2000, rel=1e-9)


def test_length_normalized_vlprm_formula():
    # reward = p_last ** 0.3 / L ** 0.6 when "+" wins, else -1 (VL-PRM VisualPRMv2.inference_single)
    assert agg.length_normalized([0.2, 0.8], length=1000) == pytest.approx(0.8**0.3 / 1000**0.6)
    # default length = number of steps
    assert agg.length_normalized([0.9, 0.8, 0.64]) == pytest.approx(0.64**0.3 / 3**0.6)
    # "-" is the argmax -> -1
    assert agg.length_normalized([0.9, 0.49], length=10) == -1.0
    # tie: argmax picks "+" (index 0)
    assert agg.length_normalized([0.5], length=1) == pytest.approx(0.5**0.3)
    # custom exponents / reject value
    assert agg.length_normalized([1.0], length=4, alpha=1.0, beta=0.5) == pytest.approx(0.5)
    assert agg.length_normalized([0.1], reject_value=-5.0) == -5.0
    # a longer prompt lowers the reward
    assert agg.length_normalized([0.9], length=100) > agg.length_normalized([0.9], length=200)


def test_length_normalized_bad_length():
    with pytest.raises(ValueError, match="positive"):
        agg.length_normalized([0.9], length=0)


def test_registry_and_dispatch():
    assert set(agg.AGGREGATIONS) == {"mean", "min", "last", "product", "length_normalized"}
    assert agg.aggregate(SCORES) == pytest.approx(0.7)  # default mean
    assert agg.aggregate(SCORES, how="min") == pytest.approx(0.5)
    assert agg.aggregate([0.9, 0.8], how="length_normalized", length=32) == pytest.approx(0.8**0.3 / 32**0.6)


def test_unknown_aggregation_message():
    with pytest.raises(ValueError, match=r"unknown aggregation 'median'.*length_normalized"):
        agg.aggregate(SCORES, how="median")


@pytest.mark.parametrize("bad", [[], np.zeros((0,)), np.zeros((2, 2)), 0.5, [0.1, float("nan")]])
def test_bad_inputs(bad):
    with pytest.raises(ValueError):
        agg.aggregate(bad, how="mean")


def test_empty_message_is_clear():
    with pytest.raises(ValueError, match="empty"):
        agg.mean([])


def test_probability_range_checked_for_product():
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        agg.product([0.5, 1.5])


def test_batch():
    batch = [[0.9, 0.5], [0.2], np.array([1.0, 1.0, 0.4])]
    np.testing.assert_allclose(agg.aggregate_batch(batch, how="mean"), [0.7, 0.2, 0.8])
    np.testing.assert_allclose(agg.aggregate_batch(batch, how="last"), [0.5, 0.2, 0.4])
    got = agg.aggregate_batch(batch, how="length_normalized", lengths=[10, 20, 30])
    np.testing.assert_allclose(got, [0.5**0.3 / 10**0.6, -1.0, -1.0])
    assert agg.aggregate_batch([], how="min").shape == (0,)


def test_batch_errors_name_the_solution():
    with pytest.raises(ValueError, match="solution 1"):
        agg.aggregate_batch([[0.5], []], how="mean")
    with pytest.raises(ValueError, match="lengths"):
        agg.aggregate_batch([[0.5]], how="mean", lengths=[3])
    with pytest.raises(ValueError, match="2 score arrays but 1 lengths"):
        agg.aggregate_batch([[0.5], [0.6]], how="length_normalized", lengths=[3])


def test_star_import_does_not_shadow_builtin_min():
    ns = {}
    exec("from jaxprm.search.aggregate import *", ns)
    assert "min" not in ns
    assert math.isclose(ns["min_score"]([0.3, 0.2]), 0.2)
