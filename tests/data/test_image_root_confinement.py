"""Image paths are confined to ``image_root`` (issue 12, item 12): ``../`` and absolute paths that land
outside it are refused by the importers, the TFDS builder (a counted skip naming file:row and the
path) and ``python -m jaxprm.eval`` (a counted skip, or exit 2), and followed with the explicit opt-in."""
import dataclasses
import json

import pytest
from PIL import Image

from jaxprm.data import tfds_builder as tb
from jaxprm.data.formats import read_records
from jaxprm.data.synthetic import generate_records, write_jsonl
from jaxprm.eval.run import main as eval_main

from tests.fakes import TagPRM


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), (0, 128, 255)).save(path)
    return path


@pytest.fixture
def tree(tmp_path):
    """``root/in.png`` inside the root, ``outside.png`` next to it, ``/abs/elsewhere.png`` elsewhere."""
    root = tmp_path / "data" / "imgs"
    _png(root / "in.png")
    _png(tmp_path / "data" / "outside.png")
    _png(tmp_path / "elsewhere" / "abs.png")
    return tmp_path, root, ["in.png", "../outside.png", str(tmp_path / "elsewhere" / "abs.png")]


def _records_file(tmp_path, paths):
    recs = [dataclasses.replace(r, images=[p]) for r, p in zip(generate_records(len(paths), image_size=(56, 56)), paths)]
    path = tmp_path / "data" / "recs.jsonl"
    write_jsonl(recs, path)
    return path, recs


def test_builder_skips_paths_outside_image_root_and_follows_them_with_the_opt_in(tree):
    tmp_path, root, paths = tree
    src, recs = _records_file(tmp_path, paths)
    res = tb.build_dataset(str(src), tmp_path / "ds", image_root=root, progress=False)
    assert res.num_examples == {"train": 1} and res.num_skipped == {"train": 2}
    by_where = {s.where: s.reason for s in res.skipped}
    assert set(by_where) == {"recs.jsonl:2", "recs.jsonl:3"}  # file:line of each refused record
    assert "'../outside.png'" in by_where["recs.jsonl:2"] and "outside image_root" in by_where["recs.jsonl:2"]
    assert repr(paths[2]) in by_where["recs.jsonl:3"]
    res = tb.build_dataset(str(src), tmp_path / "ds2", image_root=root, progress=False,
                           allow_images_outside_root=True)
    assert res.num_examples == {"train": 3} and res.num_skipped == {"train": 0}


def test_builder_cli_flag(tree):
    tmp_path, root, paths = tree
    src, _ = _records_file(tmp_path, paths)
    args = ["--records", str(src), "--image_root", str(root), "--no_progress"]
    assert tb.main(args + ["--data_dir", str(tmp_path / "a")]) == 0
    assert tb.split_sizes(tmp_path / "a") == {"train": 1}
    assert tb.main(args + ["--data_dir", str(tmp_path / "b"), "--allow-images-outside-root"]) == 0
    assert tb.split_sizes(tmp_path / "b") == {"train": 3}


def test_read_records_refuses_and_allows(tree):
    tmp_path, root, paths = tree
    src, _ = _records_file(tmp_path, paths)
    with pytest.raises(ValueError, match=r"recs.jsonl:2: image path '\.\./outside\.png'.*outside image_root"):
        list(read_records(src, image_root=root))
    assert len(list(read_records(src, image_root=root, allow_outside_root=True))) == 3


def _vpb_rows(paths):
    return [{"image": [p], "question": f"q{i}", "answer": "1", "data_source": "S",
             "response": {"steps": ["a [p=0.9]", "b [p=0.2]"], "process_correctness": [1, -1]}}
            for i, p in enumerate(paths)]


def test_eval_vpb_skips_paths_outside_root(tree, capsys):
    tmp_path, root, paths = tree
    data = tmp_path / "data" / "vpb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _vpb_rows(paths)))
    base = ["vpb", "--prm", "fake", "--data", str(data), "--image-root", str(root), "--no-progress"]
    prm = TagPRM(require_image=True)
    assert eval_main(base + ["--out", str(tmp_path / "o1")], prm=prm) == 0
    res = json.loads((tmp_path / "o1" / "vpb_results.json").read_text())
    assert res["skipped"]["count"] == 2
    assert [s["where"] for s in res["skipped"]["rows"]] == [f"{data}:2", f"{data}:3"]
    assert "../outside.png" in res["skipped"]["rows"][0]["reason"] and paths[2] in res["skipped"]["rows"][1]["reason"]
    assert eval_main(base + ["--out", str(tmp_path / "o2"), "--strict"], prm=prm) == 2
    assert f"{data}:2" in capsys.readouterr().err
    assert eval_main(base + ["--out", str(tmp_path / "o3"), "--allow-images-outside-root"], prm=prm) == 0
    assert json.loads((tmp_path / "o3" / "vpb_results.json").read_text())["skipped"]["count"] == 0


def test_eval_bon_refuses_paths_outside_root(tree, capsys):
    tmp_path, root, paths = tree
    data = tmp_path / "data" / "bench.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": "q", "answer": "3", "image": p}) + "\n"
                            for i, p in enumerate(paths)))
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"id": f"p{i}", "candidates": ["\\boxed{3} [p=0.9]"]}) + "\n"
                             for i in range(3)))
    base = ["bon", "--prm", "fake", "--data", str(data), "--image-root", str(root), "--candidates", str(cands),
            "--max-n", "1", "--no-progress"]
    prm = TagPRM(require_image=True)
    assert eval_main(base + ["--out", str(tmp_path / "o1")], prm=prm) == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "../outside.png" in err and "outside image_root" in err
    assert eval_main(base + ["--out", str(tmp_path / "o2"), "--allow-images-outside-root"], prm=prm) == 0
