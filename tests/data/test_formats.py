"""Importers on small files written in each public format, and our own JSONL round trip."""
import json
import os
import re

import pytest

from jaxprm.data.formats import (
    FORMATS,
    ImportStats,
    get_reader,
    read_jsonl,
    read_records,
    read_visualprm400k,
    read_visualprocessbench,
    read_visualprocessbench_rows,
    read_vlprm300k,
    read_vlprm300k_train,
    write_jsonl,
)
from jaxprm.data.schema import PERCEPTION as P
from jaxprm.data.schema import REASONING as R
from jaxprm.data.schema import Record, RecordError, Step

from .fixtures_formats import (
    A_COUNTS,
    A_REA,
    A_VIS,
    B_COUNTS,
    B_REA,
    B_VIS,
    PNG,
    visualprm_rows,
    vlprm_raw_rows,
    vlprm_rollout_row,
    vlprm_train_rows,
    vpb_rows,
    write_jsonl_rows,
    write_parquet,
)


def steps_of(rec):
    return [(s.text, s.kind, s.num_mc_correct, s.num_mc_total, s.judge, s.label) for s in rec.steps]


# -- VL-PRM300K raw ------------------------------------------------------------------------------------------
@pytest.fixture
def raw_parquet(tmp_path):
    return write_parquet(vlprm_raw_rows(), tmp_path / "VL_PRM300K_V2.parquet")


def test_vlprm300k_raw_exact_records(raw_parquet):
    a, b, c = list(read_vlprm300k(raw_parquet, step_text="published"))

    # a: error at ['Reasoning', 1]; the transcript's [Reasoning] header puts 3 steps in Visual Elements
    assert a.id == "a-1" and a.source == "vlprm300k"
    assert a.question == "Which tile completes the grid?" and a.answer == "C"
    assert a.images == ["images/RAVEN/a.png"]
    assert [s.text for s in a.steps] == A_VIS + A_REA
    assert [s.kind for s in a.steps] == [P, P, P, R, R]
    assert [(s.num_mc_correct, s.num_mc_total) for s in a.steps] == A_COUNTS
    assert [s.judge for s in a.steps] == [1, 1, 1, 1, 0]
    # judge (default, the authors' labels): "+" before the first incorrect step even where MC is 0/16
    assert a.labels == [1, 1, 1, 1, 0]
    assert a.meta == {
        "first_incorrect_step": ["Reasoning", 1], "num_perception_steps": 3, "section_source": "conversations",
        "label_evidence": {"mc": True, "judge": True},
        "source_dataset": "RAVEN", "question_type": "abstract_visual_reasoning",
        "consensus_filtering_algo_label": "o4-mini_incorrect_and_MC_agrees_and_disagrees",
        "label_rule": {"name": "judge", "neutral": "ignore", "after_error": "ignore"},
    }

    # b: error at ['Visual Elements', 1]; the transcript stops inside Visual Elements
    assert [s.text for s in b.steps] == B_VIS + B_REA
    assert [(s.num_mc_correct, s.num_mc_total) for s in b.steps] == B_COUNTS
    assert [s.judge for s in b.steps] == [1, 0, None, None]
    assert [s.kind for s in b.steps] == [P, P, R, R]  # 2 known perception, rest unknown_kind
    assert b.meta["num_perception_steps"] is None and b.meta["section_source"] == "partial"
    assert b.labels == [1, 0, None, None]  # the judge's error step is "-" whatever MC says

    # c: no error found by the judge
    assert [s.kind for s in c.steps] == [P, R] and [s.judge for s in c.steps] == [1, 1]
    assert c.labels == [1, 1] and c.meta["first_incorrect_step"] is None


def test_vlprm300k_raw_label_rules(raw_parquet):
    def labels(**kw):
        return [r.labels for r in read_vlprm300k(raw_parquet, **kw)]

    assert labels(label_rule="mc") == [[1, 1, 0, 1, 0], [1, 1, 0, 1], [1, 1]]
    assert labels(label_rule="mc", label_kw={"threshold": 0.5}) == [[1, 1, 0, 0, 0], [0, 0, 0, 0], [1, 1]]
    assert labels(label_rule="judge") == [[1, 1, 1, 1, 0], [1, 0, None, None], [1, 1]]
    assert labels(label_rule="judge", label_kw={"after_error": "negative"}) == [
        [1, 1, 1, 1, 0], [1, 0, 0, 0], [1, 1]]
    assert labels(label_rule="hybrid", label_kw={"disagree": "judge"}) == [
        [1, 1, 1, 1, 0], [1, 0, None, None], [1, 1]]
    assert labels(label_rule=None) == [[None] * 5, [None] * 4, [None] * 2]


