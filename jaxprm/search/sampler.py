"""Sampling from the Flax Qwen2.5-VL with a fixed-size KV cache.

``Sampler.generate(image, question, n=...)`` runs one prompt and draws ``n`` completions:

1. **Prompt** (host): the chat template with one ``{"type": "image"}`` entry per image before the
   question, ``add_generation_prompt=True``, then an optional ``assistant_prefix`` (text the
   answer must continue, e.g. the solution steps so far). ``<|image_pad|>`` is expanded to
   ``t*h*w // merge**2`` copies per image and the 3D M-RoPE positions come from
   ``rope.get_rope_index``, as ``Qwen2_5_VLProcessor`` + transformers do.
2. **Prefill** (one jitted call, batch 1): the prompt is right-padded to a length bucket (and the
   image patches to a patch bucket) so a few shapes cover all prompts; it returns the logits at
   the last prompt token and every prompt token's (k, v). Padding tokens carry segment id 0.
3. **Decode** (a Python loop over a jitted chunk of ``decode_chunk`` steps under ``lax.scan``):
   the prompt's (k, v) are broadcast to ``n`` rows of a cache of fixed size
   ``prompt bucket + max_new_tokens`` (rounded up to the chunk); each step feeds the last sampled
   token at position ``last prompt position + 1 + t`` on all three rope axes (transformers'
   ``rope_deltas``), attends to the valid cache slots (``past_segment_ids``: 1 = valid, 0 =
   empty/padding), writes its (k, v) into the next slot with ``lax.dynamic_update_slice`` and
   samples the next token. Between chunks the host checks stop tokens and stop strings and ends
   the loop once every row has finished; tokens a row draws after it finished are discarded.

Sampling (``sample_logits``): temperature (``0`` = greedy argmax), then top-k, then top-p
(nucleus: the smallest set of most likely tokens whose probability mass reaches ``top_p``), then
a categorical draw; ids at or past ``len(tokenizer)`` (the model's vocabulary is padded) are
never drawn. Generation of a row stops at ``<|im_end|>`` / ``<|endoftext|>`` / the tokenizer's
eos token (not included in the text) or at the first stop string (not included either; the
default for step-wise generation is the blank line ``"\\n\\n"``), or after ``max_new_tokens``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprm.data.preprocess import ImageProcessor
from jaxprm.models.qwen2_5_vl import rope
from jaxprm.models.qwen2_5_vl.model import Qwen25VL

__all__ = ["Generation", "Sampler", "apply_top_k", "apply_top_p", "sample_logits"]

DEFAULT_PROMPT_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
STEP_STOP = "\n\n"
_NEG = -1e30  # finite "-inf" (keeps softmax/cumsum free of NaNs)


# ------------------------------------------------------------------------------------------------
# logits filters (pure, jittable)
# ------------------------------------------------------------------------------------------------
def apply_top_k(logits, k: int):
    """Keep the ``k`` largest logits of each row (ties with the k-th kept too); others -> -1e30.
    ``k <= 0`` or ``k >= vocab`` leaves the logits as they are. ``k`` is a Python int (static)."""
    k = int(k)
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, _NEG, logits)


def apply_top_p(logits, p):
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is at
    least ``p`` (the most likely token is always kept; tokens tied with the least likely kept one
    are kept too); others -> -1e30. ``p >= 1`` keeps everything. ``p`` may be traced."""
    p = jnp.asarray(p, jnp.float32)
    srt = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(srt.astype(jnp.float32), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = (before < p) | (jnp.arange(srt.shape[-1]) == 0)
    n_keep = keep.sum(-1, keepdims=True)
    thresh = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
    out = jnp.where(logits < thresh, _NEG, logits)
    return jnp.where(p >= 1.0, logits, out)


def sample_logits(key, logits, temperature, top_k: int = 0, top_p=1.0, use_top_p: bool = True):
    """Draw one token per row of ``logits`` (..., V): greedy when ``temperature <= 0``, else
    softmax(logits / temperature) restricted by top-k then top-p. ``top_k`` is static."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    t = jnp.asarray(temperature, jnp.float32)
    x = logits / jnp.maximum(t, 1e-6)
    x = apply_top_k(x, top_k)
    if use_top_p:
        x = apply_top_p(x, top_p)
    drawn = jax.random.categorical(key, x, axis=-1)
    return jnp.where(t <= 0, greedy, drawn).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# the sampler
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop string), "eos" (a stop token) or "length"
    logits: np.ndarray | None = None  # (steps, V) float32 when requested (testing)


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // int(m)) * int(m)


def _bucket(n: int, buckets: Sequence[int], multiple: int = 64) -> int:
    for b in buckets:
        if n <= b:
            return int(b)
    return _round_up(n, multiple)


class Sampler:
    """Generate text with a ``Qwen25VL`` (see the module docstring).

    Args:
      model: the NNX model (weights are split out once; later in-place changes to ``model`` are
        not seen; call ``refresh()`` after changing them).
      tokenizer: its (Qwen2/Qwen2.5-VL style) tokenizer with a chat template.
      image_processor: default: an ``ImageProcessor`` matching the model's vision config.
      max_len: the most tokens (prompt + new) one generation may use.
      prompt_buckets: prompt lengths are padded up to the first bucket that fits (past the last,
        to a multiple of 64).
      patch_multiple: image patches are padded up to the next power of two times this (>= 1).
      decode_chunk: decode steps per jitted call (the host checks stop conditions between calls).
      system_prompt: optional system message (default: the template's own).
    """

    def __init__(self, model: Qwen25VL, tokenizer, image_processor: ImageProcessor | None = None, *,
                 max_len: int = 4096, prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                 patch_multiple: int = 64, decode_chunk: int = 8, system_prompt: str | None = None):
        cfg = model.config
        self.model, self.config, self.tokenizer = model, cfg, tokenizer
        v = cfg.vision
        self.image_processor = image_processor or ImageProcessor(
            patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)
        if self.image_processor.merge_size != v.spatial_merge_size or self.image_processor.patch_size != v.patch_size:
            raise ValueError(f"image processor {self.image_processor} does not match the model's vision config "
                             f"(patch {v.patch_size}, merge {v.spatial_merge_size})")
        self.max_len = int(max_len)
        self.prompt_buckets = tuple(sorted(int(b) for b in prompt_buckets))
        self.patch_multiple = max(int(patch_multiple), v.spatial_merge_size**2)
        if self.patch_multiple % v.spatial_merge_size**2:
            raise ValueError(f"patch_multiple must be a multiple of {v.spatial_merge_size**2}")
        self.decode_chunk = max(1, int(decode_chunk))
        self.system_prompt = system_prompt
        self.vocab_limit = min(len(tokenizer), cfg.text.vocab_size)
        stop_ids = set()
        for t in ("<|im_end|>", "<|endoftext|>"):
            i = tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tokenizer.unk_token_id and i >= 0:
                stop_ids.add(int(i))
        if tokenizer.eos_token_id is not None:
            stop_ids.add(int(tokenizer.eos_token_id))
        eos = cfg.eos_token_id
        if eos is not None:
            stop_ids.update(int(e) for e in (eos if isinstance(eos, (tuple, list)) else (eos,)))
        self.stop_token_ids = frozenset(stop_ids)
        self._donate = jax.default_backend() != "cpu"
        self.refresh()

    @classmethod
    def from_pretrained(cls, hf_dir: str, dtype=jnp.float32, **kwargs) -> "Sampler":
        """A sampler for an HF Qwen2.5-VL directory (weights, tokenizer, preprocessor config)."""
        from transformers import AutoTokenizer

        from jaxprm.models.qwen2_5_vl import from_pretrained

        model = from_pretrained(hf_dir, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(hf_dir)
        try:
            ip = ImageProcessor.from_pretrained(hf_dir)
        except FileNotFoundError:
            ip = None
        return cls(model, tok, ip, **kwargs)

    def refresh(self) -> None:
        """Re-read the model's weights (after changing them in place)."""
        self._graphdef, self._state = nnx.split(self.model)
        gd = self._graphdef
        vocab_limit = self.vocab_limit

        def mask_vocab(logits):
            if vocab_limit >= logits.shape[-1]:
                return logits
            return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, _NEG)

        def prefill(state, ids, pos, seg, pv, layout, last):
            model = nnx.merge(gd, state)
            h, (k, v) = model.hidden_states(ids, pos, seg, pv, layout, return_kv=True)
            logits = model.logits(h[0, last]).astype(jnp.float32)
            return mask_vocab(logits), k, v

        def decode(state, ck, cv, seg, tok, pos, slot, key, temperature, top_p, *, steps, top_k, use_top_p,
                   return_logits):
            model = nnx.merge(gd, state)
            n = tok.shape[0]

            def body(carry, _):
                ck, cv, seg, tok, pos, slot, key = carry
                p3 = jnp.broadcast_to(pos[None, :, None], (3, n, 1))
                h, (k_new, v_new) = model.hidden_states(tok[:, None], p3, jnp.ones((n, 1), jnp.int32),
                                                        past_kv=(ck, cv), past_segment_ids=seg, return_kv=True)
                ck = jax.lax.dynamic_update_slice(ck, k_new.astype(ck.dtype), (0, 0, slot, 0, 0))
                cv = jax.lax.dynamic_update_slice(cv, v_new.astype(cv.dtype), (0, 0, slot, 0, 0))
                seg = jax.lax.dynamic_update_slice(seg, jnp.ones((n, 1), seg.dtype), (0, slot))
                logits = mask_vocab(model.logits(h[:, 0]).astype(jnp.float32))
                key, sub = jax.random.split(key)
                nxt = sample_logits(sub, logits, temperature, top_k, top_p, use_top_p)
                out = (nxt, logits) if return_logits else (nxt, None)
                return (ck, cv, seg, nxt, pos + 1, slot + 1, key), out

            carry, (toks, logits) = jax.lax.scan(body, (ck, cv, seg, tok, pos, slot, key), None, length=steps)
            ck, cv, seg, tok, pos, slot, key = carry
            return ck, cv, seg, tok, pos, slot, key, toks.T, (None if logits is None else jnp.swapaxes(logits, 0, 1))

        def first(key, logits, n, temperature, top_p, *, top_k, use_top_p):
            return sample_logits(key, jnp.broadcast_to(logits, (n, logits.shape[-1])), temperature, top_k, top_p,
                                 use_top_p)

        self._prefill = jax.jit(prefill)
        self._decode = jax.jit(decode, static_argnames=("steps", "top_k", "use_top_p", "return_logits"),
                               donate_argnums=(1, 2, 3) if self._donate else ())
        self._first = jax.jit(first, static_argnames=("n", "top_k", "use_top_p"))

    # -- prompt ----------------------------------------------------------------------------------
    def encode_prompt(self, image, question: str, assistant_prefix: str = "") -> dict[str, Any]:
        """Host side of a prompt: ``input_ids`` (L,) int32 with image pads expanded,
        ``position_ids`` (3, 1, L), ``rope_delta``, ``pixel_values``/``image_grid_thw`` (or None)."""
        images = [] if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
        content: list[dict] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": question})
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": content})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text += assistant_prefix or ""
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
        cfg = self.config
        pv = grid = None
        if images:
            proc = self.image_processor(images)
            pv, grid = proc["pixel_values"], proc["image_grid_thw"]
            pads = np.flatnonzero(ids == cfg.image_token_id)
            if len(pads) != len(images):
                raise ValueError(f"the chat template produced {len(pads)} image placeholders for {len(images)} images")
            reps = np.ones(len(ids), np.int64)
            reps[pads] = grid.prod(-1) // cfg.vision.spatial_merge_size**2
            ids = np.repeat(ids, reps)
        pos, delta = rope.get_rope_index(
            ids[None], image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size, image_grid_thw=grid,
            tokens_per_second=cfg.tokens_per_second)
        return {"input_ids": ids.astype(np.int32), "position_ids": pos, "rope_delta": int(delta[0]),
                "pixel_values": pv, "image_grid_thw": grid, "text": text}

    # -- generation ------------------------------------------------------------------------------
    def generate(self, image, question: str, n: int = 1, **kwargs) -> list[str]:
        """``n`` completions (texts) of one prompt; keyword arguments as ``generate_full``."""
        return [g.text for g in self.generate_full(image, question, n=n, **kwargs)]

    def generate_full(self, image, question: str, n: int = 1, *, assistant_prefix: str = "",
                      temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 512,
                      stop: str | Sequence[str] | None = None, seed: int | None = 0, key=None,
                      return_logits: bool = False) -> list[Generation]:
        """``n`` samples for one (image(s), question[, assistant_prefix]) prompt.

        ``stop``: stop string(s) (e.g. ``"\\n\\n"`` for one step); generation also stops at the
        end-of-turn / eos tokens. ``seed`` (or an explicit PRNG ``key``) makes sampling
        reproducible. ``return_logits`` keeps each step's (masked) logits (for testing)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or ()) if s]
        enc = self.encode_prompt(image, question, assistant_prefix)
        ids = enc["input_ids"]
        L = len(ids)
        if L >= self.max_len:
            raise ValueError(f"the prompt has {L} tokens, max_len is {self.max_len}")
        max_new = min(int(max_new_tokens), self.max_len - L)
        Lb = _bucket(L, self.prompt_buckets)
        ids_p = np.zeros((1, Lb), np.int32)
        ids_p[0, :L] = ids
        pos_p = np.zeros((3, 1, Lb), np.int32)
        pos_p[:, :, :L] = enc["position_ids"]
        seg_p = np.zeros((1, Lb), np.int32)
        seg_p[0, :L] = 1
        pv = layout = None
        if enc["pixel_values"] is not None:
            v = self.config.vision
            n_p = enc["pixel_values"].shape[0]
            P = self.patch_multiple * (1 << max(0, int(np.ceil(np.log2(max(n_p, 1) / self.patch_multiple)))))
            P = max(P, _round_up(n_p, self.patch_multiple))
            pv = np.zeros((P, enc["pixel_values"].shape[1]), np.float32)
            pv[:n_p] = enc["pixel_values"]
            layout = rope.vision_layout(enc["image_grid_thw"], merge=v.spatial_merge_size, window_size=v.window_size,
                                        patch_size=v.patch_size, pad_to=P).as_dict()
            pv = jnp.asarray(pv)
        logits0, k, v_ = self._prefill(self._state, jnp.asarray(ids_p), jnp.asarray(pos_p), jnp.asarray(seg_p),
                                       pv, layout, jnp.int32(L - 1))

        chunk = self.decode_chunk
        S = Lb + _round_up(max(max_new - 1, 1), chunk)
        nl, _, _, K, hd = k.shape
        ck = jnp.zeros((nl, n, S, K, hd), k.dtype).at[:, :, :Lb].set(jnp.broadcast_to(k, (nl, n, Lb, K, hd)))
        cv = jnp.zeros((nl, n, S, K, hd), v_.dtype).at[:, :, :Lb].set(jnp.broadcast_to(v_, (nl, n, Lb, K, hd)))
        seg = jnp.asarray(np.broadcast_to(np.pad(seg_p, ((0, 0), (0, S - Lb))), (n, S)).copy())

        key = jax.random.PRNGKey(0 if seed is None else int(seed)) if key is None else key
        key, sub = jax.random.split(key)
        temp, tp = jnp.float32(temperature), jnp.float32(top_p)
        use_top_p = float(top_p) < 1.0
        tok = self._first(sub, logits0, n, temp, tp, top_k=int(top_k), use_top_p=use_top_p)
        first_tok = np.asarray(tok)
        tokens = [[int(t)] for t in first_tok]
        step_logits = [[np.asarray(logits0)] for _ in range(n)] if return_logits else None
        done = [None] * n  # finish reason once finished
        texts = [""] * n
        self._check(tokens, done, texts, stops, max_new)
        pos = jnp.full((n,), L + enc["rope_delta"], jnp.int32)
        slot = jnp.int32(Lb)
        produced = 1
        while produced < max_new and not all(done):
            ck, cv, seg, tok, pos, slot, key, toks, lg = self._decode(
                self._state, ck, cv, seg, tok, pos, slot, key, temp, tp, steps=chunk, top_k=int(top_k),
                use_top_p=use_top_p, return_logits=return_logits)
            toks = np.asarray(toks)
            take = min(chunk, max_new - produced)
            lg = None if lg is None else np.asarray(lg)
            for i in range(n):
                if done[i] is None:
                    tokens[i].extend(int(t) for t in toks[i, :take])
                    if return_logits:
                        step_logits[i].extend(lg[i, :take])
            produced += take
            self._check(tokens, done, texts, stops, max_new)
        out = []
        for i in range(n):
            out.append(Generation(texts[i], tokens[i], done[i] or "length",
                                  np.stack(step_logits[i][:len(tokens[i])]) if return_logits else None))
        return out

    def _check(self, tokens, done, texts, stops, max_new) -> None:
        """Finish rows that hit a stop token or stop string; cut their token lists / texts."""
        for i, toks in enumerate(tokens):
            if done[i] is not None:
                continue
            cut = next((j for j, t in enumerate(toks) if t in self.stop_token_ids), None)
            body = toks if cut is None else toks[:cut]
            text = self.tokenizer.decode(body, skip_special_tokens=False)
            hits = [(text.find(s), s) for s in stops if s in text]
            if hits:
                at = min(h[0] for h in hits)
                texts[i] = text[:at]
                done[i] = "stop"
                # keep the tokens up to the one that completed the stop string
                for j in range(1, len(body) + 1):
                    if any(s in self.tokenizer.decode(body[:j], skip_special_tokens=False) for s in stops):
                        break
                del toks[j:]
            elif cut is not None:
                texts[i] = text
                done[i] = "eos"
                del toks[cut:]
            else:
                texts[i] = text
                if len(toks) >= max_new:
                    done[i] = "length"
                    del toks[max_new:]
                    texts[i] = self.tokenizer.decode(toks, skip_special_tokens=False)
