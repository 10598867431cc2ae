"""Golden tests for issue 13 defects 1, 2, 3 and 7: rows written by hand to the published
VL-PRM300K / VL-PRM rollout layouts, expected records and labels written by hand from the authors'
rules (not from the importer's output)."""
from __future__ import annotations

import pytest

from jaxprm.data.formats import read_vlprm300k, read_vlprm300k_train
from jaxprm.data.formats._common import ImportStats
from tests.data.fixtures_formats import (
    PNG,
    golden_vlprm_raw_rows,
    golden_vlprm_raw_step_header_row,
    golden_vlprm_rollout_row,
    golden_vlprm_train_rows,
    write_jsonl_rows,
    write_parquet,
)

P, R = "perception", "reasoning"


def steps_of(rec):
    return [(s.text, s.kind, s.num_mc_correct, s.num_mc_total, s.judge, s.label) for s in rec.steps]


# -- defect 1: the published train (chat) rows --------------------------------------------------------
def test_train_rows_with_leading_image_token_and_image_part(tmp_path):
    path = write_parquet(golden_vlprm_train_rows(), tmp_path / "train.parquet")
    stats = ImportStats()
    r0, r1 = read_vlprm300k_train(path, on_error="skip", stats=stats, check_images=False)
    assert (stats.rows, stats.records, stats.skipped) == (2, 2, 0)

    assert r0.question == "What colour is the ball?"
    assert r0.images == [PNG]
    # defect 4: the step text as published, headers and <step_k> tags kept (what the released PRMs saw)
    assert steps_of(r0) == [
        ("[Visual Elements]\n<step_1>\nA ball lies on the floor.\n</step_1>", P, None, None, None, 1),
        ("<step_2>\nThe ball is red.\n</step_2>", P, None, None, None, 1),
        ("[Reasoning]\n<step_1>\nSo the answer is blue.\n</step_1>", R, None, None, None, 0),
    ]
    # the {"type": "image"} part before the text
    assert r1.question == "Find x."
    assert r1.images == ["images/geo/7.png"]
    assert steps_of(r1) == [
        ("[Visual Elements]\n<step_1>\nThe triangle has angles 50 and 60.\n</step_1>", P, None, None, None, 1),
        ("[Reasoning]\n<step_1>\nx = 180 - 110 = 70.\n</step_1>", R, None, None, None, 1),
    ]
    # stripping stays an option
    p0, _ = read_vlprm300k_train(path, step_text="plain", check_images=False)
    assert [s.text for s in p0.steps] == ["A ball lies on the floor.", "The ball is red.", "So the answer is blue."]
    with pytest.raises(ValueError, match="step_text"):
        read_vlprm300k_train(path, step_text="vlprm")


# -- defect 2: rollout files have no judge ------------------------------------------------------------
def test_rollout_rows_have_no_judge(tmp_path):
    path = write_jsonl_rows([golden_vlprm_rollout_row()], tmp_path / "rollouts.jsonl")
    (r,) = read_vlprm300k(path)
    assert r.id == "roll-7" and r.answer == "3"
    assert r.question == ("You are given an image and a question. Describe the visual elements, then reason "
                          "step by step.\nQuestion: How many apples are on the table?")
    assert r.images == ["images/COCO/000123.jpg"]
    # no verdict is invented: every judge is None, so the judge rule supervises nothing; the step text
    # is the response's markup (the policy wrote it; the released PRMs were trained on it)
    assert steps_of(r) == [
        ("[Visual Elements]\n<step_1>\nThere is a wooden table.\n</step_1>", P, 16, 16, None, None),
        ("<step_2>\nThree apples lie on it.\n</step_2>", P, 10, 16, None, None),
        ("[Reasoning]\n<step_1>\nCounting gives 4.\n</step_1>", R, 0, 16, None, None),
    ]
    assert [s.text for s in next(read_vlprm300k(path, step_text="published")).steps] == [
        "There is a wooden table.", "Three apples lie on it.", "Counting gives 4."]
    assert r.meta["label_evidence"] == {"mc": True, "judge": False}
    assert r.meta["section_source"] == "response" and r.meta["num_perception_steps"] == 2

    # hybrid must not act as if a judge approved: no judge -> nothing supervised (was [1, 1, None])
    (h,) = read_vlprm300k(path, label_rule="hybrid")
    assert h.labels == [None, None, None]
    assert h.meta["label_evidence"] == {"mc": True, "judge": False}
    assert h.meta["label_rule"]["name"] == "hybrid"
    # MC alone, by name
    assert next(read_vlprm300k(path, label_rule="mc")).labels == [1, 1, 0]
    assert next(read_vlprm300k(path, label_rule="vlprm_v2")).labels == [None, None, None]


