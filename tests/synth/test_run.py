"""The pipeline: outputs, resume after a kill, sharding, CLI."""
import json
from pathlib import Path

import pytest

from jaxprm.data.formats import read_records
from jaxprm.synth.__main__ import main
from jaxprm.synth.config import load_config
from jaxprm.synth.run import ShardStore, run

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "synth_tiny.py")


def tiny(n=8, **kw):
    cfg = load_config(CONFIG)
    cfg.num_questions = n
    cfg.mc.num_continuations = 4
    cfg.policy.malformed_rate = 0.3
    cfg.progress = False
    for k, v in kw.items():
        node = cfg
        *path, last = k.split("__")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _ids(path):
    return [json.loads(line)["id"] for line in open(path, encoding="utf-8")]


COUNTERS = ("n_records", "n_steps", "rollouts", "mc", "judge", "labels", "consensus", "questions_done")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    stats = run(tiny(), out)
    return out, stats


def test_outputs(reference):
    out, stats = reference
    st = ShardStore(out)
    recs = list(read_records(st.records_path))  # valid Record jsonl, readable by the data importers
    assert stats["complete"] and stats["questions_done"] == 8 == stats["questions_in_shard"]
    assert len(recs) == stats["n_records"] > 0
    ids = [r.id for r in recs]
    assert len(set(ids)) == len(ids)
    for r in recs:
        assert r.meta["label_rule"]["name"] == "hybrid"
        assert r.labels == r.meta["labels_by_rule"]["hybrid"]
        assert all(s.num_mc_total == 4 for s in r.steps)
        assert r.images and isinstance(r.images[0], bytes)
        assert r.meta["ground_truth"]["labels"][0] in (0, 1)
        assert 1 <= r.meta["synth"]["n_perception"] <= 12
    assert sum(stats["rollouts"]["malformed"].values()) > 0  # malformed outputs were counted and re-asked
    assert stats["rollouts"]["accepted"] == stats["n_records"]
    on_disk = json.load(open(st.stats_path))
    assert on_disk["n_records"] == stats["n_records"] and "report" in on_disk
    assert {e["id"] for e in map(json.loads, open(st.done_path))} == {r.meta["synth"]["question_id"] for r in recs}


class Kill(Exception):
    pass


def _kill_after(k):
    def hook(i, q):
        if i == k:
            raise Kill()
    return hook


def test_resume_after_kill_matches_uninterrupted_run(reference, tmp_path):
    ref_out, ref_stats = reference
    ref = ShardStore(ref_out)
    out = str(tmp_path)
    st = ShardStore(out)
    # 1) killed after 3 questions were written
    with pytest.raises(Kill):
        run(tiny(), out, hooks={"after_question": _kill_after(2)})
    assert len(_read(st.done_path).splitlines()) == 3
    partial = json.load(open(st.stats_path))
    assert not partial["complete"] and partial["questions_done"] == 3
    # 2) ... and the next question's records were being written when the process died
    with open(st.records_path, "ab") as f:
        f.write(_read(ref.records_path).splitlines(keepends=True)[-1][:57])
    # 3) rerun: resumes, skips the done questions, drops the partial line
    stats = run(tiny(), out)
    assert stats["skipped_done"] == 3 and stats["processed_this_run"] == 5
    assert stats["recovery"]["records_partial_line"] == 1
    assert _read(st.records_path) == _read(ref.records_path)
    assert _ids(st.done_path) == _ids(ref.done_path)
    for k in COUNTERS:
        assert stats[k] == ref_stats[k], k
    # 4) a rerun of a finished shard does nothing
    again = run(tiny(), out)
    assert again["processed_this_run"] == 0 and again["complete"]
    assert _read(st.records_path) == _read(ref.records_path)


def test_kill_between_records_and_done_line(reference, tmp_path):
    ref = ShardStore(reference[0])
    out = str(tmp_path)
    st = ShardStore(out)
    calls = []

    def before_done(entry):
        calls.append(entry["id"])
        if len(calls) == 4:
            raise Kill()

    with pytest.raises(Kill):
        run(tiny(), out, hooks={"before_done": before_done})
    n_done = len(_read(st.done_path).splitlines())
    assert n_done == 3 and len(_ids(st.records_path)) > 0
    # the done log itself was cut mid-line too
    with open(st.done_path, "ab") as f:
        f.write(b'{"id": "synthetic-s0-00')
    stats = run(tiny(), out)
    assert stats["recovery"]["records_dropped"] > 0 and stats["recovery"]["done_partial_line"] == 1
    assert _read(st.records_path) == _read(ref.records_path)
    assert _ids(st.done_path) == _ids(ref.done_path)