def test_vlprm300k_raw_options(raw_parquet, tmp_path):
    b = list(read_vlprm300k(raw_parquet, unknown_kind=P))[1]
    assert [s.kind for s in b.steps] == [P] * 4
    a = next(read_vlprm300k(raw_parquet, image_column="image_qwen_smart_resize", image_root=tmp_path,
                            check_images=False))
    assert a.images == [os.path.join(str(tmp_path), "images/RAVEN/a_qwen_smart_resize.png")]


def test_vlprm300k_missing_image_names_file_row_and_field(raw_parquet, tmp_path):
    for name in ("RAVEN/a.png", "DVQA/c.png"):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / name).write_bytes(PNG)
    with pytest.raises(RecordError) as e:
        list(read_vlprm300k(raw_parquet, image_root=tmp_path))
    assert str(e.value).startswith(f"{raw_parquet}:row 1: record 'b-2': field 'images[0]': image file not found: ")

    stats = ImportStats()
    recs = list(read_vlprm300k(raw_parquet, image_root=tmp_path, on_error="skip", stats=stats))
    assert [r.id for r in recs] == ["a-1", "c-3"]
    assert recs[0].images == [str(tmp_path / "images/RAVEN/a.png")]
    assert (stats.rows, stats.records, stats.skipped) == (3, 2, 1)
    assert stats.errors[0].startswith(f"{raw_parquet}:row 1: record 'b-2': field 'images[0]'")


def test_vlprm300k_rollout_jsonl_with_fractions(tmp_path):
    path = write_jsonl_rows([vlprm_rollout_row()], tmp_path / "rollouts.jsonl")
    (r,) = read_vlprm300k(path, mc_total=8, label_rule="mc", step_text="published")
    assert r.id == "u-1" and r.answer == "1"
    assert steps_of(r) == [
        ("A child stands on grass.", P, 4, 8, None, 1),
        ("He holds a frisbee.", P, 2, 8, None, 1),
        ("He looks like a toddler.", R, 0, 8, None, 0),
    ]
    assert r.meta["section_source"] == "response" and r.meta["num_perception_steps"] == 2

    with pytest.raises(RecordError, match=re.escape(
            f"{path}:1: record 'u-1': field 'steps_with_score[0].score': only a fraction is stored; pass mc_total=")):
        list(read_vlprm300k(path, mc_total=None))
    bad = write_jsonl_rows([vlprm_rollout_row(scores=(0.5, 0.3, 0.0))], tmp_path / "bad.jsonl")
    with pytest.raises(RecordError, match=re.escape(
            f"{bad}:1: record 'u-1': field 'steps_with_score[1].score': 0.3 is not a multiple of 1/16")):
        list(read_vlprm300k(bad))


@pytest.mark.parametrize(
    "edit, field, msg",
    [
        (lambda r: r.update(first_incorrect_step="['Visual Elements', 7]"), "first_incorrect_step",
         "Visual Elements index 7 but that section has 3 steps"),
        (lambda r: r.update(first_incorrect_step="['Reasoning', 5]"), "first_incorrect_step",
         "['Reasoning', 5] is step 8 but there are only 5 steps"),
        (lambda r: r.update(first_incorrect_step="['Reasoning', 0]", conversations=[]), "first_incorrect_step",
         "cannot place ['Reasoning', 0]: the number of Visual Elements steps is unknown"),
        (lambda r: r.update(first_incorrect_step="['Vision', 0]"), "first_incorrect_step",
         "section must be 'Visual Elements' or 'Reasoning'"),
        (lambda r: r["steps_with_score"][2].update(num_mc_correct=17), "steps_with_score[2].num_mc_correct",
         "17 > num_mc_total 16"),
        (lambda r: r["steps_with_score"][1].update(score=0.9), "steps_with_score[1].score",
         "0.9 disagrees with num_mc_correct/num_mc_total = 12/16"),
        (lambda r: r["steps_with_score"][3].update(step="  "), "steps_with_score[3].step",
         "must be a non-empty string"),
        (lambda r: r.update(question=""), "question", "must be a non-empty string"),
    ],
)
def test_vlprm300k_bad_rows(tmp_path, edit, field, msg):
    rows = vlprm_raw_rows()
    edit(rows[0])
    path = write_jsonl_rows([rows[2], rows[0]], tmp_path / "raw.jsonl")
    with pytest.raises(RecordError) as e:
        list(read_vlprm300k(path))
    assert str(e.value).startswith(f"{path}:2: record 'a-1': field '{field}': ")
    assert msg in str(e.value)


