"""Host-side (numpy) index math for Qwen2.5-VL: 3D M-RoPE positions and vision-tower layouts.

Everything here depends only on token ids and image grids, never on weights, so it runs on the
host (in Grain workers for training, in the scorer for inference) and the device sees fixed-shape
integer arrays. Each function mirrors the transformers 5.x function named in its docstring.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2

# The vision tower's index arrays, in the order ``VisionTower.__call__`` takes them; a batch carries
# each with a leading row axis (``jaxprm.data.pipeline``, ``jaxprm.scoring.device``).
LAYOUT_KEYS = ("window_index", "reverse_index", "window_segment_ids", "full_segment_ids", "rotary_positions")


# ------------------------------------------------------------------------------------------------
# Vision tower layouts
# ------------------------------------------------------------------------------------------------
def vision_rotary_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(N, 2) (h, w) patch coordinates, laid out block-major over merge x merge blocks and repeated
    per frame. Mirrors ``transformers.vision_utils.get_vision_position_ids``."""
    out = []
    for t, h, w in np.asarray(grid_thw).tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], -1), (t, 1)))
    return np.concatenate(out, 0).astype(np.int32) if out else np.zeros((0, 2), np.int32)


def vision_window_index(grid_thw: np.ndarray, merge: int, window_size: int, patch_size: int):
    """Permutation of merged tokens into windows and the windows' cumulative lengths (in patches).
    Mirrors ``transformers.vision_utils.get_vision_window_index`` (including dropping empty windows)."""
    win = window_size // merge // patch_size
    unit = merge * merge
    window_index, cu = [], [0]
    offset = 0
    for t, h, w in np.asarray(grid_thw).tolist():
        lh, lw = h // merge, w // merge
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        pad_h, pad_w = win - lh % win, win - lw % win
        nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum((2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu = np.asarray(cu, np.int64)
    keep = np.concatenate([[True], cu[1:] != cu[:-1]])  # torch.unique_consecutive
    idx = np.concatenate(window_index) if window_index else np.zeros(0, np.int64)
    return idx.astype(np.int32), cu[keep]


def vision_cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """Per-frame full-attention segments. Mirrors ``get_vision_cu_seqlens`` (merge_temporal=False)."""
    g = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    seqlens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
    return np.concatenate([[0], np.cumsum(seqlens)])


@dataclasses.dataclass
class VisionLayout:
    """Integer arrays the vision tower needs for one batch of images (all in window order).

    ``num_patches`` real patches are followed by padding up to the array length; padding patches
    form their own segment (-1) in both masks and are dropped by ``num_tokens`` on the way out.
    """

    window_index: np.ndarray  # (M,) merged-token permutation into window order
    reverse_index: np.ndarray  # (M,) its inverse
    window_segment_ids: np.ndarray  # (N,) window id of each patch (window order)
    full_segment_ids: np.ndarray  # (N,) image/frame id of each patch
    rotary_positions: np.ndarray  # (N, 2) (h, w) of each patch, window order
    num_patches: int

    @property
    def num_tokens(self) -> int:
        return len(self.window_index)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in LAYOUT_KEYS}


def vision_layout(grid_thw, *, merge: int, window_size: int, patch_size: int, pad_to: int | None = None) -> VisionLayout:
    """All vision-tower index arrays for ``grid_thw`` (n_images, 3), optionally padded to ``pad_to`` patches."""
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    unit = merge * merge
    n = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
    total = n if pad_to is None else int(pad_to)
    if total < n or total % unit:
        raise ValueError(f"pad_to={pad_to} must be >= {n} patches and a multiple of {unit}")
    widx, cu_win = vision_window_index(grid_thw, merge, window_size, patch_size)
    pos = vision_rotary_positions(grid_thw, merge).reshape(n // unit, unit, 2)[widx].reshape(n, 2)
    lay = pad_layout({"window_index": widx, "reverse_index": np.argsort(widx).astype(np.int32),
                      "window_segment_ids": _segments(cu_win, n),
                      "full_segment_ids": _segments(vision_cu_seqlens(grid_thw), n),
                      "rotary_positions": pos}, total, merge)
    return VisionLayout(**lay, num_patches=n)


def pad_layout(layout: Mapping[str, np.ndarray], num_patches: int, merge: int) -> dict[str, np.ndarray]:
    """Grow vision-layout arrays (``LAYOUT_KEYS``; any leading batch axes) to ``num_patches``
    patches (int32). Padding patches form their own segment (-1) in both masks, sit at position
    (0, 0) and keep the identity window order, so the tower's output for real patches is
    unchanged and ``num_tokens`` drops the padding on the way out."""
    unit = merge * merge
    widx = np.asarray(layout["window_index"])
    m, mt = widx.shape[-1], int(num_patches) // unit
    n = m * unit
    if num_patches % unit or mt < m:
        raise ValueError(f"cannot pad a layout of {n} patches to {num_patches} (need >= {n}, a multiple of {unit})")
    lead = widx.shape[:-1]
    pad = [(0, 0)] * len(lead)
    widx = np.concatenate([widx, np.broadcast_to(np.arange(m, mt, dtype=np.int32), (*lead, mt - m))], -1)
    return {
        "window_index": widx.astype(np.int32),
        "reverse_index": (np.asarray(layout["reverse_index"]) if mt == m
                          else np.argsort(widx, axis=-1)).astype(np.int32),
        "window_segment_ids": np.pad(np.asarray(layout["window_segment_ids"], np.int32), [*pad, (0, mt * unit - n)],
                                     constant_values=-1),
        "full_segment_ids": np.pad(np.asarray(layout["full_segment_ids"], np.int32), [*pad, (0, mt * unit - n)],
                                   constant_values=-1),
        "rotary_positions": np.pad(np.asarray(layout["rotary_positions"], np.int32),
                                   [*pad, (0, mt * unit - n), (0, 0)]),
    }


class VisionLayouts:
    """``vision_layout`` with one vision tower's sizes, memoised by (grids, padded length), and
    batched: ``batch(grids_per_row, pad_to)`` -> ``{key: (rows, ...) int32}`` for ``LAYOUT_KEYS``
    (a row without images (``None`` or an empty grid) is all padding). Used by the training batch
    assembler and by the scorer, so both feed the tower the same arrays."""

    def __init__(self, vision_config, max_cached: int = 4096):
        self.merge = int(vision_config.spatial_merge_size)
        self.window_size, self.patch_size = int(vision_config.window_size), int(vision_config.patch_size)
        self.max_cached = int(max_cached)
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def __call__(self, grid_thw, pad_to: int) -> dict[str, np.ndarray]:
        """The layout (a dict of arrays; do not modify them) of the images ``grid_thw`` in ``pad_to`` patches."""
        g = np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw, np.int64).reshape(-1, 3)
        key = (g.tobytes(), int(pad_to))
        lay = self._cache.get(key)
        if lay is None:
            lay = vision_layout(g, merge=self.merge, window_size=self.window_size, patch_size=self.patch_size,
                                pad_to=pad_to).as_dict()
            self._cache[key] = lay
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return lay

    def batch(self, grids: Sequence, pad_to: int) -> dict[str, np.ndarray]:
        lays = [self(g, pad_to) for g in grids]
        return {k: np.stack([lay[k] for lay in lays]) for k in LAYOUT_KEYS}


def _segments(cu: np.ndarray, n: int) -> np.ndarray:
    lengths = np.diff(np.asarray(cu, np.int64))
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)[:n]


