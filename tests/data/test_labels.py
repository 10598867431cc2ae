"""Label rules on hand-built steps: every branch of mc / judge / hybrid / vlprm_v2 and the neutral options."""
import copy

import pytest

from jaxprm.data.labels import (
    LABEL_RULES,
    RULE_NAMES,
    RULES,
    apply_label_rule,
    hybrid,
    hybrid_labels,
    judge_first_incorrect,
    judge_first_incorrect_labels,
    mc_threshold,
    mc_threshold_labels,
    vlprm_v2,
    vlprm_v2_labels,
)
from jaxprm.data.schema import Record, Step


def S(mc=None, judge=None, total=16, label=None):
    """A step with ``mc`` correct of ``total`` rollouts (mc=None: no MC counts)."""
    if mc is None:
        return Step(text="t", judge=judge, label=label)
    return Step(text="t", num_mc_correct=mc, num_mc_total=total, judge=judge, label=label)


def rec(steps):
    return Record(id="r", question="q?", steps=steps, meta={"keep": 1})


# -- mc --------------------------------------------------------------------------------------------
def test_mc_threshold_zero_is_strict_and_missing_is_neutral():
    steps = [S(3), S(0), S(None), S(0, total=0), S(5)]  # 3/16, 0/16, no counts, 0/0 (not rolled out), 5/16
    assert mc_threshold_labels(steps) == [1, 0, None, None, 1]
    assert mc_threshold_labels(steps, neutral="positive") == [1, 0, 1, 1, 1]
    assert mc_threshold_labels(steps, neutral="negative") == [1, 0, 0, 0, 1]


def test_mc_threshold_value_and_equality():
    steps = [S(3), S(4), S(5)]  # 0.1875, 0.25, 0.3125
    assert mc_threshold_labels(steps, threshold=0.25) == [0, 0, 1]  # mc == threshold is "-"
    assert mc_threshold_labels(steps, threshold=0.1) == [1, 1, 1]


def test_mc_after_error_options():
    steps = [S(8), S(0), S(9), S(None)]
    assert mc_threshold_labels(steps) == [1, 0, 1, None]  # "keep": independent (VisualPRM)
    assert mc_threshold_labels(steps, after_error="ignore") == [1, 0, None, None]
    assert mc_threshold_labels(steps, after_error="negative") == [1, 0, 0, 0]
    # a neutral step is not an error: nothing after it changes
    assert mc_threshold_labels([S(None), S(4)], neutral="negative", after_error="negative") == [0, 1]


# -- judge ---------------------------------------------------------------------------------------------
def test_judge_first_incorrect_branches():
    steps = [S(judge=1), S(judge=1), S(judge=0), S(judge=None), S(judge=1)]
    assert judge_first_incorrect_labels(steps) == [1, 1, 0, None, None]
    assert judge_first_incorrect_labels(steps, after_error="negative") == [1, 1, 0, 0, 0]


def test_judge_no_error_and_unjudged_steps():
    assert judge_first_incorrect_labels([S(judge=1), S(judge=1)]) == [1, 1]
    steps = [S(judge=1), S(judge=None), S(judge=0)]
    assert judge_first_incorrect_labels(steps) == [1, None, 0]
    assert judge_first_incorrect_labels(steps, neutral="positive") == [1, 1, 0]
    assert judge_first_incorrect_labels(steps, neutral="negative") == [1, 0, 0]
    assert judge_first_incorrect_labels([S(judge=None)] * 2) == [None, None]


# -- hybrid ----------------------------------------------------------------------------------------------
def test_hybrid_every_branch():
    steps = [
        S(8, judge=1),     # agree +            -> 1
        S(0, judge=1),     # disagree (mc low)  -> neutral
        S(None, judge=1),  # no MC              -> neutral
        S(6, judge=None),  # no verdict         -> neutral
        S(0, judge=0),     # agree -            -> 0
        S(5),              # after the error    -> after_error
        S(0),
    ]
    assert hybrid_labels(steps) == [1, None, None, None, 0, None, None]
    assert hybrid_labels(steps, after_error="negative") == [1, None, None, None, 0, 0, 0]
    assert hybrid_labels(steps, neutral="positive") == [1, 1, 1, 1, 0, None, None]
    assert hybrid_labels(steps, disagree="judge") == [1, 1, None, None, 0, None, None]
    assert hybrid_labels(steps, disagree="mc") == [1, 0, None, None, 0, None, None]


