"""Grain pipeline over the TFDS ArrayRecord dataset: fixed-shape buckets, labels and positions,
determinism, per-host shards, checkpointable iterator state, skipped records, packing."""
import dataclasses
import json
import logging

import numpy as np
import pytest

from jaxprm.data import pipeline as pl
from jaxprm.data import tfds_builder as tb
from jaxprm.data.preprocess import ImageProcessor
from jaxprm.data.prompt import encode_prm_example, label_token_ids
from jaxprm.data.synthetic import build_synthetic_tokenizer, generate_records, tiny_model_config
from jaxprm.models.qwen2_5_vl import rope

BASE = pl.PipelineConfig(
    batch_size=4, seq_buckets=(512, 640, 768), patch_buckets=(32, 64), max_steps=10, max_images=2,
    shard_index=0, shard_count=1, drop_remainder=False, seed=7, label_mode="train",
)


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer()


@pytest.fixture(scope="module")
def mc(tok):
    return tiny_model_config(tok)


@pytest.fixture(scope="module")
def records():
    # two image sizes: 24 and 64 patches (6 and 16 image tokens)
    return generate_records(24, image_size=(56, 84)) + generate_records(12, seed=1, image_size=(112, 112))


@pytest.fixture(scope="module")
def data(tmp_path_factory, records):
    return tb.build_dataset(records, tmp_path_factory.mktemp("tfds"), progress=False)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, records):
    """A dataset written without validation: good records and five unusable ones."""
    recs = list(records[:10])
    recs.insert(2, dataclasses.replace(records[10], id="bad-image", images=[b"\x89PNG\r\n\x1a\n not an image"]))
    recs.insert(5, dataclasses.replace(records[11], id="bad-record", steps=[]))
    recs.insert(7, dataclasses.replace(records[12], id="too-long", question="How many shapes? " * 300))
    recs.insert(8, dataclasses.replace(records[13], id="too-many-images", images=records[13].images * 3))
    recs.insert(9, dataclasses.replace(records[14], id="special-token", question="What <|im_start|> is this?"))
    recs.append(dataclasses.replace(records[15], id="two-images", images=records[15].images * 2))  # usable
    res = tb.build_dataset(recs, tmp_path_factory.mktemp("bad"), progress=False, validate=False)
    assert res.num_examples == {"train": 16}
    return res


def _loader(data, tok, mc, **kw):
    return pl.make_loader(data, "train", tok, ImageProcessor(), mc, dataclasses.replace(BASE, **kw))


def _rows(batches):
    """(batch, row) of every non-padding row."""
    return [(b, r) for b in batches for r in range(b["input_ids"].shape[0]) if b["num_examples"][r] > 0]


def _order(batches):
    return [int(i) for b in batches for i in b["record_index"].reshape(-1) if i >= 0]


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
def test_batches_have_the_fixed_shapes_of_their_bucket(data, tok, mc, records):
    it = iter(_loader(data, tok, mc))
    batches = list(it)
    assert len(batches) == 9  # 36 records / 4
    seen = set()
    for b in batches:
        l, p = b["input_ids"].shape[1], b["pixel_values"].shape[1]
        assert (l, p) in pl.bucket_shapes(BASE)
        spec = pl.batch_spec(BASE, mc, l, p)
        assert set(b) == set(spec)
        for k, (shape, dtype) in spec.items():
            assert b[k].shape == shape and b[k].dtype == dtype, k
        # the smallest bucket that fits
        assert b["num_tokens"].max() <= l and (l == 512 or b["num_tokens"].max() > BASE.seq_buckets[BASE.seq_buckets.index(l) - 1])
        assert b["num_patches"].max() <= p and (p == 32 or b["num_patches"].max() > 32)
        seen.add((l, p))
    assert len(seen) >= 2  # more than one bucket was used
    assert sorted(_order(batches)) == list(range(len(records)))
    assert it.stats.num_batches == 9 and it.stats.num_examples == 36 and it.stats.num_skipped == 0

    b16 = next(iter(_loader(data, tok, mc, pixel_dtype="bfloat16")))
    assert str(b16["pixel_values"].dtype) == "bfloat16"


