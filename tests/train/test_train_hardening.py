"""Training under bad input and interruptions (issue 12): malformed record rows are skipped and
counted, a corrupt newest checkpoint falls back to an older one, SIGINT saves and exits like SIGTERM
with a status that says "stopped"."""
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jaxprm import checkpointing as ckpt
from jaxprm.data.synthetic import generate_records, write_jsonl
from tests.train.test_train import _tiny_config, train_

REPO = Path(__file__).resolve().parents[2]


def test_records_source_skips_malformed_rows(tmp_path, caplog):
    """data.source=records: malformed rows are skipped with a count, the first reasons in the log and
    every kept reason in the dataset's metadata.json (the README's rule), not the end of the run."""
    from jaxprm.data.tfds_builder import read_metadata, split_sizes
    from jaxprm.train import prepare_data

    path = tmp_path / "recs.jsonl"
    write_jsonl(generate_records(12, seed=5, image_size=(56, 56)), str(path))
    lines = path.read_text().splitlines()
    bad_step = json.loads(lines[3])
    bad_step["steps"] = "not a list"
    lines[3] = json.dumps(bad_step)
    lines.insert(5, '{"id": "broken", "question": ')  # invalid JSON
    path.write_text("\n".join(lines) + "\n")

    c = _tiny_config(str(tmp_path / "w"))
    c.data.source, c.data.records, c.data.format, c.data.val_fraction = "records", str(path), "jsonl", 0.0
    with caplog.at_level(logging.WARNING, logger="jaxprm.train"):
        data_dir = prepare_data(c)
    assert split_sizes(data_dir)["train"] == 11
    msg = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(msg) == 1 and "skipped 2 of 13 rows" in msg[0] and "recs.jsonl:4" in msg[0] and "recs.jsonl:6" in msg[0], msg
    src = read_metadata(data_dir)["source"]
    assert src["rows"] == 13 and src["skipped"] == 2 and src["format"] == "jsonl"
    assert [r.split(":")[1] for r in (os.path.basename(x) for x in src["reasons"])] == ["4", "6"], src["reasons"]


def _corrupt(step_dir: Path) -> None:
    """Truncate every array file of the params item (what a half-written or damaged disk leaves)."""
    files = [f for f in (step_dir / "params").rglob("*") if f.is_file() and f.stat().st_size > 0]
    assert files, list((step_dir / "params").rglob("*"))
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 3)


def test_resume_falls_back_past_a_corrupt_checkpoint_and_resume_step_picks_one(tmp_path, caplog):
    from jaxprm.train import TrainingError

    c = _tiny_config(str(tmp_path / "w"), max_steps=4, save_every=2)
    assert train_(c)["step"] == 4
    ck = Path(c.workdir) / ckpt.CHECKPOINTS
    _corrupt(ck / "4")

    # the newest step does not restore: resume from step 2, say so, and keep the bad step aside
    c.train.max_steps = 6
    with caplog.at_level(logging.WARNING, logger="jaxprm.train"):
        assert train_(c)["step"] == 6
    logs = [r.getMessage() for r in caplog.records]
    assert any("checkpoint step 4" in m and "cannot be restored" in m for m in logs), logs
    assert any("resuming from step 2, not the newest step 4 (unrestorable: 4)" in m for m in logs), logs
    aside = os.listdir(Path(c.workdir) / "checkpoints_set_aside")
    assert len(aside) == 1 and aside[0].startswith("4-unrestorable-"), aside
    assert sorted(int(s) for s in os.listdir(ck) if s.isdigit()) == [2, 4, 6]

    # --config.train.resume_step picks a step; an absent one is an error naming those there are
    caplog.clear()
    c.train.resume_step = 4
    with caplog.at_level(logging.INFO, logger="jaxprm.train"):
        m = train_(c)
    assert m["step"] == 6 and not m.get("already_done")
    assert any("resumed from" in r.getMessage() and "at step 4" in r.getMessage() for r in caplog.records)
    c.train.resume_step = 3
    with pytest.raises(TrainingError, match=r"resume_step=3: no such checkpoint .*\[2, 4, 6\]"):
        train_(c)


def test_resume_step_is_validated(tmp_path):
    from jaxprm.train import ConfigError, validate_config

    c = _tiny_config(str(tmp_path), resume_step=-1)
    with pytest.raises(ConfigError, match="train.resume_step must be >= 0"):
        validate_config(c)


def test_sigint_is_handled_like_sigterm():
    from jaxprm.train import _Stop

    before = signal.getsignal(signal.SIGINT)
    with _Stop() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # without a handler: KeyboardInterrupt here
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the save
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


_CLI_WITH_SIGNAL = """
import os, signal, sys
from jaxprm import train as t
orig = t.train
def train(c):
    return orig(c, step_hook=lambda s: os.kill(os.getpid(), signal.{sig}) if s == 2 else None)
t.train = train
t.main(sys.argv)
"""


def test_cli_stopped_by_sigint_saves_and_exits_130(tmp_path):
    """``python -m jaxprm.train`` stopped by Ctrl-C finishes the step, saves it and exits with
    128 + SIGINT (SIGTERM: 143), not 0 or 1, so a scheduler can tell "stopped, resumable" apart."""
    from jaxprm.train import stopped_exit_status

    assert stopped_exit_status(signal.SIGTERM) == 143
    sig, status = "SIGINT", 130
    w = tmp_path / "w"
    r = subprocess.run([sys.executable, "-c", _CLI_WITH_SIGNAL.format(sig=sig), "--config", "configs/tiny.py",
                        f"--config.workdir={w}", "--config.train.max_steps=50", "--config.train.progress=False",
                        "--config.train.export=True", "--config.data.synthetic_train=48",
                        "--config.data.synthetic_eval=16"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == status, r.stderr[-3000:]
    assert f"received {sig}" in r.stderr and "stopped at step 2" in r.stderr, r.stderr[-3000:]
    assert sorted(os.listdir(w / ckpt.CHECKPOINTS)) == ["2"]
    assert not (w / "export").exists()  # stopped, not finished: no export yet
