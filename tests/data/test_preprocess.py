"""jaxprm.data.preprocess must equal transformers' Qwen2VLImageProcessorPil value for value."""
import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from jaxprm.data.preprocess import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageProcessor,
    num_image_tokens,
    smart_resize,
)

hf_qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
HFProcessor = hf_qwen2_vl.Qwen2VLImageProcessorPil


def _hf(images, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = HFProcessor(**kwargs)(images=images)
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def _assert_same(images, ours: ImageProcessor | None = None, **hf_kwargs):
    ours = ours or ImageProcessor()
    pv_hf, grid_hf = _hf(images, **hf_kwargs)
    out = ours(images)
    assert out["pixel_values"].dtype == np.float32
    assert out["image_grid_thw"].dtype == np.int64
    assert out["pixel_values"].shape == pv_hf.shape
    np.testing.assert_array_equal(out["image_grid_thw"], grid_hf)
    np.testing.assert_allclose(out["pixel_values"], pv_hf, rtol=0, atol=0)
    return out


def _rand_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_defaults_match_hf():
    hf = HFProcessor()
    assert hf.size["shortest_edge"] == DEFAULT_MIN_PIXELS == 56 * 56
    assert hf.size["longest_edge"] == DEFAULT_MAX_PIXELS == 28 * 28 * 1280
    ours = ImageProcessor()
    assert (ours.patch_size, ours.temporal_patch_size, ours.merge_size) == (hf.patch_size, hf.temporal_patch_size, hf.merge_size)
    np.testing.assert_allclose(ours.image_mean, hf.image_mean)
    np.testing.assert_allclose(ours.image_std, hf.image_std)


def test_smart_resize_matches_hf():
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (1, 200), (200, 1), (27, 29), (28, 28), (42, 42), (14, 14), (3000, 4000), (4000, 20)]
    sizes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for kw in ({}, {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}, {"factor": 32, "min_pixels": 1024, "max_pixels": 65536}):
            assert smart_resize(h, w, **kw) == hf_qwen2_vl.smart_resize(h, w, **kw), (h, w, kw)


@pytest.mark.parametrize("hw", [(37, 53), (1, 1), (2, 3), (500, 17), (17, 500), (1000, 6), (6, 1000), (224, 224), (57, 111)])
def test_pixel_values_equal_hf(hw):
    h, w = hw
    im = Image.fromarray(_rand_rgb(h, w, seed=h * 1000 + w))
    out = _assert_same([im])
    g = out["image_grid_thw"][0]
    assert g[0] == 1 and out["pixel_values"].shape == (g[1] * g[2], 3 * 2 * 14 * 14)


def test_large_image_downscaled_like_hf():
    im = Image.fromarray(_rand_rgb(1100, 1700, seed=3))
    out = _assert_same([im])
    g = out["image_grid_thw"][0]
    assert g[1] * g[2] * 14 * 14 <= DEFAULT_MAX_PIXELS


def test_aspect_ratio_limit():
    # 200:1 is allowed (HF raises only when the ratio is > 200); 201:1 raises, naming the size.
    _assert_same([Image.fromarray(_rand_rgb(1000, 5))])
    bad = Image.fromarray(_rand_rgb(201, 1))
    with pytest.raises(ValueError, match="aspect ratio"):
        _hf([bad])
    with pytest.raises(ValueError, match=r"aspect ratio.*201x1"):
        ImageProcessor()([bad])
    with pytest.raises(ValueError, match=r"aspect ratio"):
        smart_resize(1, 201)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "P+transparency", "1", "CMYK", "I", "F"])
def test_non_rgb_modes_equal_hf(mode):
    rng = np.random.default_rng(7)
    rgba = Image.fromarray(rng.integers(0, 256, (45, 61, 4), dtype=np.uint8), "RGBA")
    if mode == "RGBA":
        im = rgba
    elif mode == "P":
        im = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "P+transparency":
        im = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        im.info["transparency"] = 3
    else:
        im = rgba.convert(mode) if mode != "I" else rgba.convert("L").convert("I")
    _assert_same([im])


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_numpy_inputs_equal_hf(channels):
    x = np.random.default_rng(channels).integers(0, 256, (45, 61, channels), dtype=np.uint8)
    out = _assert_same([x])
    if channels == 1:  # a 2-D grayscale array (which HF does not accept) equals its (H, W, 1) form
        np.testing.assert_array_equal(ImageProcessor()([x[..., 0]])["pixel_values"], out["pixel_values"])