# -- VL-PRM300K-train ----------------------------------------------------------------------------------------------
def test_vlprm300k_train_messages(tmp_path):
    path = write_parquet(vlprm_train_rows(), tmp_path / "train.parquet")
    r0, r1 = read_vlprm300k_train(path, image_root=tmp_path / "root", check_images=False, step_text="plain")
    assert r0.id == "train.parquet:0" and r0.source == "vlprm300k_train"
    assert r0.question == "Which tile completes the grid?"
    assert r0.images == [PNG]  # embedded bytes kept, not decoded
    assert steps_of(r0) == [
        ("The grid is 3x3.", P, None, None, None, 1),
        ("Row 1 holds circles.", P, None, None, None, 1),
        ("Rows repeat a shape, so C.", R, None, None, None, 0),
    ]
    assert r0.meta == {"label_rule": {"name": "given", "from": "messages"}}
    assert r1.images == [os.path.join(str(tmp_path / "root"), "images/x.png")]
    assert steps_of(r1) == [("There are 3 cubes.", P, None, None, None, 1)]
    # a rule needs MC/judge data these rows do not have: all neutral
    assert next(read_vlprm300k_train(path, label_rule="mc")).labels == [None, None, None]


def test_vlprm300k_train_bad_turns(tmp_path):
    rows = vlprm_train_rows()
    rows[1]["messages"][-1]["content"][0]["text"] = "maybe"
    path = write_parquet(rows, tmp_path / "train.parquet")
    with pytest.raises(RecordError, match=re.escape(
            f"{path}:row 1: record 'train.parquet:1': field 'messages[2]': assistant turn must be '+' or '-'")):
        list(read_vlprm300k_train(path))
    rows = vlprm_train_rows()
    rows[0]["messages"][1]["content"][0]["text"] = "no header here"
    path = write_parquet(rows, tmp_path / "train2.parquet")
    with pytest.raises(RecordError, match=re.escape("field 'messages[1]': first user turn must read")):
        list(read_vlprm300k_train(path))


# -- VisualPRM400K ----------------------------------------------------------------------------------------------------
def test_visualprm400k_conversations_and_raw(tmp_path):
    path = write_jsonl_rows(visualprm_rows(), tmp_path / "ai2d_prm.jsonl")
    conv, raw, frac = read_visualprm400k(path, image_root="/data/vp", check_images=False)

    assert conv.id == "ai2d_prm.jsonl:1"  # the pipeline's id -1 is replaced
    assert conv.question == "What is x?" and conv.images == ["/data/vp/vp/1.png"]
    assert steps_of(conv) == [("Step one: x = 2 + 1.", R, None, None, None, 1),
                              ("Step two: so x = 4.", R, None, None, None, 0)]
    assert conv.meta == {"label_rule": {"name": "given", "from": "conversations"}}

    assert raw.id == "ai2d_prm.jsonl:2" and raw.question == "Find y." and raw.answer == "3"
    # VisualPRM's own rule: + iff score > 0; the 0/0 (never rolled out) step is "-"
    assert steps_of(raw) == [("y + 1 = 4.", R, 4, 16, None, 1), ("So y = 5.", R, 0, 16, None, 0),
                             ("Answer: 5.", R, 0, 0, None, 0)]
    assert raw.meta == {"num_mc_sequences": 16,
                        "label_rule": {"name": "mc", "threshold": 0.0, "neutral": "negative", "after_error": "keep"}}

    assert frac.id == "vp-frac" and frac.images == ["/data/vp/vp/3a.png", "/data/vp/vp/3b.png"]
    assert [(s.num_mc_correct, s.num_mc_total) for s in frac.steps] == [(3, 4), (2, 4)]  # num_mc_sequences = 4
    assert frac.labels == [1, 1]


