"""Qwen2-VL / Qwen2.5-VL image preprocessing in numpy + Pillow.

This reproduces, value for value, transformers' ``Qwen2VLImageProcessorPil`` (transformers 5.x,
``transformers/models/qwen2_vl/image_processing_pil_qwen2_vl.py``), which is the image processor
of ``Qwen2_5_VLProcessor``. Per image:

1. convert to RGB (``convert_to_rgb``): a PIL image with an alpha band or a ``transparency`` entry is
   composited onto white with ``Image.alpha_composite`` and converted to RGB; any other mode is
   ``Image.convert("RGB")``. A uint8 ``(H, W, 4)`` array is composited onto white in float64 and
   rounded (``np.round``), ``(H, W, 1)`` / ``(H, W)`` arrays are repeated to three channels;
2. ``smart_resize`` the (height, width) to multiples of ``patch_size * merge_size`` with the pixel
   count in ``[min_pixels, max_pixels]`` (raises past an aspect ratio of 200);
3. resize the uint8 image with Pillow's ``Image.resize((w, h), BICUBIC)`` (always called, as HF does);
4. rescale: ``uint8 -> float64 * rescale_factor -> float32``;
5. normalise: ``(x - mean) / std`` in float32 with the OpenAI CLIP mean/std;
6. patchify to ``(grid_h * grid_w, C * temporal_patch_size * patch * patch)`` in HF's element order
   (merge windows outermost, then the ``merge x merge`` patches of a window, then channel, the frame
   repeated ``temporal_patch_size`` times, and the ``patch x patch`` pixels); ``grid_t`` is 1 for an image.

Steps 4-6 run on the resized uint8 pixels: they are put in patch order first (a uint8 copy), and each
value is then looked up in a per-channel table of the 256 results of steps 4-5, computed with exactly
those operations (so every float32 equals HF's bit for bit), instead of rescaling and normalising
millions of pixels in float64 and copying the float32 image into patch order.

Images are concatenated along the patch axis, and ``image_grid_thw`` is ``(n_images, 3)`` int64.

Differences from HF, all on inputs HF does not accept or misreads: encoded ``bytes`` and file paths are
decoded with Pillow (no EXIF transpose, like HF given the decoded image); numpy arrays are always taken as
channels-last ``(H, W[, C])`` (HF guesses the channel axis and may take a ``(3, W, 3)`` image as CHW);
2-D numpy arrays are accepted as grayscale; float arrays are refused (pass uint8).
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from PIL import Image

from jaxprm.atomic import atomic_write_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Defaults of transformers' Qwen2VLImageProcessorPil (size={"shortest_edge": 56*56, "longest_edge": 28*28*1280}).
# The released Qwen2.5-VL checkpoints set max_pixels=12845056 in preprocessor_config.json; use
# ``ImageProcessor.from_pretrained`` to pick that up.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200

ImageLike = Union[Image.Image, np.ndarray, bytes, bytearray, str, os.PathLike]


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """The (height, width) Qwen2-VL resizes an image to: both multiples of ``factor``, the pixel count in
    ``[min_pixels, max_pixels]`` (as far as the rounding allows), the aspect ratio kept as well as possible.

    Same arithmetic as transformers' ``smart_resize`` (Python's round-half-to-even included).
    Raises ``ValueError`` when the aspect ratio exceeds 200 or a side is not positive.
    """
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"image must have a positive height and width, got height x width = {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio} "
            f"(image height x width = {height}x{width})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# -- input handling -------------------------------------------------------------------------------------


def _open(image: ImageLike) -> Image.Image | np.ndarray:
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            im = Image.open(io.BytesIO(bytes(image)))
            im.load()
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ValueError(f"could not decode image bytes ({len(image)} bytes): {e}") from e
        return im
    if isinstance(image, (str, os.PathLike)):
        try:
            im = Image.open(image)
            im.load()
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"could not read image file {os.fspath(image)!r}: {e}") from e
        return im
    if isinstance(image, (Image.Image, np.ndarray)):
        return image
    if hasattr(image, "numpy") and callable(image.numpy):  # e.g. a CPU torch tensor
        return np.asarray(image.numpy())
    raise TypeError(f"unsupported image type {type(image).__name__}; pass a PIL image, a uint8 array, or encoded bytes")


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    return np.array(rgb)


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.integer):
            raise TypeError(f"numpy images must be uint8 (H, W[, C]) arrays in [0, 255], got dtype {image.dtype}")
        if image.size and (image.min() < 0 or image.max() > 255):
            raise ValueError(f"integer image values must lie in [0, 255], got [{image.min()}, {image.max()}]")
        image = image.astype(np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"numpy images must be channels-last (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {image.shape}")
    c = image.shape[-1]
    if c == 1:
        return np.repeat(image, 3, axis=-1)
    if c == 4:
        alpha = image[..., 3:4] / 255
        composite = alpha * image[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    return image


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Decode/convert one image to an ``(H, W, 3)`` uint8 array the way HF's ``convert_to_rgb`` does."""
    im = _open(image)
    if isinstance(im, Image.Image):
        return _pil_to_rgb(im)
    return _array_to_rgb(np.asarray(im))