def test_encoded_bytes_and_paths(tmp_path):
    im = Image.fromarray(_rand_rgb(40, 70, seed=5))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    ref = ImageProcessor()([im])
    np.testing.assert_array_equal(ImageProcessor()([buf.getvalue()])["pixel_values"], ref["pixel_values"])
    p = tmp_path / "im.png"
    p.write_bytes(buf.getvalue())
    np.testing.assert_array_equal(ImageProcessor()([str(p)])["pixel_values"], ref["pixel_values"])
    with pytest.raises(ValueError, match="could not decode"):
        ImageProcessor()([b"not an image"])


def test_several_images_concatenate_like_hf():
    ims = [
        Image.fromarray(_rand_rgb(37, 53, seed=1)),
        Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 30, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(_rand_rgb(300, 200, seed=3)).convert("L"),
    ]
    out = _assert_same(ims)
    assert out["image_grid_thw"].shape == (3, 3)
    assert out["pixel_values"].shape[0] == int(np.prod(out["image_grid_thw"], axis=1).sum())
    # Each image's block equals processing it alone.
    start = 0
    for im, g in zip(ims, out["image_grid_thw"]):
        n = int(np.prod(g))
        np.testing.assert_array_equal(out["pixel_values"][start:start + n], ImageProcessor()([im])["pixel_values"])
        start += n


def test_custom_min_max_pixels_equal_hf():
    ims = [Image.fromarray(_rand_rgb(37, 53, seed=1)), Image.fromarray(_rand_rgb(400, 300, seed=2))]
    ours = ImageProcessor(min_pixels=128 * 28 * 28, max_pixels=160 * 28 * 28)
    out = _assert_same(ims, ours, min_pixels=128 * 28 * 28, max_pixels=160 * 28 * 28)
    for g in out["image_grid_thw"]:
        assert 128 * 28 * 28 <= g[1] * g[2] * 14 * 14 <= 160 * 28 * 28
    small = ImageProcessor(min_pixels=28 * 28, max_pixels=4 * 28 * 28)
    _assert_same(ims, small, size={"shortest_edge": 28 * 28, "longest_edge": 4 * 28 * 28})


def test_from_pretrained_both_config_styles(tmp_path):
    ims = [Image.fromarray(_rand_rgb(123, 77, seed=9))]
    legacy = {
        "min_pixels": 3136, "max_pixels": 50176, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }
    new = {k: v for k, v in legacy.items() if k not in ("min_pixels", "max_pixels")}
    new["size"] = {"shortest_edge": 3136, "longest_edge": 50176}
    for i, cfg in enumerate([legacy, new]):
        d = tmp_path / f"ckpt{i}"
        d.mkdir()
        (d / "preprocessor_config.json").write_text(json.dumps(cfg))
        ours = ImageProcessor.from_pretrained(d)
        assert (ours.min_pixels, ours.max_pixels) == (3136, 50176)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = HFProcessor.from_pretrained(str(d))
            ref = hf(images=ims)
        np.testing.assert_array_equal(ours(ims)["pixel_values"], np.asarray(ref["pixel_values"]))
        np.testing.assert_array_equal(ours(ims)["image_grid_thw"], np.asarray(ref["image_grid_thw"]))
    with pytest.raises(FileNotFoundError):
        ImageProcessor.from_pretrained(tmp_path / "missing")


def test_num_image_tokens():
    assert num_image_tokens([1, 4, 6]) == 6
    np.testing.assert_array_equal(num_image_tokens(np.array([[1, 4, 6], [1, 2, 2]])), [6, 1])
    assert ImageProcessor(merge_size=1).num_image_tokens([1, 4, 6]) == 24
    ip = ImageProcessor()
    g = ip(Image.fromarray(_rand_rgb(37, 53)))["image_grid_thw"][0]
    np.testing.assert_array_equal(ip.grid_thw(37, 53), g)


def test_patch_order():
    """Row k of pixel_values is patch (merge-window-major) k: windows of merge x merge patches in raster
    order, inside a window the patches in raster order; each row is C x T x P x P with the frame repeated."""
    ip = ImageProcessor()
    img = np.random.default_rng(0).standard_normal((3, 56, 84)).astype(np.float32)
    pv, g = ip.patchify(img)
    assert g.tolist() == [1, 4, 6]
    row = pv.reshape(-1, 3, 2, 14, 14)
    np.testing.assert_array_equal(row[:, :, 0], row[:, :, 1])
    k = 0
    for wy in range(2):
        for wx in range(3):
            for my in range(2):
                for mx in range(2):
                    y, x = (wy * 2 + my) * 14, (wx * 2 + mx) * 14
                    np.testing.assert_array_equal(row[k, :, 0], img[:, y:y + 14, x:x + 14])
                    k += 1