def test_labels_positions_and_vision_arrays_match_the_example_alone(data, tok, mc, records):
    plus, minus = label_token_ids(tok)
    ip = ImageProcessor()
    v = mc.vision
    batches = list(iter(_loader(data, tok, mc)))
    for b, r in _rows(batches):
        rec = records[int(b["record_index"][r, 0])]
        n, npat = int(b["num_tokens"][r]), int(b["num_patches"][r])
        vis = ip(rec.images)
        enc = encode_prm_example(tok, rec.question, [s.text for s in rec.steps], rec.labels, vis["image_grid_thw"],
                                 max_length=768, mode="train")
        ids = b["input_ids"][r]
        np.testing.assert_array_equal(ids[:n], enc.input_ids)
        assert (b["segment_ids"][r, :n] == 1).all() and (b["segment_ids"][r, n:] == 0).all()
        k = len(enc.labels)
        lp, lab = b["label_positions"][r], b["labels"][r]
        np.testing.assert_array_equal(lp[:k], enc.label_positions)
        np.testing.assert_array_equal(lab[:k], [s.label for s in rec.steps][:k])
        assert (lab[k:] == -1).all() and (b["label_segment_ids"][r, :k] == 1).all()
        np.testing.assert_array_equal(ids[lp[:k] + 1], np.where(lab[:k] == 1, plus, minus))
        pos, _ = rope.get_rope_index(enc.input_ids[None], image_token_id=mc.image_token_id,
                                     video_token_id=mc.video_token_id, spatial_merge_size=v.spatial_merge_size,
                                     image_grid_thw=vis["image_grid_thw"])
        np.testing.assert_array_equal(b["position_ids"][:, r, :n], pos[:, 0])
        assert (b["position_ids"][:, r, n:] == 0).all()
        # vision: patches in image order + the layout of this row's grids padded to the bucket
        np.testing.assert_array_equal(b["pixel_values"][r, :npat], vis["pixel_values"])
        assert (b["pixel_values"][r, npat:] == 0).all()
        np.testing.assert_array_equal(b["image_grid_thw"][r, :1], vis["image_grid_thw"])
        assert b["num_images"][r] == 1 and (b["image_grid_thw"][r, 1:] == 0).all()
        lay = rope.vision_layout(vis["image_grid_thw"], merge=v.spatial_merge_size, window_size=v.window_size,
                                 patch_size=v.patch_size, pad_to=b["pixel_values"].shape[1])
        for key in pl.LAYOUT_KEYS:
            np.testing.assert_array_equal(b[key][r], getattr(lay, key), err_msg=key)
        assert (ids == mc.image_token_id).sum() == npat // 4


def test_padding_rows_and_drop_remainder(data, tok, mc):
    batches = list(iter(_loader(data, tok, mc, batch_size=5)))  # 36 = 7 * 5 + 1
    assert len(batches) == 8
    last = batches[-1]
    assert list(last["num_examples"]) == [1, 0, 0, 0, 0]
    assert (last["segment_ids"][1:] == 0).all() and (last["labels"][1:] == -1).all()
    assert (last["record_index"][1:] == -1).all() and (last["window_segment_ids"][1:] == -1).all()
    it = iter(_loader(data, tok, mc, batch_size=5, drop_remainder=True))
    assert len(list(it)) == 7 and it.stats.dropped_remainder == 1 and it.stats.num_examples == 35


