"""The scorer's host shortcuts give what the plain paths give (issue 19 item 1).

* ``PRM._positions`` memoises the M-RoPE positions through the last image token per (tokens, grids)
  and counts the text after them on: equal to ``rope.get_rope_index`` on the whole sequence.
* Rows of a batch that share one pixel array (one problem's candidates) carry it once with
  ``pixel_rows``; the device copies it to the rows (``_gather_pixels``): the rows' pixel inputs equal
  the per-row packing, and the scores equal scoring the same items with a separate image per row.
"""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxprm import checkpointing as ck
from jaxprm.data.synthetic import (build_synthetic_internvl_tokenizer, build_synthetic_tokenizer,
                                   tiny_internvl_config, tiny_model_config)
from jaxprm.models.prm import PRMModel
from jaxprm.models.qwen2_5_vl import Qwen25VL, rope
from jaxprm.scoring import PRM
from jaxprm.scoring.device import TokenSequence, _gather_pixels

QUESTION = "How many red squares are left of the blue circle?"
BUCKETS = dict(batch_size=4, batch_buckets=(1, 4), length_buckets=(512,), patch_buckets=(64, 128))


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _cands(n, seed):
    rng = np.random.default_rng(seed)
    words = "the red square left of blue circle count total two three so answer is".split()
    return [[" ".join(rng.choice(words, size=int(rng.integers(3, 12)))) + "." for _ in range(1 + i % 3)]
            for i in range(n)]


@pytest.fixture(scope="module")
def prm():
    tok = build_synthetic_tokenizer()
    model = PRMModel(Qwen25VL(tiny_model_config(tok), rngs=nnx.Rngs(0)), ck.default_spec(tok))
    return PRM(model, tok, **BUCKETS)


def _rope(prm, ids, grid):
    cfg = prm.config
    pos, _ = rope.get_rope_index(ids[None], image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                                 spatial_merge_size=cfg.vision.spatial_merge_size, image_grid_thw=grid,
                                 tokens_per_second=cfg.tokens_per_second)
    return pos[:, 0]


def test_positions_memo_equals_get_rope_index(prm):
    cfg = prm.config
    img, vid, t = cfg.image_token_id, cfg.video_token_id, 7
    g1, g2 = np.array([[1, 4, 6]]), np.array([[1, 4, 6], [1, 8, 2]])
    cases = [
        (np.full(9, t), None),  # text only
        (np.r_[[t] * 3, [img] * 6, [t] * 5], g1),
        (np.r_[[t] * 3, [img] * 6, [t] * 11], g1),  # same head, longer tail: from the memo
        (np.r_[[img] * 6, [t] * 2], g1),  # the image first
        (np.r_[[t] * 2, [img] * 6], g1),  # the image last: nothing after it
        (np.r_[[t] * 2, [img] * 6, [t] * 3, [img] * 4, [t] * 4], g2),  # two images
        (np.r_[[t] * 2, [img] * 6, [img] * 4, [t] * 4], g2),  # back to back
        (np.r_[[t] * 3, [img] * 6, [t] * 5], np.array([[1, 6, 4]])),  # same tokens, another grid
    ]
    if vid is not None:
        cases.append((np.r_[[t] * 2, [vid] * 3, [t] * 2], None))  # no grid for it: the same error
    for _ in range(2):  # the second round from the memo
        for ids, grid in cases:
            ids = ids.astype(np.int32)
            try:
                ref = _rope(prm, ids, grid)
            except ValueError as e:
                with pytest.raises(ValueError, match="more"):
                    prm._positions(ids, grid)
                assert "more" in str(e)
                continue
            got = prm._positions(ids, grid)
            assert got.dtype == np.int32 and got.shape == (3, len(ids))
            np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match="more image placeholder runs"):
        prm._positions(np.r_[[t] * 2, [img] * 6, [t] * 2].astype(np.int32), None)


def test_encoded_positions_equal_get_rope_index(prm):
    pv, grid = prm._images(_image(112, 84, 0))
    for steps in _cands(5, 1):
        e = prm._encode(pv, grid, QUESTION, steps)
        np.testing.assert_array_equal(e.position_ids, _rope(prm, e.input_ids, grid))


