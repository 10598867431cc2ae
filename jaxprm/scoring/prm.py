"""Host side of scoring: ``load_prm(path)`` -> ``PRM.score / score_batch / score_candidates``.

``PRM`` (host side) builds the PRM prompt in its style (``jaxprm.data.prompt.encode_prm_example``), the
image inputs and the positions, and calls the scorer. On Qwen2.5-VL: patches (``ImageProcessor``) and
3D M-RoPE positions (``rope.get_rope_index``); on InternVL (VisualPRM): 448 px tiles
(``InternVLImageProcessor``), ``<img><IMG_CONTEXT> x 256 x tiles</img>`` per image in InternVL's
conversation template (``jaxprm.data.prompt.internvl_prompt_tokenizer``) and 1D positions 0..L-1. ``score_candidates`` scores N solutions of one problem: the system turn, the image(s) and
the question are run once, and only each candidate's own tokens are run in batches. The shared prefix
is not assumed from the template: it is the longest common prefix of the candidates' token ids, cut
before the first label position, and checked to hold every image token.

``PRM.incremental_scorer(image, question)`` (``IncrementalScorer``) scores the candidate next steps of a
solution that grows step by step on a K/V cache of the prompt so far. The bucketed, jitted device
functions are in ``jaxprm.scoring.device`` (``Scorer``).
"""
from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxprm.data.preprocess import ImageProcessor
from jaxprm.data.preprocess_internvl import InternVLImageProcessor
from jaxprm.dtypes import jax_float_type
from jaxprm.data.prompt import (INTERNVL_IMAGE_PAD, POSITIVE_TOKEN, build_messages, encode_prm_example, get_prompt_style,
                                internvl_prompt_tokenizer, label_token_ids, render_messages, tokenize_with_offsets)
from jaxprm.data.tokenizer import INTERNVL_ADDED_TOKENS, QWEN_SPECIAL_TOKENS
from jaxprm.models.prm import PRMModel
from jaxprm.models.qwen2_5_vl import rope
from jaxprm.scoring.device import KVCache, Scorer, SuffixKV, TokenSequence

__all__ = ["PRM", "IncrementalScorer", "load_prm"]


# ------------------------------------------------------------------------------------------------
# PRM: prompts, images, positions
# ------------------------------------------------------------------------------------------------
def _is_single_image(x) -> bool:
    from PIL import Image

    return isinstance(x, (Image.Image, bytes, bytearray, memoryview, str, os.PathLike)) or (
        isinstance(x, np.ndarray) and x.dtype != object and x.ndim in (2, 3)) or (
        hasattr(x, "numpy") and callable(getattr(x, "numpy")))


def _check_step_lists(steps, candidates) -> tuple[list, list]:
    """``(steps, candidates)`` of an incremental-scoring call as lists; ``TypeError`` unless both are
    lists of step strings (a single string is refused)."""
    for name, v in (("steps", steps), ("candidates", candidates)):
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
            raise TypeError(f"{name} must be a list of step strings, got {type(v).__name__}")
    return list(steps), list(candidates)


def _check_question_steps(question, steps, where: str = "") -> list[str]:
    pre = f"{where}: " if where else ""
    if not isinstance(question, str):
        raise TypeError(f"{pre}question must be a string, got {type(question).__name__}")
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise TypeError(f"{pre}steps must be a list of strings, got {type(steps).__name__}")
    steps = list(steps)
    if not steps:
        raise ValueError(f"{pre}steps must not be empty")
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            raise TypeError(f"{pre}steps[{i}] must be a string, got {type(s).__name__}")
    return steps


@dataclasses.dataclass
class _Encoded:
    input_ids: np.ndarray  # (L,)
    position_ids: np.ndarray  # (3, L)
    label_positions: np.ndarray  # (kept,)
    n_steps: int
    pixel_values: np.ndarray | None
    grid: np.ndarray | None  # (n_images, 3) grids; InternVL: (n_images,) tile counts
    text: str = ""  # the chat-template string (image pads not expanded)

    @property
    def truncated(self) -> bool:
        return len(self.label_positions) < self.n_steps


