"""Grain input pipeline: TFDS ArrayRecord records -> fixed-shape PRM training batches.

    loader = make_loader(data_dir, "train", tokenizer, ImageProcessor(), model_config,
                         PipelineConfig(batch_size=8, seq_buckets=(1024, 2048), patch_buckets=(1024, 4096)))
    it = iter(loader)                 # a grain DatasetIterator
    batch = next(it)                  # dict of numpy arrays, see "Batch format"
    state = it.get_state()            # JSON-able dict; it.set_state(state) resumes exactly here
    it.stats                          # LoaderStats: batches, examples, skips by reason, ...

Pipeline (Grain's dataset API, ``grain.MapDataset`` -> ``grain.IterDataset``)::

    MapDataset.range(num_records)[shard_index::shard_count]     per-host slice (disjoint, covering)
      .shuffle(seed)                                             global shuffle, reseeded per epoch
      .repeat(num_epochs)                                        None = forever
      .map(ExampleTransform)         read record i from the data source (TFDS ArrayRecord), decode images
                                     (Pillow) -> ImageProcessor -> encode_prm_example -> get_rope_index;
                                     a bad record becomes a small "skip" marker, never an exception
      .to_iter_dataset(ReadOptions(num_threads, prefetch_buffer_size))
    -> BatchIterDataset              pad (or pack) examples into rows of a fixed-shape bucket, build the
                                     per-row vision layout; with ``pack_buffer`` > 0 each batch is chosen
                                     from that many pending examples ("Lookahead packing"); skip markers
                                     are collected into the batch's private "_report" entry
    -> .mp_prefetch(worker_count)    optional: worker processes each run everything above on a slice
    -> PrmLoader (this module)       main process: pops "_report", logs one line per skipped record,
                                     keeps the counters (``iterator.stats``), returns the batch

Batch format (B = ``batch_size`` rows per host; L, P = the batch's bucket; S = ``max_steps``;
I = ``max_images``; K = examples per row: ``max_examples_per_row`` when packing, else 1;
U = ``spatial_merge_size ** 2``; D = 3 * temporal_patch * patch**2 = 1176 for Qwen2.5-VL)::

    input_ids          (B, L)      int32   token ids; padding = pad_token_id
    segment_ids        (B, L)      int32   0 = padding, k = k-th example of the row (1-based)
    position_ids       (3, B, L)   int32   M-RoPE (t, h, w) positions, restarting at 0 for each
                                           example (= rope.get_rope_index of the example alone); 0 on padding
    label_positions    (B, S)      int32   index whose next-token logits predict the step's "+"/"-"
                                           (input_ids[label_positions + 1] is the label token); 0 on padding
    labels             (B, S)      int32   1 = "+", 0 = "-", -1 = unsupervised step or padding slot
    label_segment_ids  (B, S)      int32   segment of the example each label slot belongs to; 0 = padding
    pixel_values       (B, P, D)   float32 (or bfloat16: ``pixel_dtype``; the vision towers cast their input
                                           to the compute dtype first, so bf16 serves a bf16 model) patches of the row's images in
                                           image order (examples in row order), zero padding after
    window_index       (B, P/U)    int32   \\
    reverse_index      (B, P/U)    int32    | rope.vision_layout(grids of the row, pad_to=P): images stay
    window_segment_ids (B, P)      int32    | separate (window/full segments per image), padding patches
    full_segment_ids   (B, P)      int32    | are segment -1
    rotary_positions   (B, P, 2)   int32   /
    image_grid_thw     (B, I, 3)   int32   grids of the row's images in order, zero rows after
    num_images         (B,)        int32   images in the row
    num_patches        (B,)        int32   real patches in the row (= sum of t*h*w)
    num_tokens         (B,)        int32   real tokens in the row
    num_examples       (B,)        int32   examples in the row (0 = a padding row)
    record_index       (B, K)      int32   index of each example's record in the split; -1 = none

The model takes a batch as it is: ``Qwen25VL.hidden_states(input_ids, position_ids, segment_ids,
pixel_values, {k: batch[k] for k in LAYOUT_KEYS})`` runs the vision tower per row (vmap over B) and
scatters each row's image features onto that row's image tokens (``PRMModel.step_logits(batch)``).
Every key has the batch on axis 0 except ``position_ids`` (axis 1).

InternVL batches (``model_config`` an ``InternVLConfig``; ``image_processor`` an
``InternVLImageProcessor``): the transform tiles each image (448 px tiles, the thumbnail), encodes the
prompt style in InternVL's conversation template (``internvl_prompt_tokenizer``) with
``<img><IMG_CONTEXT> x image_seq_length x tiles</img>`` per image, exactly as ``PRM.score`` does, and
``patch_buckets`` count tiles per row (P = tiles; the Scorer's unit on this backbone). Keys as above
except::

    position_ids       (1, B, L)   int32   1D RoPE positions 0..n-1 of each example (restarting per packed
                                           example); 0 on padding
    pixel_values       (B, P, C, S, S)     the row's tiles in image order (examples in row order), zeros after
    image_flags        (B, P)      int32   1 = a tile of the row, 0 = padding (never reaches the LM)
    image_tiles        (B, I)      int32   tiles of each of the row's images, zero after
    num_patches        (B,)        int32   real tiles in the row

and no ``image_grid_thw`` or layout keys. ``InternVL.hidden_states`` takes the batch as it is
(``PRMModel`` passes ``image_flags``).

Buckets: every batch takes the smallest ``seq_buckets`` length L that holds its longest row and the
smallest ``patch_buckets`` size P that holds its largest row's patches, so at most
``len(seq_buckets) * len(patch_buckets)`` shapes reach the device (``bucket_shapes``). Examples longer
than ``max_length`` (default: the largest L) lose whole trailing steps (``encode_prm_example``); steps
past ``max_steps`` are dropped the same way; both are counted (``steps_dropped``,
``examples_truncated``). An example whose question and first step alone exceed max_length, with more
than ``max_images`` images, or more patches than the largest P, is skipped. Multi-host: hosts choose
buckets independently; a training loop that needs one global shape can agree on the largest bucket
across hosts and grow the others with :func:`pad_batch`, or configure a single bucket.

Lookahead packing (``pack_buffer`` > 0): first-fit in arrival order fills rows in tokens but not in
patches (an image-heavy row next to text-heavy ones sets P for the whole batch). The lookahead packer
holds ``pack_buffer`` pending examples and builds each batch from them (``plan_batch``): for every
bucket it fills the rows one by one, the largest pending example first, then (packing) the example that
keeps the row's token and patch fill most even, within L, P, ``max_steps`` label slots, ``max_images``
and ``max_examples_per_row``; the bucket whose rows are fullest wins (tokens + ``PATCH_COST`` x
patches, real over carried). An example that has waited ``2 * pack_buffer`` pulls goes into the next
batch whatever it costs. On VL-PRM300K-shaped data with ``configs/qwen2_5_vl_3b.py`` this keeps ~96% of
tokens and ~91% of patches real (first-fit: 89% / 32%; one example per row: 45% / 16%). Order stays
deterministic in (seed, shard, worker_count) and the state restores exactly (see "Iterator state").
``simulate_packing(sizes, cfg)`` runs the same batching on (tokens, patches, steps, images) sizes
alone, to choose buckets for a data set; ``loader.batches_per_epoch()`` estimates a packed epoch's
batches (records // batch_size overstates it by the examples per row).

Efficiency: ``iterator.stats`` also counts, over the batches consumed, the real and the carried tokens
(B*L), patches (B*P) and label slots (B*S) and the pixel bytes; ``stats.efficiency(since=snapshot)``
gives ``data/token_efficiency``, ``data/patch_efficiency``, ``data/label_slot_efficiency`` and
``data/examples_per_batch`` (``python -m jaxprm.train`` logs them every ``log_every`` steps and writes
them to TensorBoard).

Skipped examples: a record that cannot be used (malformed stored record, image that does not decode
or preprocess, prompt too long, too many images/patches, or any other exception in the transform) is
never raised inside a worker. It travels as a marker to the batcher, which attaches
``(record_index, record id, reason)`` to the next batch it emits (or to a stats-only element at the
end of the data); the main-process iterator logs one ``logging.warning`` per skipped record naming
its id and reason and adds it to ``iterator.stats`` (``num_skipped``, ``skipped_by_reason``,
``recent_skips``). Because the report rides with the batches, the counts are exact for every
``worker_count`` (0 or more) and always describe exactly the batches consumed so far; they are part of
the iterator state, so they survive a checkpoint/restore. (The log lines are written by the main
process when the batch carrying them is consumed, not when the worker hit the record.)

Systemic failures stop the run instead: a failure that is not about one record (an ``ImportError``,
i.e. a missing package) raises ``SystemicDataError`` at once, and so does a loader whose first
``systemic_skip_limit`` records (default 16) were all skipped without a single usable example (a missing
tokenizer file, a wrong config, the wrong tokenizer: the same error on every record). Skipping them all
would train nothing and look like success.

Iterator state: ``iter(loader)`` is a ``grain.DatasetIterator``; ``get_state()`` returns a JSON-able
dict (Grain's pipeline state + the stats), ``set_state()`` restores it into a fresh iterator of a
loader built with the same arguments (same data, seed, shard, config, worker_count): the following
batches are exactly those an uninterrupted run would have produced -- no record repeated or
skipped. A packed batch that left one example over for the next batch stores the upstream state from
before that example, which is replayed on restore. With lookahead packing the state is the upstream
state before the oldest pending example plus the offsets of the elements pulled after it that were
already emitted (or reported); a restore replays from there and drops those, which rebuilds the
buffer exactly. Save it in Orbax checkpoints as JSON
(``ocp.args.JsonSave(it.get_state())``), with Grain's handler (``grain.checkpoint.CheckpointSave(it)``
/ ``CheckpointRestore(it)``, which writes ``process_{i}-of-{n}.json`` per host), or via the
iterator's own ``save``/``load`` (Orbax v1 ``StatefulCheckpointable``).

Order: deterministic in (seed, shard, worker_count). With ``worker_count > 0`` each worker batches its
own slice (round robin), so the batches differ from ``worker_count=0`` (still deterministic);
restore with the same worker_count. ``num_threads`` does not change the order.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxprm.data.prompt import (DEFAULT_PROMPT_STYLE, INTERNVL_IMAGE_PAD, POSITIVE_TOKEN, encode_prm_example,
                                get_prompt_style, internvl_prompt_tokenizer)
from jaxprm.data.schema import RecordError
from jaxprm.data.tfds_builder import DEFAULT_NAME, data_source as _tfds_data_source, example_to_record
from jaxprm.dtypes import float_dtype
from jaxprm.models.qwen2_5_vl.rope import LAYOUT_KEYS, VisionLayouts, pad_layout  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

REPORT_KEY = "_report"
STATE_FORMAT = 1

# Skip reasons (the part of the reason before the first ":").
MALFORMED_RECORD = "malformed_record"
UNREADABLE_RECORD = "unreadable_record"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_IMAGES = "too_many_images"
TOO_MANY_PATCHES = "too_many_patches"
PROMPT_TOO_LONG = "prompt_too_long"
BAD_PROMPT = "bad_prompt"
UNEXPECTED_ERROR = "error"
ENVIRONMENT_ERROR = "environment"  # not about the record (a missing package): stops the run


class SystemicDataError(RuntimeError):
    """Every record fails the same way (the environment or the config, not the data): stop, don't skip."""


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 8  # rows per host
    seq_buckets: tuple[int, ...] = (1024, 2048, 4096)  # L choices (tokens per row)
    # P choices (vision patches per row); 5120 = one image at ImageProcessor's default max_pixels
    patch_buckets: tuple[int, ...] = (1024, 2048, 5120)
    max_steps: int = 32  # S: label slots per row (an example's steps beyond it are dropped)
    max_images: int = 4  # I: image slots per row (an example with more is skipped)
    max_length: int | None = None  # token cap per example (default and upper bound: max(seq_buckets))
    packing: bool = False  # pack several examples per row (segment ids 1..k)
    max_examples_per_row: int = 8  # K when packing
    # lookahead packing: hold this many examples and build each batch from them (``plan_batch``): rows
    # filled close to the bucket in tokens AND patches, the bucket chosen per batch to fit; also without
    # packing (then it groups examples of like size into a batch). 0 = stream first-fit in arrival order
    pack_buffer: int = 0
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1  # None: repeat forever
    drop_remainder: bool = True  # False: the last short batch is padded with empty rows
    worker_count: int = 0  # Grain worker processes (mp_prefetch); 0 = in this process
    worker_buffer_size: int = 2  # batches buffered per worker
    num_threads: int = 2  # threads running the per-example transform (0 = inline)
    prefetch_buffer_size: int = 16  # examples prefetched by those threads
    # what the assistant turns hold: "score" = the placeholder in every turn (the prompt PRM.score uses;
    # labels are still supervised); "train" = the true labels (teacher forcing). See prompt.encode_mode.
    label_mode: str = "score"
    systemic_skip_limit: int = 16  # raise SystemicDataError when this many records fail before any works (0: never)
    placeholder: str = POSITIVE_TOKEN  # assistant turn of unlabelled steps (train) / all steps (score)
    prompt_style: str = DEFAULT_PROMPT_STYLE  # a name in jaxprm.data.prompt.PROMPT_STYLES
    system_prompt: str | None = None  # None: the prompt style's
    pixel_dtype: str = "float32"  # or "bfloat16"
    pad_token_id: int | None = None  # default: tokenizer.pad_token_id, else 0
    shard_index: int | None = None  # default: jax.process_index()
    shard_count: int | None = None  # default: jax.process_count()

    @property
    def examples_per_row(self) -> int:
        return int(self.max_examples_per_row) if self.packing else 1

    @property
    def effective_max_length(self) -> int:
        top = max(self.seq_buckets)
        return top if self.max_length is None else min(int(self.max_length), top)

    def validate(self, merge_size: int = 2) -> "PipelineConfig":
        def pos_int(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"PipelineConfig.{name} must be a positive int, got {v!r}")

        for name in ("batch_size", "max_steps", "max_images", "max_examples_per_row"):
            pos_int(name, getattr(self, name))
        for name in ("seq_buckets", "patch_buckets"):
            b = tuple(getattr(self, name))
            if not b:
                raise ValueError(f"PipelineConfig.{name} must not be empty")
            for v in b:
                pos_int(name, v)
            if list(b) != sorted(set(b)):
                raise ValueError(f"PipelineConfig.{name} must be strictly increasing, got {b}")
        unit = merge_size**2
        bad = [p for p in self.patch_buckets if p % unit]
        if bad:
            raise ValueError(f"patch_buckets must be multiples of spatial_merge_size**2={unit}, got {bad}")
        if self.max_length is not None:
            pos_int("max_length", self.max_length)
        if self.num_epochs is not None:
            pos_int("num_epochs", self.num_epochs)
        for name in ("worker_count", "num_threads", "prefetch_buffer_size", "systemic_skip_limit", "pack_buffer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"PipelineConfig.{name} must be an int >= 0, got {v!r}")
        pos_int("worker_buffer_size", self.worker_buffer_size)
        if self.pack_buffer and self.pack_buffer < self.batch_size:
            raise ValueError(f"pack_buffer must be 0 or >= batch_size={self.batch_size} (it holds the examples a batch "
                             f"is chosen from), got {self.pack_buffer}")
        if self.label_mode not in ("train", "score"):
            raise ValueError(f"label_mode must be 'train' or 'score', got {self.label_mode!r}")
        get_prompt_style(self.prompt_style)  # raises ValueError naming the styles
        if self.pixel_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"pixel_dtype must be 'float32' or 'bfloat16', got {self.pixel_dtype!r}")
        if not 0 <= int(self.seed) < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("give shard_index and shard_count together (or neither)")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"need 0 <= shard_index < shard_count, got {self.shard_index}, {self.shard_count}")
        return self