def test_shared_pixel_rows_equal_per_row_packing(prm):
    pv, grid = prm._images(_image(112, 112, 1))  # 64 patches: exactly a bucket (no copy)
    pv2, grid2 = prm._images(_image(84, 56, 2))  # 24 patches: padded
    sc = prm.scorer
    for p, g, units in ((pv, grid, 64), (pv2, grid2, 64), (pv2, grid2, 128)):
        seqs = [TokenSequence(e.input_ids, e.position_ids, e.label_positions, p, g)
                for e in (prm._encode(p, g, QUESTION, c) for c in _cands(3, 3))]
        shared = sc._pack(seqs, 4, 512, units)
        assert shared["pixel_values"].shape[0] == 1 and shared["pixel_rows"].tolist() == [0, 0, 0, 0]
        per_row = sc._pack(seqs, 4, 512, units, shared_pixels=False)
        assert "pixel_rows" not in per_row
        gathered = {k: np.asarray(v) for k, v in _gather_pixels(shared).items()}
        assert set(gathered) == set(per_row)
        for k, v in per_row.items():
            if k == "pixel_values":  # the dummy row carries the image (its layout is all padding)
                np.testing.assert_array_equal(gathered[k][:3], v[:3])
            else:
                np.testing.assert_array_equal(gathered[k], v, err_msg=k)
    # rows with different pixel arrays are packed per row
    seqs = [TokenSequence([5, 6], [0, 1], [1], p, g) for p, g in ((pv, grid), (pv.copy(), grid))]
    assert "pixel_rows" not in sc._pack(seqs, 4, 512, 64)


def test_scores_with_a_shared_image_equal_separate_images(prm):
    image = _image(112, 112, 4)
    cands = _cands(6, 5)
    shared = prm.score_batch([(image, QUESTION, c) for c in cands])  # one image object: shared pixel rows
    copies = prm.score_batch([(image.copy(), QUESTION, c) for c in cands])  # one per item: per-row pixels
    for a, b in zip(shared, copies):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert prm.scorer.trace_counts["full"] >= 2  # both layouts ran


def test_warmup_compiles_the_shared_layout(prm):
    other = PRM(prm.model, prm.tokenizer, batch_size=4, batch_buckets=(1, 4), length_buckets=(640,),
                patch_buckets=(32,))  # shapes no other test compiles
    n = other.warmup(text_only=False, shared=False, shared_images=False)
    assert n == 2  # full: rows 1 and 4, each row's own image
    assert other.warmup(text_only=False, shared=False) == 1  # + rows 4 sharing one image
    before = prm.scorer.num_compiles
    prm.warmup(text_only=False, shared=False)
    after = prm.scorer.num_compiles
    assert prm.warmup(text_only=False, shared=False) == 0
    image = _image(112, 112, 6)
    prm.score_batch([(image, QUESTION, c) for c in _cands(4, 7)])
    prm.score_batch([(image.copy(), QUESTION, c) for c in _cands(4, 7)])
    assert prm.scorer.num_compiles == after >= before


def test_internvl_shared_tiles_equal_per_row_packing():
    from jaxprm.models.internvl import InternVL

    tok = build_synthetic_internvl_tokenizer()
    model = PRMModel(InternVL(tiny_internvl_config(tok), rngs=nnx.Rngs(0)),
                     ck.default_spec(tok, prompt_style="visualprm"))
    p = PRM(model, tok, batch_size=4, batch_buckets=(1, 4), length_buckets=(1024,), patch_buckets=(3, 7))
    image = _image(112, 56, 8)
    pv, tiles = p._images(image)
    seqs = [TokenSequence(e.input_ids, e.position_ids, e.label_positions, pv, tiles)
            for e in (p._encode(pv, tiles, QUESTION, c) for c in _cands(3, 9))]
    units = p.scorer._patches(pv.shape[0])
    shared = p.scorer._pack(seqs, 4, 1024, units)
    per_row = p.scorer._pack(seqs, 4, 1024, units, shared_pixels=False)
    assert shared["pixel_values"].shape[0] == 1
    gathered = {k: np.asarray(v) for k, v in _gather_pixels(shared).items()}
    np.testing.assert_array_equal(gathered["pixel_values"][:3], per_row["pixel_values"][:3])
    np.testing.assert_array_equal(gathered["image_flags"], per_row["image_flags"])
    a = p.score_batch([(image, QUESTION, c) for c in _cands(3, 9)])
    b = p.score_batch([(image.copy(), QUESTION, c) for c in _cands(3, 9)])
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