def test_hybrid_error_step_where_mc_is_high():
    steps = [S(16, judge=1), S(9, judge=0)]
    assert hybrid_labels(steps) == [1, None]                  # judge says "-", MC says "+"
    assert hybrid_labels(steps, disagree="judge") == [1, 0]
    assert hybrid_labels(steps, disagree="mc") == [1, 1]
    assert hybrid_labels(steps, threshold=0.6) == [1, 0]      # 9/16 = 0.5625 <= 0.6: agreement


def test_hybrid_without_judge_error():
    assert hybrid_labels([S(4, judge=1), S(0, judge=1)]) == [1, None]


# -- wrappers ------------------------------------------------------------------------------------------
def test_rules_are_pure_and_record_meta():
    r = rec([S(8, judge=1, label=0), S(0, judge=0)])
    before = copy.deepcopy(r)
    out = hybrid(r, 0.0, after_error="negative")
    assert r == before  # input untouched
    assert out is not r and out.labels == [1, 0]
    assert out.meta == {"keep": 1, "label_rule": {"name": "hybrid", "threshold": 0.0, "neutral": "ignore",
                                                 "after_error": "negative", "disagree": "neutral"}}
    assert mc_threshold(r).meta["label_rule"] == {"name": "mc", "threshold": 0.0, "neutral": "ignore",
                                                  "after_error": "keep"}
    assert judge_first_incorrect(r).meta["label_rule"] == {"name": "judge", "neutral": "ignore",
                                                           "after_error": "ignore"}
    out.validate()


def test_rules_accept_step_lists():
    steps = [S(8, judge=1), S(0, judge=0)]
    out = mc_threshold(steps, 0.0)
    assert isinstance(out, list) and [s.label for s in out] == [1, 0]
    assert [s.label for s in steps] == [None, None]


def test_registry_and_apply_by_name():
    assert set(LABEL_RULES) == set(RULES) == set(RULE_NAMES) == {"mc", "judge", "hybrid", "vlprm_v2"}
    assert all(RULES[n].doc and RULES[n].apply is LABEL_RULES[n] for n in RULE_NAMES)
    r = rec([S(8, judge=1), S(0, judge=1)])
    assert apply_label_rule(r, "mc").labels == [1, 0]
    assert apply_label_rule(r, "judge").labels == [1, 1]
    assert apply_label_rule(r, "HYBRID", disagree="judge").labels == [1, 1]
    with pytest.raises(ValueError, match=r"unknown label rule 'vote'.*\['hybrid', 'judge', 'mc', 'vlprm_v2'\]"):
        apply_label_rule(r, "vote")


def test_vlprm_v2_is_a_registered_rule():
    """vlprm_v2 lived only in synth/fuse.py, so training (``data.label_rule``) could not use it."""
    judge_error = rec([S(8, judge=1), S(8, judge=0), S(0, judge=None)])  # judge finds an error at step 1
    accepted_mc_agrees = rec([S(8, judge=1), S(2, judge=1)])
    accepted_mc_disagrees = rec([S(8, judge=1), S(0, judge=1)])
    not_judged = rec([S(8), S(8)])
    out = apply_label_rule(judge_error, "vlprm_v2")
    assert out.labels == [1, 0, None]  # the judge's labels, whether MC agrees or not
    assert out.meta["label_rule"] == {"name": "vlprm_v2", "threshold": 0.0} and out.meta["keep"] == 1
    assert apply_label_rule(accepted_mc_agrees, "VLPRM_V2").labels == [1, 1]
    assert apply_label_rule(accepted_mc_disagrees, "vlprm_v2").labels == [None, None]  # trace dropped
    assert vlprm_v2(accepted_mc_disagrees, threshold=-1.0).labels == [1, 1]
    assert vlprm_v2_labels(not_judged.steps) == [None, None]
    assert [s.label for s in vlprm_v2(accepted_mc_agrees.steps)] == [1, 1]  # step lists too
    with pytest.raises(ValueError, match="threshold must be a number"):
        vlprm_v2(accepted_mc_agrees, threshold="0.1")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda r: mc_threshold(r, neutral="maybe"), "neutral must be one of"),
        (lambda r: mc_threshold(r, after_error="drop"), "after_error must be one of"),
        (lambda r: judge_first_incorrect(r, after_error="keep"), "after_error must be one of"),
        (lambda r: hybrid(r, disagree="coin"), "disagree must be one of"),
        (lambda r: hybrid(r, threshold="0.5"), "threshold must be a number"),
    ],
)
def test_bad_options(call, match):
    with pytest.raises(ValueError, match=match):
        call(rec([S(8, judge=1)]))
