"""jaxprm.data.preprocess_internvl must equal transformers' InternVL image processor
(GotOcr2ImageProcessorPil with crop_to_patches) value for value, and the model cards'
dynamic_preprocess tile for tile."""
import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil, get_optimal_tiled_canvas)

from jaxprm.data.preprocess_internvl import (
    IMAGENET_MEAN, IMAGENET_STD, InternVLImageProcessor, best_grid, dynamic_tiles, expand_image_token_ids,
    expand_image_tokens)

# (width, height): odd sizes, tiny, square, exact multiples, extreme aspect ratios both ways
SIZES = [(1, 1), (3, 997), (997, 3), (449, 447), (1000, 37), (37, 1000), (448, 448), (896, 448), (500, 333),
         (1343, 211), (13, 5000)]


def _hf(max_patches=12, min_patches=1, size=448):
    return GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=min_patches, max_patches=max_patches,
                                    size={"height": size, "width": size}, image_mean=IMAGENET_MEAN,
                                    image_std=IMAGENET_STD)


def _image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed + w * 7 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8), mode)


@pytest.mark.parametrize("wh", SIZES)
def test_equals_transformers(wh):
    im = _image(*wh)
    ref = _hf()(images=[im], return_tensors="np")
    got = InternVLImageProcessor()(im)
    np.testing.assert_array_equal(got["num_patches"], np.asarray(ref["num_patches"]))
    assert got["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(got["pixel_values"], np.asarray(ref["pixel_values"]))


def test_several_images_rgba_grey_bytes_and_tile_limits():
    ims = [_image(300, 700, mode="RGBA"), _image(640, 480).convert("L"), _image(50, 900)]
    buf = io.BytesIO()
    ims[2].save(buf, format="PNG")
    for kw in ({}, {"max_patches": 6}, {"max_patches": 4, "min_patches": 2}, {"max_patches": 1}):
        ref = _hf(**kw)(images=ims, return_tensors="np")
        proc = InternVLImageProcessor(min_tiles=kw.get("min_patches", 1), max_tiles=kw.get("max_patches", 12))
        got = proc([ims[0], ims[1], buf.getvalue()])
        np.testing.assert_array_equal(got["num_patches"], np.asarray(ref["num_patches"]))
        np.testing.assert_array_equal(got["pixel_values"], np.asarray(ref["pixel_values"]))
        assert [proc.num_tiles(im.height, im.width) for im in ims] == got["num_patches"].tolist()


@pytest.mark.parametrize("max_tiles", [1, 4, 6, 12, 40])
def test_grid_choice_equals_transformers(max_tiles):
    rng = np.random.default_rng(max_tiles)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 4000, (300, 2))] + SIZES
    sizes += [(448 * c, 448 * r) for c in range(1, 7) for r in range(1, 7)] + [(2 * c, r) for c in (1, 2, 3) for r in (1, 2, 3)]
    for w, h in sizes:
        assert best_grid(w, h, 448, 1, max_tiles) == get_optimal_tiled_canvas((h, w), (448, 448), 1, max_tiles), (w, h)


def _model_card_tiles(image: Image.Image, image_size=448, min_num=1, max_num=12, use_thumbnail=True):
    """The model cards' dynamic_preprocess, re-stated: candidate (i, j) grids from a set sorted by tile
    count, closest aspect ratio (ties: the later grid while the image area exceeds half of it),
    resize with PIL's default (bicubic) filter, crop in reading order, thumbnail when more than one."""
    w, h = image.size
    aspect = w / h
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}, key=lambda x: x[0] * x[1])
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and w * h > 0.5 * image_size * image_size * r[0] * r[1]:
            best = r
    tw, th = image_size * best[0], image_size * best[1]
    resized = image.resize((tw, th))
    cols = tw // image_size
    tiles = [resized.crop(((i % cols) * image_size, (i // cols) * image_size, (i % cols + 1) * image_size,
                           (i // cols + 1) * image_size)) for i in range(best[0] * best[1])]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return [np.asarray(t) for t in tiles]


@pytest.mark.parametrize("wh", [(3, 997), (1000, 37), (449, 447), (500, 333), (1343, 211)])
def test_equals_model_card_dynamic_preprocess(wh):
    im = _image(*wh)
    ref = _model_card_tiles(im)
    got = dynamic_tiles(np.asarray(im))
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_config_round_trip_and_remote_code_config(tmp_path):
    p = InternVLImageProcessor(max_tiles=6)
    p.save_pretrained(tmp_path)
    q = InternVLImageProcessor.from_pretrained(tmp_path)
    assert (q.max_tiles, q.image_size, q.image_mean) == (6, 448, IMAGENET_MEAN)
    hf = GotOcr2ImageProcessorPil.from_pretrained(str(tmp_path))
    assert hf.crop_to_patches and hf.max_patches == 6
    r = InternVLImageProcessor.from_config({"force_image_size": 448, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
                                            "use_thumbnail": True, "dynamic_image_size": True})
    assert (r.max_tiles, r.use_thumbnail) == (12, True)


def test_image_token_expansion():
    text = expand_image_tokens("<image>\nA<image>B", [2, 1], image_seq_length=3)
    assert text == "<img>" + "<IMG_CONTEXT>" * 6 + "</img>\nA<img>" + "<IMG_CONTEXT>" * 3 + "</img>B"
    with pytest.raises(ValueError, match="1 '<image>' placeholders but 2 images"):
        expand_image_tokens("<image>", [1, 1])
    ids = expand_image_token_ids([5, 9, 6, 9], [1, 2], placeholder_id=9, start_id=1, context_id=2, end_id=3,
                                 image_seq_length=2)
    assert ids == [5, 1, 2, 2, 3, 6, 1, 2, 2, 2, 2, 3]
