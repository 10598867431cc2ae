import json

import numpy as np
import pytest

from jaxprm.eval.step_f1 import binary_f1, load_visualprocessbench, step_f1, visualprocessbench_f1

GOLD = [1, 1, 1, -1, -1, 0]
SCORES = [0.9, 0.6, 0.4, 0.7, 0.2, 0.99]


def test_binary_f1():
    assert binary_f1(2, 1, 1) == pytest.approx(2 / 3)
    assert binary_f1(0, 0, 0) == 0.0
    assert binary_f1(0, 3, 2) == 0.0


def test_hand_computed_confusion_neutral_excluded():
    # scored steps: pred correct [T, T, F, T, F] vs gold correct [T, T, T, F, F]
    m = visualprocessbench_f1(SCORES, GOLD)
    assert m["confusion"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 1}
    assert m["f1_correct"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2/3
    assert m["f1_incorrect"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # 1/2
    assert m["macro_f1"] == pytest.approx(7 / 12)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert (m["n_steps"], m["n_correct"], m["n_incorrect"], m["n_neutral"]) == (5, 3, 2, 1)


def test_neutral_modes():
    m = visualprocessbench_f1(SCORES, GOLD, neutral="correct")
    assert m["confusion"] == {"tp": 3, "fp": 1, "fn": 1, "tn": 1}
    assert m["macro_f1"] == pytest.approx((6 / 8 + 2 / 4) / 2)
    m = visualprocessbench_f1(SCORES, GOLD, neutral="incorrect")
    assert m["confusion"] == {"tp": 2, "fp": 2, "fn": 1, "tn": 1}
    assert m["f1_correct"] == pytest.approx(4 / 7)
    assert m["f1_incorrect"] == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="neutral"):
        visualprocessbench_f1(SCORES, GOLD, neutral="drop")


def test_threshold_and_ties():
    # a score equal to the threshold counts as "correct"
    m = visualprocessbench_f1([0.5, 0.5], [1, -1])
    assert m["confusion"] == {"tp": 1, "fp": 1, "fn": 0, "tn": 0}
    assert m["f1_incorrect"] == 0.0 and m["macro_f1"] == pytest.approx(1 / 3)
    m = visualprocessbench_f1(SCORES, GOLD, threshold=0.8)
    # pred correct [T, F, F, F, F]: tp=1 fn=2 fp=0 tn=2
    assert m["confusion"] == {"tp": 1, "fp": 0, "fn": 2, "tn": 2}
    assert m["macro_f1"] == pytest.approx((2 / 4 + 4 / 6) / 2)


def test_perfect_and_all_wrong():
    assert visualprocessbench_f1([0.9, 0.1], [1, -1])["macro_f1"] == 1.0
    assert visualprocessbench_f1([0.1, 0.9], [1, -1])["macro_f1"] == 0.0


def test_nested_and_bool_labels():
    m1 = visualprocessbench_f1([[0.9, 0.6], [0.4, 0.7, 0.2, 0.99]], [[1, 1], [1, -1, -1, 0]])
    m2 = visualprocessbench_f1(SCORES, [True, True, True, False, False, None])
    assert m1 == visualprocessbench_f1(SCORES, GOLD) == m2


def test_matches_definition_on_random_data():
    rng = np.random.default_rng(0)
    gold = rng.choice([1, 0, -1], size=500)
    scores = rng.random(500)
    m = visualprocessbench_f1(scores, gold, threshold=0.3)
    keep = gold != 0
    y, p = gold[keep] == 1, scores[keep] >= 0.3

    def f1(pos_true, pos_pred):
        prec = np.sum(pos_true & pos_pred) / np.sum(pos_pred)
        rec = np.sum(pos_true & pos_pred) / np.sum(pos_true)
        return 2 * prec * rec / (prec + rec)

    assert m["f1_correct"] == pytest.approx(f1(y, p))
    assert m["f1_incorrect"] == pytest.approx(f1(~y, ~p))


def test_input_errors():
    with pytest.raises(ValueError, match="3 step scores but 2 gold"):
        visualprocessbench_f1([0.1, 0.2, 0.3], [1, -1])
    with pytest.raises(ValueError, match="1 \\(correct\\), 0 \\(neutral\\) or -1"):
        visualprocessbench_f1([0.1], [2])
    with pytest.raises(ValueError, match="NaN"):
        visualprocessbench_f1([float("nan")], [1])


def _rows():
    return [
        {"data_source": "A", "response": {"steps": ["s1", "s2"], "process_correctness": [1, -1]}, "pred_scores": [0.9, 0.8]},
        {"data_source": "B", "response": {"steps": ["a", "b"], "process_correctness": [1, 1]}, "pred_scores": [0.2, 0.7]},
        {"data_source": "B", "response": {"steps": ["c", "d"], "process_correctness": [-1, 0]}, "prm_scores": [[0.1, 0.5]]},
    ]


def test_step_f1_per_source_hand_computed():
    res = step_f1(_rows())
    a, b = res["per_source"]["A"], res["per_source"]["B"]
    # A: gold [1, -1], pred [T, T] -> tp=1 fp=1: F1c = 2/3, F1i = 0
    assert a["confusion"] == {"tp": 1, "fp": 1, "fn": 0, "tn": 0}
    assert a["macro_f1"] == pytest.approx(1 / 3)
    # B: gold [1, 1, -1] (neutral dropped), pred [F, T, F] -> tp=1 fn=1 tn=1: F1c = F1i = 2/3
    assert b["confusion"] == {"tp": 1, "fp": 0, "fn": 1, "tn": 1}
    assert b["macro_f1"] == pytest.approx(2 / 3) and b["n_neutral"] == 1
    # pooled: tp=2 fp=1 fn=1 tn=1
    assert res["overall"]["confusion"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 1}
    assert res["overall"]["macro_f1"] == pytest.approx(7 / 12)
    assert res["macro_f1_source_mean"] == pytest.approx(0.5)
    assert res["macro_f1_source_weighted"] == pytest.approx((1 / 3 * 2 + 2 / 3 * 3) / 5)
    assert res["n_records"] == 3


def test_step_f1_with_external_scores_and_records():
    from jaxprm.data.schema import Record, Step

    rows = _rows()
    ext = [[0.9, 0.8], [0.2, 0.7], [0.1, 0.5]]
    assert step_f1(rows, scores=ext)["overall"] == step_f1(rows)["overall"]

    recs = [
        Record(id="r1", question="q", source="A", steps=[Step("x", label=1), Step("y", label=0)], meta={"pred_scores": [0.9, 0.8]}),
        Record(id="r2", question="q", source="B", steps=[Step("x", label=1), Step("y", label=None)]),
    ]
    res = step_f1(recs, scores=[[0.9, 0.8], [0.7, 0.1]])
    # schema labels: 1 correct, 0 incorrect, None neutral
    assert res["overall"]["confusion"] == {"tp": 2, "fp": 1, "fn": 0, "tn": 0}
    assert res["overall"]["n_neutral"] == 1
    with pytest.raises(ValueError, match="record 1: no step scores"):
        step_f1(recs)


def test_step_f1_errors():
    rows = _rows()
    with pytest.raises(ValueError, match="3 records but 1 score"):
        step_f1(rows, scores=[[0.1]])
    with pytest.raises(ValueError, match="record 0: 1 step scores for 2"):
        step_f1(rows[:1], scores=[[0.1]])
    with pytest.raises(ValueError, match="record 0: no 'response.process_correctness'"):
        step_f1([{"pred_scores": [0.1]}])


def test_load_visualprocessbench(tmp_path):
    rows = _rows()
    rows[0]["response"] = json.dumps(rows[0]["response"])  # string-encoded nested object
    p = tmp_path / "test.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    loaded = load_visualprocessbench(str(p))
    assert len(loaded) == 3 and loaded[0]["response"]["process_correctness"] == [1, -1]
    assert step_f1(loaded)["overall"]["macro_f1"] == pytest.approx(7 / 12)

    # the errors of the benchmark's one reader (jaxprm.data.formats.visualprocessbench): file:line, record, field
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"response": {"steps": ["a"], "process_correctness": [1, 1]}}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: record 'bad\.jsonl:1': field 'response\.process_correctness': "
                                         r"has 2 labels for 1 steps"):
        load_visualprocessbench(str(bad))
    bad.write_text(json.dumps(rows[1]) + "\n" + json.dumps({"response": {"steps": ["a"], "process_correctness": [2]}}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*field 'response\.process_correctness\[0\]': "
                                         r"must be 1, 0 or -1"):
        load_visualprocessbench(str(bad))
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: invalid JSON"):
        load_visualprocessbench(str(bad))
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*field 'response': must be an object with 'steps' and "
                                         r"'process_correctness'"):
        load_visualprocessbench(str(bad))
    # checked like the importer's records (the former copy let these through)
    bad.write_text(json.dumps({"response": {"steps": ["a", " "], "process_correctness": [1, 1]}}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*field 'response\.steps\[1\]': must be a non-empty string"):
        load_visualprocessbench(str(bad))
    bad.write_text(json.dumps({"response": '{"steps": ["a"]'}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*field 'response': not a JSON object"):
        load_visualprocessbench(str(bad))


def test_record_meta_process_correctness_and_data_source_win():
    from jaxprm.data.schema import Record, Step

    # an importer may map neutral steps to a training label; the benchmark's own labels are in meta
    rec = Record(
        id="r", question="q", source="visualprocessbench",
        steps=[Step("a", label=1), Step("b", label=1), Step("c", label=0)],
        meta={"process_correctness": [1, 0, -1], "data_source": "MathVerse"},
    )
    res = step_f1([rec], scores=[[0.9, 0.2, 0.1]])
    assert list(res["per_source"]) == ["MathVerse"]
    assert res["overall"]["n_neutral"] == 1 and res["overall"]["macro_f1"] == 1.0
