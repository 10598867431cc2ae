"""InternVL image preprocessing (dynamic tiling) in numpy + Pillow, and the image-token expansion.

This reproduces, value for value, transformers' ``GotOcr2ImageProcessorPil`` with
``crop_to_patches=True`` (the image processor of ``InternVLProcessor``, transformers 5.x,
``transformers/models/got_ocr2/image_processing_pil_got_ocr2.py``), which is the model cards'
``load_image`` / ``dynamic_preprocess``. Per image:

1. convert to RGB exactly as ``jaxprm.data.preprocess.to_rgb_array`` (HF's ``convert_to_rgb``);
2. choose the tile grid (columns x rows, ``min_tiles <= columns*rows <= max_tiles``) whose aspect
   ratio is closest to the image's; on a tie the later grid in HF's order (more tiles) wins while the
   image area exceeds half the grid's area (``get_optimal_tiled_canvas``);
3. resize the uint8 image to (columns*448, rows*448) with Pillow's bicubic filter and cut it into
   448x448 tiles, row-major; when that gives more than one tile, append a thumbnail: the whole image
   resized to 448x448 (with ``max_tiles == 1`` the image is just resized to one tile);
4. rescale (``uint8 -> float64 * 1/255 -> float32``) and normalise ``(x - mean) / std`` in float32
   with the ImageNet mean/std.

``pixel_values`` is (total tiles, 3, 448, 448) float32, channels first, images in order;
``num_patches`` the tile count of each image. Each tile becomes ``image_seq_length`` (256) language
model tokens: ``expand_image_tokens`` writes ``<img>`` + ``<IMG_CONTEXT>`` x (256 x tiles) +
``</img>`` in place of each image placeholder, as the remote code's ``chat`` and HF's processor do.

Differences from HF are those of ``jaxprm.data.preprocess`` (encoded bytes and paths decoded with
Pillow, numpy arrays always channels-last, float arrays refused).
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from jaxprm.atomic import atomic_write_json
from jaxprm.data.preprocess import ImageLike, RescaleNormalize, as_image_list, to_rgb_array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


@functools.lru_cache(maxsize=32)
def supported_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (columns, rows) with ``min_tiles <= columns*rows <= max_tiles``, by tile count (stable:
    columns-major within a count), the order HF's ``get_all_supported_aspect_ratios`` gives."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def best_grid(width: int, height: int, tile: int = 448, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """(columns, rows) of the tiling whose aspect ratio is closest to width / height (HF's
    ``get_optimal_tiled_canvas`` / the model cards' ``find_closest_aspect_ratio``)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image must have a positive width and height, got {width}x{height}")
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in supported_grids(int(min_tiles), int(max_tiles)):
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=Image.Resampling.BICUBIC))


