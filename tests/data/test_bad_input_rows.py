"""Issue 12, items 6 and 13: a non-UTF-8 line is one bad record (``file:line``, or a counted skip),
and float step labels follow one rule at the first check (1.0 / 0.0 are the ints 1 / 0, other
floats are errors naming file:row and field)."""
import json

import pytest

from jaxprm.data.formats import ImportStats, read_jsonl, read_visualprm400k, read_visualprocessbench
from jaxprm.data.jsonl import BadLine, iter_jsonl
from jaxprm.data.schema import Record, RecordError, Step

from .fixtures_formats import vpb_rows, write_jsonl_rows


def _insert_bad_bytes(path, lineno):
    lines = path.read_bytes().split(b"\n")
    lines.insert(lineno - 1, b'{"question": "caf\xe9 \xff"}')
    path.write_bytes(b"\n".join(lines))
    return path


def test_iter_jsonl_reports_a_non_utf8_line_and_reads_on(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n\n{"c": 3}\n')
    got = list(iter_jsonl(path))
    assert [w for w, _ in got] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    assert got[0][1] == {"a": 1} and got[2][1] == {"c": 3}
    assert isinstance(got[1][1], BadLine) and got[1][1].message.startswith(f"{path}:2: not UTF-8")


def test_importer_non_utf8_line_is_a_bad_record(tmp_path):
    path = _insert_bad_bytes(write_jsonl_rows(vpb_rows(), tmp_path / "vpb.jsonl"), 2)
    with pytest.raises(RecordError, match=f"^{path}:2: not UTF-8"):
        list(read_visualprocessbench(path))
    stats = ImportStats()
    recs = list(read_visualprocessbench(path, on_error="skip", stats=stats))
    assert len(recs) == 2 and (stats.rows, stats.records, stats.skipped) == (3, 2, 1)
    assert stats.errors[0].startswith(f"{path}:2: not UTF-8")


def test_json_array_file_with_a_bad_byte_is_one_counted_bad_record(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[\n{"a": 1},\n{"b": "\xff"}\n]\n')
    stats = ImportStats()
    assert list(read_visualprm400k(path, on_error="skip", stats=stats)) == []
    assert stats.skipped == 1 and stats.errors[0].startswith(f"{path}:3: not UTF-8")


def _record(label):
    return Record(id="abc", question="q?", steps=[Step("look", label=label), Step("think", label=0)])


def test_float_labels_one_rule_at_the_first_check(tmp_path):
    d = _record(1).to_dict()
    d["steps"][0]["label"], d["steps"][1]["label"], d["steps"][1]["judge"] = 1.0, 0.0, 0.0
    bad = json.loads(json.dumps(d))
    bad["steps"][0]["label"] = 0.5
    path = write_jsonl_rows([d, bad], tmp_path / "recs.jsonl")
    with pytest.raises(RecordError) as e:
        list(read_jsonl(path))
    assert str(e.value).startswith(f"{path}:2: record 'abc': field 'steps[0].label': must be 1, 0")
    stats = ImportStats()
    (rec,) = list(read_jsonl(path, on_error="skip", stats=stats))
    assert stats.skipped == 1
    assert rec.labels == [1, 0] and all(type(v) is int for v in rec.labels)  # what the pipeline trains on
    assert type(rec.steps[1].judge) is int
    assert _record(1.0).validate().steps[0].label == 1 and type(_record(1.0).validate().steps[0].label) is int
    for v in (0.5, 2.0, float("nan"), True, "1"):
        with pytest.raises(RecordError, match=r"field 'steps\[0\].label'"):
            _record(v).validate()