def test_order_is_deterministic_in_the_seed(data, tok, mc, records):
    two = _order(iter(_loader(data, tok, mc, seed=1, num_epochs=2)))
    a, a2 = two[:36], two[36:]
    b = _order(iter(_loader(data, tok, mc, seed=1)))
    c = _order(iter(_loader(data, tok, mc, seed=2)))
    assert a == b and a != c and sorted(a) == sorted(c) == list(range(len(records)))
    assert sorted(a2) == sorted(a) and a2 != a  # each record once per epoch, reshuffled per epoch
    assert _order(iter(_loader(data, tok, mc, shuffle=False))) == list(range(len(records)))


def test_two_hosts_see_disjoint_records_covering_everything(data, tok, mc, records):
    h0 = _order(iter(_loader(data, tok, mc, shard_index=0, shard_count=2)))
    h1 = _order(iter(_loader(data, tok, mc, shard_index=1, shard_count=2)))
    assert len(h0) == len(h1) == 18
    assert set(h0).isdisjoint(h1) and sorted(h0 + h1) == list(range(len(records)))


@pytest.mark.parametrize("packing", [False, True])
def test_state_restores_mid_epoch_exactly(data, tok, mc, packing):
    kw = dict(num_epochs=2, packing=packing, seq_buckets=(768, 1536), max_steps=24, max_examples_per_row=3,
              patch_buckets=(64, 128), batch_size=2, max_length=600)  # some examples lose trailing steps
    it = iter(_loader(data, tok, mc, **kw))
    k = 5
    head = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    # the state points just after the examples already batched (with packing, the example pulled
    # but held over for the next batch is replayed after a restore)
    assert state["pipeline"]["parent"]["next_index"] == sum(int(b["num_examples"].sum()) for b in head)
    rest = list(it)  # the uninterrupted run goes on
    assert it.stats.num_examples == 72
    it2 = iter(_loader(data, tok, mc, **kw))
    it2.set_state(state)
    assert it2.stats.num_batches == k and it2.stats.num_examples == state["stats"]["num_examples"]
    rest2 = list(it2)
    assert _same(rest2, rest) and len(rest) > 5  # crosses the epoch boundary too
    assert it2.stats.num_examples == 72 and it2.stats.num_batches == k + len(rest)
    assert it.stats.examples_truncated > 0 and it2.stats.state_dict() == it.stats.state_dict()


def test_grain_checkpoint_handler_round_trip(tmp_path, data, tok, mc):
    import grain
    from etils import epath

    it = iter(_loader(data, tok, mc))
    next(it), next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    expect = list(it)
    it2 = handler.restore(epath.Path(tmp_path), item=iter(_loader(data, tok, mc)))
    assert _same(list(it2), expect)