# -- the processor ---------------------------------------------------------------------------------------


def as_image_list(images) -> list:
    """One image (PIL, encoded bytes, a path, an array) or a sequence of them -> a non-empty list."""
    if isinstance(images, (Image.Image, bytes, bytearray, str, os.PathLike)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype != object
    ):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    return images


class RescaleNormalize:
    """HF's rescale + normalise of uint8 pixels, for an image processor with ``rescale_factor``,
    ``image_mean`` and ``image_std`` (both backbones' processors): ``normalize`` computes it,
    ``_value_table`` holds its 256 results per channel, so a pixel is one table look-up."""

    rescale_factor: float
    image_mean: tuple
    image_std: tuple

    def normalize(self, chw: np.ndarray) -> np.ndarray:
        """A ``(C, ...)`` uint8 array -> ``(float32(x * rescale_factor in float64) - mean) / std`` in
        float32, as HF does."""
        x = (np.asarray(chw).astype(np.float64) * self.rescale_factor).astype(np.float32)
        shape = (-1,) + (1,) * (x.ndim - 1)
        mean = np.asarray(self.image_mean, dtype=np.float32).reshape(shape)
        std = np.asarray(self.image_std, dtype=np.float32).reshape(shape)
        return (x - mean) / std

    def _value_table(self) -> np.ndarray:
        """(3, 256) float32: ``normalize`` of every uint8 value per channel (computed once)."""
        key = (self.rescale_factor, self.image_mean, self.image_std)
        cached = getattr(self, "_table", None)
        if cached is None or cached[0] != key:
            table = self.normalize(np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256)))
            cached = self._table = (key, np.ascontiguousarray(table, np.float32))
        return cached[1]


