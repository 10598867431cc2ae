"""Training on 8 virtual CPU devices: sharding, gradient accumulation, kill-and-resume, learning."""
import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprm import checkpointing as ckpt
from jaxprm import sharding as shd
from jaxprm.data.pipeline import PipelineConfig, make_loader
from jaxprm.data.preprocess import ImageProcessor
from jaxprm.data.synthetic import build_synthetic_tokenizer, generate_records, tiny_model_config
from jaxprm.data.tfds_builder import build_dataset
from jaxprm.models.prm import PRMModel
from jaxprm.models.qwen2_5_vl import Qwen25VL
from jaxprm.train_step import init_train_state, jit_train_step, make_train_step, split_params

assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = build_synthetic_tokenizer()
    cfg = tiny_model_config(tok)
    d = str(tmp_path_factory.mktemp("data"))
    recs = generate_records(24, seed=3, image_size=(56, 56))
    build_dataset({"train": recs}, d, progress=False)
    ip = ImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 64)
    loader = make_loader(d, "train", tok, ip, cfg, PipelineConfig(batch_size=8, seq_buckets=(512,), patch_buckets=(16,),
                                                                  max_steps=10, max_images=1, shuffle=False))
    batch = next(iter(loader))
    assert (batch["labels"] >= 0).sum() > 10 and (batch["labels"] == 0).any()
    return tok, cfg, batch


def _run_step(cfg, tok, batch, mesh, accum=1, steps=1, freeze_vision=False):
    """Plain SGD: an elementwise update, so parameter differences are gradient differences (Adam
    would turn float noise in near-zero gradients into +-lr steps)."""
    model = PRMModel(Qwen25VL(cfg, rngs=nnx.Rngs(0)), ckpt.default_spec(tok))
    graphdef, trainable, frozen = split_params(model, freeze_vision)
    opt = optax.sgd(0.5)
    state, state_sh = init_train_state(trainable, frozen, opt, mesh)
    step = jit_train_step(make_train_step(graphdef, opt, accum=accum), state_sh)
    for _ in range(steps):
        state, metrics = step(state, shd.shard_batch(batch, mesh))
    return jax.device_get(nnx.to_pure_dict(state["trainable"])), jax.device_get(metrics)


def _assert_trees_close(a, b, atol):
    for (pa, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(pa))


def test_sharded_step_equals_unsharded(setup):
    tok, cfg, batch = setup
    one = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    eight = shd.make_mesh(data=2, fsdp=2, tensor=2)
    p1, m1 = _run_step(cfg, tok, batch, one, steps=2)
    p8, m8 = _run_step(cfg, tok, batch, eight, steps=2)
    # something is really sharded
    sh = shd.param_shardings(nnx.state(PRMModel(Qwen25VL(cfg), ckpt.default_spec(tok)), nnx.Param), eight)
    assert any(s.spec != jax.sharding.PartitionSpec(*([None] * len(s.spec))) for s in jax.tree.leaves(sh))
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    _assert_trees_close(p1, p8, atol=2e-5)


def test_grad_accumulation_equals_big_batch(setup):
    tok, cfg, batch = setup
    mesh = shd.make_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:2])
    big, mb = _run_step(cfg, tok, batch, mesh, accum=1)
    acc, ma = _run_step(cfg, tok, batch, mesh, accum=4)
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)
    assert int(mb["steps"]) == int(ma["steps"])
    _assert_trees_close(big, acc, atol=1e-5)


def test_frozen_vision_does_not_move(setup):
    tok, cfg, batch = setup
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trained, _ = _run_step(cfg, tok, batch, mesh, freeze_vision=True)
    assert "visual" not in trained["backbone"]


def _tiny_config(workdir, **train):
    from configs import tiny

    c = tiny.get_config()
    c.workdir = workdir
    c.data.synthetic_train, c.data.synthetic_eval = 48, 16
    c.train.batch_size = 8
    c.train.progress = False
    c.train.export = False
    c.train.async_checkpoint = True
    c.train.eval_every = 1000
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