def test_unusable_records_are_skipped_logged_and_counted(bad, tok, mc, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxprm.data.pipeline"):
        it = iter(_loader(bad, tok, mc, shuffle=False))
        batches = list(it)
    st = it.stats
    assert st.num_examples == 11 and st.num_skipped == st.skipped == 5
    assert st.skipped_by_reason == {"corrupt_image": 1, "malformed_record": 1, "prompt_too_long": 1,
                                    "too_many_images": 1, "bad_prompt": 1}
    assert sorted(_order(batches)) == [0, 1, 3, 4, 6, 10, 11, 12, 13, 14, 15]
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxprm.data.pipeline"]
    assert len(lines) == 5
    for rid, reason in [("bad-image", "corrupt_image"), ("bad-record", "malformed_record"),
                        ("too-long", "prompt_too_long"), ("too-many-images", "too_many_images"),
                        ("special-token", "bad_prompt")]:
        assert sum(repr(rid) in ln and reason in ln for ln in lines) == 1, (rid, lines)
    assert {s[1] for s in st.recent_skips} == {"bad-image", "bad-record", "too-long", "too-many-images",
                                               "special-token"}
    # the usable two-image record: both images in the row, positions over both grids
    (b, r), = [(b, r) for b, r in _rows(batches) if b["record_index"][r, 0] == 15]
    assert b["num_images"][r] == 2
    g = b["image_grid_thw"][r, :2]
    n = b["num_tokens"][r]
    ids = b["input_ids"][r, :n]
    assert (ids == mc.image_token_id).sum() == g.prod(-1).sum() // 4 == b["num_patches"][r] // 4
    pos, _ = rope.get_rope_index(ids[None], image_token_id=mc.image_token_id, video_token_id=mc.video_token_id,
                                 image_grid_thw=g)
    np.testing.assert_array_equal(b["position_ids"][:, r, :n], pos[:, 0])
    v = mc.vision
    lay = rope.vision_layout(g, merge=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size,
                             pad_to=b["pixel_values"].shape[1])
    np.testing.assert_array_equal(b["full_segment_ids"][r], lay.full_segment_ids)
    assert set(np.unique(lay.full_segment_ids)) == {-1, 0, 1}  # the two images stay separate


def test_worker_process_gives_exact_counts_and_restores(bad, tok, mc, caplog):
    """worker_count=1 (a spawned process does the reading, decoding and batching): skip counts and log
    lines are exact in the main process, and the state restores mid-epoch into a new loader. (Each
    spawn costs a few seconds of imports; Grain's set_state restarts the workers anyway.)"""
    kw = dict(worker_count=1, batch_size=2, seed=3)
    it = iter(_loader(bad, tok, mc, **kw))
    try:
        head = [next(it), next(it)]
        state = json.loads(json.dumps(it.get_state()))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="jaxprm.data.pipeline"):
            rest = list(it)
        assert it.stats.num_skipped == 5 and it.stats.num_examples == 11
        lines = [r.getMessage() for r in caplog.records if r.name == "jaxprm.data.pipeline"]
        assert len(lines) == 5 - state["stats"]["num_skipped"]  # logged in this process, once each
    finally:
        it.close()
    it2 = iter(_loader(bad, tok, mc, **kw))
    try:
        it2.set_state(state)
        assert it2.stats.num_skipped == state["stats"]["num_skipped"]
        rest2 = list(it2)
        assert _same(rest2, rest)
        assert it2.stats.num_skipped == 5 and it2.stats.num_examples == 11
    finally:
        it2.close()
    # one worker batches the whole shard, so it yields what the in-process pipeline yields
    inproc = list(iter(_loader(bad, tok, mc, **{**kw, "worker_count": 0})))
    assert _same(head + rest, inproc)
    del head, rest, rest2


def test_packing_rows_are_consistent(data, tok, mc, records):
    plus, minus = label_token_ids(tok)
    v = mc.vision
    cfg = dict(packing=True, max_examples_per_row=3, seq_buckets=(1024, 1536), patch_buckets=(64, 128, 192),
               max_steps=24, max_images=3, batch_size=3)
    it = iter(_loader(data, tok, mc, **cfg))
    batches = list(it)
    assert sorted(_order(batches)) == list(range(len(records)))
    assert it.stats.num_examples == 36 and len(batches) < 36 / 3
    multi = 0
    for b, r in _rows(batches):
        l, p = b["input_ids"].shape[1], b["pixel_values"].shape[1]
        seg, ids, pos = b["segment_ids"][r], b["input_ids"][r], b["position_ids"][:, r]
        k = int(b["num_examples"][r])
        multi += k > 1
        assert list(np.unique(seg[seg > 0])) == list(range(1, k + 1))
        assert (np.diff(seg[: b["num_tokens"][r]]) >= 0).all()  # contiguous segments
        grids, off = [], 0
        for j in range(k):
            rec = records[int(b["record_index"][r, j])]
            n = int((seg == j + 1).sum())
            assert (seg[off:off + n] == j + 1).all()
            g = ImageProcessor().grid_thw(*_hw(rec))[None]
            ref, _ = rope.get_rope_index(ids[off:off + n][None], image_token_id=mc.image_token_id,
                                         video_token_id=mc.video_token_id, image_grid_thw=g)
            np.testing.assert_array_equal(pos[:, off:off + n], ref[:, 0])  # restarts at 0 per example
            sl = b["label_segment_ids"][r] == j + 1
            assert sl.sum() == len(rec.steps)
            lp = b["label_positions"][r][sl]
            assert (lp >= off).all() and (lp + 1 < off + n).all()  # inside its own segment
            assert (seg[lp] == j + 1).all() and (seg[lp + 1] == j + 1).all()
            np.testing.assert_array_equal(ids[lp + 1], np.where(b["labels"][r][sl] == 1, plus, minus))
            np.testing.assert_array_equal(b["labels"][r][sl], rec.labels)
            grids.append(g)
            off += n
        g = np.concatenate(grids)
        np.testing.assert_array_equal(b["image_grid_thw"][r, :k], g)
        lay = rope.vision_layout(g, merge=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size,
                                 pad_to=p)
        for key in pl.LAYOUT_KEYS:
            np.testing.assert_array_equal(b[key][r], getattr(lay, key), err_msg=key)
        assert (ids == mc.image_token_id).sum() == b["num_patches"][r] // 4
        assert b["num_tokens"][r] <= l
    assert multi > 0