class PRM:
    """A process reward model ready to score: ``score``, ``score_batch``, ``score_candidates``.

    ``image``: a PIL image, encoded bytes, a path, a uint8 (H, W[, C]) array, a list of those (several
    images, in order), or None (text only). Scores are P(step correct) (softmax over the "+"/"-"
    logits), float32, one per step. Other keyword arguments configure the ``Scorer`` (buckets, batch size).

    Length limit: no sequence longer than ``max_length`` tokens (default: the Scorer's largest length
    bucket, 8192 by default) ever reaches the device. Whole trailing steps that do not fit are dropped,
    as training does, and their scores are NaN; an item whose prompt (system turn, image tokens,
    question) and first step alone do not fit raises a ``ValueError`` naming the item.
    """

    def __init__(self, model: PRMModel, tokenizer, image_processor: ImageProcessor | InternVLImageProcessor | None = None,
                 *, system_prompt: str | None = None, prompt_style: str | None = None, max_length: int | None = None,
                 **scorer_kwargs):
        if not isinstance(model, PRMModel):
            raise TypeError(f"PRM needs a jaxprm.models.prm.PRMModel, got {type(model).__name__}")
        self.model, self.tokenizer = model, tokenizer
        cfg = model.backbone.config
        self.config = cfg
        self.internvl = model.backbone_kind == "internvl"
        # what prompts are rendered with: the tokenizer's chat template (Qwen2.5-VL), InternVL's conversation
        # template (InternVL: the remote code's, whatever template its tokenizer ships)
        self.prompt_tokenizer = internvl_prompt_tokenizer(tokenizer) if self.internvl else tokenizer
        if self.internvl:
            self.image_processor = image_processor or InternVLImageProcessor(image_size=cfg.vision.image_size)
            if not isinstance(self.image_processor, InternVLImageProcessor) or \
                    self.image_processor.image_size != cfg.vision.image_size:
                raise ValueError(f"{self.image_processor!r} does not match the model's vision config "
                                 f"(InternVL tiles of {cfg.vision.image_size} px)")
            if cfg.image_token_id is None:
                raise ValueError("the InternVL model's <IMG_CONTEXT> id is unknown; load it with image_token_id=")
            tid = tokenizer.convert_tokens_to_ids(INTERNVL_IMAGE_PAD)
            if tid != cfg.image_token_id:
                raise ValueError(f"the tokenizer's {INTERNVL_IMAGE_PAD} is token {tid} but the model's image_token_id "
                                 f"is {cfg.image_token_id}; is it the checkpoint's tokenizer?")
        else:
            self.image_processor = image_processor or ImageProcessor(
                patch_size=cfg.vision.patch_size, temporal_patch_size=cfg.vision.temporal_patch_size,
                merge_size=cfg.vision.spatial_merge_size)
            if self.image_processor.merge_size != cfg.vision.spatial_merge_size or \
                    self.image_processor.patch_size != cfg.vision.patch_size:
                raise ValueError(f"{self.image_processor!r} does not match the model's vision config "
                                 f"(patch {cfg.vision.patch_size}, merge {cfg.vision.spatial_merge_size})")
        # the layout the PRM was trained with (its spec), unless the caller overrides it
        self.prompt_style = get_prompt_style(prompt_style or model.spec.prompt_style)
        self.system_prompt = system_prompt or model.spec.system_prompt or self.prompt_style.system_prompt
        self.scorer = Scorer(model, **scorer_kwargs)
        self._position_memo: dict = {}  # _positions: the positions through the last image token
        if max_length is None:
            max_length = self.scorer.length_buckets[-1]
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length must be a positive int (tokens), got {max_length!r}")
        self.max_length = int(max_length)

    @property
    def spec(self):
        return self.model.spec

    def __repr__(self) -> str:
        t = self.config.text
        return (f"PRM(layers={t.num_hidden_layers}, hidden={t.hidden_size}, head={self.spec.head!r}, "
                f"dtype={jnp.dtype(self.model.backbone.dtype).name})")

    # -- host-side encoding ----------------------------------------------------------------------
    def _images(self, image) -> tuple[np.ndarray | None, np.ndarray | None]:
        if image is None:
            return None, None
        images = [image] if _is_single_image(image) else image
        if isinstance(images, dict) or not isinstance(images, Sequence):
            raise TypeError(f"image must be a PIL image, bytes, a path, a uint8 array, a list of those or None; "
                            f"got {type(image).__name__}")
        images = list(images)
        if not images:
            return None, None
        out = self.image_processor(images)
        pv = out["pixel_values"].astype(np.float32, copy=False)  # float32 already: no copy
        if self.internvl:
            return pv, out["num_patches"].astype(np.int64)
        return pv, out["image_grid_thw"].astype(np.int64)

    def _encode(self, pv, grid, question: str, steps: list[str], where: str = "") -> _Encoded:
        cfg = self.config
        if self.internvl:  # grid: tiles per image, each tile image_seq_length <IMG_CONTEXT> tokens
            image_kw = dict(image_tokens=None if grid is None else np.asarray(grid) * cfg.image_seq_length,
                            image_pad=INTERNVL_IMAGE_PAD)
        else:
            image_kw = dict(image_grid_thw=grid, merge_size=cfg.vision.spatial_merge_size)
        try:
            enc = encode_prm_example(self.prompt_tokenizer, question, steps, max_length=self.max_length,
                                     mode="score", system_prompt=self.system_prompt, style=self.prompt_style, **image_kw)
        except ValueError as e:
            if "max_length" not in str(e):
                raise
            raise ValueError(f"{where + ': ' if where else ''}too long to score: {e} (the PRM's max_length; "
                             "shorten the question or the first step, or pass a larger max_length with "
                             "length buckets to match)") from None
        if len(enc.input_ids) > self.max_length:  # pragma: no cover - encode_prm_example guarantees it
            raise RuntimeError(f"{len(enc.input_ids)} tokens > max_length={self.max_length}; this is a bug")
        ids = enc.input_ids.astype(np.int32)
        if self.internvl:  # 1D RoPE: 0..L-1 (the three M-RoPE rows equal)
            pos = np.broadcast_to(np.arange(len(ids), dtype=np.int32), (3, len(ids))).copy()
            return _Encoded(ids, pos, enc.label_positions.astype(np.int64), len(steps), pv, grid, enc.text)
        return _Encoded(ids, self._positions(ids, grid), enc.label_positions.astype(np.int64), len(steps), pv, grid,
                        enc.text)

    def _rope_index(self, ids: np.ndarray, grid) -> np.ndarray:
        cfg = self.config
        pos, _ = rope.get_rope_index(ids[None], image_token_id=cfg.image_token_id,
                                     video_token_id=cfg.video_token_id,
                                     spatial_merge_size=cfg.vision.spatial_merge_size, image_grid_thw=grid,
                                     tokens_per_second=cfg.tokens_per_second)
        return pos[:, 0].astype(np.int32)

    def _positions(self, ids: np.ndarray, grid) -> np.ndarray:
        """(3, L) M-RoPE positions of ``ids`` (``rope.get_rope_index``). The tokens through the last image
        token (system turn, image(s), question: the same for every candidate of a problem) are computed
        once per (tokens, grids) and memoised; the text after them counts on by one on every axis from
        the position ``get_rope_index`` gives the first of them, exactly as it does."""
        cfg = self.config
        mm = ids == cfg.image_token_id
        if cfg.video_token_id is not None:
            mm |= ids == cfg.video_token_id
        idx = np.flatnonzero(mm)
        if len(idx) == 0 or int(idx[-1]) + 1 >= len(ids):
            return self._rope_index(ids, grid)
        n = int(idx[-1]) + 1  # tokens through the last image token; ids[n] is text
        key = (ids[:n].tobytes(), None if grid is None else np.asarray(grid, np.int64).tobytes())
        hit = self._position_memo.get(key)
        if hit is None:
            head = self._rope_index(ids[: n + 1], grid)  # through the first text token after the images
            hit = (head[:, :n].copy(), int(head[0, n]))
            if len(self._position_memo) >= 64:
                self._position_memo.clear()
            self._position_memo[key] = hit
        head, start = hit
        out = np.empty((3, len(ids)), np.int32)
        out[:, :n] = head
        out[:, n:] = np.arange(start, start + len(ids) - n, dtype=np.int32)
        return out

    @staticmethod
    def _expand(e: _Encoded, probs: np.ndarray) -> np.ndarray:
        out = np.full((e.n_steps,), np.nan, np.float32)
        out[: len(probs)] = probs
        return out

    # -- public API ------------------------------------------------------------------------------
    def score(self, image, question: str, steps: Sequence[str]) -> np.ndarray:
        """Per-step P(correct), float32 of shape (len(steps),)."""
        return self.score_batch([(image, question, steps)])[0]

    def score_batch(self, items) -> list[np.ndarray]:
        """``items``: a list of (image, question, steps); returns one score array per item."""
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise TypeError(f"items must be a list of (image, question, steps) tuples, got {type(items).__name__}")
        encoded, images = [], {}  # an image object given for several items is preprocessed once
        for n, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != 3:
                raise TypeError(f"items[{n}] must be an (image, question, steps) tuple, got {type(item).__name__}"
                                + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
            image, question, steps = item
            steps = _check_question_steps(question, steps, f"items[{n}]")
            if id(image) not in images:  # the items hold their images alive, so ids are not reused here
                images[id(image)] = self._images(image)
            pv, grid = images[id(image)]
            encoded.append(self._encode(pv, grid, question, steps, f"items[{n}]"))
        seqs = [TokenSequence(e.input_ids, e.position_ids, e.label_positions, e.pixel_values, e.grid) for e in encoded]
        probs = self.scorer.score_sequences(seqs)
        return [self._expand(e, p) for e, p in zip(encoded, probs)]

    def score_candidates(self, image, question: str, candidates: Sequence[Sequence[str]], *,
                         share_prefix: bool = True) -> list[np.ndarray]:
        """Score N candidate solutions (each a list of steps) of one problem. The shared prompt prefix
        (system turn, image(s), question) is encoded and run once; each candidate's tokens follow it."""
        if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
            raise TypeError(f"candidates must be a list of step lists, got {type(candidates).__name__}")
        if not candidates:
            return []
        cand_steps = [_check_question_steps(question, c, f"candidates[{i}]") for i, c in enumerate(candidates)]
        pv, grid = self._images(image)
        encoded = [self._encode(pv, grid, question, s, f"candidates[{i}]") for i, s in enumerate(cand_steps)]
        return self._score_encoded(encoded, share_prefix)

    def _score_encoded(self, encoded: Sequence[_Encoded], share_prefix: bool = True) -> list[np.ndarray]:
        cut = self.shared_prefix_length(encoded) if share_prefix else 0
        if cut <= 0:
            seqs = [TokenSequence(e.input_ids, e.position_ids, e.label_positions, e.pixel_values, e.grid)
                    for e in encoded]
            probs = self.scorer.score_sequences(seqs)
        else:
            e0 = encoded[0]
            prefix = TokenSequence(e0.input_ids[:cut], e0.position_ids[:, :cut], [], e0.pixel_values, e0.grid)
            suffixes = [TokenSequence(e.input_ids[cut:], e.position_ids[:, cut:], e.label_positions - cut)
                        for e in encoded]
            probs = self.scorer.score_shared(prefix, suffixes)
        return [self._expand(e, p) for e, p in zip(encoded, probs)]

    def shared_prefix_length(self, encoded: Sequence[_Encoded]) -> int:
        """Tokens the encodings share, verified: the longest common prefix of the token ids (and
        positions), cut before the first label position of every candidate; 0 if an image token would
        fall after the cut (then nothing is shared)."""
        first = encoded[0]
        cut = min(int(e.label_positions[0]) if len(e.label_positions) else len(e.input_ids) for e in encoded)
        for e in encoded[1:]:
            n = min(cut, len(e.input_ids), len(first.input_ids))
            diff = np.flatnonzero(e.input_ids[:n] != first.input_ids[:n])
            cut = int(diff[0]) if len(diff) else n
        if cut <= 0:
            return 0
        for e in encoded:
            if not np.array_equal(e.position_ids[:, :cut], first.position_ids[:, :cut]):  # pragma: no cover
                raise RuntimeError("candidates share tokens but not positions; this is a bug")
            if np.any(e.input_ids[cut:] == self.config.image_token_id):
                return 0
        return cut

    def incremental_scorer(self, image, question: str, *, check: bool = False) -> "IncrementalScorer":
        """A scorer for one solution that grows step by step (guided search): see ``IncrementalScorer``."""
        return IncrementalScorer(self, image, question, check=check)

    def warmup(self, **kwargs) -> int:
        """Compile the scorer's buckets ahead of time (see ``Scorer.warmup``); returns new compilations."""
        return self.scorer.warmup(**kwargs)


# ------------------------------------------------------------------------------------------------
# incremental scoring of a solution that grows step by step (guided search)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Continuation:
    """A candidate of an ``IncrementalScorer`` call: its tokens after the cache and, once scored, its
    probabilities and K/V (what committing it appends to the cache)."""

    steps: list[str]  # the whole solution it scores: the call's steps + the candidate
    ids: np.ndarray  # (n,) its tokens after the cached ones
    pos: np.ndarray  # (3, n) their M-RoPE positions
    labels: np.ndarray  # its label positions, indices into ``ids``
    text: str  # the chat-template string of the whole conversation through its assistant turn
    probs: np.ndarray | None = None
    kv: SuffixKV | None = None


class IncrementalScorer:
    """Scores candidate next steps of one solution that grows a step at a time, reusing the work of the
    earlier calls (``PRM.incremental_scorer(image, question)``; what ``guided_greedy_search`` uses).

    ``score_next(steps, candidates)`` returns, for every candidate, the per-step scores of
    ``steps + [candidate]``: the same as ``prm.score_candidates(image, question, [steps + [c] for c in
    candidates])`` up to float rounding. The image is preprocessed once. The prompt so far (system
    turn, image(s), question and the steps already taken) stays on the device as a K/V cache
    (``KVCache``, capacity bucketed by ``prefix_buckets``), and a call runs only the candidates' own
    turns on it (``Scorer.score_cached``). When a call's ``steps`` are the previous call's ``steps``
    plus one of its candidates, that candidate's K/V, computed while scoring it, is appended to the
    cache (``Scorer.extend_cache``): the vision tower and the question run once per search and each
    chosen step's tokens are run once. The scores of the steps already taken (their label positions
    lie in the cache) are the ones computed when they were candidates.

    Exactness: a continuation is scored on the cache only when its tokens begin with exactly the
    cached tokens (same ids and positions, the same label positions before the cut, no image tokens
    after it); otherwise the cache is rebuilt from scratch for that call (``stats["rebuilds"]``). Once
    the cache holds whole turns, a candidate's tokens are found by rendering the whole conversation
    with the chat template (which must render it prefix by prefix: the cached conversation's text is a
    prefix of it) and tokenizing only the text after the cached conversation, which must begin with a
    special token (``<|im_start|>`` of the candidate's user turn): a tokenizer splits its input at
    special tokens first, so the whole text tokenizes to the cached tokens followed by these. The
    first such split of a scorer (every one with ``check=True``) is compared with the full
    ``encode_prm_example`` encoding; if they ever differ, every candidate is encoded in full from then
    on (still checked against the cache token by token). A call where some candidate loses steps to
    ``max_length`` is scored without the cache, as ``score_candidates`` does (NaN for dropped steps).

    Create a new one after changing the PRM's weights (the cache holds K/V of the old ones).
    """

    def __init__(self, prm: PRM, image, question: str, *, check: bool = False):
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        self.prm, self.question, self.check = prm, question, bool(check)
        self.pixel_values, self.grid = prm._images(image)
        cfg = prm.config
        self._image_ids = np.asarray(sorted({int(i) for i in (cfg.image_token_id, getattr(cfg, "video_token_id", None))
                                             if i is not None}), np.int64)
        self._num_images = 0 if self.grid is None else int(len(self.grid))
        self._plus_id = label_token_ids(prm.tokenizer)[0]  # encode_prm_example's placeholder in "score" mode
        self._split = bool(getattr(prm.tokenizer, "is_fast", False))  # tokenize only the new turn's text
        self._split_checked = False
        self.stats: collections.Counter = collections.Counter()
        self._reset()

    def _reset(self) -> None:
        self._cache: KVCache | None = None
        self._ids = np.zeros((0,), np.int32)
        self._pos = np.zeros((3, 0), np.int32)
        self._labels = np.zeros((0,), np.int64)
        self._scores = np.zeros((0,), np.float32)
        self._steps: list[str] | None = None  # the steps the cache was built for
        self._text = ""  # the chat-template text of the cached tokens when they end with a whole turn
        self._pending: dict[str, _Continuation] = {}

    @property
    def cached_tokens(self) -> int:
        """Tokens held in the K/V cache (0 before the first call)."""
        return 0 if self._cache is None else self._cache.length

    # -- public ----------------------------------------------------------------------------------
    def score_next(self, steps: Sequence[str], candidates: Sequence[str]) -> list[np.ndarray]:
        """Per-step P(correct) of ``steps + [c]`` for every candidate step ``c`` (float32 arrays of
        ``len(steps) + 1`` scores), reusing the cache (see the class docstring)."""
        steps, cands = _check_step_lists(steps, candidates)
        if not cands:
            return []
        lists = [_check_question_steps(self.question, steps + [c], f"candidates[{i}]") for i, c in enumerate(cands)]
        self._sync(steps)
        conts = None
        if self._cache is not None:
            conts = self._continue(steps, cands)
            if conts is None:
                self.stats["rebuilds"] += 1
                self._reset()
        if conts is None:
            encoded = [self.prm._encode(self.pixel_values, self.grid, self.question, sl, f"candidates[{i}]")
                       for i, sl in enumerate(lists)]
            cut = 0 if any(e.truncated for e in encoded) else self.prm.shared_prefix_length(encoded)
            if cut <= 0:  # nothing to cache: score as score_candidates does
                self.stats["uncached"] += 1
                return self.prm._score_encoded(encoded)
            e0 = encoded[0]
            self._cache = self.prm.scorer.prefill(TokenSequence(e0.input_ids[:cut], e0.position_ids[:, :cut], [],
                                                                e0.pixel_values, e0.grid))
            self.stats["prefills"] += 1
            self._ids, self._pos, self._steps = e0.input_ids[:cut], e0.position_ids[:, :cut], steps
            conts = [self._from_encoding(e, sl) for e, sl in zip(encoded, lists)]
            if any(c is None for c in conts):  # pragma: no cover - shared_prefix_length guarantees it
                raise RuntimeError("a candidate does not continue the shared prefix; this is a bug")
        probs, kvs = self.prm.scorer.score_cached(
            self._cache, [TokenSequence(c.ids, c.pos, c.labels) for c in conts], keep_kv=True)
        out = []
        for c, p, kv in zip(conts, probs, kvs):
            c.probs, c.kv = p, kv
            full = np.concatenate([self._scores, p]).astype(np.float32)
            if full.shape[0] != len(c.steps):  # pragma: no cover
                raise RuntimeError(f"{full.shape[0]} scores for {len(c.steps)} steps; this is a bug")
            out.append(full)
            self._pending.setdefault(c.steps[-1], c)
        self.stats["scored"] += len(conts)
        return out

    # -- the cache -------------------------------------------------------------------------------
    def _sync(self, steps: list[str]) -> None:
        """Bring the cache to ``steps``: keep it, append the previous call's candidate that ``steps``
        ends with, or drop it."""
        pending, self._pending = self._pending, {}
        if self._cache is None or steps == self._steps:
            return
        prev = self._steps
        if prev is not None and len(steps) == len(prev) + 1 and steps[:-1] == prev and steps[-1] in pending:
            c = pending[steps[-1]]
            n = len(self._ids)
            self._cache = self.prm.scorer.extend_cache(self._cache, c.kv)
            self._ids = np.concatenate([self._ids, c.ids])
            self._pos = np.concatenate([self._pos, c.pos], axis=1)
            self._labels = np.concatenate([self._labels, c.labels + n])
            self._scores = np.concatenate([self._scores, c.probs]).astype(np.float32)
            self._steps, self._text = list(c.steps), c.text
            self.stats["appends"] += 1
            return
        self.stats["resets"] += 1
        self._reset()

    def _continue(self, steps: list[str], cands: list[str]) -> list[_Continuation] | None:
        """Every candidate as a continuation of the cache, or None if one is not."""
        out = []
        for i, c in enumerate(cands):
            sl, where = steps + [c], f"candidates[{i}]"
            cont = self._from_split(sl) if self._split and self._text else None
            if cont is not None and (self.check or not self._split_checked):
                ref = self._from_encoding(self.prm._encode(self.pixel_values, self.grid, self.question, sl, where), sl)
                self._split_checked = True
                if ref is None or not (np.array_equal(ref.ids, cont.ids) and np.array_equal(ref.pos, cont.pos)
                                       and np.array_equal(ref.labels, cont.labels) and ref.text == cont.text):
                    self.stats["split_mismatch"] += 1
                    self._split = False
                    cont = ref
            if cont is None:
                cont = self._from_encoding(self.prm._encode(self.pixel_values, self.grid, self.question, sl, where), sl)
            if cont is None:
                return None
            out.append(cont)
        return out

    def _from_encoding(self, e: _Encoded, steps: list[str]) -> _Continuation | None:
        """The tokens of a full encoding after the cache, if they continue it exactly."""
        n = len(self._ids)
        if e.truncated or len(e.input_ids) <= n:
            return None
        if not (np.array_equal(e.input_ids[:n], self._ids) and np.array_equal(e.position_ids[:, :n], self._pos)):
            return None
        lab = e.label_positions
        if not np.array_equal(lab[lab < n], self._labels) or np.isin(e.input_ids[n:], self._image_ids).any():
            return None
        return _Continuation(list(steps), e.input_ids[n:], e.position_ids[:, n:], lab[lab >= n] - n, e.text)

    def _from_split(self, steps: list[str]) -> _Continuation | None:
        """The new turn's tokens from the text after the cached conversation (see the class docstring);
        None where that does not apply (the caller then encodes the whole conversation)."""
        prm, tok = self.prm, self.prm.prompt_tokenizer
        if any(t in steps[-1] for t in QWEN_SPECIAL_TOKENS + (INTERNVL_ADDED_TOKENS if prm.internvl else ())):
            return None  # the full encoding raises the proper error
        msgs = build_messages(self.question, steps, num_images=self._num_images, placeholder=POSITIVE_TOKEN,
                              system_prompt=prm.system_prompt, style=prm.prompt_style)
        full = render_messages(tok, msgs)
        head = render_messages(tok, msgs[:-1], add_generation_prompt=True)
        base = self._text
        if not (head.startswith(base) and full.startswith(head)
                and full[len(head): len(head) + len(POSITIVE_TOKEN)] == POSITIVE_TOKEN):
            return None
        rest = full[len(base):]
        if not rest.startswith(QWEN_SPECIAL_TOKENS):
            return None
        ids, starts, ends = tokenize_with_offsets(tok, rest)
        if starts is None:  # pragma: no cover - self._split needs a fast tokenizer
            return None
        ids = ids.astype(np.int32)
        offsets = np.stack([starts, ends], axis=1)
        at = len(head) - len(base)
        j = int(np.searchsorted(offsets[:, 0], at))
        if not (1 <= j < len(ids) and ids[j] == self._plus_id and offsets[j, 0] == at
                and offsets[j, 1] == at + len(POSITIVE_TOKEN)):
            return None
        if np.isin(ids, self._image_ids).any():
            return None
        if prm.max_length is not None and len(self._ids) + len(ids) > prm.max_length:
            return None
        last = self._pos[:, -1]
        if not (last == last[0]).all() or np.isin(self._ids[-1:], self._image_ids).any():
            return None  # text after text: positions count on by one on every axis (rope.get_rope_index)
        pos = np.broadcast_to(int(last[0]) + 1 + np.arange(len(ids), dtype=np.int32), (3, len(ids)))
        return _Continuation(list(steps), ids, pos.astype(np.int32), np.asarray([j - 1], np.int64), full)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
_resolve_dtype = jax_float_type  # the name bench/ and jaxprm.search.scorer import


def load_prm(path, dtype="float32", step: int | None = None, *, attn_impl: str = "auto",
             system_prompt: str | None = None, prompt_style: str | None = None, max_length: int | None = None,
             **scorer_kwargs) -> PRM:
    """A ``PRM`` from a jaxprm training workdir (latest Orbax step, or ``step``), an exported PRM, or an
    HF Qwen2.5-VL directory (e.g. a released VL-PRM checkpoint; "+"/"-" rows of the lm head), or an
    InternVL directory (a released VisualPRM-8B / -v1.1 in the remote-code layout, or transformers'
    native ``model_type: internvl`` layout; "+"/"-" rows of the lm head, prompt style ``"visualprm"``
    when it has no ``prm.json``).

    ``dtype``: "float32" / "bfloat16" / "float16" (or an alias such as "bf16", see ``jaxprm.dtypes``) / a jnp
    dtype (compute and storage). The prompt layout is the one in the PRM's ``prm.json``
    (``prompt_style``; for an HF directory without one ``"vlprm"``, the released VL-PRM layout, or
    ``"visualprm"`` on an InternVL backbone);
    ``prompt_style`` (a name in ``jaxprm.data.prompt.PROMPT_STYLES``) overrides it, e.g. ``"visualprm"``.
    Other keyword arguments go to ``PRM`` / ``Scorer`` (``batch_size``, ``length_buckets``,
    ``patch_buckets``, ...).
    """
    from jaxprm.checkpointing import load_prm_model

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such PRM directory: {path!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory: expected a jaxprm workdir, an exported PRM or an "
                                "HF Qwen2.5-VL or InternVL directory")
    model, tok, ip = load_prm_model(path, dtype=_resolve_dtype(dtype), step=step, attn_impl=attn_impl)
    return PRM(model, tok, ip, system_prompt=system_prompt, prompt_style=prompt_style, max_length=max_length,
               **scorer_kwargs)
