"""python -m jaxprm.reproduce (issue 16): the smoke run end to end, its report's structure and
bounds, resuming from cached stages; the ablation labels and the claim verdicts on hand-made input."""
import json
import math
import os

import pytest

from jaxprm.data.schema import Record, Step
from jaxprm.reproduce import pipeline as P
from jaxprm.reproduce import report as R


def _rec(kinds, by_rule):
    steps = [Step(text=f"step {i}", kind=k) for i, k in enumerate(kinds)]
    return Record(id="r", question="q", steps=steps, meta={"labels_by_rule": by_rule})


def test_run_labels_rules_and_ablations():
    rec = _rec(["perception", "perception", "reasoning", "reasoning"],
               {"mc": [1, 0, 1, 1], "judge": [1, 1, 0, None], "hybrid": [1, None, 0, None], "vlprm_v2": [1, 1, 0, None]})
    assert P.run_labels(rec, "mc") == [1, 0, 1, 1]
    assert P.run_labels(rec, "hybrid") == [1, None, 0, None]
    # perception steps unsupervised; reasoning labels untouched
    assert P.run_labels(rec, "hybrid_no_perception") == [None, None, 0, None]
    # every step from the first "-" on is "-"
    assert P.run_labels(rec, "hybrid_all_steps") == [1, None, 0, 0]
    ok = _rec(["perception", "reasoning"], {"hybrid": [1, 1]})
    assert P.run_labels(ok, "hybrid_all_steps") == [1, 1]
    with pytest.raises(ValueError, match="unknown run"):
        P.run_labels(rec, "oracle")


def test_worst_curve_is_all_correct_probability():
    # 4 candidates, 2 correct: worst pick of a random 1-subset is right half the time, of a 2-subset
    # only when both are the correct ones (1 of 6 subsets), never with 3
    assert P.worst_curve([[True, True, False, False]], [1, 2, 3]) == [0.5, 1 / 6, 0.0]


def test_verdicts():
    assert R.verdict([0.10, 0.12, 0.11])["verdict"] == "held"
    assert R.verdict([-0.10, -0.12, -0.11])["verdict"] == "contradicted"
    assert R.verdict([0.2, -0.2, 0.01])["verdict"] == "inconclusive"
    assert R.verdict([0.1])["verdict"].startswith("held (1 seed")
    s = R.mean_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and math.isclose(s["ci"], 4.303 * 1.0 / math.sqrt(3))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from jaxprm.reproduce.__main__ import main

    out = str(tmp_path_factory.mktemp("repro") / "out")
    assert main(["--config", "configs/reproduce_tiny.py:smoke", "--out", out]) == 0
    return out


@pytest.mark.slow
def test_smoke_run_report(smoke):
    for f in ("report.md", "results.json", "f1_by_rule.png", "accuracy_vs_n.png", "config.json"):
        assert os.path.getsize(os.path.join(smoke, f)) > 0, f
    res = json.load(open(os.path.join(smoke, "results.json")))
    assert res["runs"] == ["mc", "hybrid", "hybrid_no_perception"] and res["seeds"] == [0]
    for run in res["runs"]:
        for kind in ("all", "perception", "reasoning"):
            assert 0.0 <= res["f1"][run][kind]["mean"] <= 1.0
    assert [c["claim"] for c in res["claims"]][:2] == [
        "hybrid labels train a better PRM than mc-only labels", "supervising perception steps helps on perception errors"]
    assert all(c["verdict"] for c in res["claims"])
    # the oracle bounds every method from above and the worst pick from below, at every N
    s = res["search"]
    curves = s["curves"]
    for name, acc in curves.items():
        for i, a in enumerate(acc):
            tol = 0.05 if name == "majority" else 1e-9  # majority vote is estimated from sampled subsets
            assert curves["worst"][i] - tol <= a <= curves["pass@n"][i] + tol, (name, i)
    assert curves["worst"][0] == pytest.approx(curves["pass@n"][0])  # N=1: every method picks the one sample
    assert s["guided"]["mean"] >= 0 and s["best_method"]
    md = open(os.path.join(smoke, "report.md")).read()
    assert "## Claims" in md and "| mc |" in md and "## Test-time scaling" in md


@pytest.mark.slow
def test_rerun_continues_from_the_last_finished_stage(smoke, capsys):
    from jaxprm.reproduce.__main__ import main

    stages = os.path.join(smoke, "stages")
    trained = {f: os.path.getmtime(os.path.join(stages, f)) for f in os.listdir(stages) if f.startswith(("train-", "synth"))}
    for f in os.listdir(stages):
        if f.startswith(("eval-hybrid-", "search-")):
            os.remove(os.path.join(stages, f))  # as if killed after training, during evaluation
    capsys.readouterr()
    assert main(["--config", "configs/reproduce_tiny.py:smoke", "--out", smoke]) == 0
    log = capsys.readouterr().out
    assert "1/4 synthesis and labels: done before" in log and log.count("2/4 train") == 3
    assert "step F1 of hybrid seed 0 (2/3) ..." in log and "step F1 of mc seed 0 (1/3): done before" in log
    assert {f: os.path.getmtime(os.path.join(stages, f)) for f in trained} == trained
    assert os.path.exists(os.path.join(stages, "search-hybrid-s0.json"))
    # another config in the same folder is refused
    assert main(["--config", "configs/reproduce_tiny.py", "--out", smoke]) == 2
