"""``python -m jaxprm.data.audit`` (issue 13): per-rule +/-/unsupervised counts, skipped rows with
their reasons, and the pairwise disagreement of the rules, checked against counts worked out by
hand for a small jsonl file."""
import json

import pytest

from jaxprm.data import audit as audit_mod
from jaxprm.data.formats import write_jsonl
from jaxprm.data.schema import Record, Step


def _step(text, c, t, judge, label):
    return Step(text=text, kind="reasoning", num_mc_correct=c, num_mc_total=t, judge=judge, label=label)


def _write(tmp_path):
    a = Record(id="a", question="qa", source="t", steps=[
        _step("a0", 4, 4, 1, 1),   # mc 1.0
        _step("a1", 0, 4, 1, 1),   # mc 0.0
        _step("a2", 2, 4, 0, 0),   # mc 0.5, the judge's first error
    ])
    b = Record(id="b", question="qb", source="t", steps=[
        _step("b0", 3, 4, None, None),      # mc 0.75, not judged
        _step("b1", None, None, None, 0),   # no MC, not judged
    ])
    path = tmp_path / "recs.jsonl"
    write_jsonl([a, b], path)
    bad = json.loads(path.read_text().splitlines()[0])
    bad["id"], bad["question"] = "c", ""
    with open(path, "a") as f:
        f.write(json.dumps(bad) + "\n")
        f.write("{not json\n")
    return path


# Labels per step (a0 a1 a2 b0 b1), worked out by hand from the rules' definitions (threshold 0):
#   given     1  1  0  N  0      (stored)
#   mc        1  0  1  1  N      (+ iff mc > 0; "keep" after an error; no MC -> N)
#   judge     1  1  0  N  N      (before the judge's first error +, that step -, unjudged N)
#   hybrid    1  N  N  N  N      (a1, a2: MC and judge disagree -> N)
#   vlprm_v2  1  1  0  N  N      (judge finds an error -> judge labels; b unjudged -> dropped)
COUNTS = {
    "given": (2, 2, 1),
    "mc": (3, 1, 1),
    "judge": (2, 1, 2),
    "hybrid": (1, 0, 4),
    "vlprm_v2": (2, 1, 2),
}
DISAGREE = {
    ("given", "mc"): 4, ("given", "judge"): 1, ("given", "hybrid"): 3, ("given", "vlprm_v2"): 1,
    ("mc", "judge"): 3, ("mc", "hybrid"): 3, ("mc", "vlprm_v2"): 3,
    ("judge", "hybrid"): 2, ("judge", "vlprm_v2"): 0, ("hybrid", "vlprm_v2"): 2,
}


def test_audit_counts_by_hand(tmp_path):
    path = _write(tmp_path)
    res = audit_mod.audit(path, "jsonl")
    assert (res["rows"], res["records"], res["skipped"], res["steps"]) == (4, 2, 2, 5)
    assert res["empty_steps_dropped"] == 0
    for rule, (pos, neg, uns) in COUNTS.items():
        r = res["rules"][rule]
        assert (r["+"], r["-"], r["unsupervised"], r["errors"]) == (pos, neg, uns, 0), rule
    got = {(d["a"], d["b"]): d["steps"] for d in res["disagreements"]}
    for (a, b), n in DISAGREE.items():
        assert got.get((a, b), got.get((b, a))) == n, (a, b)
    assert sum(res["skip_reasons"].values()) == 2
    assert any("question" in k for k in res["skip_reasons"])
    assert res["skip_messages"][0].startswith(f"{path}:3: ")
    assert res["skip_messages"][1].startswith(f"{path}:4: ")


def test_audit_cli_prints_tables_and_writes_json(tmp_path, capsys):
    path = _write(tmp_path)
    out = tmp_path / "audit.json"
    assert audit_mod.main(["--format", "jsonl", "--records", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 rows, 2 records, 2 skipped, 5 steps" in text
    hybrid = [ln.split() for ln in text.splitlines() if ln.startswith("hybrid ")]
    assert hybrid[0][1:5] == ["1", "0", "4", "0"]  # rule table: +, -, unsupervised, rule errors
    assert hybrid[1][1:6] == ["3", "3", "2", "-", "2"]  # disagreement row: given mc judge hybrid vlprm_v2
    data = json.loads(out.read_text())
    assert data["rules"]["mc"]["+"] == 3 and data["skipped"] == 2


def test_audit_counts_empty_steps_dropped_by_visualprm400k(tmp_path):
    row = {"image": "x.png", "question": "<image>\nq", "answer": "1", "response": "s1\n\n\n\ns2",
           "steps_with_score": [{"step": "s1", "score": 0.5, "num_mc_correct": 8, "num_mc_total": 16},
                                {"step": "", "score": 0.5, "num_mc_correct": 8, "num_mc_total": 16},
                                {"step": "s2", "score": 0.0, "num_mc_correct": 0, "num_mc_total": 16}],
           "num_mc_sequences": 16}
    path = tmp_path / "raw.jsonl"
    path.write_text(json.dumps(row) + "\n")
    res = audit_mod.audit(path, "visualprm400k")
    assert (res["records"], res["steps"], res["empty_steps_dropped"], res["rows_with_empty_steps"]) == (1, 2, 1, 1)
    assert (res["rules"]["given"]["+"], res["rules"]["given"]["-"]) == (1, 1)


def test_audit_cli_bad_format_is_a_usage_error(tmp_path, capsys):
    path = _write(tmp_path)
    with pytest.raises(SystemExit) as e:
        audit_mod.main(["--format", "nope", "--records", str(path)])
    assert e.value.code == 2 and "unknown record format" in capsys.readouterr().err
