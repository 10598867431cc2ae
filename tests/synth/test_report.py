"""Label accuracy of MC-only / judge-only / hybrid against the puzzles' ground truth."""
import json
from pathlib import Path

import pytest

from jaxprm.synth.config import load_config
from jaxprm.synth.report import evaluate, format_table, main
from jaxprm.synth.run import ShardStore, run

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "synth_tiny.py")


def _config(num_questions: int, num_continuations: int, judge_noise: float):
    cfg = load_config(CONFIG)
    cfg.num_questions = num_questions
    cfg.mc.num_continuations = num_continuations
    cfg.judge.noise = judge_noise
    cfg.progress = False
    return cfg


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    cfg = _config(40, 8, 0.3)
    out = str(tmp_path_factory.mktemp("noisy"))
    stats = run(cfg, out)
    return out, stats, ShardStore(out).read_records()


def test_hybrid_never_adds_judge_mistakes(noisy_run):
    _, _, records = noisy_run
    for r in records:
        judge, hybrid = r.meta["labels_by_rule"]["judge"], r.meta["labels_by_rule"]["hybrid"]
        # hybrid (disagree="neutral") supervises a subset of the judge's steps, with the judge's label
        assert all(h is None or h == j for h, j in zip(hybrid, judge))


def test_hybrid_beats_or_matches_judge_only_under_a_noisy_judge(noisy_run):
    _, stats, records = noisy_run
    rep = evaluate(records)
    assert rep == stats["report"]
    assert rep["records_with_ground_truth"] == len(records) > 40
    assert rep["traces_with_error"] > 0
    m = rep["rules"]
    assert m["judge"]["wrong"] > 0  # the judge is noisy ...
    assert m["hybrid"]["wrong"] <= m["judge"]["wrong"]  # ... hybrid only drops judge labels (guaranteed)
    assert m["hybrid"]["labelled"] <= m["judge"]["labelled"]
    assert m["hybrid"]["accuracy"] >= m["judge"]["accuracy"]  # and MC catches the judge's mistakes
    for rule in ("mc", "judge", "hybrid", "vlprm_v2"):
        assert 0.0 <= m[rule]["coverage"] <= 1.0 and 0.0 <= m[rule]["neg"]["f1"] <= 1.0
    assert m["mc"]["coverage"] == 1.0  # MC labels every step (no early stop)


def test_noise_free_judge_is_exact(tmp_path):
    stats = run(_config(12, 4, 0.0), str(tmp_path))
    m = stats["report"]["rules"]
    assert m["judge"]["accuracy"] == 1.0 and m["hybrid"]["accuracy"] == 1.0
    assert m["judge"]["first_error_match"] == 1.0


def test_report_cli(noisy_run, tmp_path, capsys):
    out, stats, _ = noisy_run
    js = str(tmp_path / "rep.json")
    assert main(["--records", out, "--json", js]) == 0
    printed = capsys.readouterr().out
    for rule in ("mc", "judge", "hybrid"):
        assert rule in printed
    assert json.load(open(js)) == json.loads(json.dumps(stats["report"]))
    assert format_table(stats["report"]).splitlines()[0].startswith("records")
    with pytest.raises(FileNotFoundError):
        main(["--records", str(tmp_path / "empty")])