def _hw(rec):
    from PIL import Image
    import io

    w, h = Image.open(io.BytesIO(rec.images[0])).size
    return h, w


def test_pad_batch_grows_to_a_larger_bucket(data, tok, mc):
    b = next(iter(_loader(data, tok, mc)))
    l, p = b["input_ids"].shape[1], b["pixel_values"].shape[1]
    big = pl.pad_batch(b, l + 128, p + 64)
    v = mc.vision
    for r in range(b["input_ids"].shape[0]):
        g = b["image_grid_thw"][r, : b["num_images"][r]]
        lay = rope.vision_layout(g, merge=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size,
                                 pad_to=p + 64)
        for key in pl.LAYOUT_KEYS:
            np.testing.assert_array_equal(big[key][r], getattr(lay, key), err_msg=key)
    assert big["input_ids"].shape == (4, l + 128) and (big["segment_ids"][:, l:] == 0).all()
    np.testing.assert_array_equal(big["input_ids"][:, :l], b["input_ids"])
    with pytest.raises(ValueError):
        pl.pad_batch(b, l - 1)


def test_config_is_checked(data, tok, mc):
    for bad_kw in (dict(seq_buckets=(512, 256)), dict(patch_buckets=(30,)), dict(batch_size=0),
                   dict(label_mode="eval"), dict(shard_index=1, shard_count=None)):
        with pytest.raises(ValueError):
            _loader(data, tok, mc, **bad_kw)
    with pytest.raises(ValueError, match="merge_size"):
        pl.make_loader(data, "train", tok, ImageProcessor(merge_size=1), mc, BASE)