# -- defect 3: the default labels are the authors' released labels ------------------------------------
def test_default_labels_follow_first_incorrect_step(tmp_path):
    path = write_parquet(golden_vlprm_raw_rows(), tmp_path / "VL_PRM300K_V2.parquet")
    vis, rea, ok = read_vlprm300k(path)

    # defect 4: each step's text is its user turn in the released transcript (conversations), where
    # the transcript has it
    for rec, row in zip((vis, rea, ok), golden_vlprm_raw_rows()):
        turns = [t["content"][0]["text"] for t in row["conversations"] if t["role"] == "user"]
        turns[0] = turns[0].split("### Solution Process:\n", 1)[1]
        assert [s.text for s in rec.steps[:len(turns)]] == turns

    # ['Visual Elements', 2]: steps 0, 1 "+", step 2 "-", step 3 unsupervised; MC (0/16 on step 1,
    # 5/16 on the error step) does not change the released labels
    assert [s.judge for s in vis.steps] == [1, 1, 0, None]
    assert vis.labels == [1, 1, 0, None]
    assert vis.meta["first_incorrect_step"] == ["Visual Elements", 2]
    assert vis.meta["consensus_filtering_algo_label"] == "o4-mini_incorrect_and_MC_agrees_and_disagrees"
    assert vis.meta["label_rule"] == {"name": "judge", "neutral": "ignore", "after_error": "ignore"}
    assert vis.meta["label_evidence"] == {"mc": True, "judge": True}

    # ['Reasoning', 0] after one Visual Elements step -> global step 1
    assert [s.kind for s in rea.steps] == [P, R, R]
    assert rea.labels == [1, 0, None]
    assert rea.meta["first_incorrect_step"] == ["Reasoning", 0]

    # "None": the judge found no error -> all "+"
    assert ok.labels == [1, 1] and ok.meta["first_incorrect_step"] is None
    assert ok.meta["consensus_filtering_algo_label"] == "o4-mini_correct_and_MC_agrees"

    # the other rules stay available by name
    assert [r.labels for r in read_vlprm300k(path, label_rule="hybrid")] == [
        [1, None, None, None], [None, None, None], [1, 1]]  # MC 3/16 > 0 on the error step: disagreement
    assert [r.labels for r in read_vlprm300k(path, label_rule="mc")] == [[1, 0, 1, 1], [0, 1, 0], [1, 1]]


# -- defect 7: the section boundary from the step text ------------------------------------------------
def test_visual_error_boundary_from_reasoning_header_in_step_text(tmp_path):
    path = write_parquet([golden_vlprm_raw_step_header_row()], tmp_path / "VL_PRM300K_V2.parquet")
    (r,) = read_vlprm300k(path, step_text="published")
    assert steps_of(r) == [
        ("Two birds sit on a wire.", P, 4, 16, 0, 0),
        ("The sky is grey.", P, 12, 16, None, None),
        ("[Reasoning]\nTwo birds are visible.", R, 9, 16, None, None),
        ("So the answer is 2.", R, 9, 16, None, None),
    ]
    # default: the training turns' markup; the header in the text becomes the section's header
    assert [s.text for s in next(read_vlprm300k(path)).steps] == [
        "[Visual Elements]\n<step_1>\nTwo birds sit on a wire.\n</step_1>", "<step_2>\nThe sky is grey.\n</step_2>",
        "[Reasoning]\n<step_1>\nTwo birds are visible.\n</step_1>", "<step_2>\nSo the answer is 2.\n</step_2>"]
    assert [s.text for s in next(read_vlprm300k(path, step_text="plain")).steps][2] == "Two birds are visible."
    assert r.meta["num_perception_steps"] == 2 and r.meta["section_source"] == "step_text"
    # unknown_kind no longer decides the kinds: the boundary is known
    (p,) = read_vlprm300k(path, unknown_kind=P)
    assert [s.kind for s in p.steps] == [P, P, R, R]


def test_visual_error_index_beyond_step_text_boundary_is_a_bad_row(tmp_path):
    row = golden_vlprm_raw_step_header_row()
    row["first_incorrect_step"] = "['Visual Elements', 2]"
    path = write_parquet([row], tmp_path / "bad.parquet")
    stats = ImportStats()
    assert list(read_vlprm300k(path, on_error="skip", stats=stats)) == []
    assert stats.skipped == 1
    assert "record 'g-hdr': field 'first_incorrect_step': Visual Elements index 2" in stats.errors[0]
