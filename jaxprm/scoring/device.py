"""Device side of scoring: ``Scorer`` runs jitted, fixed-shape forwards of a ``PRMModel`` and returns P(step is
correct) at given token positions. Every input is padded to a *bucket* so that a small, known set of
shapes is ever compiled:

* rows of a batch: ``batch_buckets`` (default 1, 2, 4, 8; a chunk of ``batch_size`` rows at most),
  missing rows are dummy (all padding) rows;
* token lengths: ``length_buckets`` for whole sequences, ``prefix_buckets`` for shared prefixes and
  ``suffix_buckets`` for the candidate continuations; lengths above the largest bucket round up to a
  multiple of it (a new, rarely used shape);
* vision inputs per row: ``patch_buckets`` (0 = no image, a separate variant without the tower), in
  the backbone's unit: patches for Qwen2.5-VL, 448 px tiles for InternVL (padding tiles are flagged
  off with ``image_flags``, so they never reach the language model).

Three jitted functions (``nnx.split`` once into graphdef/state; pure functions of ``(state, arrays)``
that ``nnx.merge`` inside the trace, so a call is one cheap C++ dispatch): ``full`` (whole sequences,
per-row vision; rows that share one image, as the candidates of one problem do, get it as one pixel
array copied to the rows on the device, not once per row from the host), ``prefix`` (one shared
prefix with its image(s) -> its K/V cache) and ``suffix`` (a batch of continuations attending to the
prefix cache broadcast over the rows). Each returns only
the 2-class step head at every position -- (B, L) probabilities, never full-vocabulary logits --
and the host picks the label positions. The jitted functions are shared by all scorers whose model
has the same graph (architecture, dtype, head), and ``Scorer.trace_counts`` counts their traces, so
tests can prove that no recompilation happens after warm-up.

Incremental scoring (guided search) adds three: ``suffix_kv`` (``suffix`` that also returns the
continuations' own K/V), ``append`` (write one continuation's K/V into a prefix cache at its
length) and ``grow`` (pad a cache to a larger capacity). A ``KVCache`` (``Scorer.prefill``) has a
capacity from ``prefix_buckets`` and a valid length; ``Scorer.score_cached`` scores continuations
on it and ``Scorer.extend_cache`` appends a scored one, so a cache that grows step by step keeps a
few known shapes. ``PRM.incremental_scorer(image, question)`` (``IncrementalScorer``) uses them to
score the candidate next steps of a growing solution while the image, the question and the steps
already taken run once.

The host side (prompts, images, positions: ``PRM``, ``IncrementalScorer``, ``load_prm``) is in
``jaxprm.scoring.prm``.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprm.models.prm import PRMModel, step_probs
from jaxprm.models.qwen2_5_vl.rope import VisionLayouts

__all__ = ["Scorer", "TokenSequence", "KVCache", "SuffixKV", "bucket_size", "DEFAULT_LENGTH_BUCKETS",
           "DEFAULT_SUFFIX_BUCKETS", "DEFAULT_PATCH_BUCKETS", "DEFAULT_TILE_BUCKETS", "DEFAULT_BATCH_BUCKETS"]

DEFAULT_LENGTH_BUCKETS = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
DEFAULT_SUFFIX_BUCKETS = (32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
DEFAULT_PATCH_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384)
# InternVL: tiles per row (an image is 1 tile, or a grid of 2..12 plus its thumbnail: 3..13)
DEFAULT_TILE_BUCKETS = (1, 3, 5, 7, 10, 13, 26)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8)


def bucket_size(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; above the largest, the next multiple of the largest."""
    n = int(n)
    for b in buckets:
        if n <= b:
            return int(b)
    top = int(buckets[-1])
    return -(-n // top) * top


def _check_buckets(name: str, buckets, multiple_of: int = 1) -> tuple[int, ...]:
    try:
        out = tuple(int(b) for b in buckets)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of positive ints, got {buckets!r}") from None
    if not out or any(b <= 0 for b in out) or list(out) != sorted(set(out)):
        raise ValueError(f"{name} must be a non-empty, strictly increasing list of positive ints, got {buckets!r}")
    bad = [b for b in out if b % multiple_of]
    if bad:
        raise ValueError(f"{name}: {bad} are not multiples of {multiple_of}")
    return out


# ------------------------------------------------------------------------------------------------
# host-side inputs of the scorer
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TokenSequence:
    """One tokenized sequence to score (no padding).

    input_ids (L,), position_ids (3, L) (M-RoPE positions of these tokens; for a suffix the slice of
    the full sequence's positions; 1D RoPE backbones: three equal rows), label_positions (S,) indices
    into this sequence whose step head is read, pixel_values (n_patches, patch_dim) / image_grid_thw
    (n_images, 3) or None. InternVL: pixel_values (n_tiles, C, S, S) and image_grid_thw the tile count
    of each image (n_images,).
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    label_positions: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None

    def __post_init__(self):
        self.input_ids = np.asarray(self.input_ids, np.int32).reshape(-1)
        n = self.input_ids.shape[0]
        pos = np.asarray(self.position_ids, np.int32)
        if pos.ndim == 1:
            pos = np.broadcast_to(pos[None], (3, n))
        if pos.shape != (3, n):
            raise ValueError(f"position_ids must have shape (3, {n}), got {pos.shape}")
        self.position_ids = pos
        self.label_positions = np.asarray(self.label_positions, np.int64).reshape(-1)
        if n == 0:
            raise ValueError("empty sequence")
        if len(self.label_positions) and (self.label_positions.min() < 0 or self.label_positions.max() >= n):
            raise ValueError(f"label positions {self.label_positions.tolist()} outside [0, {n})")
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("give pixel_values and image_grid_thw together")
        if self.pixel_values is not None:
            self.pixel_values = np.asarray(self.pixel_values, np.float32)
            if self.pixel_values.ndim == 4:  # InternVL tiles; image_grid_thw: tiles per image
                self.image_grid_thw = np.asarray(self.image_grid_thw, np.int64).reshape(-1)
                if int(self.image_grid_thw.sum()) != self.pixel_values.shape[0]:
                    raise ValueError("the tile counts in image_grid_thw do not add up to the tiles in pixel_values")
                return
            self.image_grid_thw = np.asarray(self.image_grid_thw, np.int64).reshape(-1, 3)
            if int(self.image_grid_thw.prod(-1).sum()) != self.pixel_values.shape[0]:
                raise ValueError("image_grid_thw does not match the number of patches in pixel_values")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclasses.dataclass(frozen=True)
class KVCache:
    """The K/V of a prefix on the device (``Scorer.prefill`` / ``Scorer.extend_cache``).

    ``kv`` = (k, v), each (layers, 1, capacity, kv_heads, head_dim) with rotary already applied;
    the first ``length`` slots hold the prefix, the rest are free (masked). ``capacity`` is a
    prefix bucket, so a cache that grows by appended continuations keeps a few known shapes."""

    kv: tuple
    length: int

    @property
    def capacity(self) -> int:
        return int(self.kv[0].shape[2])

    def segment_ids(self) -> np.ndarray:
        seg = np.zeros((1, self.capacity), np.int32)
        seg[0, : self.length] = 1
        return seg


@dataclasses.dataclass(frozen=True)
class SuffixKV:
    """What scoring a continuation on a cache left behind (``Scorer.score_cached(..., keep_kv=True)``):
    its chunk's K/V (each (layers, rows, suffix bucket, kv_heads, head_dim)), its row and its length,
    enough to append it to the cache (``Scorer.extend_cache``) without running it again."""

    kv: tuple
    row: int
    length: int


# ------------------------------------------------------------------------------------------------
# the jitted functions (shared per model graph)
# ------------------------------------------------------------------------------------------------
def _gather_pixels(batch: dict) -> dict:
    """A batch whose rows share images carries each image once: ``pixel_values`` (U, units, ...) and
    ``pixel_rows`` (rows,) the image of each row; give every row its own copy (on the device)."""
    if "pixel_rows" not in batch:
        return batch
    batch = dict(batch)
    rows = batch.pop("pixel_rows")
    batch["pixel_values"] = jnp.take(batch["pixel_values"], rows, axis=0)
    return batch


class _Compiled:
    """The jitted functions of one model graph, with a trace counter."""

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self.trace_counts: collections.Counter = collections.Counter()
        gd = graphdef

        def full(state, batch):
            self.trace_counts["full"] += 1
            model = nnx.merge(gd, state)
            return step_probs(model.head(model.hidden_states(_gather_pixels(batch))))

        def prefix(state, batch):
            self.trace_counts["prefix"] += 1
            model = nnx.merge(gd, state)
            _, kv = model.hidden_states(batch, return_kv=True)
            return kv

        def on_cache(state, kv, past_segment_ids, batch, return_kv):
            # the batch's rows continue the cached prefix (broadcast over the rows)
            model = nnx.merge(gd, state)
            b = batch["input_ids"].shape[0]
            past = tuple(jnp.broadcast_to(x, (x.shape[0], b, *x.shape[2:])) for x in kv)
            past_seg = jnp.broadcast_to(past_segment_ids, (b, past_segment_ids.shape[1]))
            out = model.hidden_states(batch, past_kv=past, past_segment_ids=past_seg, return_kv=return_kv)
            if return_kv:
                return step_probs(model.head(out[0])), out[1]
            return step_probs(model.head(out))

        def suffix(state, kv, past_segment_ids, batch):
            self.trace_counts["suffix"] += 1
            return on_cache(state, kv, past_segment_ids, batch, return_kv=False)

        def suffix_kv(state, kv, past_segment_ids, batch):
            # ``suffix`` that also returns the chunk's own K/V (layers, B, L, kv_heads, head_dim), so that
            # a chosen continuation can be appended to the prefix cache without running it again
            self.trace_counts["suffix_kv"] += 1
            return on_cache(state, kv, past_segment_ids, batch, return_kv=True)

        def append(kv, offset, new_kv, row):
            # write row ``row`` of a chunk's K/V into the cache at slots offset, offset + 1, ...; slots past
            # the cache's capacity are dropped (they are the chunk's padding: the caller sizes the cache)
            self.trace_counts["append"] += 1

            def one(cache, new):
                r = jax.lax.dynamic_index_in_dim(new, row, axis=1, keepdims=True)
                idx = offset + jnp.arange(r.shape[2], dtype=jnp.int32)
                return cache.at[:, :, idx].set(r.astype(cache.dtype), mode="drop")

            return tuple(one(c, x) for c, x in zip(kv, new_kv))

        def grow(kv, capacity):
            self.trace_counts["grow"] += 1
            return tuple(jnp.pad(x, ((0, 0), (0, 0), (0, capacity - x.shape[2]), (0, 0), (0, 0))) for x in kv)

        self.full, self.prefix, self.suffix = jax.jit(full), jax.jit(prefix), jax.jit(suffix)
        self.suffix_kv, self.append = jax.jit(suffix_kv), jax.jit(append)
        self.grow = jax.jit(grow, static_argnums=1)

    def cache_sizes(self) -> dict[str, int]:
        return {n: getattr(self, n)._cache_size() for n in ("full", "prefix", "suffix", "suffix_kv", "append", "grow")}


_COMPILED: dict[Any, _Compiled] = {}
_COMPILED_LOCK = threading.Lock()


def _compiled_for(graphdef) -> _Compiled:
    with _COMPILED_LOCK:
        c = _COMPILED.get(graphdef)
        if c is None:
            c = _COMPILED[graphdef] = _Compiled(graphdef)
        return c


# ------------------------------------------------------------------------------------------------
# the vision inputs of a batch, per backbone
# ------------------------------------------------------------------------------------------------
def _pad_units(x: np.ndarray, units: int) -> np.ndarray:
    """``x`` (n, ...) as (1, units, ...) float32, zero-padded (no copy when it already has ``units`` rows)."""
    if x.shape[0] == units:
        return x[None]
    out = np.zeros((1, units, *x.shape[1:]), np.float32)
    out[0, : x.shape[0]] = x
    return out


class _VisionInputs:
    """The pixel rows of a batch: each row's own (rows, units, ...) array, or, when every row with an
    image holds the same pixel array (one problem's candidates), that array once with ``pixel_rows``
    (rows,) zeros: ``_gather_pixels`` copies it to every row on the device, so the host neither copies
    nor transfers it once per row. Rows without an image (dummy rows) then carry it too; their vision
    layout / flags are all padding, as before, and rows never see each other's vision inputs."""

    unit_shape: tuple = ()

    def _pixels(self, seqs, rows: int, units: int, shared: bool | None = None) -> tuple[dict, list]:
        """({"pixel_values": ..., ["pixel_rows": ...]}, the sequence of each row or None)."""
        row_seqs = [seqs[i] if i < len(seqs) and seqs[i] is not None and seqs[i].pixel_values is not None
                    else None for i in range(rows)]
        for s in row_seqs:
            if s is not None:
                self._check(s)
        with_image = [s for s in row_seqs if s is not None]
        if shared is None:  # one pixel array for every row that has an image
            shared = rows > 1 and bool(with_image) and all(s.pixel_values is with_image[0].pixel_values
                                                          for s in with_image)
        if shared:
            pv = (_pad_units(with_image[0].pixel_values, units) if with_image
                  else np.zeros((1, units, *self.unit_shape), np.float32))
            return {"pixel_values": pv, "pixel_rows": np.zeros((rows,), np.int32)}, row_seqs
        pv = np.zeros((rows, units, *self.unit_shape), np.float32)
        for i, s in enumerate(row_seqs):
            if s is not None:
                pv[i, : s.num_patches] = s.pixel_values
        return {"pixel_values": pv}, row_seqs

    def _check(self, s: TokenSequence) -> None:
        pass


class _PatchInputs(_VisionInputs):
    """Qwen2.5-VL: per row, ``units`` patches (P, patch_dim) and their layout arrays."""

    default_buckets = DEFAULT_PATCH_BUCKETS

    def __init__(self, config):
        v = config.vision
        self.multiple_of, self.patch_dim = v.spatial_merge_size**2, v.patch_dim
        self.unit_shape = (self.patch_dim,)
        self._layouts = VisionLayouts(v)

    def pack(self, seqs: Sequence[TokenSequence | None], rows: int, units: int, shared: bool | None = None) -> dict:
        out, row_seqs = self._pixels(seqs, rows, units, shared)
        grids = [None if s is None else s.image_grid_thw for s in row_seqs]
        return {**out, **self._layouts.batch(grids, units)}


class _TileInputs(_VisionInputs):
    """InternVL: per row, ``units`` tiles (T, C, S, S) and ``image_flags`` (T,): 1 for the row's own
    tiles, 0 for padding (dropped before the language model)."""

    default_buckets = DEFAULT_TILE_BUCKETS
    multiple_of = 1

    def __init__(self, config):
        v = config.vision
        self.tile_shape = self.unit_shape = (v.num_channels, v.image_size, v.image_size)

    def _check(self, s: TokenSequence) -> None:
        if s.pixel_values.shape[1:] != self.tile_shape:
            raise ValueError(f"tiles of shape {s.pixel_values.shape[1:]}, the model takes {self.tile_shape}")

    def pack(self, seqs: Sequence[TokenSequence | None], rows: int, units: int, shared: bool | None = None) -> dict:
        out, row_seqs = self._pixels(seqs, rows, units, shared)
        flags = np.zeros((rows, units), np.int32)
        for i, s in enumerate(row_seqs):
            if s is not None:
                flags[i, : s.num_patches] = 1
        return {**out, "image_flags": flags}


# ------------------------------------------------------------------------------------------------
# Scorer
# ------------------------------------------------------------------------------------------------
class Scorer:
    """Bucketed, jitted step scoring for a ``PRMModel`` (see the module docstring)."""

    def __init__(self, model: PRMModel, *, batch_size: int = 8, batch_buckets: Sequence[int] | None = None,
                 length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
                 prefix_buckets: Sequence[int] | None = None,
                 suffix_buckets: Sequence[int] = DEFAULT_SUFFIX_BUCKETS,
                 patch_buckets: Sequence[int] | None = None,
                 max_batch_tokens: int | None = None):
        if not isinstance(model, PRMModel):
            raise TypeError(f"Scorer needs a jaxprm.models.prm.PRMModel, got {type(model).__name__}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.config = model.backbone.config
        # the backbone's vision inputs (patch_buckets count its unit: patches or tiles; None: its default)
        self._vision = _TileInputs(self.config) if model.backbone_kind == "internvl" else _PatchInputs(self.config)
        self.batch_size = int(batch_size)
        if batch_buckets is None:
            batch_buckets = sorted({min(2**i, self.batch_size) for i in range(self.batch_size.bit_length() + 1)})
        self.batch_buckets = _check_buckets("batch_buckets", batch_buckets)
        if self.batch_buckets[-1] < self.batch_size:
            raise ValueError(f"the largest batch bucket {self.batch_buckets[-1]} < batch_size {self.batch_size}")
        self.batch_buckets = tuple(b for b in self.batch_buckets if b <= self.batch_size)
        self.length_buckets = _check_buckets("length_buckets", length_buckets)
        self.prefix_buckets = _check_buckets("prefix_buckets", prefix_buckets or self.length_buckets)
        self.suffix_buckets = _check_buckets("suffix_buckets", suffix_buckets)
        self.patch_buckets = _check_buckets("patch_buckets", patch_buckets or self._vision.default_buckets,
                                            self._vision.multiple_of)
        self.max_batch_tokens = None if max_batch_tokens is None else int(max_batch_tokens)
        self.graphdef, self.state = nnx.split(model)
        self._fns = _compiled_for(self.graphdef)

    # -- introspection ---------------------------------------------------------------------------
    @property
    def trace_counts(self) -> dict[str, int]:
        """Traces (= compilations) so far of the jitted functions this scorer uses (shared by every
        scorer of a model with the same graph)."""
        return dict(self._fns.trace_counts)

    @property
    def num_compiles(self) -> int:
        return sum(self._fns.trace_counts.values())

    def cache_sizes(self) -> dict[str, int]:
        return self._fns.cache_sizes()

    def update_state(self, model: PRMModel | None = None) -> None:
        """Pick up new weights (same architecture) after ``self.model`` was changed in place or replaced."""
        model = self.model if model is None else model
        graphdef, state = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError("update_state needs a model with the same graph (architecture, dtype, head)")
        self.model, self.state = model, state

    # -- buckets ---------------------------------------------------------------------------------
    def _rows(self, n: int) -> int:
        return bucket_size(n, self.batch_buckets)

    def _patches(self, n: int) -> int:
        return 0 if n == 0 else bucket_size(n, self.patch_buckets)

    def _chunk_rows(self, length: int) -> int:
        """Rows per chunk for sequences padded to ``length`` tokens."""
        rows = self.batch_size
        if self.max_batch_tokens is not None:
            rows = max(1, min(rows, self.max_batch_tokens // max(length, 1)))
            rows = max([b for b in self.batch_buckets if b <= rows] or [1])
        return rows

    def _pack(self, seqs: Sequence[TokenSequence | None], rows: int, length: int, patches: int,
              shared_pixels: bool | None = None) -> dict:
        """Right-pad sequences into a (rows, length) batch (None / missing rows: dummy rows). Rows that
        share one pixel array carry it once (``_VisionInputs``); ``shared_pixels`` forces that layout
        (True) or the per-row one (False) -- what warm-up compiles."""
        ids = np.zeros((rows, length), np.int32)
        pos = np.zeros((3, rows, length), np.int32)
        seg = np.zeros((rows, length), np.int32)
        batch = {"input_ids": ids, "position_ids": pos, "segment_ids": seg}
        for i in range(rows):
            s = seqs[i] if i < len(seqs) else None
            if s is not None:
                n = len(s)
                ids[i, :n], pos[:, i, :n], seg[i, :n] = s.input_ids, s.position_ids, 1
        if patches:
            batch.update(self._vision.pack(seqs, rows, patches, shared_pixels))
        return batch

    # -- scoring ---------------------------------------------------------------------------------
    def score_sequences(self, seqs: Sequence[TokenSequence]) -> list[np.ndarray]:
        """P(correct) at each sequence's ``label_positions`` (float32 arrays), whole sequences, batched."""
        seqs = list(seqs)
        if not seqs:
            return []
        # Group by (has image, patch bucket) and sort by length, so each chunk pads little.
        order = sorted(range(len(seqs)), key=lambda i: (self._patches(seqs[i].num_patches), len(seqs[i])))
        pending = []
        i = 0
        while i < len(order):
            first = seqs[order[i]]
            pb = self._patches(first.num_patches)
            rows = self._chunk_rows(bucket_size(len(first), self.length_buckets))
            chunk = []
            while i < len(order) and len(chunk) < rows and self._patches(seqs[order[i]].num_patches) == pb:
                cand = chunk + [order[i]]
                lb = bucket_size(max(len(seqs[j]) for j in cand), self.length_buckets)
                if len(chunk) and len(cand) > self._chunk_rows(lb):
                    break
                chunk = cand
                i += 1
            lb = bucket_size(max(len(seqs[j]) for j in chunk), self.length_buckets)
            batch = self._pack([seqs[j] for j in chunk], self._rows(len(chunk)), lb, pb)
            pending.append((chunk, self._fns.full(self.state, batch)))  # async dispatch
        out: list[np.ndarray | None] = [None] * len(seqs)
        for chunk, probs in pending:
            probs = np.asarray(probs)
            for r, j in enumerate(chunk):
                out[j] = probs[r, seqs[j].label_positions].astype(np.float32)
        return out  # type: ignore[return-value]

    def score_shared(self, prefix: TokenSequence, suffixes: Sequence[TokenSequence]) -> list[np.ndarray]:
        """Continuations of one shared prefix: the prefix (with its images) runs once, the suffixes
        (text only, positions already offset) run in batches on its K/V cache. ``label_positions`` of
        the suffixes index the suffix tokens."""
        suffixes = list(suffixes)
        if not suffixes:
            return []
        self._check_suffixes(suffixes)
        return self.score_cached(self.prefill(prefix), suffixes)

    # -- prefix caches (incremental scoring) -----------------------------------------------------
    @staticmethod
    def _check_suffixes(suffixes: Sequence[TokenSequence]) -> None:
        for s in suffixes:
            if s.pixel_values is not None:
                raise ValueError("suffixes of a shared prefix cannot carry images; put them in the prefix")

    def prefill(self, prefix: TokenSequence) -> KVCache:
        """Run a prefix (with its images) once and keep its K/V (capacity: its prefix bucket)."""
        plen = bucket_size(len(prefix), self.prefix_buckets)
        pb = self._patches(prefix.num_patches)
        kv = self._fns.prefix(self.state, self._pack([prefix], 1, plen, pb))
        return KVCache(tuple(kv), len(prefix))

    def score_cached(self, cache: KVCache, suffixes: Sequence[TokenSequence], *, keep_kv: bool = False):
        """P(correct) at each suffix's ``label_positions`` (indices into the suffix), every suffix a text
        continuation of the cached prefix (positions already offset). With ``keep_kv`` returns
        ``(probs, kvs)``: also a ``SuffixKV`` per suffix, for ``extend_cache``."""
        suffixes = list(suffixes)
        self._check_suffixes(suffixes)
        if not suffixes:
            return ([], []) if keep_kv else []
        plen = cache.capacity
        past_seg = cache.segment_ids()
        fn = self._fns.suffix_kv if keep_kv else self._fns.suffix
        order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
        pending = []
        i = 0
        while i < len(order):
            chunk = []
            while i < len(order):
                cand = chunk + [order[i]]
                lb = bucket_size(max(len(suffixes[j]) for j in cand), self.suffix_buckets)
                if len(cand) > self._chunk_rows(lb + plen) and chunk:
                    break
                chunk = cand
                i += 1
                if len(chunk) >= self.batch_size:
                    break
            lb = bucket_size(max(len(suffixes[j]) for j in chunk), self.suffix_buckets)
            batch = self._pack([suffixes[j] for j in chunk], self._rows(len(chunk)), lb, 0)
            pending.append((chunk, fn(self.state, cache.kv, past_seg, batch)))  # async dispatch
        out: list[np.ndarray | None] = [None] * len(suffixes)
        kvs: list[SuffixKV | None] = [None] * len(suffixes)
        for chunk, res in pending:
            probs, new_kv = res if keep_kv else (res, None)
            probs = np.asarray(probs)
            for r, j in enumerate(chunk):
                out[j] = probs[r, suffixes[j].label_positions].astype(np.float32)
                if keep_kv:
                    kvs[j] = SuffixKV(tuple(new_kv), r, len(suffixes[j]))
        return (out, kvs) if keep_kv else out  # type: ignore[return-value]

    def extend_cache(self, cache: KVCache, suffix: SuffixKV) -> KVCache:
        """A new cache: ``cache`` followed by a scored continuation's K/V (nothing is run again). The
        capacity grows to the prefix bucket of the new length when needed; ``cache`` is left as it is."""
        n = cache.length + int(suffix.length)
        cap = bucket_size(n, self.prefix_buckets)
        kv = cache.kv
        if cap > cache.capacity:
            kv = self._fns.grow(kv, cap)
        kv = self._fns.append(kv, np.int32(cache.length), suffix.kv, np.int32(suffix.row))
        return KVCache(tuple(kv), n)

    # -- warm-up ---------------------------------------------------------------------------------
    def warmup(self, *, batch_sizes: Sequence[int] | None = None, lengths: Sequence[int] | None = None,
               patches: Sequence[int] | None = None, prefix_lengths: Sequence[int] | None = None,
               suffix_lengths: Sequence[int] | None = None, full: bool = True, shared: bool = True,
               text_only: bool = True, incremental: bool = False, shared_images: bool = True) -> int:
        """Compile (by running dummy batches) every bucket combination, or the given subsets:
        ``full``: batch_sizes x lengths x (0 + patches), with images in both layouts of the pixel rows
        (each row's own, and -- unless ``shared_images=False`` -- one image shared by all rows, what
        ``score_batch`` sends for best-of-N candidates of one problem); ``shared``:
        prefix_lengths x (0 + patches) and batch_sizes x suffix_lengths x prefix_lengths. Values are
        rounded to their buckets; 0 patches (the text-only variant) is included when ``text_only``.
        ``incremental`` (what ``PRM.incremental_scorer``, i.e. guided search, runs): the prefixes as for
        ``shared``, scoring with K/V kept and appending to a cache for batch_sizes x suffix_lengths x prefix_lengths
        (the prefix buckets are the cache capacities), and growing a cache from each of those prefix
        buckets to every larger one. Returns the number of new compilations. Dummy batches are run
        (an AOT ``lower().compile()`` would not fill jit's cache).

        With the default buckets the full product is large (hundreds of programs); for a real model
        warm up what the workload needs, e.g. ``warmup(batch_sizes=[8], lengths=[1024, 2048],
        patches=[1024], prefix_lengths=[768], suffix_lengths=[256, 512], text_only=False)``."""
        before = self.num_compiles
        bs = sorted({self._rows(b) for b in (batch_sizes or self.batch_buckets)})
        ls = sorted({bucket_size(n, self.length_buckets) for n in (lengths or self.length_buckets)})
        ps = sorted(({0} if text_only else set()) | {self._patches(p) for p in (self.patch_buckets if patches is None
                                                                                   else patches) if p})
        if not ps:
            raise ValueError("nothing to warm up: no patch buckets and text_only=False")
        pls = sorted({bucket_size(n, self.prefix_buckets) for n in (prefix_lengths or self.prefix_buckets)})
        sls = sorted({bucket_size(n, self.suffix_buckets) for n in (suffix_lengths or self.suffix_buckets)})
        outs = []
        if full:
            for p in ps:
                for n in ls:
                    for b in bs:
                        outs.append(self._fns.full(self.state, self._pack([], b, n, p, shared_pixels=False)))
                        if p and b > 1 and shared_images:  # rows sharing one image (best-of-N candidates)
                            outs.append(self._fns.full(self.state, self._pack([], b, n, p, shared_pixels=True)))
        if shared:
            for pl in pls:
                kv, past_seg = self._warm_prefix(pl, ps)
                for n in sls:
                    for b in bs:
                        outs.append(self._fns.suffix(self.state, kv, past_seg, self._pack([], b, n, 0)))
        if incremental:
            for i, pl in enumerate(pls):
                kv, past_seg = self._warm_prefix(pl, ps)
                for n in sls:
                    for b in bs:
                        probs, new_kv = self._fns.suffix_kv(self.state, kv, past_seg, self._pack([], b, n, 0))
                        outs += [probs, self._fns.append(kv, np.int32(0), new_kv, np.int32(0))]
                outs += [self._fns.grow(kv, bigger) for bigger in pls[i + 1:]]
        jax.block_until_ready(outs)
        return self.num_compiles - before

    def _warm_prefix(self, length: int, patch_sizes):
        """Compile the prefix function for ``length`` and every patch bucket; -> (a cache, its segment ids)."""
        kv = None
        for p in patch_sizes:
            kv = self._fns.prefix(self.state, self._pack([], 1, length, p))
        return kv, np.zeros((1, length), np.int32)
