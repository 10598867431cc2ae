"""End-to-end and layer-level parity of the Flax Qwen2.5-VL port against transformers (fp32, CPU)."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

from jaxprm.models import qwen2_5_vl as q
from jaxprm.models.qwen2_5_vl import rope

from .hf_reference import IMAGE, VIDEO, build_hf_model, hf_logits, make_inputs, save_hf, tiny_hf_config

TOL = 1e-4
# image grids (t, h, w) in patches: non-square, and llm grids (h/2, w/2) that do not divide the
# 2x2 merged-token window of the tiny config (window_size 56 = 2 merged tokens of 28 px)
GRIDS = [(1, 6, 10), (1, 8, 4), (1, 4, 4), (1, 10, 6)]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    hf = build_hf_model(tiny_hf_config(tie=False), seed=0)
    d = save_hf(hf, str(tmp_path_factory.mktemp("untied")))
    return hf, d


@pytest.fixture(scope="module")
def untied_flax(untied):
    return q.from_pretrained(untied[1])


def _check(flax_model, hf_model, ids, mask, pv, grid):
    ref = hf_logits(hf_model, ids, mask, pv, grid)
    out = flax_model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
    got = np.asarray(out.logits)
    keep = mask.astype(bool)
    err = np.abs(got - ref)[keep].max()
    assert err < TOL, f"max |logit diff| {err:.2e} >= {TOL}"
    return got, ref


def test_several_images_padded_batch(untied, untied_flax):
    # row 0: three images of different non-square sizes; row 1: one image, left-padded
    ids, mask, pv, grid = make_inputs(GRIDS[:3] + GRIDS[3:], [[5, 7, 3, 2], [4, 6]], seed=1)
    assert (mask == 0).any(), "the batch must contain padding"
    _check(untied_flax, untied[0], ids, mask, pv, grid)


def test_single_image_no_padding(untied, untied_flax):
    ids, mask, pv, grid = make_inputs([(1, 12, 6)], [[9, 11]], seed=2)
    _check(untied_flax, untied[0], ids, mask, pv, grid)


def test_text_only(untied, untied_flax):
    ids, mask, _, _ = make_inputs([], [[17], [11]], seed=3)
    ref = hf_logits(untied[0], ids, mask, None, None)
    got = np.asarray(untied_flax(ids, attention_mask=mask).logits)
    assert np.abs(got - ref)[mask.astype(bool)].max() < TOL


def test_tied_head(tmp_path):
    hf = build_hf_model(tiny_hf_config(tie=True), seed=5)
    assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    d = save_hf(hf, str(tmp_path))
    fm = q.from_pretrained(d)
    assert fm.lm_head is None and fm.config.tie_word_embeddings
    ids, mask, pv, grid = make_inputs([(1, 4, 8), (1, 6, 6)], [[3, 4], [2, 5]], seed=4)
    _check(fm, hf, ids, mask, pv, grid)


def test_legacy_layout_flat_config_and_sharded_weights(tmp_path, untied):
    """Pre-v5 checkpoints: visual.* / model.* names, flat config.json with rope_scaling, and a sharded index."""
    hf = untied[0]
    d = str(tmp_path)
    save_hf(hf, d, legacy_names=True)
    cfg = json.load(open(os.path.join(d, "config.json")))
    text = cfg.pop("text_config")
    rp = text.pop("rope_parameters")
    flat = {**cfg, **{k: v for k, v in text.items() if k not in ("model_type", "dtype")}}
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rp["mrope_section"]}
    flat["rope_theta"] = rp["rope_theta"]
    json.dump(flat, open(os.path.join(d, "config.json"), "w"))
    # split into two shards with an index
    from jaxprm.models.qwen2_5_vl.convert import read_safetensors, write_safetensors
    t = {k: np.array(v) for k, v in read_safetensors(os.path.join(d, "model.safetensors")).items()}
    assert any(k.startswith("visual.") for k in t) and any(k.startswith("model.layers.") for k in t)
    os.remove(os.path.join(d, "model.safetensors"))
    names = sorted(t)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    wm = {}
    for fn, ks in parts.items():
        write_safetensors(os.path.join(d, fn), {k: t[k] for k in ks})
        wm.update({k: fn for k in ks})
    json.dump({"weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    fm = q.from_pretrained(d)
    ids, mask, pv, grid = make_inputs([(1, 6, 10)], [[4, 4]], seed=6)
    _check(fm, hf, ids, mask, pv, grid)


def test_save_pretrained_round_trip(tmp_path, untied, untied_flax):
    """Our params written back in HF layout load into transformers and give the same logits."""
    d = str(tmp_path)
    q.save_pretrained(untied_flax, d)
    hf2 = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(d).eval()
    ref_sd, got_sd = untied[0].state_dict(), hf2.state_dict()
    assert set(ref_sd) == set(got_sd)
    for k in ref_sd:
        torch.testing.assert_close(got_sd[k], ref_sd[k], rtol=0, atol=0)


def test_vision_tower_output(untied, untied_flax):
    hf = untied[0]
    _, _, pv, grid = make_inputs(GRIDS, [[1] * (len(GRIDS) + 1)], seed=7)
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    v = untied_flax.config.vision
    layout = rope.vision_layout(grid, merge=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size)
    got = np.asarray(untied_flax.image_features(pv, layout.as_dict()))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_vision_padding_does_not_change_features(untied_flax):
    """Fixed-shape (bucketed) vision batches: padded patches must not leak into real ones."""
    _, _, pv, grid = make_inputs(GRIDS[:2], [[1, 1, 1]], seed=8)
    v = untied_flax.config.vision
    kw = dict(merge=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size)
    base = np.asarray(untied_flax.image_features(pv, rope.vision_layout(grid, **kw).as_dict()))
    n = pv.shape[0]
    pv_pad = np.concatenate([pv, np.random.default_rng(0).standard_normal((36, pv.shape[1])).astype(np.float32)])
    padded = np.asarray(untied_flax.image_features(pv_pad, rope.vision_layout(grid, pad_to=n + 36, **kw).as_dict()))
    np.testing.assert_allclose(padded[: n // 4], base, atol=1e-6)


@pytest.mark.parametrize("grids", [[(1, 6, 10)], [(1, 8, 4), (2, 4, 6), (1, 16, 16)], [(1, 2, 2), (1, 14, 18)]])
@pytest.mark.parametrize("window_size", [56, 112])
def test_window_index_and_rotary_positions(grids, window_size):
    from transformers import vision_utils as vu
    g = torch.tensor(grids)
    widx, cu = vu.get_vision_window_index(g, spatial_merge_size=2, window_size=window_size, patch_size=14)
    mine_idx, mine_cu = rope.vision_window_index(np.array(grids), 2, window_size, 14)
    np.testing.assert_array_equal(mine_idx, widx.numpy())
    np.testing.assert_array_equal(mine_cu, cu.numpy())
    np.testing.assert_array_equal(rope.vision_rotary_positions(np.array(grids), 2), vu.get_vision_position_ids(g, 2).numpy())
    np.testing.assert_array_equal(rope.vision_cu_seqlens(np.array(grids)), vu.get_vision_cu_seqlens(g).numpy())


def test_rope_index_matches_transformers(untied):
    hf = untied[0]
    ids, mask, _, grid = make_inputs(GRIDS, [[5, 7, 3], [4, 6, 1]], seed=9)
    ref, ref_d = hf.model.get_rope_index(torch.tensor(ids), mm_token_type_ids=(torch.tensor(ids) == IMAGE).int(),
                                         image_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(mask))
    got, got_d = rope.get_rope_index(ids, image_token_id=IMAGE, video_token_id=VIDEO, spatial_merge_size=2,
                                     image_grid_thw=grid, attention_mask=mask)
    np.testing.assert_array_equal(got, ref.numpy())
    np.testing.assert_array_equal(got_d, ref_d.numpy().reshape(-1))


def test_rope_index_video(untied):
    hf = untied[0]
    vgrid = np.array([[4, 4, 6]])
    n = 4 * 4 * 6 // 4
    ids = np.array([[1, 2, 252] + [VIDEO] * n + [253, 7, 8]])
    mm = torch.tensor(np.where(ids == VIDEO, 2, 0)).int()
    ref, _ = hf.model.get_rope_index(torch.tensor(ids), mm_token_type_ids=mm, video_grid_thw=torch.tensor(vgrid),
                                     second_per_grid_ts=torch.tensor([0.5]))
    got, _ = rope.get_rope_index(ids, image_token_id=IMAGE, video_token_id=VIDEO, spatial_merge_size=2,
                                 video_grid_thw=vgrid, second_per_grid_ts=np.array([0.5]), tokens_per_second=2)
    np.testing.assert_array_equal(got, ref.numpy())


def test_mismatched_image_tokens_error(untied_flax):
    ids, mask, pv, grid = make_inputs([(1, 4, 4)], [[3, 3]], seed=10)
    with pytest.raises(ValueError, match="image tokens do not match"):
        untied_flax(ids, attention_mask=mask, pixel_values=np.concatenate([pv, pv]), image_grid_thw=np.array([[1, 4, 8]]))


def test_bad_checkpoint_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        q.from_pretrained(str(tmp_path))
    save_hf(build_hf_model(tiny_hf_config(), seed=1), str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["text_config"]["num_hidden_layers"] = 3
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="missing \\[2\\]"):
        q.from_pretrained(str(tmp_path))
