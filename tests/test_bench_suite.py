"""bench/accelerator_suite.py runs end to end in its smoke mode (tiny shapes on CPU): every bench in
its own process, one JSON and one table (issue 19 item 4)."""
import json

import pytest


@pytest.mark.slow
def test_accelerator_suite_smoke(tmp_path):
    from bench.accelerator_suite import main

    suite = main(["--smoke", "--out", str(tmp_path)])
    assert [r["name"] for r in suite["runs"]] == ["train_tiny", "score_tiny", "memory_tiny"]
    assert all(r["status"] == "ok" for r in suite["runs"]), [(r["name"], r["log_tail"][-500:]) for r in suite["runs"]]
    by = {r["name"]: r["result"] for r in suite["runs"]}
    assert by["train_tiny"]["jax"]["tokens_per_s"] > 0
    assert by["score_tiny"]["speedup_forward"] > 0 and by["score_tiny"]["hf"]["tokens_per_s"] > 0
    assert by["memory_tiny"]["fits"] in (True, False)
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved["device"].startswith("cpu") and saved["smoke"] is True
    md = (tmp_path / "suite.md").read_text()
    assert "| train_tiny | ok |" in md and "python bench/score_bench.py" in md


def test_suite_rejects_unknown_runs(tmp_path, capsys):
    from bench.accelerator_suite import main

    with pytest.raises(SystemExit):
        main(["--smoke", "--out", str(tmp_path), "--only", "nope"])
    assert "unknown run(s) ['nope']" in capsys.readouterr().err
