"""Multi-host training with real processes (issue 14): 2 OS processes x 2 CPU devices each, joined by
``jax.distributed`` (coordinator on 127.0.0.1, gloo cross-process collectives), every one running the
unchanged ``python -m jaxprm.train`` through ``launch/gpu_multihost.sh``.

Compared with one process x 4 devices on the same global batches and mesh; per-host data slices
checked by record id (``JAXPRM_RECORD_IDS_DIR``); the dataset import on process 0 only, with its
failure stopping everyone; SIGKILL of one host (the other exits promptly, a rerun resumes to the same
parameters) and SIGTERM on one host (every host saves, then stops); outputs written once.

Every launch is bounded: on timeout the harness kills all its processes and fails with their logs.
The checks on the shared 2-process run are marked slow (the run takes about a minute on 2 cores);
the failed-import check is not (a few seconds).
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxprm import checkpointing as ckpt

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "gpu_multihost.sh"
HOSTS, LOCAL_DEVICES = 2, 2
RUN_TIMEOUT = 420  # seconds for one launch of all processes (a hang fails the test with the logs)
HEARTBEAT = 15  # JAXPRM_HEARTBEAT_TIMEOUT: a silent process is declared dead after this long
N_TRAIN, N_EVAL, VAL_FRACTION = 48, 9, 0.2  # 9 eval records: the hosts get 5 and 4 (uneven batch counts)
EPOCHS, BATCH = 2, 8  # 6 steps an epoch, 4 rows per host


# ------------------------------------------------------------------------------------------------
# harness
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, ids_dir: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "JAXPRM_", "XLA_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", JAXPRM_HEARTBEAT_TIMEOUT=str(HEARTBEAT),
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if ids_dir is not None:
        env["JAXPRM_RECORD_IDS_DIR"] = str(ids_dir)
    return env


class Run:
    """Processes started together; ``wait`` bounds them and ``logs`` reads what they wrote."""

    def __init__(self, procs, log_paths, t0):
        self.procs, self.log_paths, self.t0 = procs, log_paths, t0

    def log(self, i: int) -> str:
        return self.log_paths[i].read_text(errors="replace")

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"----- process {i} (rc={p.poll()}) {self.log_paths[i]} -----\n{self.log(i)[-tail:]}"
                         for i, p in enumerate(self.procs))

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the launcher exec's python: its own group
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float = RUN_TIMEOUT) -> list[int]:
        deadline = self.t0 + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill_all()
                pytest.fail(f"multi-host run did not finish within {timeout} s (killed):\n{self.logs()}")
        return [p.returncode for p in self.procs]

    def wait_for_line(self, i: int, pattern: str, timeout: float = RUN_TIMEOUT) -> None:
        deadline = self.t0 + timeout
        while not re.search(pattern, self.log(i), re.M):
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                self.kill_all()
                pytest.fail(f"process {i} never logged {pattern!r}:\n{self.logs()}")
            time.sleep(0.2)


def launch(workdir: Path, args: list[str], *, hosts: int = HOSTS, local: int = LOCAL_DEVICES,
           ids_dir: Path | None = None) -> Run:
    """``hosts`` processes of ``launch/gpu_multihost.sh configs/tiny.py --config.workdir=... args``."""
    port = free_port()
    workdir.parent.mkdir(parents=True, exist_ok=True)
    procs, paths = [], []
    for i in range(hosts):
        path = workdir.parent / f"{workdir.name}.process{i}.{int(time.time() * 1000)}.log"
        env = {**_env(local, ids_dir), "COORDINATOR": f"127.0.0.1:{port}", "NUM_HOSTS": str(hosts),
               "HOST_ID": str(i)}
        with open(path, "w") as f:
            procs.append(subprocess.Popen(["bash", str(LAUNCHER), "configs/tiny.py", f"--config.workdir={workdir}",
                                           *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        paths.append(path)
    return Run(procs, paths, time.time())


# One process with HOSTS * LOCAL_DEVICES devices fed the same global batches as the multi-host run:
# each host's slice is read and batched as that host reads it (shard i of HOSTS, batch_size / HOSTS
# rows), padded to a common bucket and concatenated in process order -- the layout
# jax.make_array_from_process_local_data gives the hosts' rows. Evaluation: a host whose slice is used
# up adds rows of padding, as jaxprm.train.evaluate does.
_REFERENCE = """
import dataclasses, sys
import numpy as np
from jaxprm import train as t
from jaxprm.data import pipeline as p