def dynamic_tiles(rgb: np.ndarray, tile: int = 448, min_tiles: int = 1, max_tiles: int = 12,
                  use_thumbnail: bool = True) -> list[np.ndarray]:
    """(H, W, 3) uint8 -> the uint8 (tile, tile, 3) tiles InternVL feeds its vision tower."""
    height, width = rgb.shape[:2]
    if max_tiles <= 1:
        return [_resize(rgb, tile, tile)]
    cols, rows = best_grid(width, height, tile, min_tiles, max_tiles)
    resized = _resize(rgb, cols * tile, rows * tile)
    tiles = [resized[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(_resize(rgb, tile, tile))
    return tiles


class InternVLImageProcessor(RescaleNormalize):
    """numpy/Pillow twin of transformers' ``GotOcr2ImageProcessorPil`` as InternVL configures it.

    ``__call__(images)`` returns ``{"pixel_values": (N_tiles, 3, S, S) float32, "num_patches":
    (n_images,) int64}``, equal to HF's output for the same images and settings.
    """

    def __init__(self, image_size: int = 448, min_tiles: int = 1, max_tiles: int = 12, use_thumbnail: bool = True,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 rescale_factor: float = 1 / 255):
        if image_size <= 0 or min_tiles < 1 or max_tiles < min_tiles:
            raise ValueError(f"need image_size > 0 and 1 <= min_tiles <= max_tiles, got {image_size}, "
                             f"{min_tiles}, {max_tiles}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 entries (RGB)")
        self.image_size, self.min_tiles, self.max_tiles = int(image_size), int(min_tiles), int(max_tiles)
        self.use_thumbnail = bool(use_thumbnail)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.rescale_factor = float(rescale_factor)

    def __repr__(self) -> str:
        return (f"InternVLImageProcessor(image_size={self.image_size}, min_tiles={self.min_tiles}, "
                f"max_tiles={self.max_tiles}, use_thumbnail={self.use_thumbnail})")

    # -- config ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "InternVLImageProcessor":
        """From a ``preprocessor_config.json`` dict of transformers' layout (``crop_to_patches``,
        ``min_patches``, ``max_patches``, ``size``) or the remote-code ``config.json`` fields
        (``force_image_size``, ``min_dynamic_patch``, ``max_dynamic_patch``, ``use_thumbnail``,
        ``dynamic_image_size``)."""
        if "max_dynamic_patch" in cfg or "force_image_size" in cfg:
            size = cfg.get("force_image_size") or (cfg.get("vision_config") or {}).get("image_size", 448)
            dynamic = cfg.get("dynamic_image_size", True)
            return cls(image_size=int(size), min_tiles=int(cfg.get("min_dynamic_patch", 1)),
                       max_tiles=int(cfg.get("max_dynamic_patch", 12)) if dynamic else 1,
                       use_thumbnail=bool(cfg.get("use_thumbnail", True)))
        size = cfg.get("size") or {"height": 448, "width": 448}
        if size.get("height") != size.get("width"):
            raise ValueError(f"InternVL tiles are square; size {size} is not")
        if cfg.get("resample", 3) not in (None, 3, Image.Resampling.BICUBIC):
            raise ValueError(f"only bicubic resampling (3) is supported, config has resample={cfg.get('resample')!r}")
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if cfg.get(flag, True) is False:
                raise ValueError(f"config sets {flag}=False, which this processor does not support")
        crop = cfg.get("crop_to_patches", False)
        return cls(image_size=int(size["height"]), min_tiles=int(cfg.get("min_patches", 1)),
                   max_tiles=int(cfg.get("max_patches", 12)) if crop else 1,
                   image_mean=cfg.get("image_mean", IMAGENET_MEAN), image_std=cfg.get("image_std", IMAGENET_STD),
                   rescale_factor=cfg.get("rescale_factor", 1 / 255))

    @classmethod
    def from_pretrained(cls, hf_dir: str | os.PathLike) -> "InternVLImageProcessor":
        """``preprocessor_config.json`` when present, else the remote-code ``config.json``."""
        hf_dir = os.fspath(hf_dir)
        for name in ("preprocessor_config.json", "config.json"):
            path = os.path.join(hf_dir, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    try:
                        return cls.from_config(json.load(f))
                    except (ValueError, TypeError, KeyError) as e:
                        raise ValueError(f"{path}: {e}") from None
        raise FileNotFoundError(f"no preprocessor_config.json or config.json in {hf_dir!r}")

    def to_config(self) -> dict[str, Any]:
        """A ``preprocessor_config.json`` dict that both ``from_config`` and transformers read."""
        return {"image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": self.max_tiles > 1,
                "min_patches": self.min_tiles, "max_patches": self.max_tiles,
                "size": {"height": self.image_size, "width": self.image_size},
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "rescale_factor": self.rescale_factor, "resample": 3, "do_resize": True, "do_rescale": True,
                "do_normalize": True, "do_convert_rgb": True}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_write_json(os.path.join(os.fspath(directory), "preprocessor_config.json"), self.to_config(), indent=2)

    # -- sizes -------------------------------------------------------------------------------------------
    def num_tiles(self, height: int, width: int) -> int:
        """Tiles an image of this size gives (thumbnail included), without processing it."""
        if self.max_tiles <= 1:
            return 1
        c, r = best_grid(width, height, self.image_size, self.min_tiles, self.max_tiles)
        return c * r + (1 if self.use_thumbnail and c * r > 1 else 0)

    # -- processing --------------------------------------------------------------------------------------
    def normalize_tile(self, tile: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 -> (3, S, S) float32, rescaled and normalised as HF does (``normalize``): each
        value looked up in the per-channel table of its 256 results (~3x faster than the float64
        arithmetic on every pixel, the same float32 values)."""
        chw = np.moveaxis(np.asarray(tile, np.uint8), -1, 0)
        table = self._value_table()
        out = np.empty(chw.shape, np.float32)
        for c in range(chw.shape[0]):
            np.take(table[c], chw[c], out=out[c], mode="clip")  # uint8 indices: never clipped
        return out

    def preprocess_one(self, image: ImageLike) -> np.ndarray:
        """One image -> (tiles, 3, S, S) float32."""
        tiles = dynamic_tiles(to_rgb_array(image), self.image_size, self.min_tiles, self.max_tiles,
                              self.use_thumbnail)
        return np.stack([self.normalize_tile(t) for t in tiles])

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> dict[str, np.ndarray]:
        images = as_image_list(images)
        out = []
        for i, im in enumerate(images):
            try:
                out.append(self.preprocess_one(im))
            except (ValueError, TypeError) as e:
                if len(images) == 1:
                    raise
                raise type(e)(f"image {i}: {e}") from e
        return {"pixel_values": np.concatenate(out), "num_patches": np.array([len(x) for x in out], np.int64)}


def image_token_text(num_tiles: int, image_seq_length: int = 256) -> str:
    """``<img>`` + ``<IMG_CONTEXT>`` x (image_seq_length x num_tiles) + ``</img>``."""
    if num_tiles < 1:
        raise ValueError(f"an image has at least one tile, got {num_tiles}")
    return IMG_START + IMG_CONTEXT * (image_seq_length * int(num_tiles)) + IMG_END


def expand_image_tokens(text: str, num_tiles: Sequence[int], image_seq_length: int = 256,
                        placeholder: str = "<image>") -> str:
    """Replace the i-th ``placeholder`` with ``image_token_text(num_tiles[i])``. The remote code's
    placeholder is ``<image>``; transformers' processor takes ``<IMG_CONTEXT>`` itself."""
    parts = text.split(placeholder)
    if len(parts) - 1 != len(num_tiles):
        raise ValueError(f"text has {len(parts) - 1} {placeholder!r} placeholders but {len(num_tiles)} images "
                         "were given")
    out = [parts[0]]
    for n, rest in zip(num_tiles, parts[1:]):
        out += [image_token_text(n, image_seq_length), rest]
    return "".join(out)


def expand_image_token_ids(ids: Sequence[int], num_tiles: Sequence[int], placeholder_id: int, start_id: int,
                           context_id: int, end_id: int, image_seq_length: int = 256) -> list[int]:
    """The same expansion on token ids: each ``placeholder_id`` -> start, context x (256 x tiles), end."""
    ids = [int(x) for x in ids]
    n_ph = sum(1 for x in ids if x == placeholder_id)
    if n_ph != len(num_tiles):
        raise ValueError(f"ids have {n_ph} image placeholders (id {placeholder_id}) but {len(num_tiles)} images "
                         "were given")
    out, it = [], iter(num_tiles)
    for x in ids:
        if x == placeholder_id:
            out += [start_id] + [context_id] * (image_seq_length * int(next(it))) + [end_id]
        else:
            out.append(x)
    return out