def resolve_pixel_dtype(pixel_dtype: str, model_dtype: str) -> str:
    """``data.pixel_dtype`` -> ``PipelineConfig.pixel_dtype``: "auto" is bfloat16 when the model computes
    in bfloat16 (both vision towers cast ``pixel_values`` to the compute dtype before anything else, so
    bfloat16 pixels give the same values at half the host memory and transfer), else float32."""
    if pixel_dtype != "auto":
        return pixel_dtype
    return "bfloat16" if str(model_dtype) == "bfloat16" else "float32"


def auto_worker_count(workers_per_chip: float, local_chips: int | None = None, cpus: int | None = None) -> int:
    """``data.worker_count = -1``: ``ceil(workers_per_chip x local chips)`` worker processes, at most the
    host's CPUs minus one (the training loop's); 0 when ``workers_per_chip`` is 0. Logs when the CPUs
    are too few to keep the chips fed at the rate ``workers_per_chip`` was measured for."""
    import math

    if workers_per_chip <= 0:
        return 0
    if local_chips is None:
        import jax

        local_chips = jax.local_device_count()
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    need = math.ceil(workers_per_chip * local_chips - 1e-9)
    n = max(0, min(need, cpus - 1))
    if n < need:
        log.warning("pipeline: %d worker processes would keep %d chip(s) fed (%.2f per chip), but this host has %d "
                    "CPUs: using %d; the input pipeline may be the bottleneck", need, local_chips, workers_per_chip,
                    cpus, n)
    return n


