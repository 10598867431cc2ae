"""The embedded synthetic task: puzzles, solutions, error injection, records, tokenizer, tiny config, CLI."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxprm.data import solution
from jaxprm.data import synthetic as S
from jaxprm.data.schema import NEGATIVE, PERCEPTION, POSITIVE, REASONING, Record, Step


# -- an independent answer key, computed from the scene alone --------------------------------------
def _matches(shape, target):
    return (target["color"] in (None, shape.color)) and (target["kind"] in (None, shape.kind))


def _n(puzzle, target):
    return sum(_matches(s, target) for s in puzzle.shapes)


def _group_answer(target):
    return target["color"] if target["kind"] is None else target["kind"] + "s"


def answer_key(p: S.Puzzle) -> str:
    prm = p.params
    if p.question_type == "count":
        return str(_n(p, prm["target"]))
    if p.question_type == "sum":
        return str(_n(p, prm["a"]) + _n(p, prm["b"]))
    if p.question_type == "difference":
        return str(_n(p, prm["a"]) - _n(p, prm["b"]))
    if p.question_type == "compare":
        na, nb = _n(p, prm["a"]), _n(p, prm["b"])
        assert na != nb
        return _group_answer(prm["a"] if na > nb else prm["b"])
    if p.question_type == "score":
        return str(sum(prm["weights"][s.kind] for s in p.shapes))
    if p.question_type == "extreme":
        key = {
            "leftmost": lambda s: s.col,
            "rightmost": lambda s: -s.col,
            "topmost": lambda s: s.row,
            "bottommost": lambda s: -s.row,
        }[prm["direction"]]
        cand = [s for s in p.shapes if _matches(s, prm["target"])]
        best = min(key(s) for s in cand)
        (winner,) = [s for s in cand if key(s) == best]
        return getattr(winner, prm["ask"])
    raise AssertionError(p.question_type)


def _puzzles(qtype, n, seed=0, image_size=S.DEFAULT_IMAGE_SIZE):
    rng = np.random.default_rng(seed)
    return [S.generate_puzzle(rng, image_size=image_size, question_type=qtype) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return S.build_synthetic_tokenizer()


# -- puzzles and correct solutions ------------------------------------------------------------------
def test_generate_puzzle_is_deterministic():
    a = S.generate_puzzle(np.random.default_rng(7))
    b = S.generate_puzzle(np.random.default_rng(7))
    c = S.generate_puzzle(np.random.default_rng(8))
    assert a == b and S.encode_png(a.image) == S.encode_png(b.image)
    assert (a.shapes, a.question) != (c.shapes, c.question)


@pytest.mark.parametrize("qtype", S.QUESTION_TYPES)
def test_correct_solutions_box_the_right_answer(qtype):
    for p in _puzzles(qtype, 25, seed=S.QUESTION_TYPES.index(qtype)):
        steps = S.solve(p)
        assert p.answer == answer_key(p)
        assert 2 <= len(steps) <= 8
        kinds = [s.kind for s in steps]
        n_perc = kinds.count(PERCEPTION)
        assert n_perc >= 1 and kinds == [PERCEPTION] * n_perc + [REASONING] * (len(steps) - n_perc)
        assert all(s.label == POSITIVE for s in steps)
        assert steps[-1].text.endswith(f"The answer is \\boxed{{{p.answer}}}.")
        assert S.extract_boxed(steps[-1].text) == p.answer
        assert all(S.extract_boxed(s.text) is None for s in steps[:-1])


def test_small_image_size_and_grid():
    for p in _puzzles(None, 10, image_size=(56, 84)):
        assert p.grid == (2, 3) and p.image.size == (84, 56)
        assert S.extract_boxed(S.solve(p)[-1].text) == answer_key(p)
    with pytest.raises(ValueError, match="multiples of 28"):
        S.generate_puzzle(np.random.default_rng(0), image_size=(100, 100))


# -- error injection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", S.ERROR_KINDS)
@pytest.mark.parametrize("qtype", S.QUESTION_TYPES)
def test_corrupt_injects_a_propagated_error_of_the_requested_kind(qtype, kind):
    rng = np.random.default_rng(123)
    done = 0
    for p in _puzzles(qtype, 12, seed=5):
        clean = S.solve(p)
        try:
            bad, info = S.inject_error(p, clean, rng, kind=kind)
        except S.InjectionError:
            continue
        done += 1
        labels = [s.label for s in bad]
        j = labels.index(NEGATIVE)
        assert info["step"] == j and info["kind"] == kind
        assert labels == [POSITIVE] * j + [NEGATIVE] * (len(bad) - j)  # documented convention
        assert bad[j].kind == kind  # perception errors in perception steps, reasoning in reasoning
        assert [s.kind for s in bad] == [s.kind for s in clean]
        assert [s.text for s in bad[:j]] == [s.text for s in clean[:j]]
        assert bad[j].text != clean[j].text
        wrong = S.extract_boxed(bad[-1].text)
        assert wrong is not None and wrong != p.answer and wrong == info["predicted_answer"]
        if kind == PERCEPTION:
            assert info["type"] in S.PERCEPTION_ERROR_TYPES
        else:
            assert info["type"] in S.REASONING_ERROR_TYPES
            # a slip changes no observation: every perception step stays as it was
            assert all(b.text == c.text for b, c in zip(bad, clean) if c.kind == PERCEPTION)
        # corrupt() is the steps-only view of inject_error() with the same rng state
        again = S.corrupt(p, clean, np.random.default_rng(0), kind=kind)
        assert [s.label for s in again].count(NEGATIVE) >= 1
    assert done >= 8


def test_corrupt_at_a_chosen_step():
    p = _puzzles("score", 1, seed=2)[0]
    clean = S.solve(p)
    rng = np.random.default_rng(0)
    for j, s in enumerate(clean):
        if s.kind == REASONING and j < len(clean) - 1:
            bad = S.corrupt(p, clean, rng, kind=REASONING, step=j)
            assert [x.label for x in bad].index(NEGATIVE) == j
    with pytest.raises(ValueError, match="not a reasoning step"):
        S.corrupt(p, clean, rng, kind=REASONING, step=0)
    with pytest.raises(ValueError, match="correct solution"):
        S.corrupt(p, clean[::-1], rng, kind=REASONING)
    with pytest.raises(ValueError, match="kind must be"):
        S.corrupt(p, clean, rng, kind="vision")


# -- records ---------------------------------------------------------------------------------------------
def test_records_are_deterministic_and_validate():
    a = S.generate_records(18, seed=3)
    b = S.generate_records(18, seed=3)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]  # image bytes included
    c = S.generate_records(18, seed=4)
    assert [r.images for r in a] != [r.images for r in c]
    assert len({r.id for r in a}) == 18
    for r in a:
        r.validate()
        assert r.source == "synthetic" and len(r.images) == 1 and isinstance(r.images[0], bytes)
        back = Record.from_dict(json.loads(json.dumps(r.to_dict())))
        assert back.to_dict() == r.to_dict()
        im = Image.open(io.BytesIO(r.images[0]))
        assert im.format == "PNG" and im.size == (112, 112) and im.mode == "RGB"


def test_records_image_size():
    for r in S.generate_records(4, seed=0, image_size=(56, 84)):
        assert Image.open(io.BytesIO(r.images[0])).size == (84, 56)


def test_label_balance_and_meta():
    n = 300
    recs = S.generate_records(n, seed=0, error_rate=0.3, perception_error_share=0.5)
    wrong = [r for r in recs if r.meta["first_error_step"] is not None]
    assert len(wrong) == 90
    assert sum(r.meta["error_kind"] == PERCEPTION for r in wrong) == 45
    types = [r.meta["question_type"] for r in recs]
    assert all(types.count(q) == n // len(S.QUESTION_TYPES) for q in S.QUESTION_TYPES)
    for r in recs:
        first = r.meta["first_error_step"]
        if first is None:
            assert all(l == POSITIVE for l in r.labels) and r.meta["error_kind"] is None
            assert r.meta["answer_correct"] and r.meta["predicted_answer"] == r.answer
        else:
            assert r.labels == [POSITIVE] * first + [NEGATIVE] * (len(r.steps) - first)
            assert r.steps[first].kind == r.meta["error_kind"]
            assert not r.meta["answer_correct"] and r.meta["predicted_answer"] != r.answer
            assert r.meta["error_type"] and r.meta["error_detail"]
    # every error type of each kind shows up somewhere
    seen = {r.meta["error_type"] for r in wrong}
    assert {"omission", "hallucination", "wrong_color", "wrong_kind", "arithmetic"} <= seen


def test_make_record_from_a_solution():
    p = _puzzles("count", 1)[0]
    rec = S.make_record(p, S.solve(p), 5)
    assert rec.id == "synthetic-0000005" and rec.answer == p.answer
    assert rec.meta["question_type"] == "count" and rec.meta["first_error_step"] is None


def test_extract_boxed_and_format_solution():
    assert S.extract_boxed("x \\boxed{1} then \\boxed{ 12 }.") == "12"
    assert S.extract_boxed("no answer") is None
    steps = [Step("I see a red circle.", PERCEPTION), Step("So 1. The answer is \\boxed{1}.", REASONING)]
    text = S.format_solution(steps)
    assert text.index("[Visual Elements]") < text.index("red circle") < text.index("[Reasoning]")


def test_synthetic_extract_boxed_is_the_nested_brace_aware_one():
    # jaxprm.data.synthetic had its own regex (no nested braces): None for a \frac answer, and the
    # last *flat* box ("1") when one came before it
    assert S.extract_boxed is solution.extract_boxed
    assert S.extract_boxed(r"So \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert S.extract_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"


# -- tokenizer and tiny config -------------------------------------------------------------------------
def test_tokenizer(tokenizer):
    assert S.build_synthetic_tokenizer() is tokenizer  # cached
    for s in ("+", "-"):
        assert len(tokenizer.encode(s, add_special_tokens=False)) == 1
    assert tokenizer.convert_tokens_to_ids("+") != tokenizer.convert_tokens_to_ids("-")
    p = _puzzles("score", 1)[0]
    for text in [p.question, "### Question:\n", "### Solution Process:\n"] + [s.text for s in S.solve(p)]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # the task's own text compresses well (the BPE learned its words)
    step = S.solve(p)[-1].text
    assert len(tokenizer.encode(step, add_special_tokens=False)) < len(step) / 2
    assert S.tokenizer_corpus(0, 5) == S.tokenizer_corpus(0, 5)


def test_tiny_model_config(tokenizer):
    from jaxprm.data.tokenizer import special_token_ids
    from jaxprm.models.qwen2_5_vl.config import Qwen25VLConfig

    cfg = S.tiny_model_config(tokenizer)
    assert isinstance(cfg, Qwen25VLConfig)
    ids = special_token_ids(tokenizer)
    assert cfg.image_token_id == ids["<|image_pad|>"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]
    assert cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert cfg.text.vocab_size % 64 == 0 and cfg.text.vocab_size >= len(tokenizer)
    assert sum(cfg.text.mrope_section) * 2 == cfg.text.head_dim == 16
    assert cfg.vision.out_hidden_size == cfg.text.hidden_size
    assert cfg.vision.patch_size * cfg.vision.spatial_merge_size == S.PIXELS_PER_TOKEN


# -- CLI -------------------------------------------------------------------------------------------------------
def test_cli_writes_readable_jsonl(tmp_path, capsys):
    out = tmp_path / "sub" / "records.jsonl"
    prev = tmp_path / "preview"
    rc = S.main(["--out", str(out), "--n", "12", "--seed", "1", "--preview", str(prev), "--preview-n", "3"])
    assert rc == 0
    lines = out.read_text().splitlines()
    recs = [Record.from_dict(json.loads(line), where=f"records.jsonl:{i + 1}") for i, line in enumerate(lines)]
    assert len(recs) == 12
    assert [r.to_dict() for r in recs] == [r.to_dict() for r in S.generate_records(12, seed=1)]
    assert os.listdir(out.parent) == ["records.jsonl"]  # no temp file left behind
    assert len(list(prev.glob("*.png"))) == 3 and len(list(prev.glob("*.txt"))) == 3
    assert "wrote 12 records" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        S.main(["--out", str(tmp_path / "r.jsonl"), "--image-size", "100x100"])
    with pytest.raises(SystemExit):
        S.main(["--out", str(tmp_path / "r.jsonl"), "--question-types", "count,nope"])
    assert not (tmp_path / "r.jsonl").exists()


def test_puzzle_from_record_one_helper_for_records_and_questions():
    """search's ``puzzle_from_record`` and synth's ``puzzle_from_meta`` differed: the first kept JSON
    numbers as they came (a float grid) and an answer as it was (None, an int); the second made
    ``str(None)`` = "None" the answer. One helper now: ints for the grid, the answer as text, "" for none."""
    import dataclasses

    from jaxprm.search.policy import puzzle_from_record as from_search
    from jaxprm.synth.puzzle import puzzle_from_question
    from jaxprm.synth.questions import synthetic_questions

    (rec,) = S.generate_records(1, seed=4, error_rate=0.0)
    p = S.puzzle_from_record(rec)
    assert from_search is S.puzzle_from_record
    assert S.solve(p) == [dataclasses.replace(s, label=POSITIVE) for s in rec.steps] and p.answer == rec.answer
    meta = json.loads(json.dumps(rec.meta))
    meta["grid"] = [float(x) for x in meta["grid"]]
    odd = dataclasses.replace(rec, meta=meta, answer=None)
    q = S.puzzle_from_record(odd)
    assert q.grid == p.grid and all(isinstance(x, int) for x in q.grid) and q.answer == ""
    assert S.puzzle_from_meta(rec.meta, rec.question, 3).answer == "3"
    (question,) = synthetic_questions(1, seed=2)
    assert puzzle_from_question(question) == S.puzzle_from_record(question)
    with pytest.raises(ValueError, match=r"record 'x' is not a synthetic puzzle record \(meta lacks 'scene'\)"):
        S.puzzle_from_record(dataclasses.replace(rec, id="x", meta={}))
