"""Benchmark question files (``jaxprm.data.formats.benchmarks``)."""
import json

import pytest

from jaxprm.data.answers import extract_answer, is_correct
from jaxprm.data.formats.benchmarks import BenchmarkFormatError, load_benchmark_jsonl


def _write(tmp_path, name, rows, raw_lines=()):
    p = tmp_path / name
    with open(p, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(p)


def test_load_mmmu(tmp_path):
    rows = [
        {
            "id": "validation_Accounting_1",
            "question": "<image 1> What is the total?",
            "options": "['$6', '$7', '$8', '$9']",
            "answer": "B",
            "image_1": "images/a.png",
            "image_2": None,
            "question_type": "multiple-choice",
            "subfield": "Financial Accounting",
        },
        {"id": "validation_Math_2", "question": "Solve", "options": "[]", "answer": "['24/7', '3.429']", "question_type": "open", "image_1": {"bytes": None, "path": "/abs/b.png"}},
        {"index": 7, "question": "VLMEvalKit TSV style", "A": "cat", "B": "dog", "answer": "B", "image_path": "c.jpg"},
    ]
    out = load_benchmark_jsonl(_write(tmp_path, "mmmu.jsonl", rows), format="mmmu", allow_outside_root=True)  # "/abs/b.png" lies outside the root
    assert out[0]["id"] == "validation_Accounting_1"
    assert out[0]["choices"] == ["$6", "$7", "$8", "$9"]
    assert out[0]["answer"] == "B" and out[0]["answer_letter"] == "B"
    assert out[0]["images"] == [str(tmp_path / "images" / "a.png")]
    assert out[0]["image"] == out[0]["images"][0]
    assert out[0]["meta"]["subfield"] == "Financial Accounting"
    assert out[1]["choices"] is None and out[1]["answer"] == ["24/7", "3.429"]
    assert out[1]["images"] == ["/abs/b.png"]
    assert out[2]["id"] == "7" and out[2]["choices"] == ["cat", "dog"] and out[2]["answer_letter"] == "B"
    assert is_correct(extract_answer(r"\boxed{$7}", choices=out[0]["choices"]), out[0]["answer"], out[0]["choices"])


def test_load_mathvista(tmp_path):
    rows = [
        {"pid": "1", "question": "Which is bigger?", "image": "images/1.jpg", "choices": ["3", "5"], "answer": "5",
         "question_type": "multi_choice", "answer_type": "text", "precision": None, "unit": None},
        {"pid": "2", "question": "Length?", "image": "images/2.jpg", "choices": None, "answer": "1.45",
         "question_type": "free_form", "answer_type": "float", "precision": 2.0},
    ]
    out = load_benchmark_jsonl(_write(tmp_path, "testmini.jsonl", rows), format="mathvista", image_root="/data/mv")
    assert out[0]["id"] == "1" and out[0]["choices"] == ["3", "5"] and out[0]["answer_letter"] == "B"
    assert out[0]["images"] == ["/data/mv/images/1.jpg"]
    assert out[1]["choices"] is None and out[1]["meta"]["precision"] == 2.0 and out[1]["answer_letter"] is None
    assert is_correct("B", out[0]["answer"], out[0]["choices"])
    assert is_correct("1.449", out[1]["answer"])


def test_load_mathvision(tmp_path):
    rows = [
        {"id": "1", "question": "Which figure?", "options": ["A", "B", "C", "D", "E"], "image": "images/1.jpg", "answer": "C", "level": 2, "subject": "metric geometry - area"},
        {"id": "2", "question": "How many?", "options": [], "image": "images/2.jpg", "answer": "4", "level": 1, "subject": "counting"},
    ]
    out = load_benchmark_jsonl(_write(tmp_path, "mathvision.jsonl", rows), format="mathvision")
    assert out[0]["choices"] == ["A", "B", "C", "D", "E"] and out[0]["answer_letter"] == "C"
    assert out[1]["choices"] is None and out[1]["answer"] == "4"
    assert out[1]["meta"] == {"level": 1, "subject": "counting"}


@pytest.mark.parametrize("fmt", ["puzzlevqa", "algopuzzlevqa"])
def test_load_puzzles(tmp_path, fmt):
    rows = [
        {"question": "What is the size of the missing circle?", "image": "images/circle/0.png", "options": ["small", "medium", "large"], "answer": "medium", "caption": "c", "explanation": "e", "deduction": "d"},
        {"question": "How many moves?", "image": "images/moves/1.png", "options": [3, 4, 5, 6], "answer": 5},
    ]
    out = load_benchmark_jsonl(_write(tmp_path, "circle_size_number.json", rows), format=fmt)
    assert [r["id"] for r in out] == ["circle_size_number-1", "circle_size_number-2"]
    assert out[0]["answer_letter"] == "B" and out[0]["meta"]["deduction"] == "d"
    assert out[1]["choices"] == ["3", "4", "5", "6"] and out[1]["answer"] == "5" and out[1]["answer_letter"] == "C"
    assert is_correct(extract_answer("... so the answer is (C)", choices=out[1]["choices"]), out[1]["answer"], out[1]["choices"])


def test_load_generic_and_blank_lines(tmp_path):
    rows = [{"uid": "q1", "prompt": "2+2?", "gold": 4, "images": ["x.png", "y.png"]}, {"question": "colour?", "answer": "red", "options": ["red", "blue"]}]
    path = _write(tmp_path, "g.jsonl", rows, raw_lines=["", "   "])
    out = load_benchmark_jsonl(path)
    assert len(out) == 2
    assert out[0]["id"] == "q1" and out[0]["question"] == "2+2?" and out[0]["answer"] == "4"
    assert len(out[0]["images"]) == 2 and out[0]["source"] == "generic"
    assert out[1]["id"] == "g-2" and out[1]["answer_letter"] == "A" and out[1]["image"] is None


def test_loader_errors_name_file_and_line(tmp_path):
    good = {"question": "q", "answer": "a"}
    path = _write(tmp_path, "bad.jsonl", [good], raw_lines=["{not json"])
    with pytest.raises(BenchmarkFormatError, match=r"bad\.jsonl:2: invalid JSON"):
        load_benchmark_jsonl(path)
    path = _write(tmp_path, "missing.jsonl", [good, good, {"question": "q"}])
    with pytest.raises(BenchmarkFormatError, match=r"missing\.jsonl:3: missing field 'answer'"):
        load_benchmark_jsonl(path)
    path = _write(tmp_path, "arr.jsonl", [[1, 2]])
    with pytest.raises(BenchmarkFormatError, match=r"arr\.jsonl:1: expected a JSON object"):
        load_benchmark_jsonl(path)
    path = _write(tmp_path, "p.jsonl", [{"question": "q", "answer": "x", "options": ["a", "b"], "image": "i.png"}])
    with pytest.raises(BenchmarkFormatError, match=r"p\.jsonl:1: answer 'x' is not one of the options"):
        load_benchmark_jsonl(path, format="puzzlevqa")
    path = _write(tmp_path, "o.jsonl", [{"question": "q", "answer": "a", "image": "i.png"}])
    with pytest.raises(BenchmarkFormatError, match=r"o\.jsonl:1: missing field 'options'"):
        load_benchmark_jsonl(path, format="algopuzzlevqa")
    path = _write(tmp_path, "c.jsonl", [{"question": "q", "answer": "a", "choices": "red"}])
    with pytest.raises(BenchmarkFormatError, match=r"c\.jsonl:1: choices/options must be a list"):
        load_benchmark_jsonl(path)
    with pytest.raises(ValueError, match="unknown benchmark format"):
        load_benchmark_jsonl(path, format="mmlu")
