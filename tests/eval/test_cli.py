"""``python -m jaxprm.eval`` run in-process (``main(argv, prm=...)``) on small hand-made files with a
stand-in PRM whose scores are written into the step texts, so every number can be checked by hand."""
import json

import numpy as np
import pytest
from PIL import Image

from jaxprm.data import synthetic as syn
from jaxprm.eval.run import evaluate_synthetic, main

from tests.fake_openai import FakeOpenAIServer
from tests.fakes import TagPRM


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), (255, 0, 0)).save(path)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# p1 (gold 3)                                          mean  last  orm   correct
P1 = ["Count [p=0.9]\n\nSo \\boxed{3}. [p=0.8] [orm=0.1]",  # .85   .8   .1    yes
      "Count [p=0.3]\n\nSo \\boxed{4}. [p=0.9] [orm=0.95]",  # .6    .9   .95   no
      "So \\boxed{4}. [p=0.2]",                              # .2    .2   .2    no
      "Count [p=0.5]\n\nSo \\boxed{4}. [p=0.5] [orm=0.3]"]   # .5    .5   .3    no
# p2 (gold "dog" = choice B)
P2 = ["\\boxed{A} [p=0.7]",            # .7  no
      "\\boxed{B} [p=0.6]",            # .6  yes
      "The answer is dog. [p=0.1]",    # .1  yes
      "\\boxed{B} [p=0.2]"]            # .2  yes


@pytest.fixture
def bench(tmp_path):
    _png(tmp_path / "img" / "a.png")
    data = _jsonl(tmp_path / "bench.jsonl", [
        {"id": "p1", "question": "How many red circles?", "answer": "3", "image": "img/a.png"},
        {"id": "p2", "question": "Which animal?", "choices": ["cat", "dog"], "answer": "dog", "image": "img/a.png"},
    ])
    cands = _jsonl(tmp_path / "cands.jsonl", [{"id": "p1", "candidates": P1},
                                              {"id": "p2", "candidates": [{"text": t} for t in P2]}])
    return tmp_path, data, cands