def _tiny_model(mc):
    """The tiny model with random weights set from numpy (eager init would compile ~36 XLA programs)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxprm.models.qwen2_5_vl.model import Qwen25VL

    model = nnx.eval_shape(lambda: Qwen25VL(mc))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray((rng.standard_normal(s.shape) * 0.02).astype(s.dtype)),
                          nnx.state(model, nnx.Param))
    nnx.update(model, params)
    return model


def test_a_packed_row_runs_through_the_tiny_model_like_its_example_alone(data, tok, mc):
    """The model takes a batch as is (per-row vision arrays, as ``PRMModel.step_logits`` passes them);
    in a packed row, the second example (shifted in tokens, positions restarting, image features after
    the first example's) gets the hidden states it gets alone in an unpacked row of the same bucket."""
    from flax import nnx

    shape = dict(seq_buckets=(1536,), patch_buckets=(128,), max_steps=24, batch_size=1, shuffle=False)
    packed = next(iter(_loader(data, tok, mc, packing=True, max_examples_per_row=2, **shape)))
    assert list(packed["record_index"][0]) == [0, 1]
    alone_it = iter(_loader(data, tok, mc, **shape))
    next(alone_it)
    alone = next(alone_it)
    assert list(alone["record_index"][0]) == [1]
    model = _tiny_model(mc)

    @nnx.jit
    def hidden(model, b):
        return model.hidden_states(b["input_ids"], b["position_ids"], b["segment_ids"], b["pixel_values"],
                                   {k: b[k] for k in pl.LAYOUT_KEYS})

    hp, ha = np.asarray(hidden(model, packed))[0], np.asarray(hidden(model, alone))[0]
    assert hp.shape == (1536, mc.text.hidden_size)
    seg = packed["segment_ids"][0]
    off, n = int((seg == 1).sum()), int((seg == 2).sum())
    assert n == alone["num_tokens"][0]
    np.testing.assert_array_equal(packed["input_ids"][0, off:off + n], alone["input_ids"][0, :n])
    np.testing.assert_allclose(hp[off:off + n], ha[:n], atol=2e-5)
    # the label positions the PRM reads point at the same rows
    lp_p = packed["label_positions"][0][packed["label_segment_ids"][0] == 2]
    lp_a = alone["label_positions"][0][alone["label_segment_ids"][0] == 1]
    np.testing.assert_array_equal(lp_p - off, lp_a)


def test_a_missing_package_stops_the_loader_at_once(data, tok, mc, monkeypatch):
    """An ImportError is about the environment, not the record: skipping every record would train nothing."""
    def no_jinja(*a, **k):
        raise ImportError("apply_chat_template requires jinja2 to be installed")

    monkeypatch.setattr(pl, "encode_prm_example", no_jinja)
    it = iter(_loader(data, tok, mc, shuffle=False))
    with pytest.raises(pl.SystemicDataError, match="jinja2") as e:
        next(it)
    assert "not about the record" in str(e.value)
    assert it.stats.num_skipped == 1 and it.stats.skipped_by_reason == {pl.ENVIRONMENT_ERROR: 1}


@pytest.mark.parametrize("limit", [4, 16])
def test_the_same_failure_on_every_record_stops_the_loader(data, tok, mc, records, limit):
    """A config that fits no record (here: sequences far too short for any prompt) stops after
    ``systemic_skip_limit`` records instead of skipping the whole split."""
    it = iter(_loader(data, tok, mc, shuffle=False, seq_buckets=(64,), systemic_skip_limit=limit))
    with pytest.raises(pl.SystemicDataError, match="prompt_too_long") as e:
        next(it)
    assert f"the first {limit} records were all skipped" in str(e.value)
    assert it.stats.num_skipped == limit < len(records) and it.stats.num_examples == 0


def test_systemic_limit_off_skips_everything(data, tok, mc, records):
    it = iter(_loader(data, tok, mc, shuffle=False, seq_buckets=(64,), systemic_skip_limit=0))
    assert list(it) == [] and it.stats.num_skipped == len(records)


def test_default_prompt_is_the_scoring_prompt(data, tok, mc, records):
    """PipelineConfig's default fills the assistant turns as PRM.score does (placeholders), while the
    labels are still supervised; "train" mode (teacher forcing) must be asked for."""
    assert pl.PipelineConfig().label_mode == "score"
    it = iter(_loader(data, tok, mc, label_mode="score"))
    ip = ImageProcessor()
    for b, r in _rows([next(it)]):
        rec = records[int(b["record_index"][r, 0])]
        enc = encode_prm_example(tok, rec.question, [s.text for s in rec.steps], rec.labels,
                                 ip(rec.images)["image_grid_thw"], max_length=768, mode="score")
        n = int(b["num_tokens"][r])
        np.testing.assert_array_equal(b["input_ids"][r, :n], enc.input_ids)
        k = len(enc.labels)
        np.testing.assert_array_equal(b["labels"][r, :k], [s.label for s in rec.steps][:k])
