"""Records -> TFDS ArrayRecord dataset (no TensorFlow): round trip, splits, validation and skips,
atomic writes, the CLI."""
import dataclasses
import io
import json
import logging
import os
import sys

import numpy as np
import pytest
from PIL import Image

from jaxprm.data import tfds_builder as tb
from jaxprm.data.synthetic import generate_records, write_jsonl


@pytest.fixture(scope="module")
def records():
    return generate_records(12, image_size=(56, 84))


class _HideTensorFlow:
    """Wraps a meta-path finder so that it never finds ``tensorflow``: with every finder wrapped,
    the interpreter behaves as if TF were not installed (``import`` fails, ``find_spec`` is None)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        find = getattr(self.finder, "find_spec", None)
        return None if find is None else find(name, path, target)

    def __getattr__(self, item):
        return getattr(self.finder, item)


@pytest.fixture
def no_tensorflow(monkeypatch):
    if "tensorflow" in sys.modules:
        pytest.skip("tensorflow is already imported in this process")
    monkeypatch.setattr(sys, "meta_path", [_HideTensorFlow(f) for f in sys.meta_path])
    yield
    assert "tensorflow" not in sys.modules


def _png(color=(10, 200, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_round_trip_without_tensorflow(tmp_path, records, no_tensorflow):
    import tensorflow_datasets as tfds

    res = tb.build_dataset(records, tmp_path, progress=False)
    assert os.fspath(res) == str(tmp_path / "prm_records" / "1.0.0")
    assert res.num_examples == {"train": len(records)} and res.num_skipped == {"train": 0}
    assert _entries(tmp_path / "prm_records") == ["1.0.0"]  # no temporary folder left
    assert any(f.startswith("prm_records-train.array_record") for f in os.listdir(res.path))

    back = list(tb.read_records(tmp_path, "train"))
    assert back == records  # stored order = input order, every field (images as bytes) equal

    src = tfds.data_source("prm_records", split="train", data_dir=str(tmp_path))  # TFDS' own reader
    assert len(src) == len(records)
    ex = src[3]
    assert set(ex) == set(tb.FEATURE_KEYS)
    assert ex["id"].decode() == records[3].id and ex["images"][0] == records[3].images[0]
    assert tb.example_to_record(ex) == records[3]
    meta = tb.read_metadata(res)
    assert meta["num_examples"] == {"train": len(records)} and meta["num_skipped"] == {"train": 0}
    assert "tensorflow" not in sys.modules


def test_jsonl_source_fractions_and_image_paths(tmp_path, records):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "a.png").write_bytes(_png())
    with_path = dataclasses.replace(records[0], id="with-path", images=["imgs/a.png"])  # relative to the jsonl
    recs = list(records) + [with_path]
    write_jsonl(recs, str(tmp_path / "recs.jsonl"))

    res = tb.build_dataset(str(tmp_path / "recs.jsonl"), tmp_path / "data", val_fraction=0.3, progress=False)
    train = list(tb.read_records(res, "train"))
    val = list(tb.read_records(res, "validation"))
    assert res.num_examples == {"train": len(train), "validation": len(val)}
    assert len(train) + len(val) == len(recs)
    assert {r.id for r in train}.isdisjoint({r.id for r in val})
    fr = [("train", 0.7), ("validation", 0.3)]
    for r in train:
        assert tb.split_of(r.id, fr) == "train"
    for r in val:
        assert tb.split_of(r.id, fr) == "validation"
    (p,) = [r for r in train + val if r.id == "with-path"]
    assert p.images == [_png()]  # the path was read into bytes at build time

    # explicit splits
    res2 = tb.build_dataset({"train": records[:8], "test": records[8:]}, tmp_path / "data2", progress=False)
    assert res2.num_examples == {"train": 8, "test": len(records) - 8}
    assert [r.id for r in tb.read_records(res2, "test")] == [r.id for r in records[8:]]


def test_bad_records_are_skipped_with_counts_and_log_lines(tmp_path, records, caplog):
    good = list(records[:5])
    bad_image = dataclasses.replace(records[5], images=[b"\x89PNG\r\n\x1a\n this is not a png"])
    truncated = dataclasses.replace(records[6], images=[records[6].images[0][:60]])
    missing = dataclasses.replace(records[7], images=["does/not/exist.png"])
    dup = dataclasses.replace(records[8], id=records[0].id)
    write_jsonl(good + [bad_image, truncated, missing, dup], str(tmp_path / "r.jsonl"))
    with open(tmp_path / "r.jsonl", "a", encoding="utf-8") as fh:
        fh.write("{this is not json\n")
        d = records[9].to_dict()
        d["steps"] = []  # fails Record.validate
        fh.write(json.dumps(d) + "\n")
        d = records[10].to_dict()
        d["steps"][0]["kind"] = "vibes"
        fh.write(json.dumps(d) + "\n")

    with caplog.at_level(logging.WARNING, logger="jaxprm.data.tfds_builder"):
        res = tb.build_dataset(str(tmp_path / "r.jsonl"), tmp_path / "data", progress=False)
    assert res.num_examples == {"train": 5}
    assert res.num_skipped == {"train": 7} and res.total_skipped == 7
    by_where = {s.where: s for s in res.skipped}
    assert set(by_where) == {f"r.jsonl:{i}" for i in range(6, 13)}
    assert by_where["r.jsonl:6"].id == bad_image.id and "corrupt image" in by_where["r.jsonl:6"].reason
    assert "corrupt image" in by_where["r.jsonl:7"].reason
    assert "not found" in by_where["r.jsonl:8"].reason
    assert "duplicate id" in by_where["r.jsonl:9"].reason
    assert "invalid JSON" in by_where["r.jsonl:10"].reason
    assert by_where["r.jsonl:11"].id == records[9].id and "steps" in by_where["r.jsonl:11"].reason
    assert "kind" in by_where["r.jsonl:12"].reason
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxprm.data.tfds_builder" and r.levelno == logging.WARNING]
    assert len(lines) == 7
    for s in res.skipped:
        assert any(s.where in ln and repr(s.id) in ln for ln in lines), s
    assert [r.id for r in tb.read_records(res, "train")] == [r.id for r in good]
    assert tb.read_metadata(res)["num_skipped"] == {"train": 7}


def test_iterable_source_and_validate_false(tmp_path, records):
    bad = dataclasses.replace(records[1], images=[b"garbage"])
    not_a_record = {"id": "x"}
    res = tb.build_dataset(iter([records[0], bad, not_a_record]), tmp_path / "a", progress=False)
    assert res.num_examples == {"train": 1} and res.num_skipped == {"train": 2}
    assert {s.where for s in res.skipped} == {"records[1]", "records[2]"}

    # validate=False stores the corrupt image (the loader must then cope with it)
    res = tb.build_dataset([records[0], bad], tmp_path / "b", progress=False, validate=False)
    assert res.num_examples == {"train": 2}
    stored = list(tb.read_records(res, "train"))
    assert stored[1].images == [b"garbage"]


def test_atomic_exists_and_overwrite(tmp_path, records):
    def interrupted():
        yield from records[:4]
        raise RuntimeError("disk on fire")

    class OneShot:  # an iterable that is not a Sequence: iterated per split
        def __iter__(self):
            return interrupted()

    with pytest.raises(RuntimeError, match="disk on fire"):
        tb.build_dataset(OneShot(), tmp_path, progress=False)
    name_dir = tmp_path / "prm_records"
    assert not (name_dir / "1.0.0").exists()  # nothing half-written is visible
    assert [e for e in os.listdir(name_dir) if not e.startswith(".")] == []

    # a leftover of a killed build is cleaned by the next build
    (name_dir / ".building-deadbeef").mkdir()
    res = tb.build_dataset(records[:3], tmp_path, progress=False)
    assert _entries(name_dir) == ["1.0.0"]
    with pytest.raises(FileExistsError):
        tb.build_dataset(records[:2], tmp_path, progress=False)
    res = tb.build_dataset(records[:2], tmp_path, progress=False, overwrite=True)
    assert [r.id for r in tb.read_records(res, "train")] == [r.id for r in records[:2]]
    assert _entries(name_dir) == ["1.0.0"]


def _entries(name_dir):
    """What a dataset's name folder holds, less the build lock file (which stays)."""
    return sorted(e for e in os.listdir(name_dir) if e != tb._LOCK_NAME)