def test_visualprm400k_explicit_rule_applies_to_every_row(tmp_path):
    path = write_jsonl_rows(visualprm_rows(), tmp_path / "vp.jsonl")
    conv, raw, frac = read_visualprm400k(path, label_rule="mc", label_kw={"threshold": 0.5})
    assert conv.labels == [None, None]  # no MC counts in conversation rows
    assert raw.labels == [0, 0, None] and frac.labels == [1, 0]


def test_visualprm400k_directory_and_bad_row(tmp_path):
    d = tmp_path / "annotations"
    d.mkdir()
    rows = visualprm_rows()
    write_jsonl_rows(rows[:1], d / "a.jsonl")
    write_jsonl_rows([rows[1], {"image": "x.png", "question": "q"}], d / "b.jsonl")
    stats = ImportStats()
    recs = list(read_visualprm400k(d, on_error="skip", stats=stats))
    assert [r.id for r in recs] == ["a.jsonl:1", "b.jsonl:1"]
    assert stats.skipped == 1 and stats.errors == [
        f"{d / 'b.jsonl'}:2: record 'b.jsonl:2': field 'conversations': row has neither 'conversations' "
        "nor 'steps_with_score'"]


# -- VisualProcessBench ---------------------------------------------------------------------------------------------
def test_visualprocessbench(tmp_path):
    path = write_jsonl_rows(vpb_rows(), tmp_path / "test.jsonl")
    r1, r2 = read_visualprocessbench(path, image_root="/bench", check_images=False)
    assert r1.id == "test.jsonl:1" and r1.source == "visualprocessbench"
    assert r1.question == "What is the area?" and r1.answer == "12" and r1.images == ["/bench/vpb/1.png"]
    assert steps_of(r1) == [("Width is 3.", R, None, None, None, 1), ("Height is 4.", R, None, None, None, 1),
                            ("Let us think.", R, None, None, None, None), ("Area is 7.", R, None, None, None, 0)]
    assert r1.meta == {"process_correctness": [1, 1, 0, -1], "policy_model": "InternVL2.5-8B",
                       "data_source": "MathVerse", "label_rule": {"name": "human", "neutral": "ignore"}}
    assert r2.labels == [1, 0] and r2.meta["data_source"] == "MMMU"  # response stored as a JSON string
    assert next(read_visualprocessbench(path, neutral="positive")).labels == [1, 1, 1, 0]
    assert next(read_visualprocessbench(path, neutral="negative")).labels == [1, 1, 0, 0]


def test_visualprocessbench_bad_rows(tmp_path):
    good, _ = vpb_rows()
    mismatch = json.loads(json.dumps(good))
    mismatch["response"]["process_correctness"] = [1, 1]
    badval = json.loads(json.dumps(good))
    badval["response"]["process_correctness"] = [1, 2, 0, -1]
    path = write_jsonl_rows([good, mismatch, '{"image": [', badval], tmp_path / "vpb.jsonl")

    with pytest.raises(RecordError) as e:
        list(read_visualprocessbench(path))
    assert str(e.value) == (f"{path}:2: record 'vpb.jsonl:2': field 'response.process_correctness': "
                            "has 2 labels for 4 steps")

    stats = ImportStats()
    recs = list(read_visualprocessbench(path, on_error="skip", stats=stats))
    assert len(recs) == 1 and (stats.rows, stats.records, stats.skipped) == (4, 1, 3)
    assert stats.errors[1].startswith(f"{path}:3: invalid JSON: ")
    assert stats.errors[2] == (f"{path}:4: record 'vpb.jsonl:4': field 'response.process_correctness[1]': "
                               "must be 1, 0 or -1, got 2")


# -- our JSONL and the dispatcher -------------------------------------------------------------------------------------
def _records(tmp_path):
    recs = list(read_visualprocessbench(write_jsonl_rows(vpb_rows(), tmp_path / "vpb.jsonl")))
    recs.append(Record(id="abc", question="q?", images=[PNG, "img/1.png"], answer="4", source="synthetic",
                       steps=[Step("look", kind=P, num_mc_correct=3, num_mc_total=8, judge=1, label=1),
                              Step("think", judge=0, label=0)],
                       meta={"note": [1, 2]}))
    return recs