class Killed(Exception):
    pass


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_kill_and_resume_matches_uninterrupted(tmp_path, param_dtype):
    """Also with bf16 weights: stochastic rounding draws its bits from (seed, step), so the resumed
    run rounds exactly as the uninterrupted one."""
    from jaxprm.train import train

    full = _tiny_config(str(tmp_path / "full"), max_steps=9, save_every=3)
    full.model.param_dtype = param_dtype
    m_full = train(full)
    assert m_full["step"] == 9

    part = _tiny_config(str(tmp_path / "part"), max_steps=9, save_every=3)
    part.model.param_dtype = param_dtype

    def kill_at_7(step):
        if step == 7:
            raise Killed  # dies after step 7; last complete checkpoint is step 6

    with pytest.raises(Killed):
        train(part, step_hook=kill_at_7)
    m_resumed = train(part)
    assert m_resumed["step"] == 9
    a = jax.tree.leaves(_params(str(tmp_path / "full")))
    b = jax.tree.leaves(_params(str(tmp_path / "part")))
    assert len(a) == len(b) > 10
    for x in a:  # trained and saved in param_dtype (the loader hands them back as fp32)
        np.testing.assert_array_equal(np.asarray(x).astype(param_dtype).astype(np.float32), x)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _params(workdir):
    model, _, _ = ckpt.load_prm_model(workdir)
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_config_validation_messages(tmp_path):
    from jaxprm.train import ConfigError, validate_config

    c = _tiny_config(str(tmp_path))
    c.train.grad_accum = 3
    c.model.remat = "sometimes"
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    assert "divisible by train.grad_accum" in str(e.value) and "model.remat" in str(e.value)
    c = _tiny_config(str(tmp_path))
    c.model.init = "hf"
    with pytest.raises(ConfigError, match="model.hf_dir"):
        validate_config(c)


def test_config_choices_come_from_their_modules(tmp_path, monkeypatch):
    """Adding a preset, a label rule or a remat policy is one edit, in the module that owns it."""
    from jaxprm.data import labels
    from jaxprm.models import remat
    from jaxprm.models.qwen2_5_vl import presets
    from jaxprm.train import ConfigError, validate_config

    c = _tiny_config(str(tmp_path))
    c.model.preset, c.model.hf_dir = "qwen2.5-vl-1b", str(tmp_path)
    c.data.label_rule = "majority"
    c.model.remat = "offload"
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    assert [p.split()[1] for p in str(e.value).splitlines()[1:]] == ["model.init='random'", "model.remat",
                                                                     "data.label_rule"]
    monkeypatch.setitem(presets.HF_CONFIGS, "qwen2.5-vl-1b", presets.HF_CONFIGS["qwen2.5-vl-3b"])
    monkeypatch.setitem(labels.LABEL_RULES, "majority", labels.LABEL_RULES["mc"])
    monkeypatch.setattr(remat, "NAMES", (*remat.NAMES, "offload"))
    validate_config(c)


def test_cli_config_errors(tmp_path):
    """``python -m jaxprm.train``: an override naming no field, or invalid values, is one message that
    lists every field to change, and exit status 2 (before any work)."""
    import subprocess
    import sys
    from pathlib import Path

    def cli(*overrides):
        r = subprocess.run([sys.executable, "-m", "jaxprm.train", "--config", "configs/tiny.py",
                            f"--config.workdir={tmp_path / 'w'}", *overrides], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[2], timeout=300)
        return r.returncode, r.stderr

    rc, err = cli("--config.train.batchsize=4", "--config.model.nope=1")
    assert rc == 2, err
    assert "--config.train.batchsize: config.train has no field 'batchsize'; did you mean --config.train.batch_size?" in err
    assert "--config.model.nope: config.model has no field 'nope'" in err
    rc, err = cli("--config.train.grad_accum=3", "--config.model.remat=sometimes")
    assert rc == 2 and err.startswith("invalid config:"), err
    assert "model.remat" in err and "divisible by train.grad_accum" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_7b_one_card"])
def test_real_configs_only_miss_user_paths(name):
    """The shipped real-size configs are valid apart from the paths only the user can give."""
    import importlib

    from jaxprm.train import ConfigError, validate_config

    c = importlib.import_module(f"configs.{name}").get_config()
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    problems = [ln for ln in str(e.value).splitlines()[1:]]
    assert len(problems) == 2 and "model.hf_dir" in problems[0] and "data.records" in problems[1], problems