def test_bon_curves_on_hand_made_data(bench, capsys):
    tmp, data, cands = bench
    out = tmp / "out"
    rc = main(["bon", "--prm", "fake", "--data", data, "--candidates", cands, "--max-n", "64",
               "--aggregate", "mean,min,last,product,orm", "--out", str(out), "--no-progress"], prm=TagPRM(require_image=True))
    assert rc == 0
    res = json.loads((out / "bon_results.json").read_text())
    png = (out / "bon_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["max_n"] == 4 and res["ns"] == [1, 2, 3, 4] and res["n_problems"] == 2  # clipped to 4 candidates
    pp = {p["id"]: p for p in res["per_problem"]}
    assert pp["p1"]["correct"] == [True, False, False, False]
    assert pp["p2"]["correct"] == [False, True, True, True]
    np.testing.assert_allclose(pp["p1"]["scores"]["mean"], [0.85, 0.6, 0.2, 0.5], rtol=1e-6)
    np.testing.assert_allclose(pp["p1"]["scores"]["orm"], [0.1, 0.95, 0.2, 0.3], rtol=1e-6)
    c = {k: dict(zip(v["ns"], v["acc"])) for k, v in res["curves"].items()}
    assert all(v["ns"] == [1, 2, 3, 4] for v in res["curves"].values())  # every curve at every N, majority too
    # N=1: a random candidate: (1/4 + 3/4) / 2
    for k in ("bon_mean", "bon_min", "bon_last", "bon_product", "bon_orm", "pass@n"):
        assert c[k][1] == pytest.approx(0.5)
    # N=4: the top-scoring candidate of each problem
    assert c["bon_mean"][4] == pytest.approx(0.5)     # p1 right (.85), p2 wrong (.7)
    assert c["bon_last"][4] == pytest.approx(0.0)     # p1 wrong (.9), p2 wrong (.7)
    assert c["bon_orm"][4] == pytest.approx(0.0)      # p1 wrong (.95), p2 wrong (.7)
    assert c["pass@n"][4] == pytest.approx(1.0)
    assert c["majority"][4] == pytest.approx(0.5)     # p1 votes 4 (wrong), p2 votes B (right)
    assert c["majority"][1] == pytest.approx(0.5, abs=0.1)  # sampled
    # exact N=2 for bon_mean, p1: P(c0 in pair) = 1/2; p2: correct unless c0 is in the pair -> 1/2
    assert c["bon_mean"][2] == pytest.approx(0.5)
    printed = capsys.readouterr().out
    assert "bon_mean" in printed and "N=4" in printed and "pass@n" in printed


def _policy_reply(body):
    return [f"Count [p=0.{i + 1}]\n\nSo \\boxed{{{3 if i % 2 else 4}}}." for i in range(body["n"])]


def test_bon_samples_candidates_with_an_openai_policy_and_reuses_them(bench):
    tmp, data, _ = bench
    out = tmp / "out2"
    with FakeOpenAIServer(_policy_reply) as srv:
        argv = ["bon", "--prm", "fake", "--data", data, "--max-n", "4", "--aggregate", "mean", "--out", str(out),
                "--no-progress", "--policy", "openai", "--base-url", srv.base_url,
                "--model", "pol", "--max-retries", "0", "--temperature", "0.9"]
        assert main(argv, prm=TagPRM(require_image=True)) == 0
        assert len(srv.bodies) == 2 and all(r["n"] == 4 and r["temperature"] == 0.9 for r in srv.bodies)
        # the choices are shown to the policy
        assert "(B) dog" in srv.bodies[1]["messages"][-1]["content"][-1]["text"]
        saved = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
        assert [r["id"] for r in saved] == ["p1", "p2"] and all(len(r["candidates"]) == 4 for r in saved)
        assert main(argv, prm=TagPRM(require_image=True)) == 0  # everything cached: no new requests
        assert len(srv.bodies) == 2
    res = json.loads((out / "bon_results.json").read_text())
    assert res["per_problem"][0]["correct"] == [False, True, False, True]
    assert res["per_problem"][1]["correct"] == [False] * 4  # p2 wants "dog"
    assert res["curves"]["bon_mean"]["acc"][3] == pytest.approx(0.5)  # p1: the best (p=0.4) says 3


def test_bon_reports_bad_input_with_file_and_line(bench, capsys):
    tmp, data, _ = bench
    bad = tmp / "bad.jsonl"
    bad.write_text(json.dumps({"id": "p1", "candidates": ["x"]}) + "\n\n" + '{"id": "p2", "candidates": 3}\n')
    rc = main(["bon", "--prm", "fake", "--data", data, "--candidates", str(bad), "--out", str(tmp / "o"),
               "--no-progress"], prm=TagPRM(require_image=True))
    assert rc == 2
    assert f"{bad}:3:" in capsys.readouterr().err
    rc = main(["bon", "--prm", "fake", "--data", data, "--candidates", str(bad), "--aggregate", "mean,median",
               "--out", str(tmp / "o"), "--no-progress"], prm=TagPRM(require_image=True))
    assert rc == 2 and "median" in capsys.readouterr().err
    (tmp / "broken.jsonl").write_text('{"id": "p1", "question": "q", "answer": "1"}\n{"id": "p2"\n')
    rc = main(["bon", "--prm", "fake", "--data", str(tmp / "broken.jsonl"), "--candidates", str(bad),
               "--out", str(tmp / "o"), "--no-progress"], prm=TagPRM(require_image=True))
    assert rc == 2 and f"{tmp / 'broken.jsonl'}:2:" in capsys.readouterr().err


def test_vpb_macro_f1_per_source(tmp_path, capsys):
    _png(tmp_path / "images" / "x.png")
    rows = [
        {"image": ["images/x.png"], "question": "q1", "answer": "1", "data_source": "MMMU",
         "response": {"steps": ["a [p=0.9]", "b [p=0.2]"], "process_correctness": [1, -1]}},
        {"image": ["images/x.png"], "question": "q2", "answer": "2", "data_source": "MMMU",
         "response": {"steps": ["c [p=0.8]", "d [p=0.7]", "e [p=0.4]"], "process_correctness": [1, 0, 1]}},
        {"image": ["images/x.png"], "question": "q3", "answer": "3", "data_source": "WeMath",
         "response": {"steps": ["f [p=0.3]"], "process_correctness": [1]}},
    ]
    data = _jsonl(tmp_path / "vpb.jsonl", rows)
    prm = TagPRM(require_image=True)
    rc = main(["vpb", "--prm", "fake", "--data", data, "--out", str(tmp_path / "out"), "--batch-size", "2",
               "--no-progress"], prm=prm)
    assert rc == 0 and prm.items == 3
    res = json.loads((tmp_path / "out" / "vpb_results.json").read_text())
    mmmu, wemath, overall = res["per_source"]["MMMU"], res["per_source"]["WeMath"], res["overall"]
    # MMMU: a tp, b tn, c tp, d neutral (excluded), e fn -> F1(correct) 4/5, F1(incorrect) 2/3
    assert mmmu["n_steps"] == 4 and mmmu["f1_correct"] == pytest.approx(0.8)
    assert mmmu["f1_incorrect"] == pytest.approx(2 / 3) and mmmu["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert wemath["macro_f1"] == 0.0
    assert overall["f1_correct"] == pytest.approx(4 / 6) and overall["f1_incorrect"] == pytest.approx(0.5)
    scores = [json.loads(line) for line in (tmp_path / "out" / "vpb_scores.jsonl").read_text().splitlines()]
    assert scores[1]["pred_scores"] == pytest.approx([0.8, 0.7, 0.4]) and scores[1]["where"] == f"{data}:2"
    table = capsys.readouterr().out
    assert "MMMU" in table and "WeMath" in table and "overall" in table
    # a missing image is reported with file:line: skipped and counted, or with --strict exit 2
    rows[2]["image"] = ["images/missing.png"]
    data = _jsonl(tmp_path / "vpb2.jsonl", rows)
    assert main(["vpb", "--prm", "fake", "--data", data, "--out", str(tmp_path / "o2"), "--no-progress",
                 "--strict"], prm=prm) == 2
    err = capsys.readouterr().err
    assert f"{data}:3" in err and "missing.png" in err


class OraclePRM:
    """Knows the ground-truth step labels of the generated puzzles."""

    def __init__(self, records):
        self.labels = {(r.question, tuple(s.text for s in r.steps)): [s.label for s in r.steps] for r in records}

    def score_batch(self, items):
        return [np.asarray(self.labels[(q, tuple(steps))], np.float32) * 0.8 + 0.1 for _, q, steps in items]


def test_synthetic_step_f1(tmp_path, capsys):
    seed, n = 7, 12
    records = syn.generate_records(n, seed=seed)
    rc = main(["synthetic", "--prm", "fake", "--n", str(n), "--seed", str(seed), "--out", str(tmp_path),
               "--no-progress"], prm=OraclePRM(records))
    assert rc == 0
    res = json.loads((tmp_path / "synthetic_results.json").read_text())
    assert res["n_records"] == n and res["macro_f1"] == pytest.approx(1.0)
    assert res["solution_accuracy"] == 1.0 and res["first_error_accuracy"] == 1.0 and res["n_with_error"] == 6
    assert set(res["by_error_kind"]) == {"none", "perception", "reasoning"}
    assert set(res["by_question_type"]) == set(syn.QUESTION_TYPES)
    out = capsys.readouterr().out
    assert "error:perception" in out and "overall" in out

    class Always:  # every step judged correct
        def score_batch(self, items):
            return [np.full(len(s), 0.9) for _, _, s in items]

    r = evaluate_synthetic(Always(), records=records)
    assert r["overall"]["f1_incorrect"] == 0.0 and r["first_error_accuracy"] == 0.0
    assert r["solution_accuracy"] == pytest.approx(np.mean([rec.meta["answer_correct"] for rec in records]))


def test_synthetic_uses_the_task_the_prm_was_trained_on(tmp_path, capsys):
    """``eval synthetic`` generates puzzles with the settings training saved in the PRM's spec (here
    56x56 images, 25% wrong solutions), unless the command line overrides them; writes JSON and a plot."""
    import io
    import types

    from tests.fakes import TruthPRM

    task = syn.task_settings(image_size=(56, 56), error_rate=0.25)
    n, seed = 16, 3
    records = syn.generate_records(n, seed=seed, **task)
    prm = TruthPRM(records, spec=types.SimpleNamespace(task=task))
    assert main(["synthetic", "--prm", "fake", "--n", str(n), "--seed", str(seed), "--out", str(tmp_path),
                 "--no-progress"], prm=prm) == 0
    res = json.loads((tmp_path / "synthetic_results.json").read_text())
    assert res["task"] == task and res["n_with_error"] == 4 and res["macro_f1"] == pytest.approx(1.0)
    assert {Image.open(io.BytesIO(im)).size for im in prm.images} == {(56, 56)}
    assert set(res["by_step_kind"]) == {"perception", "reasoning"}
    assert (tmp_path / "synthetic_f1.png").stat().st_size > 0
    other = TruthPRM(syn.generate_records(4, seed=seed, **{**task, "image_size": (84, 112)}),
                     spec=types.SimpleNamespace(task=task))
    assert main(["synthetic", "--prm", "fake", "--n", "4", "--seed", str(seed), "--image-size", "84x112",
                 "--no-progress"], prm=other) == 0
    assert {Image.open(io.BytesIO(im)).size for im in other.images} == {(112, 84)}


def test_synthetic_search_beats_majority_with_a_good_prm(tmp_path, capsys):
    """Test-time scaling on embedded puzzles: with a PRM that knows the truth, best-of-N reaches the
    pass@N oracle, beats majority vote once the policy is mostly wrong, and guided search solves
    (nearly) everything."""
    from tests.fakes import TruthPRM

    records = syn.generate_records(12, seed=5, image_size=(56, 56))
    from jaxprm.eval.run import evaluate_synthetic_search

    res = evaluate_synthetic_search(TruthPRM(records), records, n_candidates=8, policy_error_rate=0.8, guided_k=8)
    c = res["curves"]
    assert c["bon_min"]["acc"][-1] == pytest.approx(c["pass@n"]["acc"][-1])
    assert c["bon_min"]["acc"][-1] > c["majority"]["acc"][-1]
    # N=1: one random sample (best-of-1 exactly; majority vote estimated from sampled subsets)
    assert c["bon_min"]["acc"][0] == pytest.approx(res["accuracy_at_1"])
    assert c["majority"]["acc"][0] == pytest.approx(res["accuracy_at_1"], abs=0.05)
    assert res["guided"]["accuracy"] >= 0.9
