"""Fusion of MC values and judge verdicts on hand-made steps (rules from jaxprm.data.labels)."""
import pytest

from jaxprm.data.schema import Record, Step
from jaxprm.synth.fuse import consensus_category, fill_steps, fuse_record, rule_labels
from jaxprm.synth.judge import JudgeVerdict


def _steps(mc, judge):
    base = [Step(text=f"s{i}", kind="perception" if i < 2 else "reasoning") for i in range(len(mc))]
    return fill_steps(base, [(c, 4) for c in mc], judge)


CASES = [
    # mc correct counts (of 4), judge values, expected labels per rule, consensus category
    dict(mc=[4, 3, 2, 1], judge=[1, 1, 1, 1],
         mc_l=[1, 1, 1, 1], judge_l=[1, 1, 1, 1], hybrid=[1, 1, 1, 1], v2=[1, 1, 1, 1],
         cat="judge_correct_and_mc_agrees"),
    # both find the error at step 2
    dict(mc=[4, 3, 0, 0], judge=[1, 1, 0, None],
         mc_l=[1, 1, 0, 0], judge_l=[1, 1, 0, None], hybrid=[1, 1, 0, None], v2=[1, 1, 0, None],
         cat="judge_incorrect_and_mc_agrees"),
    # the judge misses an error MC sees: hybrid drops the disagreeing steps, v2 drops the trace
    dict(mc=[4, 3, 0, 0], judge=[1, 1, 1, 1],
         mc_l=[1, 1, 0, 0], judge_l=[1, 1, 1, 1], hybrid=[1, 1, None, None], v2=[None] * 4,
         cat="judge_correct_and_mc_disagrees"),
    # the judge flags step 1 but MC says it is fine (a false alarm): hybrid leaves it unlabelled
    dict(mc=[4, 3, 2, 2], judge=[1, 0, None, None],
         mc_l=[1, 1, 1, 1], judge_l=[1, 0, None, None], hybrid=[1, None, None, None], v2=[1, 0, None, None],
         cat="judge_incorrect_and_mc_disagrees"),
    # the judge points late (step 3), MC fails at step 1: steps 1-2 disagree, step 3 agrees
    dict(mc=[4, 0, 0, 0], judge=[1, 1, 1, 0],
         mc_l=[1, 0, 0, 0], judge_l=[1, 1, 1, 0], hybrid=[1, None, None, 0], v2=[1, 1, 1, 0],
         cat="judge_incorrect_and_mc_disagrees"),
]


@pytest.mark.parametrize("case", CASES)
def test_rules_on_hand_made_steps(case):
    steps = _steps(case["mc"], case["judge"])
    assert rule_labels(steps, "mc", threshold=0.0) == case["mc_l"]
    assert rule_labels(steps, "judge") == case["judge_l"]
    assert rule_labels(steps, "hybrid", threshold=0.0) == case["hybrid"]
    assert rule_labels(steps, "vlprm_v2", threshold=0.0) == case["v2"]
    assert consensus_category(steps) == case["cat"]


def test_fuse_record_sets_labels_and_meta():
    steps = _steps([4, 3, 0, 0], [1, 1, 1, 1])
    rec = Record(id="q-r0", question="q?", steps=steps, answer="1")
    for primary, expected in (("hybrid", [1, 1, None, None]), ("mc", [1, 1, 0, 0]), ("judge", [1, 1, 1, 1]),
                              ("vlprm_v2", [None] * 4)):
        out = fuse_record(rec, primary).validate()
        assert out.labels == expected
        assert out.meta["label_rule"]["name"] == primary
        assert out.meta["labels_by_rule"]["hybrid"] == [1, 1, None, None]
        assert set(out.meta["labels_by_rule"]) == {"mc", "judge", "hybrid", "vlprm_v2"}
        assert out.meta["consensus"] == "judge_correct_and_mc_disagrees"
    assert rec.labels == [None] * 4  # inputs are not modified


def test_rule_parameters_pass_through():
    steps = _steps([4, 1, 0, 0], [1, 1, 0, None])
    rec = Record(id="q-r0", question="q?", steps=steps)
    out = fuse_record(rec, "hybrid", {"hybrid": {"threshold": 0.5}, "mc": {"threshold": 0.5, "after_error": "negative"}})
    assert out.labels == [1, None, 0, None]
    assert out.meta["labels_by_rule"]["mc"] == [1, 0, 0, 0]
    assert out.meta["label_rule"]["threshold"] == 0.5
    out = fuse_record(rec, "hybrid", {"hybrid": {"disagree": "judge"}})
    assert out.labels == [1, 1, 0, None]
    with pytest.raises(ValueError):
        fuse_record(rec, "majority")
    with pytest.raises(ValueError):
        fuse_record(rec, "hybrid", {"nope": {}})


def test_missing_sources():
    base = [Step(text="a"), Step(text="b")]
    only_mc = fill_steps(base, [(2, 4), (0, 4)], None)
    assert rule_labels(only_mc, "hybrid") == [None, None] and consensus_category(only_mc) == "no_judge"
    assert rule_labels(only_mc, "mc") == [1, 0]
    failed = fill_steps(base, [(2, 4), (0, 4)], JudgeVerdict(ok=False).step_values(2))
    assert rule_labels(failed, "judge") == [None, None] and rule_labels(failed, "vlprm_v2") == [None, None]
    # early-stopped MC (0/0) is missing information, not a negative
    stopped = fill_steps(base, [(0, 4), (0, 0)], [1, 1])
    assert rule_labels(stopped, "hybrid") == [None, None]
    assert rule_labels(stopped, "mc") == [0, None]