def test_tiny_config_learns(tmp_path):
    """A short run of configs/tiny.py: the step loss and the auxiliary LM loss fall, and the export
    loads as a PRM that scores a held-out solution. (What the full run reaches through the API is
    checked by test_embedded_default_works_through_the_api.)"""
    from jaxprm.data.tfds_builder import read_records
    from jaxprm.train import train

    c = _tiny_config(str(tmp_path), eval_every=1000, log_every=10)
    c.data.synthetic_train, c.data.synthetic_eval = 480, 80
    c.train.export = True
    c.train.epochs = 1
    logs = []
    from jaxprm.metrics import TrainMetrics

    orig = TrainMetrics.log_train

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        logs.append(out)
        return out

    TrainMetrics.log_train = spy
    try:
        m = train(c)
    finally:
        TrainMetrics.log_train = orig
    assert m["step"] == 60 and len(logs) == 6
    assert logs[-1]["train/loss"] < logs[0]["train/loss"] - 0.05, [x["train/loss"] for x in logs]
    assert logs[-1]["train/lm_loss"] < logs[0]["train/lm_loss"] / 2, [x["train/lm_loss"] for x in logs]
    # the export loads as a PRM and scores a held-out solution
    import jaxprm

    prm = jaxprm.load_prm(os.path.join(c.workdir, "export"))
    rec = next(read_records(os.path.join(c.workdir, "data"), "validation"))
    scores = prm.score(rec.images[0], rec.question, [s.text for s in rec.steps])
    assert scores.shape == (len(rec.steps),) and np.all((scores >= 0) & (scores <= 1))


@pytest.mark.slow
def test_embedded_default_works_through_the_api(tmp_path):
    """The README's main command as shipped (configs/tiny.py, only the workdir moved), then the README's
    eval command: step macro-F1 >= 0.80 on 200 fresh puzzles scored through PRM.score_batch, and
    PRM-guided test-time scaling beats majority vote of the same noisy policy."""
    from configs import tiny
    from jaxprm.eval.run import main as eval_main
    from jaxprm.train import train

    c = tiny.get_config()
    c.workdir = str(tmp_path / "tiny")
    c.train.progress = False
    m = train(c)
    assert m["step"] == 600 and m["skipped_records"] == 0
    out = tmp_path / "eval"
    assert eval_main(["synthetic", "--prm", os.path.join(c.workdir, "export"), "--n", "200", "--search", "16",
                      "--out", str(out), "--no-progress"]) == 0
    res = json.load(open(out / "synthetic_results.json"))
    assert res["n_records"] == 200 and res["macro_f1"] >= 0.80, res["overall"]
    curves = res["search"]["curves"]
    at16 = {k: v["acc"][-1] for k, v in curves.items()}
    assert max(at16["bon_min"], at16["bon_last"]) > at16["majority"] + 0.05, at16
    assert res["search"]["guided"]["accuracy"] > res["search"]["accuracy_at_1"] + 0.05, res["search"]["guided"]


def test_training_prompt_is_the_scoring_prompt(tmp_path):
    """Train as you score: with the default prompt history, the batches the model trains on hold the
    exact token ids and label positions PRM.score builds for the same record (placeholders in every
    assistant turn), with the true labels supervised."""
    import dataclasses

    from jaxprm.data.tfds_builder import read_records
    from jaxprm.search.scorer import PRM
    from jaxprm.train import model_assets, pipeline_config, prepare_data

    c = _tiny_config(str(tmp_path))
    assert c.model.history == "placeholder"
    data_dir = prepare_data(c)
    cfg, tok, ip = model_assets(c)
    prm = PRM(PRMModel(Qwen25VL(cfg, rngs=nnx.Rngs(0)), ckpt.default_spec(tok)), tok, ip,
              system_prompt=c.model.system_prompt)
    pc = dataclasses.replace(pipeline_config(c, train=True, seed=0), shuffle=False, batch_size=4)
    batch = next(iter(make_loader(data_dir, "train", tok, ip, cfg, pc)))
    recs = list(read_records(data_dir, "train"))
    for r in range(4):
        rec = recs[int(batch["record_index"][r, 0])]
        enc = prm._encode(*prm._images(rec.images[0]), rec.question, [s.text for s in rec.steps])
        n = int(batch["num_tokens"][r])
        np.testing.assert_array_equal(batch["input_ids"][r, :n], enc.input_ids)
        k = len(enc.label_positions)
        np.testing.assert_array_equal(batch["label_positions"][r, :k], enc.label_positions)
        np.testing.assert_array_equal(batch["labels"][r, :k], [s.label for s in rec.steps])
    # teacher forcing is still there when asked for, and then differs from the scoring prompt
    c.model.history = "labels"
    pc = dataclasses.replace(pipeline_config(c, train=True, seed=0), shuffle=False, batch_size=4)
    forced = next(iter(make_loader(data_dir, "train", tok, ip, cfg, pc)))
    assert pc.label_mode == "train" and not np.array_equal(forced["input_ids"], batch["input_ids"])
    assert pipeline_config(c, train=False, seed=0).label_mode == "score"  # eval always scores as users do


