"""What the tiny transformers references of both backbones (``hf_reference.py``,
``internvl/hf_reference.py``) build the same way: random weights and left-padded rows of random text
with image placeholders."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def fill_random(model, seed: int, value: Callable[[str, torch.Tensor], torch.Tensor]):
    """Every parameter of ``model`` set to ``value(name, noise)``, noise ~ N(0, 1) of its shape drawn
    in order from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(value(name, torch.randn(p.shape, generator=g, dtype=p.dtype)))
    return model


def image_rows(rng: np.random.Generator, text_lens: Sequence[Sequence[int]], vocab: int,
               next_image: Callable[[], list[int]]) -> list[list[int]]:
    """One row per entry of ``text_lens`` (per-segment lengths of random ids below ``vocab``), with
    ``next_image()`` (the next image's placeholder ids) between segments."""
    rows = []
    for segs in text_lens:
        ids = []
        for si, n in enumerate(segs):
            ids += rng.integers(0, vocab, n).tolist()
            if si < len(segs) - 1:
                ids += next_image()
        rows.append(ids)
    return rows


def left_pad(rows: Sequence[Sequence[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 (B, length): rows left-padded with 0 to ``length`` (the
    longest row's by default)."""
    length = max(len(r) for r in rows) if length is None else length
    input_ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return input_ids, mask