def bucket_shapes(cfg: PipelineConfig) -> list[tuple[int, int]]:
    """Every (L, P) a batch can have."""
    return [(int(l), int(p)) for l in cfg.seq_buckets for p in cfg.patch_buckets]


def batch_spec(cfg: PipelineConfig, model_config, seq_len: int, num_patches: int) -> dict[str, tuple[tuple, Any]]:
    """``{key: (shape, dtype)}`` of a batch in bucket (seq_len, num_patches) (for AOT compilation);
    InternVL: ``num_patches`` tiles (see "InternVL batches" in the module docstring)."""
    if is_internvl(model_config):
        return _tile_batch_spec(cfg, model_config, seq_len, num_patches)
    v = model_config.vision
    unit = v.spatial_merge_size**2
    b, s, i, k = cfg.batch_size, cfg.max_steps, cfg.max_images, cfg.examples_per_row
    l, p, d = int(seq_len), int(num_patches), v.patch_dim
    i32 = np.dtype(np.int32)
    return {
        "input_ids": ((b, l), i32), "segment_ids": ((b, l), i32), "position_ids": ((3, b, l), i32),
        "label_positions": ((b, s), i32), "labels": ((b, s), i32), "label_segment_ids": ((b, s), i32),
        "pixel_values": ((b, p, d), float_dtype(cfg.pixel_dtype)),
        "window_index": ((b, p // unit), i32), "reverse_index": ((b, p // unit), i32),
        "window_segment_ids": ((b, p), i32), "full_segment_ids": ((b, p), i32),
        "rotary_positions": ((b, p, 2), i32), "image_grid_thw": ((b, i, 3), i32),
        "num_images": ((b,), i32), "num_patches": ((b,), i32), "num_tokens": ((b,), i32),
        "num_examples": ((b,), i32), "record_index": ((b, k), i32),
    }


def is_internvl(model_config) -> bool:
    """Whether ``model_config`` is an InternVL one (tiles, 1D positions) rather than Qwen2.5-VL's."""
    from jaxprm.models.internvl.config import InternVLConfig

    return isinstance(model_config, InternVLConfig)


def _tile_shape(model_config) -> tuple[int, int, int]:
    v = model_config.vision
    return int(v.num_channels), int(v.image_size), int(v.image_size)


def _tile_batch_spec(cfg: PipelineConfig, model_config, seq_len: int, num_tiles: int) -> dict[str, tuple[tuple, Any]]:
    b, s, i, k = cfg.batch_size, cfg.max_steps, cfg.max_images, cfg.examples_per_row
    l, p = int(seq_len), int(num_tiles)
    i32 = np.dtype(np.int32)
    return {
        "input_ids": ((b, l), i32), "segment_ids": ((b, l), i32), "position_ids": ((1, b, l), i32),
        "label_positions": ((b, s), i32), "labels": ((b, s), i32), "label_segment_ids": ((b, s), i32),
        "pixel_values": ((b, p, *_tile_shape(model_config)), float_dtype(cfg.pixel_dtype)),
        "image_flags": ((b, p), i32), "image_tiles": ((b, i), i32),
        "num_images": ((b,), i32), "num_patches": ((b,), i32), "num_tokens": ((b,), i32),
        "num_examples": ((b,), i32), "record_index": ((b, k), i32),
    }


# ------------------------------------------------------------------------------------------------
# Per-example transform (runs in Grain threads / worker processes; never raises)
# ------------------------------------------------------------------------------------------------
def _skip(index: int, rid: str, kind: str, detail: str) -> dict:
    detail = " ".join(str(detail).split())
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return {"skip": (int(index), str(rid), f"{kind}: {detail}")}


def _record_id(raw: Any) -> str:
    try:
        v = raw["id"]
        return bytes(v).decode("utf-8", "replace") if isinstance(v, (bytes, bytearray, np.bytes_)) else str(v)
    except Exception:  # noqa: BLE001
        return "<no id>"


class ExampleTransform:
    """Record index -> one tokenized, preprocessed example (dict of numpy arrays) or a skip marker."""

    def __init__(self, source, tokenizer, image_processor, model_config, cfg: PipelineConfig):
        self.source = source
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.cfg = cfg
        self.pixel_dtype = float_dtype(cfg.pixel_dtype)
        self.internvl = is_internvl(model_config)
        if self.internvl:  # tiles, InternVL's template, 1D positions (``_transform_internvl``)
            self.tile_shape = _tile_shape(model_config)
            self.image_token_id = int(model_config.image_token_id)
            self.image_seq_length = int(model_config.image_seq_length)
            self.max_patches = int(max(cfg.patch_buckets))  # tiles
            self.max_length = cfg.effective_max_length
            return
        v = model_config.vision
        self.merge = int(v.spatial_merge_size)
        self.patch_dim = int(v.patch_dim)
        self.image_token_id = int(model_config.image_token_id)
        self.video_token_id = int(model_config.video_token_id)
        self.tokens_per_second = int(getattr(model_config, "tokens_per_second", 4))
        self.max_patches = int(max(cfg.patch_buckets))
        self.max_length = cfg.effective_max_length

    def __call__(self, index) -> dict:
        index = int(index)
        try:
            raw = self.source[index]
        except Exception as e:  # noqa: BLE001
            return _skip(index, "<unknown>", UNREADABLE_RECORD, f"{type(e).__name__}: {e}")
        rid = _record_id(raw)
        try:
            return self._transform(index, rid, raw)
        except ImportError as e:  # a missing package fails every record: the main process stops the run
            return _skip(index, rid, ENVIRONMENT_ERROR, f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - never let a record crash a worker
            return _skip(index, rid, UNEXPECTED_ERROR, f"{type(e).__name__}: {e}")

    def _record(self, index: int, rid: str, raw: Any):
        """``(record, image-processor output or None)``, or ``(skip entry, None)``."""
        try:
            rec = example_to_record(raw)
        except (RecordError, TypeError, ValueError, KeyError) as e:
            return _skip(index, rid, MALFORMED_RECORD, e), None
        if len(rec.images) > self.cfg.max_images:
            return _skip(index, rec.id, TOO_MANY_IMAGES,
                         f"{len(rec.images)} images > max_images={self.cfg.max_images}"), None
        if not rec.images:
            return rec, None
        try:
            return rec, self.image_processor(rec.images)
        except (ValueError, TypeError, OSError) as e:
            return _skip(index, rec.id, CORRUPT_IMAGE, e), None

    def _encode(self, index: int, rec, tokenizer, **kw):
        """``(steps kept, PromptEncoding)`` of the record's prompt, or ``(skip entry, None)``."""
        cfg = self.cfg
        steps = rec.steps[: cfg.max_steps]
        try:
            return steps, encode_prm_example(
                tokenizer, rec.question, [s.text for s in steps], [s.label for s in steps],
                max_length=self.max_length, placeholder=cfg.placeholder, mode=cfg.label_mode,
                system_prompt=cfg.system_prompt, style=cfg.prompt_style, **kw)
        except ImportError:
            raise
        except ValueError as e:
            kind = PROMPT_TOO_LONG if "max_length=" in str(e) else BAD_PROMPT
            return _skip(index, rec.id, kind, e), None

    def _pixels(self, vis: dict | None, count_key: str, unit: tuple) -> tuple[np.ndarray, np.ndarray]:
        """The image processor's pixels in the batch's dtype (bfloat16: half the memory of a pending example,
        the same values the batch gets) and its per-image entry ``count_key``; empty ones for no image."""
        if vis is None:
            return np.zeros((0, *unit), self.pixel_dtype), np.zeros((0,), np.int64)
        return (np.asarray(vis["pixel_values"], np.float32).astype(self.pixel_dtype, copy=False),
                np.asarray(vis[count_key], np.int64).reshape(-1))

    def _check_pixels(self, index: int, rid: str, pixels: np.ndarray, what: str) -> dict | None:
        """A skip entry when the pixels are not the model's ``what`` (patches/tiles) or too many for a row."""
        want = (self.patch_dim,) if what == "patches" else self.tile_shape
        if tuple(pixels.shape[1:]) != tuple(want):
            return _skip(index, rid, CORRUPT_IMAGE, f"{what} of shape {tuple(pixels.shape[1:])} != model's {tuple(want)}")
        if pixels.shape[0] > self.max_patches:
            return _skip(index, rid, TOO_MANY_PATCHES,
                         f"{pixels.shape[0]} {what} > largest patch bucket {self.max_patches}")
        return None

    def _transform(self, index: int, rid: str, raw: Any) -> dict:
        from jaxprm.models.qwen2_5_vl.rope import get_rope_index

        if self.internvl:
            return self._transform_internvl(index, rid, raw)
        rec, vis = self._record(index, rid, raw)
        if vis is None and isinstance(rec, dict):
            return rec
        rid = rec.id
        pixel_values, grids = self._pixels(vis, "image_grid_thw", (self.patch_dim,))
        bad = self._check_pixels(index, rid, pixel_values, "patches")
        if bad:
            return bad
        grids = grids.reshape(-1, 3)
        steps, enc = self._encode(index, rec, self.tokenizer, image_grid_thw=grids if len(grids) else None,
                                  merge_size=self.merge)
        if enc is None:
            return steps
        ids = np.asarray(enc.input_ids, np.int32)
        pos, _ = get_rope_index(
            ids[None], image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            spatial_merge_size=self.merge, image_grid_thw=grids if len(grids) else None,
            tokens_per_second=self.tokens_per_second,
        )
        return {
            "record_index": index,
            "id": rid,
            "input_ids": ids,
            "position_ids": np.asarray(pos[:, 0], np.int32),
            "label_positions": np.asarray(enc.label_positions, np.int32),
            "labels": np.asarray(enc.labels, np.int32),
            "pixel_values": pixel_values,
            "image_grid_thw": grids.astype(np.int32),
            "steps_dropped": int(len(rec.steps) - len(steps) + enc.num_steps_dropped),
        }

    def _transform_internvl(self, index: int, rid: str, raw: Any) -> dict:
        """InternVL: 448 px tiles (``InternVLImageProcessor``), VisualPRM's prompt in InternVL's template with
        ``<img><IMG_CONTEXT> x image_seq_length x tiles</img>`` per image, positions 0..L-1: what
        ``PRM.score`` encodes for the record (``jaxprm.scoring.prm.PRM._encode``)."""
        rec, vis = self._record(index, rid, raw)
        if vis is None and isinstance(rec, dict):
            return rec
        rid = rec.id
        tiles, per_image = self._pixels(vis, "num_patches", self.tile_shape)
        bad = self._check_pixels(index, rid, tiles, "tiles")
        if bad:
            return bad
        steps, enc = self._encode(index, rec, internvl_prompt_tokenizer(self.tokenizer),
                                  image_tokens=per_image * self.image_seq_length if len(per_image) else None,
                                  image_pad=INTERNVL_IMAGE_PAD)
        if enc is None:
            return steps
        ids = np.asarray(enc.input_ids, np.int32)
        return {
            "record_index": index,
            "id": rid,
            "input_ids": ids,
            "position_ids": np.arange(len(ids), dtype=np.int32)[None],  # 1D RoPE, from 0 in every example
            "label_positions": np.asarray(enc.label_positions, np.int32),
            "labels": np.asarray(enc.labels, np.int32),
            "pixel_values": tiles,
            "image_tiles": per_image.astype(np.int32),
            "steps_dropped": int(len(rec.steps) - len(steps) + enc.num_steps_dropped),
        }


def _num_images(ex: dict) -> int:
    return len(ex["image_grid_thw"] if "image_grid_thw" in ex else ex["image_tiles"])


# ------------------------------------------------------------------------------------------------
# Rows, buckets, batch assembly
# ------------------------------------------------------------------------------------------------
class _Row:
    __slots__ = ("examples", "tokens", "patches", "steps", "images")

    def __init__(self):
        self.examples, self.tokens, self.patches, self.steps, self.images = [], 0, 0, 0, 0

    def fits(self, ex: dict, cfg: PipelineConfig, max_len: int, max_patches: int) -> bool:
        return (
            len(self.examples) < cfg.examples_per_row
            and self.tokens + len(ex["input_ids"]) <= max_len
            and self.patches + len(ex["pixel_values"]) <= max_patches
            and self.steps + len(ex["labels"]) <= cfg.max_steps
            and self.images + _num_images(ex) <= cfg.max_images
        )

    def add(self, ex: dict) -> None:
        self.examples.append(ex)
        self.tokens += len(ex["input_ids"])
        self.patches += len(ex["pixel_values"])
        self.steps += len(ex["labels"])
        self.images += _num_images(ex)


def _smallest(buckets: Sequence[int], need: int) -> int:
    for b in buckets:
        if b >= need:
            return int(b)
    raise ValueError(f"{need} exceeds the largest bucket {max(buckets)}")


class _AssemblerBase:
    """Rows of examples -> one fixed-shape batch: the text, label and bookkeeping arrays every backbone
    shares, filled once here; subclasses add their vision arrays (``_vision_arrays``), what each
    example's images write besides its pixels (``_put_images``) and any per-batch layout (``_finish``)."""

    position_rows = 3  # M-RoPE (t, h, w); InternVL: 1

    def __init__(self, cfg: PipelineConfig, pad_token_id: int):
        self.cfg = cfg
        self.pad_token_id = int(pad_token_id)
        self.pixel_dtype = float_dtype(cfg.pixel_dtype)

    def _vision_arrays(self, b: int, p: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _put_images(self, out: dict, r: int, poff: int, npat: int, ioff: int, ex: dict) -> int:
        """Write ``ex``'s per-image entries of row ``r`` (its patches start at ``poff``); returns its image count."""
        raise NotImplementedError

    def _finish(self, out: dict, p: int) -> None:
        pass

    def __call__(self, rows: list[_Row]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        b, s, k = cfg.batch_size, cfg.max_steps, cfg.examples_per_row
        l = _smallest(cfg.seq_buckets, max(r.tokens for r in rows))
        p = _smallest(cfg.patch_buckets, max(r.patches for r in rows))
        out = {
            "input_ids": np.full((b, l), self.pad_token_id, np.int32),
            "segment_ids": np.zeros((b, l), np.int32),
            "position_ids": np.zeros((self.position_rows, b, l), np.int32),
            "label_positions": np.zeros((b, s), np.int32),
            "labels": np.full((b, s), -1, np.int32),
            "label_segment_ids": np.zeros((b, s), np.int32),
            **self._vision_arrays(b, p),
            "num_images": np.zeros((b,), np.int32),
            "num_patches": np.zeros((b,), np.int32),
            "num_tokens": np.zeros((b,), np.int32),
            "num_examples": np.zeros((b,), np.int32),
            "record_index": np.full((b, k), -1, np.int32),
        }
        for r, row in enumerate(rows[:b]):
            off = poff = soff = ioff = 0
            for j, ex in enumerate(row.examples):
                n = len(ex["input_ids"])
                out["input_ids"][r, off:off + n] = ex["input_ids"]
                out["segment_ids"][r, off:off + n] = j + 1
                out["position_ids"][:, r, off:off + n] = ex["position_ids"]
                m = len(ex["labels"])
                out["label_positions"][r, soff:soff + m] = ex["label_positions"] + off
                out["labels"][r, soff:soff + m] = ex["labels"]
                out["label_segment_ids"][r, soff:soff + m] = j + 1
                npat = len(ex["pixel_values"])
                if npat:
                    out["pixel_values"][r, poff:poff + npat] = ex["pixel_values"]
                ioff += self._put_images(out, r, poff, npat, ioff, ex)
                out["record_index"][r, j] = ex["record_index"]
                off, poff, soff = off + n, poff + npat, soff + m
            out["num_tokens"][r] = off
            out["num_patches"][r] = poff
            out["num_images"][r] = ioff
            out["num_examples"][r] = len(row.examples)
        self._finish(out, p)
        return out


class BatchAssembler(_AssemblerBase):
    """Qwen2.5-VL: rows of examples -> one fixed-shape batch (see the module docstring)."""

    def __init__(self, cfg: PipelineConfig, model_config, pad_token_id: int):
        super().__init__(cfg, pad_token_id)
        v = model_config.vision
        self.patch_dim = int(v.patch_dim)
        # rows rarely repeat their images, so only a few layouts (the empty ones) are worth keeping
        self.layouts = VisionLayouts(v, max_cached=16)

    def _vision_arrays(self, b: int, p: int) -> dict[str, np.ndarray]:
        return {"pixel_values": np.zeros((b, p, self.patch_dim), self.pixel_dtype),
                "image_grid_thw": np.zeros((b, self.cfg.max_images, 3), np.int32)}

    def _put_images(self, out, r, poff, npat, ioff, ex) -> int:
        g = ex["image_grid_thw"]
        out["image_grid_thw"][r, ioff:ioff + len(g)] = g
        return len(g)

    def _finish(self, out, p) -> None:
        grids = [out["image_grid_thw"][r, :n] for r, n in enumerate(out["num_images"])]
        out.update(self.layouts.batch(grids, p))


class TileBatchAssembler(_AssemblerBase):
    """InternVL: rows of examples -> one fixed-shape batch of tiles (see "InternVL batches")."""

    position_rows = 1

    def __init__(self, cfg: PipelineConfig, model_config, pad_token_id: int):
        super().__init__(cfg, pad_token_id)
        self.tile_shape = _tile_shape(model_config)

    def _vision_arrays(self, b: int, p: int) -> dict[str, np.ndarray]:
        return {"pixel_values": np.zeros((b, p, *self.tile_shape), self.pixel_dtype),
                "image_flags": np.zeros((b, p), np.int32),
                "image_tiles": np.zeros((b, self.cfg.max_images), np.int32)}

    def _put_images(self, out, r, poff, npat, ioff, ex) -> int:
        out["image_flags"][r, poff:poff + npat] = 1
        t = ex["image_tiles"]
        out["image_tiles"][r, ioff:ioff + len(t)] = t
        return len(t)


# ------------------------------------------------------------------------------------------------
# Lookahead ("balanced") packing: which pending examples make up the next batch
# ------------------------------------------------------------------------------------------------
# What a vision patch costs relative to an LM token in a training step, used only to rank the buckets
# a batch could take: Qwen2.5-VL's ViT (~0.67B params) runs on every patch, the 3B LM (~2.8B
# non-embedding params) on every token, so a patch costs ~1/4 of a token (~1/10 on the 7B).
PATCH_COST = 0.25


def plan_batch(sizes: np.ndarray, forced: np.ndarray, cfg: PipelineConfig) -> list[list[int]]:
    """Choose the examples of one batch from a buffer of pending ones and group them into rows.

    ``sizes``: (N, 4) int of each pending example's (tokens, patches, steps, images); ``forced``: (N,) bool,
    examples that must be in this batch (they have waited long enough). Returns up to ``batch_size`` rows
    of indices into ``sizes``.

    For every bucket (L, P) of ``bucket_shapes(cfg)`` it fills the rows one at a time: a row starts with
    the oldest forced example left, else the largest example (tokens / L or patches / P, whichever is
    larger: first-fit decreasing on the dominant resource); with packing it then takes, while one fits,
    the example that leaves the row's token and patch fill most even (a text-heavy example after an
    image-heavy one), ties to the fuller row. The bucket whose rows are fullest wins (real tokens +
    ``PATCH_COST`` x real patches over the same of the bucket); buckets that cannot hold every forced
    example are not considered. Deterministic in the buffer's contents and order.
    """
    sizes = np.asarray(sizes, np.int64).reshape(-1, 4)
    n = len(sizes)
    tok, pat, stp, img = sizes.T
    forced = np.asarray(forced, bool)
    b, k, s_cap, i_cap = cfg.batch_size, cfg.examples_per_row, cfg.max_steps, cfg.max_images
    order = np.arange(n)

    def fill(l_cap: int, p_cap: int, forced: np.ndarray):
        ok = (tok <= l_cap) & (pat <= p_cap)
        if not ok.any() or (forced & ~ok).any():
            return None, -1.0
        ft, fp = tok / l_cap, pat / p_cap
        dominant = np.maximum(ft, fp)
        avail = ok.copy()
        rows, used_t, used_p = [], 0, 0
        for _ in range(b):
            if not avail.any():
                break
            cand = avail & forced
            if cand.any():
                first = int(order[cand][0])
            else:
                first = int(np.argmax(np.where(avail, dominant, -1.0)))
            row = [first]
            avail[first] = False
            rt, rp, rs, ri = int(tok[first]), int(pat[first]), int(stp[first]), int(img[first])
            while len(row) < k:
                fits = avail & (tok <= l_cap - rt) & (pat <= p_cap - rp) & (stp <= s_cap - rs) & (img <= i_cap - ri)
                if not fits.any():
                    break
                nt, npat = (rt + tok) / l_cap, (rp + pat) / p_cap
                score = np.minimum(nt, npat) + 0.5 * (nt + npat) + 10.0 * forced
                j = int(np.argmax(np.where(fits, score, -np.inf)))
                row.append(j)
                avail[j] = False
                rt, rp, rs, ri = rt + int(tok[j]), rp + int(pat[j]), rs + int(stp[j]), ri + int(img[j])
            rows.append(row)
            used_t, used_p = used_t + rt, used_p + rp
        if (forced & avail).any():  # a forced example left out: not this bucket
            return None, -1.0
        return rows, (used_t + PATCH_COST * used_p) / (b * l_cap + PATCH_COST * b * p_cap)

    for f in (forced, np.zeros_like(forced)):  # more forced examples than any bucket holds: plain packing
        best, best_score = None, -1.0
        for l_cap, p_cap in bucket_shapes(cfg):
            rows, score = fill(l_cap, p_cap, f)
            if rows is not None and score > best_score + 1e-12:
                best, best_score = rows, score
        if best is not None:
            return best
    raise ValueError("no pending example fits any bucket")  # the transform skips those: cannot happen


# ------------------------------------------------------------------------------------------------
# The batching IterDataset (stateful, checkpointable)
# ------------------------------------------------------------------------------------------------
class BatchIterDataset(grain.IterDataset):
    """Examples (and skip markers) -> fixed-shape batches; see ``BatchIterator``."""

    def __init__(self, parent, cfg: PipelineConfig, assembler: BatchAssembler):
        super().__init__(parent)
        self._cfg, self._assembler = cfg, assembler

    def __iter__(self):
        return BatchIterator(self._parent.__iter__(), self._cfg, self._assembler)

    def __str__(self) -> str:
        return f"BatchIterDataset(batch_size={self._cfg.batch_size}, packing={self._cfg.packing})"


class BatchIterator(grain.DatasetIterator):
    """Pulls examples (and skip markers) and emits fixed-shape batches.

    ``pack_buffer == 0`` (streaming): rows are filled first-fit in arrival order. Between calls at most
    one example is held over (packing: the example that did not fit the finished batch); its upstream
    state *before* it was pulled is what ``get_state`` returns, so a restore replays it.

    ``pack_buffer > 0`` (lookahead): up to ``pack_buffer`` pending examples are held, and each batch is
    chosen from them by ``plan_batch`` (rows filled close to the bucket in tokens and patches, the
    bucket chosen to fit). An example that has waited ``2 * pack_buffer`` pulls is forced into the next
    batch, so none waits for ever. ``get_state`` returns the upstream state before the oldest pending
    example plus the offsets (counted in pulls from it) of the elements pulled after it that were
    already emitted or reported; a restore replays from there and drops those, which rebuilds exactly
    the buffer an uninterrupted run holds.

    Skip markers are reported with the element that follows them, or at once (a report-only
    element) when no example is pending.
    """

    def __init__(self, parent, cfg: PipelineConfig, assembler: _AssemblerBase):
        super().__init__(parent)
        self._cfg, self._assembler = cfg, assembler
        self._max_len = cfg.effective_max_length
        self._max_patches = int(max(cfg.patch_buckets))
        self._reset()

    def _reset(self, replay=()):
        self._rows: list[_Row] = []
        self._held_state = None  # upstream state before the first example of self._rows
        self._skips: list = []
        # lookahead mode
        self._pending: list[tuple[int, Any, dict]] = []  # (offset, upstream state before it, example)
        self._done: list[bool] = []  # per element pulled since the oldest pending one: emitted/reported
        self._skip_offsets: list[int] = []
        self._replay = set(int(o) for o in replay)  # offsets to drop when pulled again (after a restore)
        self._exhausted = False

    def _report(self, rows: list[_Row], dropped: int = 0) -> dict:
        """What the main process accounts for with this element: the skips pulled since the last
        element, and the examples (with their truncation) of ``rows``. A held-over example is counted
        with the batch it ends up in, so a restore that replays it does not count it twice."""
        exs = [ex for r in rows for ex in r.examples]
        rep = {"skipped": [list(s) for s in self._skips], "examples": len(exs), "ids": [ex["id"] for ex in exs],
               "steps_dropped": int(sum(ex["steps_dropped"] for ex in exs)),
               "examples_truncated": int(sum(1 for ex in exs if ex["steps_dropped"])),
               "dropped_remainder": int(dropped)}
        self._skips = []
        for o in self._skip_offsets:
            self._done[o] = True
        self._skip_offsets = []
        return rep

    def _emit(self, rows: list[_Row]) -> dict:
        batch = self._assembler(rows)
        batch[REPORT_KEY] = self._report(rows)
        return batch

    def _place(self, ex: dict) -> bool:
        """Put ``ex`` into the open batch; False when it belongs to the next batch."""
        cfg = self._cfg
        if cfg.packing:
            for row in self._rows:
                if row.fits(ex, cfg, self._max_len, self._max_patches):
                    row.add(ex)
                    return True
        if len(self._rows) < cfg.batch_size:
            row = _Row()
            row.add(ex)
            self._rows.append(row)
            return True
        return False

    def __next__(self):
        if self._cfg.pack_buffer:
            return self._next_lookahead()
        cfg = self._cfg
        while True:
            before = self._parent.get_state()
            try:
                ex = next(self._parent)
            except StopIteration:
                rows, self._rows, self._held_state = self._rows, [], None
                if rows and not cfg.drop_remainder:
                    return self._emit(rows)
                dropped = sum(len(r.examples) for r in rows)
                if self._skips or dropped:
                    return {REPORT_KEY: self._report([], dropped)}
                raise
            if "skip" in ex:
                self._skips.append(tuple(ex["skip"]))
                if not self._rows:  # report now: a loader whose every record fails must stop early
                    return {REPORT_KEY: self._report([])}
                continue
            if not self._rows:
                self._held_state = copy.deepcopy(before)
            if self._place(ex):
                if not cfg.packing and len(self._rows) == cfg.batch_size:
                    rows, self._rows, self._held_state = self._rows, [], None
                    return self._emit(rows)
                continue
            # ``ex`` opens the next batch.
            rows = self._rows
            row = _Row()
            row.add(ex)
            self._rows, self._held_state = [row], copy.deepcopy(before)
            return self._emit(rows)

    # -- lookahead mode ----------------------------------------------------------------------------
    def _pull(self) -> str:
        """One element from upstream into the buffer: "example", "skip" or "replayed" (dropped: it was
        emitted or reported before the restore). Raises StopIteration at the end of the data."""
        before = self._parent.get_state()
        el = next(self._parent)
        off = len(self._done)
        self._done.append(False)
        if off in self._replay:
            self._replay.discard(off)
            self._done[off] = True
            return "replayed"
        if "skip" in el:
            self._skips.append(tuple(el["skip"]))
            self._skip_offsets.append(off)
            return "skip"
        self._pending.append((off, copy.deepcopy(before), el))
        return "example"

    def _rebase(self) -> None:
        """Forget the bookkeeping of everything pulled before the oldest pending example."""
        first = self._pending[0][0] if self._pending else len(self._done)
        if not first:
            return
        self._done = self._done[first:]
        self._pending = [(o - first, st, ex) for o, st, ex in self._pending]
        self._skip_offsets = [o - first for o in self._skip_offsets]
        self._replay = {o - first for o in self._replay}

    def _next_lookahead(self):
        cfg = self._cfg
        while len(self._pending) < cfg.pack_buffer and not self._exhausted:
            try:
                kind = self._pull()
            except StopIteration:
                self._exhausted = True
                break
            if kind == "skip" and not self._pending:  # report now (see the streaming mode)
                rep = self._report([])
                self._rebase()
                return {REPORT_KEY: rep}
        if not self._pending:
            if self._skips:
                rep = self._report([])
                self._rebase()
                return {REPORT_KEY: rep}
            raise StopIteration
        sizes = np.array([(len(ex["input_ids"]), len(ex["pixel_values"]), len(ex["labels"]), _num_images(ex))
                          for _, _, ex in self._pending], np.int64)
        age = len(self._done) - np.array([o for o, _, _ in self._pending])
        plan = plan_batch(sizes, age >= 2 * cfg.pack_buffer, cfg)
        placed = sorted(i for r in plan for i in r)
        last = self._exhausted and len(placed) == len(self._pending)
        placed_rows: list[_Row] = []
        if not (last and len(plan) < cfg.batch_size and cfg.drop_remainder):  # else: drop the short last batch
            for r in plan:
                row = _Row()
                for i in r:
                    row.add(self._pending[i][2])
                placed_rows.append(row)
        for i in placed:
            self._done[self._pending[i][0]] = True
        keep = set(range(len(self._pending))) - set(placed)
        dropped = 0 if placed_rows else len(placed)
        self._pending = [self._pending[i] for i in sorted(keep)]
        if placed_rows:
            out = self._emit(placed_rows)
        else:
            out = {REPORT_KEY: self._report([], dropped)}
        self._rebase()
        return out

    def get_state(self) -> dict:
        if self._cfg.pack_buffer:
            if not self._pending:
                return {"parent": self._parent.get_state()}
            return {"parent": self._pending[0][1], "done": [o for o, d in enumerate(self._done) if d]}
        return {"parent": self._held_state if self._rows else self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._reset(state.get("done", ()))

    def start_prefetch(self) -> None:
        self._parent.start_prefetch()

    def __str__(self) -> str:
        return "BatchIterator"


# ------------------------------------------------------------------------------------------------
# Main-process wrapper: reports, stats, state
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoaderStats:
    """Counters over the batches consumed so far (exact for any worker_count; part of the state)."""

    num_batches: int = 0
    num_examples: int = 0
    num_skipped: int = 0
    skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    steps_dropped: int = 0  # trailing steps removed (max_steps / max_length), over all examples
    examples_truncated: int = 0  # examples that lost at least one step
    dropped_remainder: int = 0  # examples in a final short batch dropped by drop_remainder
    # packing efficiency: what the batches hold for real / what their shapes carry (B*L, B*P, B*S)
    tokens: int = 0
    token_slots: int = 0
    patches: int = 0
    patch_slots: int = 0
    label_slots_used: int = 0
    label_slots: int = 0
    pixel_bytes: int = 0  # bytes of pixel_values handed to the training loop
    recent_skips: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=100))

    @property
    def skipped(self) -> int:
        """Alias of ``num_skipped``."""
        return self.num_skipped

    def account_batch(self, batch: dict) -> None:
        """Add one batch's real and carried tokens, patches and label slots."""
        b, l = batch["input_ids"].shape
        p = batch["pixel_values"].shape[1]
        s = batch["labels"].shape[1]
        self.tokens += int(batch["num_tokens"].sum())
        self.token_slots += b * l
        self.patches += int(batch["num_patches"].sum())
        self.patch_slots += b * p
        self.label_slots_used += int((batch["label_segment_ids"] > 0).sum())
        self.label_slots += b * s
        self.pixel_bytes += int(batch["pixel_values"].nbytes)

    def efficiency(self, since: dict | None = None) -> dict[str, float]:
        """``data/token_efficiency``, ``data/patch_efficiency``, ``data/label_slot_efficiency`` (real / carried)
        and ``data/examples_per_batch``, over all batches so far or those after the ``since`` snapshot
        (a ``state_dict()``)."""
        d, s0 = self.state_dict(), since or {}

        def delta(k):
            return d[k] - int(s0.get(k, 0))

        def ratio(a, b):
            return delta(a) / delta(b) if delta(b) else 0.0

        return {"data/token_efficiency": ratio("tokens", "token_slots"),
                "data/patch_efficiency": ratio("patches", "patch_slots"),
                "data/label_slot_efficiency": ratio("label_slots_used", "label_slots"),
                "data/examples_per_batch": ratio("num_examples", "num_batches")}

    def state_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("recent_skips")
        return d

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if k == "skipped_by_reason":
                self.skipped_by_reason = {str(a): int(b) for a, b in v.items()}
            elif hasattr(self, k) and k != "recent_skips":
                setattr(self, k, int(v))
        self.recent_skips.clear()


# ------------------------------------------------------------------------------------------------
# Packing efficiency of a size distribution, without the pixels
# ------------------------------------------------------------------------------------------------
class _ShapeAssembler(_AssemblerBase):
    """The bookkeeping arrays of a batch only (no token ids, no pixels: ``pixel_values`` is a zero-stride
    view of the batch's shape), for ``simulate_packing``."""

    def __init__(self, cfg: PipelineConfig, patch_dim: int):
        super().__init__(cfg, 0)
        self.patch_dim = int(patch_dim)

    def __call__(self, rows: list[_Row]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        b, s, k = cfg.batch_size, cfg.max_steps, cfg.examples_per_row
        l = _smallest(cfg.seq_buckets, max(r.tokens for r in rows))
        p = _smallest(cfg.patch_buckets, max(r.patches for r in rows))
        out = {"input_ids": np.broadcast_to(np.int32(0), (b, l)),
               "pixel_values": np.broadcast_to(np.zeros((), self.pixel_dtype), (b, p, self.patch_dim)),
               "labels": np.broadcast_to(np.int32(-1), (b, s)),
               "label_segment_ids": np.zeros((b, s), np.int32), "num_tokens": np.zeros((b,), np.int32),
               "num_patches": np.zeros((b,), np.int32), "num_steps": np.zeros((b,), np.int32),
               "num_images": np.zeros((b,), np.int32), "num_examples": np.zeros((b,), np.int32),
               "record_index": np.full((b, k), -1, np.int32)}
        for r, row in enumerate(rows[:b]):
            soff = 0
            for j, ex in enumerate(row.examples):
                m = len(ex["labels"])
                out["label_segment_ids"][r, soff:soff + m] = j + 1
                out["record_index"][r, j] = ex["record_index"]
                soff += m
            out["num_tokens"][r], out["num_patches"][r], out["num_steps"][r] = row.tokens, row.patches, row.steps
            out["num_images"][r], out["num_examples"][r] = row.images, len(row.examples)
        return out


def simulate_packing(sizes, cfg: PipelineConfig, *, patch_dim: int = 1176) -> tuple[list[dict], LoaderStats]:
    """Batch examples of the given sizes as the loader would (same ``BatchIterator``, rows, buckets and
    lookahead), without tokens or pixels: ``sizes`` is a sequence of (tokens, patches, steps, images) per
    example, in the order the loader would read them (shuffle them first for a shuffled loader).
    Returns the batches' bookkeeping arrays (``num_tokens``, ``num_patches``, ``label_segment_ids``,
    ``record_index`` = position in ``sizes``, ... and the batch shapes) and the ``LoaderStats`` with their
    efficiencies (``stats.efficiency()``): how full a bucket/packing choice keeps the batches on a
    data set's size distribution (``bench/pipeline_bench.py``)."""
    cfg.validate(1)  # no vision layouts here: any patch (or tile) count
    exs = []
    for i, (t, p, s, n) in enumerate(np.asarray(sizes, np.int64).reshape(-1, 4)):
        exs.append({"record_index": i, "id": str(i), "input_ids": np.empty((int(t), 0), np.int8),
                    "pixel_values": np.empty((int(p), 0), np.int8), "labels": np.empty((int(s), 0), np.int8),
                    "image_grid_thw": np.empty((int(n), 0), np.int8), "steps_dropped": 0})
    parent = grain.MapDataset.source(exs).to_iter_dataset(grain.ReadOptions(num_threads=0)).__iter__()
    it = BatchIterator(parent, cfg, _ShapeAssembler(cfg, patch_dim))
    stats, batches = LoaderStats(), []
    for el in it:
        rep = el.pop(REPORT_KEY, {})
        stats.num_examples += int(rep.get("examples", 0))
        stats.dropped_remainder += int(rep.get("dropped_remainder", 0))
        if "input_ids" in el:
            stats.num_batches += 1
            stats.account_batch(el)
            batches.append(el)
    return batches, stats


# Debugging aid (multi-host tests, docs/multihost.md): with JAXPRM_RECORD_IDS_DIR=<dir> every loader
# appends the record ids of each batch it yields to <dir>/<split>.shard-<i>-of-<n>.jsonl, one JSON
# list per batch, so the slices the hosts read can be compared.
RECORD_IDS_ENV = "JAXPRM_RECORD_IDS_DIR"


def _log_record_ids(loader, ids: list) -> None:
    import json

    d = os.environ[RECORD_IDS_ENV]
    os.makedirs(d, exist_ok=True)
    name = f"{loader.split}.shard-{loader.shard_index}-of-{loader.shard_count}.jsonl"
    with open(os.path.join(d, name), "a") as f:
        f.write(json.dumps([str(i) for i in ids]) + "\n")


class PrmIterator(grain.DatasetIterator):
    """The loader's iterator: batches (dicts of numpy arrays), ``stats``, ``get_state``/``set_state``."""

    def __init__(self, parent, loader):
        super().__init__(parent)
        self.loader = loader
        self.stats = LoaderStats()

    def _account(self, rep: dict | None) -> None:
        if not rep:
            return
        if rep.get("ids") and os.environ.get(RECORD_IDS_ENV):
            _log_record_ids(self.loader, rep["ids"])
        st = self.stats
        for idx, rid, reason in rep.get("skipped", ()):
            kind = str(reason).split(":", 1)[0]
            st.num_skipped += 1
            st.skipped_by_reason[kind] = st.skipped_by_reason.get(kind, 0) + 1
            st.recent_skips.append((int(idx), str(rid), str(reason)))
            if kind == ENVIRONMENT_ERROR:
                raise SystemicDataError(
                    f"split {self.loader.split!r}: record {rid!r} (index {int(idx)}) failed for a reason that is not "
                    f"about the record, so every record would fail: {str(reason).rstrip('.')}. Install what is missing "
                    "(pip install -e . installs every requirement) and rerun.")
            log.warning("pipeline: skipped record %r (split %r, index %d): %s", rid, self.loader.split, int(idx),
                        reason)
        st.num_examples += int(rep.get("examples", 0))
        limit = self.loader.cfg.systemic_skip_limit
        if limit and st.num_examples == 0 and st.num_skipped >= limit:
            reasons = collections.Counter(r for _, _, r in st.recent_skips)
            common = "\n  ".join(f"{n} x {r}" for r, n in reasons.most_common(3))
            raise SystemicDataError(
                f"split {self.loader.split!r}: the first {st.num_skipped} records were all skipped and none could be "
                f"used, so this is not a problem of single records but of the setup (tokenizer files, image "
                f"processor, config such as seq_buckets/patch_buckets/max_images). Reasons:\n  {common}")
        st.steps_dropped += int(rep.get("steps_dropped", 0))
        st.examples_truncated += int(rep.get("examples_truncated", 0))
        n_drop = int(rep.get("dropped_remainder", 0))
        if n_drop:
            st.dropped_remainder += n_drop
            log.info("pipeline: dropped the last %d example(s) of the data (drop_remainder=True)", n_drop)

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            el = next(self._parent)
            el = dict(el)
            self._account(el.pop(REPORT_KEY, None))
            if "input_ids" in el:
                self.stats.num_batches += 1
                self.stats.account_batch(el)
                return el

    def get_state(self) -> dict:
        return {"format": STATE_FORMAT, "pipeline": self._parent.get_state(), "stats": self.stats.state_dict()}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a jaxprm pipeline iterator state (format {STATE_FORMAT}): {str(state)[:200]}")
        self._parent.set_state(state["pipeline"])
        self.stats = LoaderStats()
        self.stats.load_state_dict(state.get("stats") or {})

    def start_prefetch(self) -> None:
        self._parent.start_prefetch()

    def __str__(self) -> str:
        return f"PrmIterator(split={self.loader.split!r})"


class PrmLoader(grain.IterDataset):
    """A ``grain.IterDataset`` of PRM batches; ``iter(loader)`` -> ``PrmIterator``."""

    def __init__(self, pipeline, *, cfg, split, num_records, shard_index, shard_count, model_config, transform=None):
        super().__init__(pipeline)
        self.cfg, self.split = cfg, split
        self.num_records, self.shard_index, self.shard_count = num_records, shard_index, shard_count
        self.model_config = model_config
        self.transform = transform  # the ExampleTransform (record index -> example), for estimates

    def batches_per_epoch(self, sample: int = 256, seed: int = 0) -> int:
        """Batches this host's loader yields per epoch. One example per row: exact, records // batch_size
        (rounded up without ``drop_remainder``; skipped records not known in advance). Packing: an estimate
        from ``sample`` records of the shard run through the transform, their sizes resampled to a few
        thousand examples and batched by ``simulate_packing`` (~0.1 s per record sampled), so a training
        loop can size its schedule in packed batches (~2x fewer than records / batch_size on VL-PRM300K-
        shaped data with ``configs/qwen2_5_vl_3b.py``)."""
        cfg = self.cfg
        n = self.num_shard_records
        if not cfg.packing or self.transform is None or n == 0:
            return n // cfg.batch_size if cfg.drop_remainder else -(-n // cfg.batch_size)
        rng = np.random.default_rng(seed)
        shard = np.arange(self.shard_index, self.num_records, self.shard_count)
        picks = rng.choice(shard, size=min(int(sample), n), replace=False)
        sizes = []
        for i in picks:
            ex = self.transform(int(i))
            if "skip" not in ex:
                sizes.append((len(ex["input_ids"]), len(ex["pixel_values"]), len(ex["labels"]), _num_images(ex)))
        if not sizes:
            return 0
        usable = n * len(sizes) / len(picks)
        sizes = np.asarray(sizes, np.int64)
        m = max(len(sizes), 16 * cfg.batch_size * cfg.examples_per_row)
        _, st = simulate_packing(sizes[rng.integers(0, len(sizes), m)],
                                 dataclasses.replace(cfg, drop_remainder=True, shard_index=0, shard_count=1))
        per_batch = st.num_examples / max(st.num_batches, 1)
        return max(1, int(usable / per_batch)) if usable >= cfg.batch_size else int(not cfg.drop_remainder)

    @property
    def num_shard_records(self) -> int:
        """Records this host reads per epoch."""
        return len(range(self.shard_index, self.num_records, self.shard_count))

    def bucket_shapes(self) -> list[tuple[int, int]]:
        return bucket_shapes(self.cfg)

    def __iter__(self):
        return PrmIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return (f"PrmLoader(split={self.split!r}, records={self.num_records}, "
                f"shard={self.shard_index}/{self.shard_count}, batch_size={self.cfg.batch_size})")


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
def _process_shard(cfg: PipelineConfig) -> tuple[int, int]:
    if cfg.shard_count is not None:
        return int(cfg.shard_index), int(cfg.shard_count)
    import jax

    return int(jax.process_index()), int(jax.process_count())


def _ensure_absl_flags_parsed() -> None:
    """Grain 0.2.18's multiprocess prefetch reads an absl flag (worker profiling) that raises
    ``UnparsedFlagAccessError`` in programs that do not run ``absl.app`` once JAX is imported
    (google/grain#1355, fixed after 0.2.18). Marking the flags parsed keeps their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_processor(image_processor, model_config) -> None:
    if is_internvl(model_config):
        from jaxprm.data.preprocess_internvl import InternVLImageProcessor

        size = int(model_config.vision.image_size)
        if not isinstance(image_processor, InternVLImageProcessor) or int(image_processor.image_size) != size:
            raise ValueError(f"an InternVL model needs an InternVLImageProcessor with image_size={size} "
                             f"(its tiles), got {image_processor!r}")
        return
    v = model_config.vision
    for ours, theirs in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                         ("temporal_patch_size", "temporal_patch_size")):
        a, b = getattr(image_processor, ours, None), getattr(v, theirs)
        if a is not None and int(a) != int(b):
            raise ValueError(f"image_processor.{ours}={a} does not match model_config.vision.{theirs}={b}")


def make_loader(
    data,
    split: str,
    tokenizer,
    image_processor,
    model_config,
    cfg: PipelineConfig | None = None,
    *,
    name: str = DEFAULT_NAME,
    version: str | None = None,
):
    """A ``grain.IterDataset`` (``PrmLoader``) of fixed-shape PRM batches for one split.

    data: a TFDS data_dir (holding ``{name}/{version}``), the dataset's version directory, a
      ``BuildResult`` from ``build_dataset``, or any random-access source (``len``, ``[i]``) returning
      the TFDS feature dicts (e.g. ``tfds.data_source(...)``).
    image_processor: ``jaxprm.data.preprocess.ImageProcessor`` (patch/merge sizes must match the model), or
      an ``InternVLImageProcessor`` (tile size must match) for an InternVL model.
    model_config: ``Qwen25VLConfig`` (image/video token ids, merge, window and patch sizes) or
      ``InternVLConfig`` (tiles, 1D positions: "InternVL batches" in the module docstring).
    """
    cfg = cfg or PipelineConfig()
    internvl = is_internvl(model_config)
    merge = 1 if internvl else int(model_config.vision.spatial_merge_size)  # InternVL: patch_buckets count tiles
    cfg.validate(merge)
    _check_processor(image_processor, model_config)
    if isinstance(data, (str, os.PathLike)):
        source = _tfds_data_source(data, split, name=name, version=version)
    else:
        source = data
    num_records = len(source)
    shard_index, shard_count = _process_shard(cfg)
    pad_id = cfg.pad_token_id
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
    if pad_id == int(model_config.image_token_id):
        raise ValueError("pad_token_id must not be the image token id (padding would take image features)")

    ds = grain.MapDataset.range(num_records)[shard_index::shard_count]
    if cfg.shuffle and len(ds) > 0:
        ds = ds.shuffle(seed=int(cfg.seed))
    if len(ds) > 0 and cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)
    transform = ExampleTransform(source, tokenizer, image_processor, model_config, cfg)
    ds = ds.map(transform)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(cfg.num_threads),
                                                 prefetch_buffer_size=int(cfg.prefetch_buffer_size)))
    assembler = (TileBatchAssembler if internvl else BatchAssembler)(cfg, model_config, pad_id)
    it_ds = BatchIterDataset(it_ds, cfg, assembler)
    if cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg.worker_count),
                                                               per_worker_buffer_size=int(cfg.worker_buffer_size)))
    return PrmLoader(it_ds, cfg=cfg, split=split, num_records=num_records, shard_index=shard_index,
                     shard_count=shard_count, model_config=model_config, transform=transform)


# ------------------------------------------------------------------------------------------------
# Helpers for consumers
# ------------------------------------------------------------------------------------------------
def pad_batch(batch: dict[str, np.ndarray], seq_len: int | None = None, num_patches: int | None = None,
              merge_size: int = 2) -> dict[str, np.ndarray]:
    """Grow a batch to a larger bucket (seq_len >= L, num_patches >= P), e.g. so that every host of a
    multi-host job feeds the same shape. Padding follows the batch format (segment 0, label -1,
    vision padding patches in segment -1 with the identity window order)."""
    out = dict(batch)
    b, l = batch["input_ids"].shape
    p = batch["pixel_values"].shape[1]
    seq_len = l if seq_len is None else int(seq_len)
    num_patches = p if num_patches is None else int(num_patches)
    if seq_len < l or num_patches < p:
        raise ValueError(f"cannot shrink a batch from (L={l}, P={p}) to (L={seq_len}, P={num_patches})")
    tiles = "image_flags" in batch  # InternVL: num_patches counts tiles
    unit = 1 if tiles else merge_size**2
    if num_patches % unit:
        raise ValueError(f"num_patches must be a multiple of {unit}")
    if seq_len > l:
        dl = seq_len - l
        pad_id = batch["input_ids"][batch["segment_ids"] == 0]
        pad_val = int(pad_id[0]) if pad_id.size else 0
        out["input_ids"] = np.pad(batch["input_ids"], ((0, 0), (0, dl)), constant_values=pad_val)
        out["segment_ids"] = np.pad(batch["segment_ids"], ((0, 0), (0, dl)))
        out["position_ids"] = np.pad(batch["position_ids"], ((0, 0), (0, 0), (0, dl)))
    if num_patches > p and tiles:
        pv = batch["pixel_values"]
        out["pixel_values"] = np.pad(pv, ((0, 0), (0, num_patches - p)) + ((0, 0),) * (pv.ndim - 2))
        out["image_flags"] = np.pad(batch["image_flags"], ((0, 0), (0, num_patches - p)))
    elif num_patches > p:
        out["pixel_values"] = np.pad(batch["pixel_values"], ((0, 0), (0, num_patches - p), (0, 0)))
        out.update(pad_layout(batch, num_patches, merge_size))
    return out