def test_in_training_eval_is_what_the_api_gives(tmp_path):
    """The eval numbers training reports are those of PRM.score_batch on the exported PRM, over the
    same held-out records (VisualProcessBench step F1, threshold 0.5)."""
    import jaxprm
    from jaxprm.data.tfds_builder import read_records
    from jaxprm.eval import step_f1 as f1_lib

    c = _tiny_config(str(tmp_path), max_steps=4, export=True)
    m = train_(c)
    prm = jaxprm.load_prm(os.path.join(c.workdir, "export"))
    recs = list(read_records(os.path.join(c.workdir, "data"), "validation"))
    scores = prm.score_batch([(r.images[0], r.question, [s.text for s in r.steps]) for r in recs])
    api = f1_lib.step_f1(recs, scores=scores)["overall"]
    assert m["eval/steps"] == api["n_steps"] == sum(len(r.steps) for r in recs)
    assert m["eval/acc"] == pytest.approx(api["accuracy"], abs=1e-9)
    assert m["eval/macro_f1"] == pytest.approx(api["macro_f1"], abs=1e-9)
    spec = json.load(open(os.path.join(c.workdir, "export", "prm.json")))
    assert spec["history"] == "placeholder" and spec["task"]["image_size"] == [56, 56]


def train_(c, **kw):
    from jaxprm.train import train

    return train(c, **kw)


def test_a_run_that_trains_nothing_fails_and_exports_nothing(tmp_path):
    """Fewer training records than one batch: no step can be taken, so the run must not look fine."""
    from jaxprm.train import TrainingError

    c = _tiny_config(str(tmp_path), export=True, batch_size=16, epochs=1)
    c.data.synthetic_train = 8
    with pytest.raises(TrainingError, match="trained 0 steps"):
        train_(c)
    assert not os.path.exists(os.path.join(c.workdir, "export"))


def test_a_missing_package_stops_training(tmp_path, monkeypatch):
    """The same ImportError on every record stops the run with that error (not 0 steps and exit 0)."""
    from jaxprm.data import pipeline as pl

    def no_jinja(*a, **k):
        raise ImportError("apply_chat_template requires jinja2 to be installed")

    monkeypatch.setattr(pl, "encode_prm_example", no_jinja)
    c = _tiny_config(str(tmp_path), export=True)
    with pytest.raises(pl.SystemicDataError, match="jinja2"):
        train_(c)
    assert not os.path.exists(os.path.join(c.workdir, "export"))


def test_rerun_of_a_finished_workdir_says_done(tmp_path, caplog):
    import logging

    c = _tiny_config(str(tmp_path), max_steps=2, export=True)
    train_(c)
    assert set(ckpt.ITEMS) <= set(os.listdir(os.path.join(c.workdir, ckpt.CHECKPOINTS, "2")))  # the layout
    events = sorted(os.listdir(os.path.join(c.workdir, "events")))
    with caplog.at_level(logging.INFO, logger="jaxprm.train"):
        m = train_(c)
    assert m["already_done"] and m["step"] == 2
    first = json.load(open(os.path.join(c.workdir, "final_metrics.json")))
    assert {k: m[k] for k in first} == first and "eval/macro_f1" in first  # the final eval, not an older one
    assert any("already finished 2 steps" in r.getMessage() for r in caplog.records)
    assert not any("resumed" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(os.path.join(c.workdir, "events"))) == events  # no new events file


def test_no_validation_split_means_no_eval(tmp_path, caplog):
    """val_fraction=0 (or too few records for a validation split): train, save and export; no eval."""
    import logging

    from jaxprm.data.synthetic import write_jsonl

    recs = generate_records(16, seed=5, image_size=(56, 56))
    write_jsonl(recs, str(tmp_path / "recs.jsonl"))
    c = _tiny_config(str(tmp_path / "w"), max_steps=2, export=True, eval_every=1)
    c.data.source, c.data.records, c.data.format, c.data.val_fraction = "records", str(tmp_path / "recs.jsonl"), "jsonl", 0.0
    with caplog.at_level(logging.INFO, logger="jaxprm.train"):
        m = train_(c)
    assert m["step"] == 2 and not any(k.startswith("eval/") for k in m)
    assert os.path.exists(os.path.join(c.workdir, "export", "prm.json"))
    assert any("training without evaluation" in r.getMessage() for r in caplog.records)


