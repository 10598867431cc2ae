"""Lookahead packing (``PipelineConfig.pack_buffer``): efficiency on a VL-PRM300K-shaped size distribution,
every example intact in its row, every record once per epoch, exact restore mid-epoch (also with skipped
records and a worker process), the efficiency counters, and the pipeline bench's smoke run."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxprm.data import pipeline as pl
from jaxprm.data import tfds_builder as tb
from jaxprm.data.preprocess import ImageProcessor
from jaxprm.data.synthetic import generate_records
from jaxprm.models.qwen2_5_vl import rope

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# rows of up to 3 examples (~500-700 tokens, 24 or 64 patches each) in 3-row batches chosen from 9 pending
BASE = pl.PipelineConfig(
    batch_size=3, seq_buckets=(1024, 1536), patch_buckets=(64, 128, 192), max_steps=24, max_images=3,
    packing=True, max_examples_per_row=3, pack_buffer=9, shard_index=0, shard_count=1, drop_remainder=False,
    seed=5, label_mode="train",
)


from tests.data.test_pipeline import mc, tok  # noqa: E402,F401  (the same tokenizer and tiny model fixtures)


@pytest.fixture(scope="module")
def records():
    return generate_records(20, image_size=(56, 84)) + generate_records(10, seed=1, image_size=(112, 112))


@pytest.fixture(scope="module")
def data(tmp_path_factory, records):
    return tb.build_dataset(records, tmp_path_factory.mktemp("tfds"), progress=False)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, records):
    """Good records with three unusable ones among them (skip markers in the stream)."""
    recs = list(records[:14])
    recs.insert(1, dataclasses.replace(records[20], id="bad-image", images=[b"\x89PNG\r\n\x1a\n not an image"]))
    recs.insert(6, dataclasses.replace(records[21], id="bad-record", steps=[]))
    recs.insert(11, dataclasses.replace(records[22], id="too-many-images", images=records[22].images * 4))
    return tb.build_dataset(recs, tmp_path_factory.mktemp("bad"), progress=False, validate=False)


def _loader(data, tok, mc, **kw):
    return pl.make_loader(data, "train", tok, ImageProcessor(), mc, dataclasses.replace(BASE, **kw))


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def _ids(batches):
    return [int(i) for b in batches for i in b["record_index"].reshape(-1) if i >= 0]


def _run_with_states(it):
    """Every element of ``it`` and the state before each (JSON round-tripped)."""
    states, elems = [], []
    while True:
        states.append(json.loads(json.dumps(it.get_state())))
        try:
            elems.append(next(it))
        except StopIteration:
            return states, elems


def _efficiency(batches):
    """Real / carried tokens, patches and label slots, from the batch arrays alone."""
    tok = sum(int(b["num_tokens"].sum()) for b in batches) / sum(b["input_ids"].size for b in batches)
    pat = (sum(int(b["num_patches"].sum()) for b in batches)
           / sum(b["pixel_values"].shape[0] * b["pixel_values"].shape[1] for b in batches))
    lab = sum(int((b["label_segment_ids"] > 0).sum()) for b in batches) / sum(b["labels"].size for b in batches)
    return tok, pat, lab


# ------------------------------------------------------------------------------------------------
# efficiency on VL-PRM300K-shaped sizes (the bench's distribution, the 3B config's data settings)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, ROOT)
    from bench import pipeline_bench

    return pipeline_bench


def test_lookahead_packing_fills_tokens_and_patches_on_vlprm300k_shaped_data(bench, tok):
    (_, old), (_, first_fit), (_, cfg) = bench.packing_configs()
    assert cfg.pack_buffer >= cfg.batch_size and cfg.packing
    specs = bench.make_specs(1600, seed=11)
    sizes = bench.spec_sizes(specs, tok, bench.image_processor(), cfg)
    assert 256 * 4 <= sizes[:, 1].min() and sizes[:, 1].max() <= 1280 * 4 and 4 <= sizes[:, 2].min()
    batches, stats = pl.simulate_packing(sizes, cfg)
    # every example once, or dropped with the short last batch
    ids = _ids(batches)
    assert len(ids) == len(set(ids)) and len(ids) + stats.dropped_remainder == len(sizes)
    for b in batches:  # rows within the bucket in every resource
        l, p, s = b["input_ids"].shape[1], b["pixel_values"].shape[1], b["labels"].shape[1]
        assert (l, p) in pl.bucket_shapes(cfg)
        assert (b["num_tokens"] <= l).all() and (b["num_patches"] <= p).all() and (b["num_steps"] <= s).all()
        assert (b["num_examples"] <= cfg.max_examples_per_row).all() and (b["num_images"] <= cfg.max_images).all()
        rows = b["record_index"]
        for r in range(len(rows)):  # the row's sums are its examples' sizes
            mine = sizes[rows[r][rows[r] >= 0]]
            assert b["num_tokens"][r] == mine[:, 0].sum() and b["num_patches"][r] == mine[:, 1].sum()
    tok_eff, pat_eff, lab_eff = _efficiency(batches)
    assert tok_eff >= 0.95 and pat_eff >= 0.90, (tok_eff, pat_eff)
    eff = stats.efficiency()
    assert eff["data/token_efficiency"] == pytest.approx(tok_eff) and eff["data/patch_efficiency"] == pytest.approx(pat_eff)
    assert eff["data/label_slot_efficiency"] == pytest.approx(lab_eff)
    # the old settings on the same sizes: far from it (the reason for the change)
    for before in (old, first_fit):
        b_old, _ = pl.simulate_packing(bench.spec_sizes(specs, tok, bench.image_processor(), before), before)
        t_old, p_old, _ = _efficiency(b_old)
        assert p_old < 0.5 and pat_eff > p_old + 0.4 and tok_eff > t_old


def test_plan_batch_forces_waiting_examples_and_respects_every_limit():
    cfg = dataclasses.replace(BASE, batch_size=2, max_examples_per_row=2, max_steps=10, max_images=2)
    sizes = np.array([(900, 40, 3, 1), (100, 20, 2, 1), (1400, 180, 9, 1), (400, 30, 6, 1), (300, 100, 1, 1)])
    rows = pl.plan_batch(sizes, np.zeros(5, bool), cfg)
    assert 1 <= len(rows) <= 2
    for r in rows:
        t, p, s, i = sizes[r].sum(0)
        assert len(r) <= 2 and t <= 1536 and p <= 192 and s <= 10 and i <= 2
    assert 2 in {j for r in rows for j in r}  # the largest starts a row (first-fit decreasing)
    forced = np.array([False, True, False, False, True])
    rows = pl.plan_batch(sizes, forced, cfg)
    assert {1, 4} <= {j for r in rows for j in r}


# ------------------------------------------------------------------------------------------------
# real batches: rows hold their examples intact; every record once; exact restore
# ------------------------------------------------------------------------------------------------
def test_every_example_lands_intact_in_its_row(data, tok, mc, records):
    alone = pl.ExampleTransform(tb.data_source(data, "train"), tok, ImageProcessor(), mc, BASE)
    v = mc.vision
    it = iter(_loader(data, tok, mc))
    batches = list(it)
    assert sorted(_ids(batches)) == list(range(len(records)))  # every record exactly once
    multi = 0
    for b in batches:
        l, p = b["input_ids"].shape[1], b["pixel_values"].shape[1]
        assert set(b) == set(pl.batch_spec(BASE, mc, l, p))
        for r in range(b["input_ids"].shape[0]):
            k = int(b["num_examples"][r])
            multi += k > 1
            off = poff = soff = 0
            grids = []
            for j in range(k):
                ex = alone(int(b["record_index"][r, j]))
                n, npat, m = len(ex["input_ids"]), len(ex["pixel_values"]), len(ex["labels"])
                np.testing.assert_array_equal(b["input_ids"][r, off:off + n], ex["input_ids"])
                assert (b["segment_ids"][r, off:off + n] == j + 1).all()
                np.testing.assert_array_equal(b["position_ids"][:, r, off:off + n], ex["position_ids"])
                np.testing.assert_array_equal(b["label_positions"][r, soff:soff + m], ex["label_positions"] + off)
                np.testing.assert_array_equal(b["labels"][r, soff:soff + m], ex["labels"])
                assert (b["label_segment_ids"][r, soff:soff + m] == j + 1).all()
                np.testing.assert_array_equal(b["pixel_values"][r, poff:poff + npat], ex["pixel_values"])
                grids.append(ex["image_grid_thw"])
                off, poff, soff = off + n, poff + npat, soff + m
            assert b["num_tokens"][r] == off and b["num_patches"][r] == poff
            assert (b["segment_ids"][r, off:] == 0).all() and (b["labels"][r, soff:] == -1).all()
            assert (b["pixel_values"][r, poff:] == 0).all()
            g = np.concatenate(grids) if grids else np.zeros((0, 3), np.int32)
            np.testing.assert_array_equal(b["image_grid_thw"][r, :len(g)], g)
            lay = rope.vision_layout(g, merge=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size,
                                     pad_to=p)
            for key in pl.LAYOUT_KEYS:
                np.testing.assert_array_equal(b[key][r], getattr(lay, key), err_msg=key)
    assert multi > 0
    # the loader's counters are the batches' own
    st = it.stats
    tok_eff, pat_eff, lab_eff = _efficiency(batches)
    assert st.token_slots == sum(b["input_ids"].size for b in batches)
    assert st.efficiency()["data/token_efficiency"] == pytest.approx(tok_eff)
    assert st.efficiency()["data/patch_efficiency"] == pytest.approx(pat_eff)
    assert st.efficiency()["data/label_slot_efficiency"] == pytest.approx(lab_eff)
    assert st.pixel_bytes == sum(b["pixel_values"].nbytes for b in batches)


@pytest.mark.parametrize("packing", [True, False])
def test_lookahead_restores_mid_epoch_exactly_at_every_batch(data, tok, mc, packing):
    kw = dict(packing=packing, num_epochs=2, drop_remainder=True)
    it = iter(_loader(data, tok, mc, **kw))
    states, batches = _run_with_states(it)
    ids = _ids(batches)  # two epochs: each record twice, but for the dropped short last batch
    assert len(ids) + it.stats.dropped_remainder == 60 and all(ids.count(i) <= 2 for i in set(ids))
    assert len(set(ids)) == 30
    # the states hold examples pulled after the oldest pending one and already emitted: replayed and dropped
    assert any(st["pipeline"].get("done") for st in states)
    for k in range(1, len(batches)):
        it2 = iter(_loader(data, tok, mc, **kw))
        it2.set_state(states[k])
        rest = list(it2)
        assert _same(rest, batches[k:]), k
        assert it2.stats.state_dict() == it.stats.state_dict(), k


def test_lookahead_restore_with_skipped_records_counts_each_once(bad, tok, mc):
    kw = dict(shuffle=True, seed=2)
    it = iter(_loader(bad, tok, mc, **kw))
    states, elems = _run_with_states(it)
    assert it.stats.num_skipped == 3 and it.stats.num_examples == 14
    assert it.stats.skipped_by_reason == {"corrupt_image": 1, "malformed_record": 1, "too_many_images": 1}
    for k in range(len(elems)):
        it2 = iter(_loader(bad, tok, mc, **kw))
        it2.set_state(states[k])
        assert _same(list(it2), elems[k:]), k
        assert it2.stats.state_dict() == it.stats.state_dict(), k


def test_lookahead_with_a_worker_process_restores(data, tok, mc):
    kw = dict(worker_count=1, num_epochs=1)
    it = iter(_loader(data, tok, mc, **kw))
    try:
        head = [next(it), next(it)]
        state = json.loads(json.dumps(it.get_state()))
        rest = list(it)
    finally:
        it.close()
    it2 = iter(_loader(data, tok, mc, **kw))
    try:
        it2.set_state(state)
        assert _same(list(it2), rest)
        assert it2.stats.state_dict() == it.stats.state_dict()
    finally:
        it2.close()
    assert _same(head + rest, list(iter(_loader(data, tok, mc, worker_count=0))))  # one worker = in-process


def test_stream_mode_is_unchanged_by_the_lookahead_option(data, tok, mc):
    """pack_buffer=0 keeps the first-fit streaming batches (what the loader did before)."""
    a = list(iter(_loader(data, tok, mc, pack_buffer=0)))
    ids = _ids(a)
    assert sorted(ids) == list(range(30))
    # first-fit in arrival order: record order is the shuffled order (row-major)
    order = list(iter(_loader(data, tok, mc, pack_buffer=0, packing=False)))
    assert sorted(_ids(order)) == list(range(30))


def test_batches_per_epoch_estimates_the_packed_epoch(data, tok, mc):
    for kw in (dict(), dict(pack_buffer=0), dict(batch_size=2, pack_buffer=6)):
        loader = _loader(data, tok, mc, drop_remainder=True, **kw)
        actual = len(list(iter(loader)))
        est = loader.batches_per_epoch(sample=30)
        assert abs(est - actual) <= max(1, 0.2 * actual), (kw, est, actual)
        assert est < 30 // loader.cfg.batch_size  # packed: fewer batches than rows of one example
    plain = _loader(data, tok, mc, packing=False, drop_remainder=True)
    assert plain.batches_per_epoch() == len(list(iter(plain))) == 30 // 3


# ------------------------------------------------------------------------------------------------
# config helpers
# ------------------------------------------------------------------------------------------------
def test_config_helpers():
    with pytest.raises(ValueError, match="pack_buffer"):
        dataclasses.replace(BASE, pack_buffer=2).validate()
    assert pl.resolve_pixel_dtype("auto", "bfloat16") == "bfloat16"
    assert pl.resolve_pixel_dtype("auto", "float32") == "float32"
    assert pl.resolve_pixel_dtype("float32", "bfloat16") == "float32"
    assert pl.auto_worker_count(0.0, local_chips=8, cpus=64) == 0
    assert pl.auto_worker_count(0.7, local_chips=8, cpus=64) == 6
    assert pl.auto_worker_count(2.0, local_chips=8, cpus=8) == 7  # one CPU left to the training loop


def test_real_model_configs_carry_bf16_pixels_and_lookahead_packing():
    sys.path.insert(0, ROOT)
    from configs import qwen2_5_vl_3b, qwen2_5_vl_7b

    from jaxprm.train import pipeline_config

    for mod in (qwen2_5_vl_3b, qwen2_5_vl_7b):
        c = mod.get_config()
        pc = pipeline_config(c, train=True, seed=0)
        assert pc.pixel_dtype == "bfloat16" and c.model.dtype == "bfloat16"
        assert pc.packing and pc.pack_buffer >= pc.batch_size and pc.worker_count >= 0
        pc.validate()


# ------------------------------------------------------------------------------------------------
def test_pipeline_bench_quick_runs(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "pipeline_bench.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["worker"]["bfloat16"]["examples_per_s"] > 0
    now = res["packing"][-1]
    assert now["token_efficiency"] > res["packing"][0]["token_efficiency"]
    assert set(res["target"]["per_chip"]) == {"H100", "TPU v5p"}
    assert "(c) 3B step" in r.stdout


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a 2-step tiny training run: ~35 s on the 2-core machine
def test_training_logs_the_packing_efficiency(tmp_path, caplog):
    """The periodic log line and TensorBoard carry the loader's efficiencies over the log window."""
    import logging

    sys.path.insert(0, ROOT)
    from configs import tiny

    from jaxprm.train import train

    c = tiny.get_config()
    c.workdir = str(tmp_path / "w")
    c.data.synthetic_train, c.data.synthetic_eval = 24, 8
    c.data.packing, c.data.pack_buffer = True, 2.0
    c.train.batch_size, c.train.max_steps, c.train.log_every = 8, 2, 1
    c.train.progress, c.train.export, c.train.eval_every = False, False, 1000
    with caplog.at_level(logging.INFO, logger="jaxprm.train"):
        train(c)
    import re
    from pathlib import Path

    from tests.train.test_multihost import _tb_scalars

    lines = [r.getMessage() for r in caplog.records if "data/token_efficiency" in r.getMessage()]
    assert len(lines) == 2, lines
    for ln in lines:
        vals = dict(re.findall(r"(data/\w+)=([0-9.e+-]+)", ln))
        for k in ("data/token_efficiency", "data/patch_efficiency", "data/label_slot_efficiency"):
            assert 0 < float(vals[k]) <= 1, ln
        assert float(vals["data/examples_per_batch"]) >= 8  # packed: at least one example per row
    tb = _tb_scalars(Path(c.workdir) / "events")
    for tag in ("data/token_efficiency", "data/patch_efficiency", "data/label_slot_efficiency"):
        assert tb[tag] == 2, tb