# ------------------------------------------------------------------------------------------------
# 3D M-RoPE positions for the decoder
# ------------------------------------------------------------------------------------------------
def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int, video_token_id: int | None = None) -> np.ndarray:
    """0 for text, 1 for image placeholder tokens, 2 for video placeholder tokens (what the HF processor emits)."""
    ids = np.asarray(input_ids)
    out = np.where(ids == image_token_id, IMAGE, TEXT)
    if video_token_id is not None:
        out = np.where(ids == video_token_id, VIDEO, out)
    return out.astype(np.int32)


def get_rope_index(
    input_ids: np.ndarray,
    *,
    image_token_id: int,
    video_token_id: int | None = None,
    spatial_merge_size: int = 2,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    tokens_per_second: int = 4,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(3, B, L) int32 position ids and (B,) rope deltas.

    Mirrors ``Qwen2_5_VLModel.get_rope_index``: text runs count up by one on all three axes; an
    image occupies (t, h/merge, w/merge) positions offset by the running position, which then
    advances by max(h, w)/merge. Padding (attention_mask == 0) is skipped and gets position 0.
    Images are consumed from ``image_grid_thw`` in order across the batch. Adjacent placeholder
    runs are split by the grids' token counts (transformers would merge them into one image).
    """
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    b, length = ids.shape
    types = mm_token_type_ids(ids, image_token_id, video_token_id)
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool).reshape(b, length)
    grids = {
        IMAGE: iter(np.asarray(image_grid_thw).reshape(-1, 3).tolist()) if image_grid_thw is not None else iter(()),
        VIDEO: iter(np.asarray(video_grid_thw).reshape(-1, 3).tolist()) if video_grid_thw is not None else iter(()),
    }
    sec = iter(np.asarray(second_per_grid_ts).reshape(-1).tolist()) if second_per_grid_ts is not None else None
    positions = np.zeros((3, b, length), np.int64)
    deltas = np.zeros(b, np.int64)
    for bi in range(b):
        tt = types[bi][mask[bi]]
        chunks, cur, i = [], 0, 0
        n = len(tt)
        while i < n:
            kind = tt[i]
            j = i
            while j < n and tt[j] == kind:
                j += 1
            if kind == TEXT:
                chunks.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
                cur += j - i
                i = j
                continue
            while i < j:  # one or more images/videos back to back
                try:
                    t, h, w = next(grids[kind])
                except StopIteration:
                    what = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
                    raise ValueError(f"row {bi}: more {('image', 'video')[kind - 1]} placeholder runs than entries in {what}") from None
                lt, lh, lw = t, h // spatial_merge_size, w // spatial_merge_size
                count = lt * lh * lw
                if count > j - i:
                    raise ValueError(
                        f"row {bi}: grid {t}x{h}x{w} needs {count} placeholder tokens but only {j - i} follow at index {i}"
                    )
                interval = tokens_per_second * (next(sec) if sec is not None else 1) if kind == VIDEO else 1
                tpos = (np.arange(lt) * interval).astype(np.int64)
                tg, hg, wg = np.meshgrid(tpos, np.arange(lh), np.arange(lw), indexing="ij")
                chunks.append(np.stack([tg.reshape(-1), hg.reshape(-1), wg.reshape(-1)]) + cur)
                cur += max(h, w) // spatial_merge_size
                i += count
        pos = np.concatenate(chunks, 1) if chunks else np.zeros((3, 0), np.int64)
        positions[:, bi, mask[bi]] = pos
        deltas[bi] = (pos.max() + 1 - n) if n else 0
    return positions.astype(np.int32), deltas