@pytest.mark.parametrize("by", ["hash", "index"])
def test_shards_are_disjoint_and_cover_everything(reference, tmp_path, by):
    ref = ShardStore(reference[0])
    out = str(tmp_path)
    stats = [run(tiny(shard_by=by), out, shard=(i, 2)) for i in range(2)]
    done = [set(_ids(ShardStore(out, i, 2).done_path)) for i in range(2)]
    assert done[0] and done[1] and not done[0] & done[1]
    assert done[0] | done[1] == set(_ids(ref.done_path))
    assert sum(s["questions_in_shard"] for s in stats) == 8
    # each question's records do not depend on the shard it ran in
    lines = {}
    for i in range(2):
        for line in open(ShardStore(out, i, 2).records_path, encoding="utf-8"):
            lines[json.loads(line)["id"]] = line
    ref_lines = {json.loads(line)["id"]: line for line in open(ref.records_path, encoding="utf-8")}
    assert lines == ref_lines


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "cli")
    argv = ["--config", CONFIG, "--config.num_questions=4", "--config.mc.num_continuations", "4",
            "--config.judge.noise=0.0", "--config.progress=false", "--out", out, "--shard", "0/1", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.splitlines()[0])
    assert summary["questions_done"] == 4 and summary["complete"]
    assert "hybrid" in printed and "accuracy" in printed
    cfg = json.load(open(ShardStore(out).config_path))
    assert cfg["num_questions"] == 4 and cfg["mc"]["num_continuations"] == 4 and cfg["judge"]["noise"] == 0.0
    assert main(argv + ["--overwrite"]) == 0
    for bad in (["--config.no_such_field=1"], ["--config.num_questions=many"], ["--shard", "2/2"],
                ["--config.policy.kind=human"]):
        with pytest.raises(SystemExit) as e:
            main(["--config", CONFIG, "--out", out, *bad])
        assert e.value.code == 2, bad  # a usage error, before any work


def test_skip_failing_questions(tmp_path):
    class Flaky:
        name = "flaky"

        def __init__(self):
            from jaxprm.synth.policies import ScriptedPuzzlePolicy

            self.inner = ScriptedPuzzlePolicy(malformed_rate=0.0)
            self.fail = True

        def usage_snapshot(self):
            return self.inner.usage_snapshot()

        def generate(self, requests):
            if self.fail and requests[0].question.id.endswith("1"):
                raise ConnectionError("boom")
            return self.inner.generate(requests)

    cfg = tiny(4, on_question_error="skip")
    pol = Flaky()
    stats = run(cfg, str(tmp_path), policy=pol)
    assert not stats["complete"] and len(stats["failed_this_run"]) == 1 and stats["questions_done"] == 3
    pol.fail = False
    stats = run(cfg, str(tmp_path), policy=pol)
    assert stats["complete"] and stats["processed_this_run"] == 1 and stats["questions_done"] == 4
    with pytest.raises(ConnectionError):
        run(tiny(4), str(tmp_path / "raise"), policy=Flaky())


def test_sigkill_mid_question_then_resume(reference, tmp_path):
    """A real kill -9 of the process after a question's records were written, before its done line."""
    import signal
    import subprocess
    import sys
    import textwrap

    ref = ShardStore(reference[0])
    out = str(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tests.synth.test_run import tiny
        from jaxprm.synth.run import run
        seen = []
        def before_done(entry):
            seen.append(entry["id"])
            if len(seen) == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        run(tiny(), {out!r}, hooks={{"before_done": before_done}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    st = ShardStore(out)
    assert len(_ids(st.done_path)) == 4
    stats = run(tiny(), out)
    assert stats["complete"] and stats["skipped_done"] == 4 and stats["recovery"]["records_dropped"] > 0
    assert _read(st.records_path) == _read(ref.records_path)