HOSTS, LOCAL = {hosts}, {local}
make_loader = p.make_loader


class MergedIterator:
    def __init__(self, its, split, cfg, model_config):
        self.its, self.split, self.cfg, self.model_config = its, split, cfg, model_config

    def __next__(self):
        bs = []
        for it in self.its:
            try:
                bs.append(next(it))
            except StopIteration:
                bs.append(None)
        if all(b is None for b in bs) or (self.split == "train" and any(b is None for b in bs)):
            raise StopIteration
        bs = [None if b is None else t._pad_rows(b, -(-b["input_ids"].shape[0] // LOCAL) * LOCAL) for b in bs]
        have = [b for b in bs if b is not None]
        seq = max(b["input_ids"].shape[1] for b in have)
        pat = max(b["pixel_values"].shape[1] for b in have)
        rows = max(b["input_ids"].shape[0] for b in have)
        out = []
        for b in bs:
            if b is None:
                spec = p.batch_spec(dataclasses.replace(self.cfg, batch_size=rows), self.model_config, seq, pat)
                b = {{k: np.full(s, -1 if k == "labels" else 0, d) for k, (s, d) in spec.items()}}
            out.append(t._pad_rows(p.pad_batch(b, seq, pat), rows))
        return {{k: np.concatenate([b[k] for b in out], axis=1 if k == "position_ids" else 0) for k in out[0]}}

    @property
    def stats(self):  # what process 0 of a multi-host run logs: its own loader's counters
        return self.its[0].stats

    def get_state(self):
        return {{"shards": [it.get_state() for it in self.its]}}

    def set_state(self, state):
        for it, s in zip(self.its, state["shards"]):
            it.set_state(s)


class Merged:
    def __init__(self, loaders, split, cfg, model_config):
        self.loaders, self.split, self.cfg, self.model_config = loaders, split, cfg, model_config

    def __iter__(self):
        return MergedIterator([iter(l) for l in self.loaders], self.split, self.cfg, self.model_config)


def merged_loader(data, split, tok, ip, model_config, cfg, **kw):
    one = dataclasses.replace(cfg, batch_size=cfg.batch_size // HOSTS, shard_count=HOSTS)
    return Merged([make_loader(data, split, tok, ip, model_config, dataclasses.replace(one, shard_index=i), **kw)
                   for i in range(HOSTS)], split, one, model_config)


p.make_loader = merged_loader
t.main(sys.argv)
"""


def run_reference(workdir: Path, args: list[str], ids_dir: Path, *, hosts: int = HOSTS,
                  local: int = LOCAL_DEVICES) -> subprocess.CompletedProcess:
    """One process with ``hosts * local`` devices, fed the global batches of ``hosts`` hosts."""
    env = _env(hosts * local, ids_dir)
    try:
        r = subprocess.run([sys.executable, "-c", _REFERENCE.format(hosts=hosts, local=local),
                            "--config", "configs/tiny.py", f"--config.workdir={workdir}", *args],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the single-process reference run did not finish within {RUN_TIMEOUT} s:\n"
                    f"{(e.stderr or b'')[-4000:]}")
    assert r.returncode == 0, r.stderr[-4000:]
    return r


# ------------------------------------------------------------------------------------------------
# the runs the tests share
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict:
    """A records file whose hash split gives exactly N_TRAIN train and N_EVAL validation records."""
    from jaxprm.data.synthetic import generate_records, write_jsonl
    from jaxprm.data.tfds_builder import split_of

    fractions = [("train", 1 - VAL_FRACTION), ("validation", VAL_FRACTION)]
    picked = {"train": [], "validation": []}
    for r in generate_records(4 * (N_TRAIN + N_EVAL), seed=7, image_size=(56, 56),
                              question_types=("sum", "difference", "compare")):
        s = split_of(r.id, fractions)
        if len(picked[s]) < {"train": N_TRAIN, "validation": N_EVAL}[s]:
            picked[s].append(r)
    assert len(picked["train"]) == N_TRAIN and len(picked["validation"]) == N_EVAL
    path = tmp_path_factory.mktemp("records") / "recs.jsonl"
    write_jsonl(picked["train"] + picked["validation"], str(path))
    return {"path": path, "train": [r.id for r in picked["train"]], "validation": [r.id for r in picked["validation"]]}


def train_args(records: dict, **over) -> list[str]:
    a = {"data.source": "records", "data.records": str(records["path"]), "data.format": "jsonl",
         "data.val_fraction": VAL_FRACTION, "train.batch_size": BATCH, "train.epochs": EPOCHS,
         "train.max_steps": 0, "train.save_every": 2, "train.log_every": 1, "train.eval_every": 1000,
         "train.progress": True, "train.export": True, "mesh.data": 2, "mesh.fsdp": 2}
    a.update(over)
    return [f"--config.{k}={v}" for k, v in a.items()]


TOTAL_STEPS = EPOCHS * N_TRAIN // BATCH


@pytest.fixture(scope="module")
def base(tmp_path_factory, records) -> dict:
    """The uninterrupted 2-process run every check compares with."""
    root = tmp_path_factory.mktemp("mh")
    run = launch(root / "w", train_args(records), ids_dir=root / "ids")
    rcs = run.wait()
    assert rcs == [0] * HOSTS, run.logs()
    return {"workdir": root / "w", "ids": root / "ids", "run": run, "logs": [run.log(i) for i in range(HOSTS)],
            "seconds": time.time() - run.t0}


def _params(workdir: Path) -> dict:
    model, _, _ = ckpt.load_prm_model(str(workdir))
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_params_equal(a: Path, b: Path) -> None:
    pa = jax.tree_util.tree_leaves_with_path(_params(a))
    pb = jax.tree_util.tree_leaves_with_path(_params(b))
    assert len(pa) == len(pb) > 10
    for (path, x), (_, y) in zip(pa, pb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _ids(ids_dir: Path, split: str, shard: int, hosts: int = HOSTS) -> list[list[str]]:
    f = ids_dir / f"{split}.shard-{shard}-of-{hosts}.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------
# 2 x 2 vs 1 x 4: the parameters after 12 Adam steps (lr 3e-3, weights ~0.02) may differ by this much.
# Why not bit for bit: the gradient all-reduce over the 4 devices runs through gloo across processes
# and through XLA's in-process all-reduce in one process, and the two add the devices' float32
# partial sums in different orders (about 1 ulp per step). Adam divides by sqrt(v), so in entries
# with near-zero gradients that rounding becomes a small part of an lr-sized step. Measured: at most
# 6e-7 (3.6e-5 of the leaf's largest weight), losses equal to 1e-7 relative; the bound is 8x that.
PARAMS_ATOL, METRICS_RTOL = 5e-6, 1e-6


@pytest.mark.slow
def test_two_hosts_train_like_one_host_with_four_devices(base, records, tmp_path):
    """2 processes x 2 devices == 1 process x 4 devices with the same global batches and the same
    (data=2, fsdp=2) mesh: the same parameters up to float32 summation order (PARAMS_ATOL) and the
    same metrics (eval counts exactly)."""
    ref = tmp_path / "ref"
    run_reference(ref, train_args(records), tmp_path / "ref_ids")
    # the reference really saw the hosts' batches: the same ids, batch by batch, shard by shard
    for split in ("train", "validation"):
        for shard in range(HOSTS):
            assert _ids(tmp_path / "ref_ids", split, shard) == _ids(base["ids"], split, shard), (split, shard)
    a = jax.tree_util.tree_leaves_with_path(_params(base["workdir"]))
    b = jax.tree_util.tree_leaves_with_path(_params(ref))
    assert len(a) == len(b) > 10
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_allclose(x, y, atol=PARAMS_ATOL, rtol=0, err_msg=jax.tree_util.keystr(path))
    m_mh = json.loads((base["workdir"] / "final_metrics.json").read_text())
    m_ref = json.loads((ref / "final_metrics.json").read_text())
    assert m_mh["step"] == m_ref["step"] == TOTAL_STEPS
    assert "eval/loss" in m_mh and "train/loss" in m_mh
    for k in m_ref:
        if not k.startswith("perf/"):
            np.testing.assert_allclose(m_mh[k], m_ref[k], rtol=METRICS_RTOL, err_msg=k)
    for k in ("eval/acc", "eval/macro_f1", "eval/steps", "train/acc"):  # counts: exact
        assert m_mh[k] == m_ref[k], k


@pytest.mark.slow  # two runs of about a minute each on 2 cores
def test_four_hosts_of_one_device_train_like_one_host_with_four(records, tmp_path):
    """4 processes x 1 device on the (data=2, fsdp=2) mesh, one epoch: each host reads its own
    quarter of the records (every record once), and the parameters and metrics equal those of one
    process x 4 devices fed the same global batches (up to float32 summation order, as for 2 x 2)."""
    hosts = 4
    args = train_args(records, **{"train.epochs": 1})
    run = launch(tmp_path / "mh4", args, hosts=hosts, local=1, ids_dir=tmp_path / "ids4")
    assert run.wait() == [0] * hosts, run.logs()
    run_reference(tmp_path / "ref4", args, tmp_path / "ref4_ids", hosts=hosts, local=1)
    shards = [_ids(tmp_path / "ids4", "train", i, hosts) for i in range(hosts)]
    assert all(len(b) == BATCH // hosts for batches in shards for b in batches)
    every = collections.Counter(x for batches in shards for b in batches for x in b)
    assert sorted(every) == sorted(records["train"]) and set(every.values()) == {1}  # disjoint, covering
    for split in ("train", "validation"):
        for i in range(hosts):
            assert _ids(tmp_path / "ref4_ids", split, i, hosts) == _ids(tmp_path / "ids4", split, i, hosts), (split, i)
    a = jax.tree_util.tree_leaves_with_path(_params(tmp_path / "mh4"))
    b = jax.tree_util.tree_leaves_with_path(_params(tmp_path / "ref4"))
    assert len(a) == len(b) > 10
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_allclose(x, y, atol=PARAMS_ATOL, rtol=0, err_msg=jax.tree_util.keystr(path))
    m_mh = json.loads((tmp_path / "mh4" / "final_metrics.json").read_text())
    m_ref = json.loads((tmp_path / "ref4" / "final_metrics.json").read_text())
    assert m_mh["step"] == m_ref["step"] == N_TRAIN // BATCH
    for k in m_ref:
        if not k.startswith("perf/"):
            np.testing.assert_allclose(m_mh[k], m_ref[k], rtol=METRICS_RTOL, err_msg=k)
    for k in ("eval/acc", "eval/macro_f1", "eval/steps", "train/acc"):
        assert m_mh[k] == m_ref[k], k
    wrote = [("tfds_builder: wrote" in run.log(i)) for i in range(hosts)]
    assert wrote == [True] + [False] * (hosts - 1)  # imported once, on process 0


@pytest.mark.slow  # the shared 2-process run (`base`) takes about a minute
def test_hosts_read_disjoint_slices_that_cover_each_epoch(base, records):
    per_epoch = N_TRAIN // BATCH
    shards = [_ids(base["ids"], "train", i) for i in range(HOSTS)]
    for i, batches in enumerate(shards):
        assert len(batches) == TOTAL_STEPS and all(len(b) == BATCH // HOSTS for b in batches), (i, batches)
    for e in range(EPOCHS):
        seen = [set(x for b in batches[e * per_epoch:(e + 1) * per_epoch] for x in b) for batches in shards]
        assert not seen[0] & seen[1]  # disjoint
        every = collections.Counter(x for batches in shards for b in batches[e * per_epoch:(e + 1) * per_epoch]
                                    for x in b)
        assert sorted(every) == sorted(records["train"]) and set(every.values()) == {1}, e  # each exactly once
    assert shards[0][:per_epoch] != shards[0][per_epoch:]  # reshuffled per epoch
    ev = [[x for b in _ids(base["ids"], "validation", i) for x in b] for i in range(HOSTS)]
    assert sorted(ev[0] + ev[1]) == sorted(records["validation"]) and len(ev[0]) != len(ev[1])


@pytest.mark.slow  # the shared 2-process run (`base`) takes about a minute
def test_records_import_runs_once_on_process_0(base, records):
    from jaxprm.data.tfds_builder import read_metadata

    wrote = [("tfds_builder: wrote" in log) for log in base["logs"]]
    assert wrote == [True] + [False] * (HOSTS - 1), base["run"].logs()
    for log in base["logs"][1:]:
        assert "waits for process 0: building the dataset" in log
    assert read_metadata(str(base["workdir"] / "data"))["source"]["rows"] == N_TRAIN + N_EVAL
    # one dataset, read by every host (the id check above covers what they read)
    assert len([p for p in (base["workdir"] / "data").glob("*/*") if not p.name.startswith(".")]) == 1


def test_failed_import_on_process_0_stops_every_process(tmp_path, records):
    """No records usable: process 0's build fails; every process exits 1 with that error, promptly."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": \n' * 3)  # every row malformed
    run = launch(tmp_path / "w", train_args(records, **{"data.records": str(bad)}))
    rcs = run.wait(timeout=120)
    assert rcs == [1] * HOSTS, run.logs()
    err0 = re.search(r"process 0 of 2 failed: (.*)", run.log(0))
    assert err0, run.logs()
    for i in range(1, HOSTS):
        assert f"process 0 failed while building the dataset in {tmp_path / 'w' / 'data'}" in run.log(i), run.logs()
        assert err0.group(1).split(":")[0] in run.log(i)  # process 0's error, named on the others
    assert not (tmp_path / "w" / "checkpoints").exists() or not os.listdir(tmp_path / "w" / "checkpoints")


def _step_dirs(workdir: Path) -> list[int]:
    d = workdir / ckpt.CHECKPOINTS
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.mark.slow
def test_sigkill_of_one_host_stops_the_other_and_a_rerun_resumes(base, records, tmp_path):
    """SIGKILL process 1 mid-run: process 0 exits within the heartbeat timeout (not a hang on a
    collective) saying another process died; rerunning both resumes from the last complete
    checkpoint and ends with the parameters of the uninterrupted run."""
    w = tmp_path / "w"
    args = train_args(records, **{"train.progress": False, "train.export": False})
    run = launch(w, args)
    run.wait_for_line(1, r"jaxprm.train: step 3 ")
    os.kill(run.procs[1].pid, signal.SIGKILL)
    t_kill = time.time()
    rcs = run.wait(timeout=time.time() - run.t0 + 2 * HEARTBEAT + 30)
    took = time.time() - t_kill
    # process 0 is either in a small collective of its own (a gloo error at once: jaxprm's message,
    # status 1) or inside the compiled step's collectives, which wait; then JAX's heartbeat check ends
    # it after JAXPRM_HEARTBEAT_TIMEOUT with its own message (abort, status 134)
    assert rcs[1] == -signal.SIGKILL and rcs[0] in (1, -signal.SIGABRT), run.logs()
    assert took < HEARTBEAT + 20, f"process 0 needed {took:.0f} s to stop\n{run.logs()}"
    assert ("process 0 of 2 lost contact with the other processes" in run.log(0)
            or "This most likely indicates that another task died" in run.log(0)), run.logs()
    last = max(_step_dirs(w))
    assert 2 <= last < TOTAL_STEPS

    rerun = launch(w, args)
    assert rerun.wait() == [0] * HOSTS, rerun.logs()
    resumed = re.search(r"resumed from .* at step (\d+)", rerun.log(0))
    assert resumed and int(resumed.group(1)) >= 2, rerun.logs()
    assert f"resumed from {w / 'checkpoints'} at step {resumed.group(1)}" in rerun.log(1)
    _assert_params_equal(base["workdir"], w)


@pytest.mark.slow
def test_sigterm_on_one_host_saves_on_every_host(base, records, tmp_path):
    """SIGTERM (a TPU preemption notice) reaches process 1 only: both processes save the same step and
    exit 143; the data position of each host is in the checkpoint, and a rerun finishes with the
    parameters of the uninterrupted run."""
    w = tmp_path / "w"
    args = train_args(records, **{"train.progress": False, "train.export": False, "train.save_every": 100})
    run = launch(w, args)
    run.wait_for_line(1, r"jaxprm.train: step 3 ")
    os.kill(run.procs[1].pid, signal.SIGTERM)
    assert run.wait() == [143] * HOSTS, run.logs()
    stopped = [re.search(r"stopped at step (\d+)", run.log(i)) for i in range(HOSTS)]
    assert all(stopped), run.logs()
    step = int(stopped[0].group(1))
    assert {int(s.group(1)) for s in stopped} == {step} and 3 <= step < TOTAL_STEPS
    assert "received SIGTERM" in run.log(1) and "another process received SIGTERM" in run.log(0)
    assert _step_dirs(w) == [step]  # save_every=100: only the save the signal asked for
    data = json.loads((w / ckpt.CHECKPOINTS / str(step) / "data" / "metadata").read_text())
    assert len(data["processes"]) == HOSTS  # each host's own data position
    assert all(d["stats"]["num_batches"] == step for d in data["processes"])  # the batches trained, not one more

    rerun = launch(w, args)
    assert rerun.wait() == [0] * HOSTS, rerun.logs()
    assert f"at step {step} of {TOTAL_STEPS}" in rerun.log(0)
    _assert_params_equal(base["workdir"], w)


def _tb_scalars(events_dir: Path) -> collections.Counter:
    """tag -> number of values in the TensorBoard event files (TFRecord framing, tensorboardX protos)."""
    from tensorboardX.proto import event_pb2

    counts = collections.Counter()
    for f in events_dir.iterdir():
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                counts[v.tag] += 1
    return counts


@pytest.mark.slow  # the shared 2-process run (`base`) takes about a minute
def test_events_progress_eval_and_export_are_written_once(base):
    w, logs = base["workdir"], base["logs"]
    events = list((w / "events").iterdir())
    assert len(events) == 1, events  # one writer: process 0's
    tb = _tb_scalars(w / "events")
    assert tb["train/loss"] == TOTAL_STEPS and tb["eval/loss"] == 1, tb  # log_every=1; the final eval
    bars = [len(re.findall(r"train: +\d+%", log)) > 0 for log in logs]
    assert bars == [True] + [False] * (HOSTS - 1)
    exported = ["exported the PRM to" in log for log in logs]
    assert exported == [True] + [False] * (HOSTS - 1)
    assert (w / "export" / "prm.json").exists() and (w / "export" / "model.safetensors").exists()
    assert not [p for p in w.iterdir() if p.name.startswith(".export")]  # no second, half-written export
    # the export holds the trained parameters (gathered from the fsdp shards of both hosts)
    model, _, _ = ckpt.load_prm_model(str(w / "export"))
    trained = _params(w)
    exp = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(trained), jax.tree_util.tree_leaves_with_path(exp)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
