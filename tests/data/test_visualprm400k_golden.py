"""Issue 13, defect 6: a VisualPRM400K raw row whose response holds ``"\\n\\n\\n\\n"`` splits into an
empty step; the importer drops that step (with its score), counts it, and keeps the others aligned
with their own MC values. The row is written by hand in the published ``VisualPRM400K-Raw`` layout;
the expected record is written by hand from VisualPRM's rule (``+`` iff ``score > 0``)."""
import json

from jaxprm.data.formats import ImportStats, read_records, read_visualprm400k
from jaxprm.data.schema import REASONING

RESPONSE = ("The image shows 3 red apples.\n\nEach apple costs $2.\n\n\n\n"
            "So the total is 3 * 2 = 6.\n\nFinal answer: 7")

ROW = {
    "image": "ai2d/images/42.png",
    "question": "<image>\nHow much do the apples cost in total?",
    "answer": "6",
    "response": RESPONSE,
    # RESPONSE.split("\n\n"), scored step by step as the pipeline writes it
    "steps_with_score": [
        {"step": "The image shows 3 red apples.", "score": 0.75, "num_mc_correct": 12, "num_mc_total": 16},
        {"step": "Each apple costs $2.", "score": 0.5, "num_mc_correct": 8, "num_mc_total": 16},
        {"step": "", "score": 0.5, "num_mc_correct": 8, "num_mc_total": 16},
        {"step": "So the total is 3 * 2 = 6.", "score": 0.25, "num_mc_correct": 4, "num_mc_total": 16},
        {"step": "Final answer: 7", "score": 0.0, "num_mc_correct": 0, "num_mc_total": 16},
    ],
    "num_mc_sequences": 16,
}


def _write(tmp_path, rows):
    path = tmp_path / "ai2d_raw.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_matches_published_layout():
    assert RESPONSE.split("\n\n") == [e["step"] for e in ROW["steps_with_score"]]


def test_empty_step_is_dropped_and_counted(tmp_path):
    path = _write(tmp_path, [ROW])
    stats = ImportStats()
    recs = list(read_visualprm400k(path, on_error="skip", stats=stats))
    assert (stats.rows, stats.records, stats.skipped) == (1, 1, 0), stats.errors
    (rec,) = recs
    assert rec.id == f"{path.name}:1"
    assert rec.question == "How much do the apples cost in total?"
    assert rec.answer == "6"
    assert [s.text for s in rec.steps] == ["The image shows 3 red apples.", "Each apple costs $2.",
                                           "So the total is 3 * 2 = 6.", "Final answer: 7"]
    assert [(s.num_mc_correct, s.num_mc_total) for s in rec.steps] == [(12, 16), (8, 16), (4, 16), (0, 16)]
    assert [s.label for s in rec.steps] == [1, 1, 1, 0]
    assert all(s.kind == REASONING for s in rec.steps)
    assert rec.meta["empty_steps_dropped"] == [2]
    assert rec.meta["num_mc_sequences"] == 16


def test_empty_step_with_other_rules_and_whitespace_only(tmp_path):
    row = json.loads(json.dumps(ROW))
    row["steps_with_score"][2]["step"] = " \n "
    path = _write(tmp_path, [row])
    (rec,) = read_records(path, format="visualprm400k", label_rule="mc", label_kw={"after_error": "negative"})
    assert [s.label for s in rec.steps] == [1, 1, 1, 0]
    assert rec.meta["empty_steps_dropped"] == [2]


def test_row_without_empty_steps_has_no_count(tmp_path):
    row = json.loads(json.dumps(ROW))
    del row["steps_with_score"][2]
    (rec,) = read_visualprm400k(_write(tmp_path, [row]))
    assert "empty_steps_dropped" not in rec.meta and len(rec.steps) == 4


def test_all_steps_empty_is_a_counted_skip(tmp_path):
    row = json.loads(json.dumps(ROW))
    row["steps_with_score"] = [{"step": "", "score": 0.5, "num_mc_correct": 8, "num_mc_total": 16}]
    path = _write(tmp_path, [row, ROW])
    stats = ImportStats()
    recs = list(read_visualprm400k(path, on_error="skip", stats=stats))
    assert len(recs) == 1 and stats.skipped == 1
    assert stats.errors[0].startswith(f"{path}:1: ") and "all 1 steps are empty" in stats.errors[0]