class ImageProcessor(RescaleNormalize):
    """numpy/Pillow twin of transformers' ``Qwen2VLImageProcessorPil``.

    ``__call__(images)`` returns ``{"pixel_values": (N_patches, C*T*P*P) float32,
    "image_grid_thw": (n_images, 3) int64}``, equal to HF's output for the same images and settings.
    """

    def __init__(
        self,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        rescale_factor: float = 1 / 255,
    ):
        if min_pixels is None or max_pixels is None or min_pixels <= 0 or max_pixels <= 0:
            raise ValueError(f"min_pixels and max_pixels must be positive, got {min_pixels}, {max_pixels}")
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 entries (RGB)")
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.rescale_factor = float(rescale_factor)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(patch_size={self.patch_size}, temporal_patch_size={self.temporal_patch_size}, "
            f"merge_size={self.merge_size}, min_pixels={self.min_pixels}, max_pixels={self.max_pixels})"
        )

    # -- config ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ImageProcessor":
        """Build from a ``preprocessor_config.json`` dict. ``min_pixels``/``max_pixels`` win over
        ``size.shortest_edge``/``size.longest_edge`` (as in HF's ``__init__``); missing keys take HF's defaults."""
        size = cfg.get("size") or {}
        min_pixels = size.get("shortest_edge", size.get("min_pixels", DEFAULT_MIN_PIXELS)) if isinstance(size, dict) else DEFAULT_MIN_PIXELS
        max_pixels = size.get("longest_edge", size.get("max_pixels", DEFAULT_MAX_PIXELS)) if isinstance(size, dict) else DEFAULT_MAX_PIXELS
        if cfg.get("min_pixels") is not None:
            min_pixels = cfg["min_pixels"]
        if cfg.get("max_pixels") is not None:
            max_pixels = cfg["max_pixels"]
        resample = cfg.get("resample", 3)
        if resample not in (None, 3, Image.Resampling.BICUBIC):
            raise ValueError(f"only bicubic resampling (3) is supported, config has resample={resample!r}")
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if cfg.get(flag, True) is False:
                raise ValueError(f"config sets {flag}=False, which this processor does not support")
        return cls(
            patch_size=cfg.get("patch_size", 14),
            temporal_patch_size=cfg.get("temporal_patch_size", 2),
            merge_size=cfg.get("merge_size", 2),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            image_mean=cfg.get("image_mean", OPENAI_CLIP_MEAN),
            image_std=cfg.get("image_std", OPENAI_CLIP_STD),
            rescale_factor=cfg.get("rescale_factor", 1 / 255),
        )

    @classmethod
    def from_pretrained(cls, hf_dir: str | os.PathLike) -> "ImageProcessor":
        """Read ``preprocessor_config.json`` (or the ``image_processor`` entry of ``processor_config.json``)
        from a local checkpoint directory."""
        hf_dir = os.fspath(hf_dir)
        path = os.path.join(hf_dir, "preprocessor_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return cls.from_config(json.load(f))
        path2 = os.path.join(hf_dir, "processor_config.json")
        if os.path.isfile(path2):
            with open(path2, encoding="utf-8") as f:
                cfg = json.load(f)
            return cls.from_config(cfg.get("image_processor", cfg))
        raise FileNotFoundError(f"no preprocessor_config.json or processor_config.json in {hf_dir!r}")

    def to_config(self) -> dict[str, Any]:
        """A ``preprocessor_config.json`` dict that both ``from_config`` and transformers read."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": 3,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_write_json(os.path.join(os.fspath(directory), "preprocessor_config.json"), self.to_config(), indent=2)

    # -- sizes -------------------------------------------------------------------------------------------
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid_thw(self, height: int, width: int) -> np.ndarray:
        """``[1, grid_h, grid_w]`` (int64) for an image of the given original size, without processing it."""
        h, w = self.resized_size(height, width)
        return np.array([1, h // self.patch_size, w // self.patch_size], dtype=np.int64)

    def num_image_tokens(self, grid_thw) -> int | np.ndarray:
        """LLM tokens per image after the patch merger: ``t*h*w // merge_size**2`` (int for one ``[t,h,w]``,
        an int64 array for ``(n, 3)``)."""
        return num_image_tokens(grid_thw, self.merge_size)

    # -- processing --------------------------------------------------------------------------------------
    def preprocess_one(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray]:
        """One image -> (patches ``(grid_h*grid_w, D)`` float32, grid_thw ``[1, grid_h, grid_w]`` int64)."""
        return self.patchify_uint8(self.resize(image))

    def resize(self, image: ImageLike) -> np.ndarray:
        """Steps 1-3: one image -> the resized ``(H, W, 3)`` uint8 array (H, W multiples of patch*merge)."""
        rgb = to_rgb_array(image)  # (H, W, 3) uint8
        height, width = rgb.shape[:2]
        rh, rw = self.resized_size(height, width)
        return np.asarray(Image.fromarray(rgb).resize((rw, rh), resample=Image.Resampling.BICUBIC))

    def patchify_uint8(self, image: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(H, W, C)`` uint8 image (H, W multiples of patch*merge) -> (normalised patches, grid_thw), equal
        to ``patchify(normalize(channels-first image))``: the uint8 pixels are put in patch order and each
        is looked up in ``_value_table``. ``out``: a C-contiguous ``(grid_h*grid_w, D)`` float32 array to
        write the patches into (returned)."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        h, w, c = image.shape
        if h % (p * m) or w % (p * m):
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size*merge_size={p * m}")
        gh, gw = h // p, w // p
        u = image.reshape(gh // m, m, p, gw // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)  # (.., m, m, C, p, p)
        u = np.ascontiguousarray(u).reshape(gh * gw, c, p * p)
        table = self._value_table()
        shape = (gh * gw, c * t * p * p)
        if out is None:
            out = np.empty(shape, np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
        o = out.reshape(gh * gw, c, t, p * p)
        for ci in range(c):
            np.take(table[ci], u[:, ci], out=o[:, ci, 0], mode="clip")  # uint8 indices: never clipped
            for ti in range(1, t):
                o[:, ci, ti] = o[:, ci, 0]
        return out, np.array([1, gh, gw], dtype=np.int64)

    def patchify(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(C, H, W)`` float image (H, W multiples of patch*merge) -> (patches, grid_thw) in HF's order."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        c, h, w = image.shape
        if h % (p * m) or w % (p * m):
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size*merge_size={p * m}")
        gh, gw = h // p, w // p
        x = image.astype(np.float32, copy=False).reshape(c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
        patches = np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p)
        return patches, np.array([1, gh, gw], dtype=np.int64)

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> dict[str, np.ndarray]:
        images = as_image_list(images)
        resized = []
        for i, im in enumerate(images):
            try:
                resized.append(self.resize(im))
            except (ValueError, TypeError) as e:
                if len(images) == 1:
                    raise
                raise type(e)(f"image {i}: {e}") from e
        p = self.patch_size
        grids = np.asarray([[1, r.shape[0] // p, r.shape[1] // p] for r in resized], np.int64)
        counts = grids[:, 1] * grids[:, 2]
        dim = 3 * self.temporal_patch_size * p * p
        pixel_values = np.empty((int(counts.sum()), dim), np.float32)  # each image's patches written in place
        at = 0
        for r, n in zip(resized, counts.tolist()):
            self.patchify_uint8(r, out=pixel_values[at: at + n])
            at += n
        return {"pixel_values": pixel_values, "image_grid_thw": grids}


def num_image_tokens(grid_thw, merge_size: int = 2) -> int | np.ndarray:
    """LLM placeholder tokens for an image of grid ``[t, h, w]``: ``t*h*w // merge_size**2``."""
    g = np.asarray(grid_thw, dtype=np.int64)
    if g.ndim == 1:
        if g.shape != (3,):
            raise ValueError(f"grid_thw must be [t, h, w] or (n, 3), got shape {g.shape}")
        return int(np.prod(g)) // (merge_size**2)
    if g.ndim != 2 or g.shape[1] != 3:
        raise ValueError(f"grid_thw must be [t, h, w] or (n, 3), got shape {g.shape}")
    return np.prod(g, axis=1) // (merge_size**2)
