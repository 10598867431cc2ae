"""``ImageProcessor`` normalises through a per-value table on patch-ordered uint8 pixels (issue 19 item 1);
the result is bit for bit the float64-rescale / float32-normalise / patchify of the float image that HF's
``Qwen2VLImageProcessorPil`` does (tests/data/test_preprocess.py compares whole outputs with HF)."""
from __future__ import annotations

import numpy as np
import pytest

from jaxprm.data.preprocess import ImageProcessor


def _reference(ip: ImageProcessor, resized: np.ndarray):
    """The former path: rescale in float64, normalise in float32 on the channels-first image, patchify."""
    chw = np.moveaxis(resized, -1, 0)
    x = (chw.astype(np.float64) * ip.rescale_factor).astype(np.float32)
    mean = np.asarray(ip.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(ip.image_std, dtype=np.float32)[:, None, None]
    return ip.patchify((x - mean) / std)


@pytest.mark.parametrize("kw", [
    {},
    dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
    dict(rescale_factor=1 / 127.5, image_mean=(0.1, 0.2, 0.3), image_std=(0.9, 1.1, 0.7)),
    dict(patch_size=16, merge_size=2, temporal_patch_size=1),
    dict(patch_size=14, merge_size=1, temporal_patch_size=3),
])
@pytest.mark.parametrize("hw", [(56, 56), (112, 28 * 5), (28 * 9, 56)])
def test_table_patchify_is_bit_identical(kw, hw):
    ip = ImageProcessor(**kw)
    f = ip.patch_size * ip.merge_size
    h, w = (hw[0] // 28) * f, (hw[1] // 28) * f
    rng = np.random.default_rng(h * 1000 + w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]  # the extremes
    got, grid = ip.patchify_uint8(img)
    ref, ref_grid = _reference(ip, img)
    assert got.dtype == np.float32 and got.shape == ref.shape and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    np.testing.assert_array_equal(grid, ref_grid)


def test_every_value_of_the_table_is_the_normalised_value():
    ip = ImageProcessor()
    v = np.arange(256, dtype=np.uint8)
    for c in range(3):
        x = (v.astype(np.float64) * ip.rescale_factor).astype(np.float32)
        ref = (x - np.float32(ip.image_mean[c])) / np.float32(ip.image_std[c])
        np.testing.assert_array_equal(ip._value_table()[c].view(np.uint32), ref.view(np.uint32))
    ip.image_mean = (0.0, 0.0, 0.0)  # a changed setting rebuilds the table
    np.testing.assert_array_equal(ip._value_table()[0], ip.normalize(v[None])[0])


def test_preprocess_one_equals_the_reference_path_on_resized_images():
    from PIL import Image

    ip = ImageProcessor(max_pixels=64 * 28 * 28)
    rng = np.random.default_rng(0)
    for h, w in ((100, 37), (333, 512), (28, 28)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rh, rw = ip.resized_size(h, w)
        resized = np.asarray(Image.fromarray(img).resize((rw, rh), resample=Image.Resampling.BICUBIC))
        got, grid = ip.preprocess_one(img)
        ref, ref_grid = _reference(ip, resized)
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
        np.testing.assert_array_equal(grid, ref_grid)


def test_size_not_a_multiple_is_refused():
    with pytest.raises(ValueError, match="not a multiple"):
        ImageProcessor().patchify_uint8(np.zeros((30, 28, 3), np.uint8))


def test_several_images_are_written_in_place_equal_to_one_by_one():
    ip = ImageProcessor(max_pixels=64 * 28 * 28)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((100, 37), (56, 56), (300, 90))]
    out = ip(images)
    ones = [ip.preprocess_one(im) for im in images]
    np.testing.assert_array_equal(out["pixel_values"].view(np.uint32),
                                  np.concatenate([pv for pv, _ in ones]).view(np.uint32))
    np.testing.assert_array_equal(out["image_grid_thw"], np.stack([g for _, g in ones]))
    assert out["pixel_values"].dtype == np.float32 and out["image_grid_thw"].dtype == np.int64
    with pytest.raises(ValueError, match="image 1"):
        ip([images[0], np.zeros((2, 2, 2), np.uint8)])


def test_out_must_fit():
    ip = ImageProcessor()
    img = np.zeros((56, 56, 3), np.uint8)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        ip.patchify_uint8(img, out=np.empty((16, 10), np.float32))
    buf = np.empty((16, 1176), np.float32)
    got, _ = ip.patchify_uint8(img, out=buf)
    assert got is buf