def test_lm_token_mask_and_aux_loss(setup):
    """The auxiliary LM loss scores next tokens inside each example only: never padding, image
    placeholders or a step-label position (whose next token is the step's verdict); with grad
    accumulation it equals the big batch, as the step loss does."""
    import jax.numpy as jnp

    from jaxprm.models.prm import lm_token_mask

    tok, cfg, batch = setup
    m = np.asarray(lm_token_mask({k: jnp.asarray(v) for k, v in batch.items()}, cfg.image_token_id))
    seg, ids = batch["segment_ids"], batch["input_ids"]
    for r in range(seg.shape[0]):
        n = int(batch["num_tokens"][r])
        on = np.flatnonzero(m[r])
        assert on.max() < n - 1 and (ids[r, on + 1] != cfg.image_token_id).all()
        labelled = batch["label_positions"][r][batch["label_segment_ids"][r] > 0]
        assert not np.isin(labelled, on).any()
        expect = {t for t in range(n - 1) if ids[r, t + 1] != cfg.image_token_id} - set(labelled.tolist())
        assert set(on.tolist()) == expect

    def run(accum, weight):
        model = PRMModel(Qwen25VL(cfg, rngs=nnx.Rngs(0)), ckpt.default_spec(tok))
        graphdef, trainable, frozen = split_params(model, False)
        opt = optax.sgd(0.5)
        mesh = shd.make_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:2])
        state, state_sh = init_train_state(trainable, frozen, opt, mesh)
        step = jit_train_step(make_train_step(graphdef, opt, accum=accum, lm_loss_weight=weight,
                                              image_token_id=cfg.image_token_id), state_sh)
        state, metrics = step(state, shd.shard_batch(batch, mesh))
        return jax.device_get(nnx.to_pure_dict(state["trainable"])), jax.device_get(metrics)

    p0, m0 = run(1, 0.0)
    p1, m1 = run(1, 0.5)
    p4, m4 = run(4, 0.5)
    assert "lm_loss_sum" not in m0 and int(m1["lm_tokens"]) == m.sum()
    assert 0 < float(m1["lm_loss_sum"]) / float(m1["lm_tokens"]) < 2 * np.log(cfg.text.vocab_size)
    np.testing.assert_allclose(m1["lm_loss_sum"], m4["lm_loss_sum"], rtol=1e-5)
    _assert_trees_close(p1, p4, atol=1e-5)
    assert not np.allclose(p0["backbone"]["lm_head"], p1["backbone"]["lm_head"])  # the LM loss trains the head


def test_packed_epochs_size_the_schedule(tmp_path, caplog):
    """With packing a batch holds several examples per row, so an epoch has fewer batches than
    records / batch_size: the schedule (total steps, learning-rate decay) follows the packed count,
    and two epochs run to the end instead of stopping early on 'data exhausted' with the schedule
    half done."""
    import logging

    from jaxprm.train import steps_in_an_epoch

    c = _tiny_config(str(tmp_path), epochs=2, export=False)
    c.data.synthetic_train = 64
    c.data.packing, c.data.pack_buffer = True, 2.0
    # rows long enough for ~3 of the tiny task's examples (~120 tokens, 16 patches, 2-6 steps each)
    c.data.seq_buckets, c.data.patch_buckets, c.data.max_steps, c.data.max_images = (384,), (64,), 20, 4
    with caplog.at_level(logging.INFO, logger="jaxprm.train"):
        m = train_(c)
    msgs = [r.getMessage() for r in caplog.records]
    assert not any("data exhausted" in s for s in msgs), msgs
    planned = [s for s in msgs if s.startswith("packing: ~")]
    assert planned, msgs
    per_epoch = int(planned[0].split("~")[1].split()[0])
    assert per_epoch < 64 // 8  # several examples per row: fewer batches than records / batch_size
    assert m["step"] == 2 * per_epoch

    c.data.packing = False  # one example per row: exactly records // batch_size
    assert steps_in_an_epoch(c, None, 64) == 8
