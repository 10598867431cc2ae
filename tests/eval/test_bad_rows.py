"""Issue 12, items 5 and 15: per-row image failures in ``eval vpb|bon`` are skipped with a count and
a ``file:line: reason`` log line (``--strict``: exit 2); ``eval bon`` resumes after a partial last
line in the candidates file; ``eval vpb`` rejects malformed ``steps`` with ``file:line``."""
import base64
import io
import json

import pytest
from PIL import Image

from jaxprm.eval.run import main

from tests.fake_openai import FakeOpenAIServer
from tests.fakes import TagPRM


def _png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _bad_images(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png_bytes())
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "trunc.png").write_bytes(_png_bytes()[:60])
    return ["ok.png", "garbage.png", "trunc.png", 5]


def _vpb_row(image, q):
    return {"image": image, "question": q, "answer": "1", "data_source": "S",
            "response": {"steps": ["a [p=0.9]", "b [p=0.2]"], "process_correctness": [1, -1]}}


def test_vpb_skips_rows_with_bad_images_and_counts_them(tmp_path, capsys):
    imgs = _bad_images(tmp_path)
    rows = [_vpb_row([im], f"q{i}") for i, im in enumerate(imgs)] + [_vpb_row("ok.png", "q-str")]
    rows.append(_vpb_row({"path": "ok.png"}, "q-dict"))  # 'image' of the wrong type
    data = _jsonl(tmp_path / "vpb.jsonl", rows)
    prm = TagPRM(require_image=True)
    rc = main(["vpb", "--prm", "fake", "--data", data, "--out", str(tmp_path / "out"), "--no-progress"], prm=prm)
    assert rc == 0 and prm.items == 2
    err = capsys.readouterr().err
    for line in (2, 3, 4, 6):
        assert f"skipped {data}:{line}: " in err
    res = json.loads((tmp_path / "out" / "vpb_results.json").read_text())
    assert res["skipped"]["count"] == 4 and [r["where"] for r in res["skipped"]["rows"]] == [
        f"{data}:{n}" for n in (2, 3, 4, 6)]
    assert "image 0" in res["skipped"]["rows"][0]["reason"] and res["overall"]["n_steps"] == 4
    scores = [json.loads(x)["where"] for x in (tmp_path / "out" / "vpb_scores.jsonl").read_text().splitlines()]
    assert scores == [f"{data}:1", f"{data}:5"]
    rc = main(["vpb", "--prm", "fake", "--data", data, "--out", str(tmp_path / "o2"), "--no-progress", "--strict"],
              prm=prm)
    assert rc == 2 and f"{data}:2: image 0" in capsys.readouterr().err


@pytest.mark.parametrize("steps, field", [("a [p=0.9]", "response.steps"), ([1, "b"], "response.steps[0]")])
def test_vpb_malformed_steps_name_file_and_line(tmp_path, capsys, steps, field):
    (tmp_path / "ok.png").write_bytes(_png_bytes())
    bad = _vpb_row(["ok.png"], "q")
    bad["response"] = {"steps": steps, "process_correctness": [1, -1]}
    data = _jsonl(tmp_path / "vpb.jsonl", [_vpb_row(["ok.png"], "q"), bad])
    rc = main(["vpb", "--prm", "fake", "--data", data, "--out", str(tmp_path / "out"), "--no-progress"],
              prm=TagPRM(require_image=True))
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:2" in err and field in err and "Traceback" not in err


def test_bon_skips_problems_with_bad_images(tmp_path, capsys):
    imgs = _bad_images(tmp_path)[:3]
    probs = [{"id": f"p{i}", "question": "How many?", "answer": "3", "image": im} for i, im in enumerate(imgs)]
    probs.append({"id": "p3", "question": "How many?", "answer": "3",
                  "image": "data:image/png;base64," + base64.b64encode(b"junk").decode()})
    data = _jsonl(tmp_path / "bench.jsonl", probs)
    cands = _jsonl(tmp_path / "cands.jsonl", [{"id": p["id"], "candidates": ["\\boxed{3} [p=0.9]", "\\boxed{4} [p=0.1]"]}
                                              for p in probs])
    argv = ["bon", "--prm", "fake", "--data", data, "--candidates", cands, "--aggregate", "mean",
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv, prm=TagPRM(require_image=True)) == 0
    err = capsys.readouterr().err
    res = json.loads((tmp_path / "out" / "bon_results.json").read_text())
    assert res["n_problems"] == 1 and res["skipped"]["count"] == 3
    assert [r["where"] for r in res["skipped"]["rows"]] == [f"{data}: problem 'p{i}'" for i in (1, 2, 3)]
    assert f"skipped {data}: problem 'p1': image 0" in err
    assert main(argv + ["--strict"], prm=TagPRM(require_image=True)) == 2
    assert f"{data}: problem 'p1': image 0" in capsys.readouterr().err


def _reply(body):
    return [f"So \\boxed{{{3 if i % 2 else 4}}}. [p=0.{i + 1}]" for i in range(body["n"])]


def test_bon_resumes_after_a_partial_last_candidates_line(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(_png_bytes())
    data = _jsonl(tmp_path / "bench.jsonl", [{"id": f"p{i}", "question": "q", "answer": "3", "image": "a.png"}
                                             for i in range(3)])
    cands = tmp_path / "cands.jsonl"
    cands.write_bytes(json.dumps({"id": "p0", "candidates": ["\\boxed{3}", "\\boxed{4}"]}).encode() + b"\n"
                      + b'{"id": "p1", "candidates": ["\\\\boxed{3}", "\\\\bo')  # killed mid-write
    with FakeOpenAIServer(_reply) as srv:
        argv = ["bon", "--prm", "fake", "--data", data, "--candidates", str(cands), "--max-n", "2",
                "--aggregate", "mean", "--out", str(tmp_path / "out"), "--no-progress", "--policy", "openai",
                "--base-url", srv.base_url, "--model", "pol", "--max-retries", "0"]
        assert main(argv, prm=TagPRM(require_image=True)) == 0
        assert len(srv.bodies) == 2  # p1 and p2 sampled, p0 reused
    assert f"{cands}:2: partial last line" in capsys.readouterr().err
    saved = [json.loads(x) for x in cands.read_text().splitlines()]
    assert [r["id"] for r in saved] == ["p0", "p1", "p2"]
    # a complete last line without its newline is kept and the next line starts on its own line
    cands.write_text(json.dumps({"id": "p0", "candidates": ["\\boxed{3}", "\\boxed{4}"]}))
    with FakeOpenAIServer(_reply) as srv:
        argv[argv.index("--base-url") + 1] = srv.base_url
        assert main(argv, prm=TagPRM(require_image=True)) == 0
    assert [json.loads(x)["id"] for x in cands.read_text().splitlines()] == ["p0", "p1", "p2"]


def test_candidates_file_with_a_non_utf8_line_names_file_and_line(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(_png_bytes())
    data = _jsonl(tmp_path / "bench.jsonl", [{"id": "p0", "question": "q", "answer": "3", "image": "a.png"}])
    cands = tmp_path / "cands.jsonl"
    cands.write_bytes(b'{"id": "p0", "candidates": ["a"]}\n{"id": "p0", "candidates": ["\xff"]}\n')
    rc = main(["bon", "--prm", "fake", "--data", data, "--candidates", str(cands), "--out", str(tmp_path / "o"),
               "--no-progress"], prm=TagPRM(require_image=True))
    assert rc == 2 and f"{cands}:2: not UTF-8" in capsys.readouterr().err