def test_jsonl_round_trip(tmp_path):
    recs = _records(tmp_path)
    out = tmp_path / "out" / "records.jsonl"
    assert write_jsonl(iter(recs), out) == 3
    assert list(read_records(out)) == recs
    assert list(read_records(out, format="jsonl")) == recs
    assert sorted(os.listdir(out.parent)) == ["records.jsonl"]  # no temp file left behind
    relabeled = list(read_jsonl(out, label_rule="judge"))
    assert relabeled[-1].labels == [1, 0] and relabeled[-1].meta["label_rule"]["name"] == "judge"


def test_write_jsonl_is_atomic(tmp_path):
    out = tmp_path / "records.jsonl"
    out.write_text("old\n")
    recs = _records(tmp_path)
    recs[1].steps[0].kind = "vision"
    with pytest.raises(RecordError, match=re.escape(f"{out}: item 1: record 'vpb.jsonl:2': field 'steps[0].kind'")):
        write_jsonl(recs, out)
    assert out.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["records.jsonl", "vpb.jsonl"]


def test_jsonl_error_names_file_line_record_field(tmp_path):
    good = _records(tmp_path)[-1].to_dict()
    bad = json.loads(json.dumps(good))
    bad["steps"][1]["kind"] = "vision"
    path = write_jsonl_rows([good, bad], tmp_path / "data.jsonl")
    with pytest.raises(RecordError) as e:
        list(read_jsonl(path))
    assert str(e.value) == (f"{path}:2: record 'abc': field 'steps[1].kind': "
                            "must be one of ('perception', 'reasoning'), got 'vision'")


def test_dispatcher(tmp_path, raw_parquet):
    assert set(FORMATS) == {"jsonl", "vlprm300k", "vlprm300k_train", "visualprm400k", "visualprocessbench"}
    assert list(read_records(raw_parquet, format="VL-PRM300K")) == list(read_vlprm300k(raw_parquet))
    assert get_reader("VL-PRM300K-train") is read_vlprm300k_train
    path = write_jsonl_rows(vpb_rows(), tmp_path / "test.jsonl")
    assert list(read_records(path, format="visualprocessbench", neutral="positive"))[0].labels == [1, 1, 1, 0]
    with pytest.raises(ValueError, match=r"unknown record format 'prm800k'; known formats: \['jsonl', "):
        read_records(path, format="prm800k")
    # argument and path errors surface at the call, not on first iteration
    with pytest.raises(ValueError, match="on_error must be one of"):
        read_records(path, format="visualprocessbench", on_error="ignore")
    with pytest.raises(ValueError, match="unknown label rule"):
        read_records(raw_parquet, format="vlprm300k", label_rule="vote")
    arr = tmp_path / "test.json"  # a JSON array: rows are 0-based
    arr.write_text(json.dumps(vpb_rows()))
    assert [r.id for r in read_records(arr, format="visualprocessbench")] == ["test.json:0", "test.json:1"]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")


def test_vlprm300k_response_sections_are_read_by_the_solution_reader(tmp_path):
    # the sections of "response" are counted by jaxprm.data.solution (headers in any case); the importer's
    # own regex missed "[reasoning]" and left the steps' kinds unknown
    row = vlprm_rollout_row()
    row["response"] = row["response"].replace("[Reasoning]", "[reasoning]")
    (r,) = read_vlprm300k(write_jsonl_rows([row], tmp_path / "r.jsonl"), mc_total=8, label_rule="mc")
    assert r.meta["section_source"] == "response" and r.meta["num_perception_steps"] == 2
    assert [s.kind for s in r.steps] == [P, P, R]


def test_visualprocessbench_rows_and_records_agree(tmp_path):
    path = write_jsonl_rows(vpb_rows(), tmp_path / "test.jsonl")
    rows = read_visualprocessbench_rows(path)
    assert [row["response"]["process_correctness"] for row in rows] == [
        r.meta["process_correctness"] for r in read_visualprocessbench(path)]
    assert rows[1]["response"]["steps"] == ["The ball is red.", "So no."]  # decoded from its JSON string