def test_internvl_tiles_pack_with_lookahead_and_restore(tmp_path):
    """InternVL batches (P counts tiles): the lookahead packer fills rows in tokens and tiles, every record
    once, each example's tiles intact, and the state restores exactly."""
    from jaxprm.data.preprocess_internvl import InternVLImageProcessor
    from jaxprm.data.synthetic import build_synthetic_internvl_tokenizer, tiny_internvl_config

    tok = build_synthetic_internvl_tokenizer()
    mc = tiny_internvl_config(tok)
    size = int(mc.vision.image_size)
    recs = (generate_records(8, image_size=(size, size)) + generate_records(8, seed=1, image_size=(size, 2 * size))
            + generate_records(6, seed=2, image_size=(2 * size, 2 * size)))
    data = tb.build_dataset(recs, tmp_path / "tfds", progress=False)
    ip = InternVLImageProcessor(image_size=size, max_tiles=4)
    cfg = dataclasses.replace(BASE, seq_buckets=(512, 1024), patch_buckets=(4, 8, 12), max_images=4, batch_size=2,
                              pack_buffer=6, num_epochs=2, drop_remainder=True)
    loader = pl.make_loader(data, "train", tok, ip, mc, cfg)
    alone = pl.ExampleTransform(tb.data_source(data, "train"), tok, ip, mc, cfg)
    it = iter(loader)
    states, batches = _run_with_states(it)
    ids = _ids(batches)
    assert len(ids) + it.stats.dropped_remainder == 2 * len(recs) and len(set(ids)) == len(recs)
    assert max(int(b["num_examples"].max()) for b in batches) > 1
    for b in batches[:6]:
        for r in range(b["input_ids"].shape[0]):
            poff = off = 0
            for j in range(int(b["num_examples"][r])):
                ex = alone(int(b["record_index"][r, j]))
                n, nt = len(ex["input_ids"]), len(ex["pixel_values"])
                np.testing.assert_array_equal(b["input_ids"][r, off:off + n], ex["input_ids"])
                np.testing.assert_array_equal(b["pixel_values"][r, poff:poff + nt], ex["pixel_values"])
                assert (b["image_flags"][r, poff:poff + nt] == 1).all()
                off, poff = off + n, poff + nt
            assert (b["image_flags"][r, poff:] == 0).all() and b["num_patches"][r] == poff
    for k in (1, len(batches) // 2, len(batches) - 1):
        it2 = iter(pl.make_loader(data, "train", tok, ip, mc, cfg))
        it2.set_state(states[k])
        assert _same(list(it2), batches[k:]), k


def test_bf16_pixels_give_a_bf16_model_the_same_hidden_states(data, tok, mc):
    """Why pixel_dtype "auto" is bfloat16 on a bf16 model: the vision tower casts pixel_values to the compute
    dtype first, so bf16 batches (half the bytes) give exactly the hidden states fp32 batches give."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxprm.models.qwen2_5_vl.model import Qwen25VL

    model = nnx.eval_shape(lambda: Qwen25VL(mc, dtype=jnp.bfloat16, param_dtype=jnp.float32))
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(lambda s: jnp.asarray((rng.standard_normal(s.shape) * 0.02).astype(s.dtype)),
                                   nnx.state(model, nnx.Param)))
    shape = dict(seq_buckets=(1536,), patch_buckets=(192,), batch_size=2, shuffle=False)
    b32 = next(iter(_loader(data, tok, mc, pixel_dtype="float32", **shape)))
    b16 = next(iter(_loader(data, tok, mc, pixel_dtype="bfloat16", **shape)))
    assert str(b16["pixel_values"].dtype) == "bfloat16" and b16["pixel_values"].nbytes * 2 == b32["pixel_values"].nbytes
    np.testing.assert_array_equal(b16["pixel_values"], b32["pixel_values"].astype(b16["pixel_values"].dtype))

    @nnx.jit
    def hidden(model, b):
        return model.hidden_states(b["input_ids"], b["position_ids"], b["segment_ids"], b["pixel_values"],
                                   {k: b[k] for k in pl.LAYOUT_KEYS})

    np.testing.assert_array_equal(np.asarray(hidden(model, b16), np.float32), np.asarray(hidden(model, b32), np.float32))