def test_concurrent_builds_into_one_data_dir(tmp_path, records):
    import threading
    import time

    first_started = threading.Event()

    class Slow:  # the first build is still writing when the second one starts
        def __iter__(self):
            first_started.set()
            for r in records:
                time.sleep(0.05)
                yield r

    results, errors = {}, {}

    def build(key, src):
        try:
            results[key] = tb.build_dataset(src, tmp_path, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors[key] = e

    t1 = threading.Thread(target=build, args=("first", Slow()), daemon=True)
    t1.start()
    assert first_started.wait(60)
    t2 = threading.Thread(target=build, args=("second", list(records)), daemon=True)
    t2.start()
    t1.join(180)
    t2.join(180)
    assert not t1.is_alive() and not t2.is_alive(), "a build hung"
    assert errors == {}
    name_dir = tmp_path / "prm_records"
    assert _entries(name_dir) == ["1.0.0"]  # one dataset, no temporary folder left
    assert results["first"].path == results["second"].path == str(name_dir / "1.0.0")
    assert results["second"].num_examples == results["first"].num_examples == {"train": len(records)}
    assert [r.id for r in tb.read_records(results["second"], "train")] == [r.id for r in records]


def test_stale_temp_dirs_of_dead_builds_are_cleaned_live_ones_kept(tmp_path, records):
    import subprocess

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        name_dir = tmp_path / "prm_records"
        name_dir.mkdir()
        dead_dir = name_dir / f".building-{done.pid}-0123456789ab"
        dead_old = name_dir / f".building-old-{done.pid}-0123456789ab"
        live_dir = name_dir / f".building-{live.pid}-ba9876543210"
        for d in (dead_dir, dead_old, live_dir):
            d.mkdir()
            (d / "part").write_bytes(b"x")
        assert tb._tmp_owner(live_dir.name) == live.pid and tb._tmp_owner(".building-deadbeef") is None
        res = tb.build_dataset(records[:3], tmp_path, progress=False)
        assert _entries(name_dir) == sorted(["1.0.0", live_dir.name])  # the live build's folder is untouched
        assert (live_dir / "part").read_bytes() == b"x"
        assert res.num_examples == {"train": 3}
    finally:
        live.kill()
        live.wait()
    tb._clean_stale(str(name_dir))  # its owner is gone now
    assert _entries(name_dir) == ["1.0.0"]


def test_empty_splits(tmp_path, records, caplog):
    res = tb.build_dataset(records[:3], tmp_path / "a", splits={"train": 1.0, "validation": 0.0}, progress=False)
    assert res.num_examples == {"train": 3}  # a split without records is left out (TFDS cannot write one)
    assert any("'validation' gets no records" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="no valid records"):
        tb.build_dataset([dataclasses.replace(records[0], images=[b"x"])], tmp_path / "b", progress=False)
    assert _entries(tmp_path / "b" / "prm_records") == []


def test_numpy_values_in_meta_are_stored(tmp_path, records):
    rec = dataclasses.replace(records[0], meta={"score": np.float32(0.5), "n": np.int64(3), "v": np.arange(2)})
    res = tb.build_dataset([rec], tmp_path, progress=False)
    (back,) = tb.read_records(res, "train")
    assert back.meta == {"score": 0.5, "n": 3, "v": [0, 1]}


def test_split_arguments_are_checked(tmp_path, records):
    with pytest.raises(ValueError, match="sum to 1"):
        tb.build_dataset(records, tmp_path, splits={"train": 0.5, "validation": 0.2}, progress=False)
    with pytest.raises(ValueError, match="not both"):
        tb.build_dataset(records, tmp_path, splits={"train": 1.0}, val_fraction=0.1, progress=False)
    with pytest.raises(ValueError, match="name"):
        tb.build_dataset(records, tmp_path, name="bad name", progress=False)


def test_cli(tmp_path, records, capsys):
    write_jsonl(records[:6], str(tmp_path / "r.jsonl"))
    rc = tb.main(["--records", str(tmp_path / "r.jsonl"), "--data_dir", str(tmp_path / "d"),
                  "--val_fraction", "0.5", "--no_progress"])
    assert rc == 0
    meta = tb.read_metadata(tmp_path / "d")
    assert sum(meta["num_examples"].values()) == 6
    assert "wrote" in capsys.readouterr().err
    rc = tb.main(["--records", str(tmp_path / "r.jsonl"), "--data_dir", str(tmp_path / "d"), "--no_progress"])
    assert rc == 2  # exists, no --overwrite


def test_importer_refuses_image_paths_outside_image_root(tmp_path, records):
    from jaxprm.data.formats._common import ImportStats, run_import
    from jaxprm.data.schema import RecordError

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"img": p}) for p in ["ok.png", "../secret.png", str(tmp_path / "secret.png")]) + "\n")

    def convert(row, where):
        return dataclasses.replace(records[0], images=[row["img"]])

    stats = ImportStats()
    out = list(run_import(str(rows), convert, on_error="skip", stats=stats, image_root=str(root)))
    assert [r.images for r in out] == [[os.path.join(str(root), "ok.png")]]
    assert stats.skipped == 2
    with pytest.raises(RecordError, match=r"rows.jsonl:2: image path '../secret.png' resolves to .*outside image_root"):
        list(run_import(str(rows), convert, image_root=str(root)))
    allowed = list(run_import(str(rows), convert, image_root=str(root), allow_outside_root=True))
    assert len(allowed) == 3
