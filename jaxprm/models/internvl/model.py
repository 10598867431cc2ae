"""The InternVL model: InternViT + pixel shuffle + projector, image features scattered over the
``<IMG_CONTEXT>`` tokens, and a decoder language model (+ lm head).

The language model is the project's Qwen2 decoder (``jaxprm.models.qwen2_5_vl.text.TextModel``) with
1D RoPE (one M-RoPE section, ``position_ids`` (1, B, L)); a Llama/InternLM2 language model is the
same decoder without q/k/v biases (InternLM2's packed ``wqkv`` is split on load, see ``convert``).

Two ways in, as for Qwen2.5-VL:
- ``model(input_ids, attention_mask=, pixel_values=, image_flags=)`` has transformers' semantics and
  returns ``.logits`` over the full vocabulary (one compile per shape);
- ``model.hidden_states(...)`` / ``model.token_logits(...)``: pure, fixed-shape, jittable pieces.

Tiles: ``pixel_values`` is (N, C, H, W), all tiles of all images in order (each image's tiles then its
thumbnail, as the preprocessing emits them); every kept tile gives ``image_seq_length`` features and
they fill the ``<IMG_CONTEXT>`` positions in order. ``image_flags`` (N,) marks tiles to drop (0), as the
remote code's ``image_flags`` does (dummy tiles of text-only rows in a batch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprm.models.vlm import Output, VisionLanguageModel, hf_forward, host_ids_and_mask, scatter_features
from .config import InternVLConfig
from .vision import VisionTower


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """(B, L) 0/1 mask -> (1, B, L) 1D RoPE positions: 0, 1, ... over each row's real tokens (padding
    gets 0). RoPE is relative, so this equals transformers' 0..L-1 for every real token's logits."""
    m = np.asarray(attention_mask).astype(np.int64)
    return np.maximum(np.cumsum(m, axis=1) - 1, 0).astype(np.int32)[None]


class InternVL(VisionLanguageModel):
    def init_vision(self, config: InternVLConfig, **kw):
        self.vision = VisionTower(config, **kw)

    # -- pure, jittable pieces ------------------------------------------------------------------
    def image_features(self, pixel_values):
        """(N, C, H, W) tiles -> (N, image_seq_length, text hidden)."""
        return self.vision(pixel_values)

    def embed(self, input_ids, image_features=None, image_flags=None):
        """Token embeddings with the features of the kept tiles scattered, in order, over the
        ``<IMG_CONTEXT>`` positions. image_features (N, T, D); image_flags (N,) or None (all kept)."""
        x = self.language_model.embed(input_ids)
        if image_features is None:
            return x
        n, t, d = image_features.shape
        feats = image_features
        if image_flags is not None:  # kept tiles first, in order (a stable sort on "dropped")
            feats = feats[jnp.argsort(jnp.asarray(image_flags) == 0, stable=True)]
        return scatter_features(x, input_ids, self.config.image_token_id, feats.reshape(n * t, d))

    def hidden_states(self, input_ids, position_ids, segment_ids, pixel_values=None, image_flags=None,
                      past_kv=None, past_segment_ids=None, return_kv: bool = False):
        """Final-normed decoder states (B, L, D). position_ids (1, B, L) (or (B, L)); segment_ids (B, L).

        Tiles are either one flat batch (``pixel_values`` (N, C, H, W), features of the kept tiles fill
        the placeholders of all rows in order) or per row (``pixel_values`` (B, N, C, H, W),
        ``image_flags`` (B, N) marking each row's real tiles): the fixed-shape form that shards with
        the batch. ``past_kv`` / ``return_kv``: see ``TextModel.__call__``.
        """
        if position_ids.ndim == 2:
            position_ids = position_ids[None]
        if pixel_values is None:
            embeds = self.embed(input_ids)
        elif pixel_values.ndim == 4:
            embeds = self.embed(input_ids, self.image_features(pixel_values), image_flags)
        else:
            b, n = pixel_values.shape[:2]
            feats = self.image_features(pixel_values.reshape(b * n, *pixel_values.shape[2:]))
            feats = feats.reshape(b, n, *feats.shape[1:])
            flags = jnp.ones((b, n), jnp.int32) if image_flags is None else image_flags
            embeds = jax.vmap(lambda ids, f, fl: self.embed(ids[None], f, fl)[0])(input_ids, feats, flags)
        return self.language_model(embeds, position_ids, segment_ids, past_kv=past_kv,
                                   past_segment_ids=past_segment_ids, return_kv=return_kv)

    # -- transformers-style call -------------------------------------------------------------------
    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_flags=None,
                       position_ids=None) -> dict:
        """Host side of ``__call__``: positions, segment ids and checks (numpy)."""
        cfg = self.config
        ids, mask = host_ids_and_mask(input_ids, attention_mask)
        b, l = ids.shape
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        scaling = cfg.rope_scaling or {}
        if scaling and l > cfg.text.max_position_embeddings:
            raise ValueError(f"sequence length {l} exceeds max_position_embeddings {cfg.text.max_position_embeddings}: "
                             f"dynamic NTK RoPE scaling ({scaling}) beyond it is not implemented")
        out = {"input_ids": ids.astype(np.int32), "segment_ids": mask}
        if position_ids is not None:
            pos = np.asarray(position_ids)
            out["position_ids"] = (pos if pos.ndim == 3 else pos.reshape(b, l)[None]).astype(np.int32)
        else:
            out["position_ids"] = positions_from_mask(mask)
        if pixel_values is not None:
            if cfg.image_token_id is None:
                raise ValueError("image_token_id is unknown (remote-code config.json without tokenizer files): "
                                 "pass image_token_id= to from_pretrained")
            shape = np.shape(pixel_values)
            if len(shape) != 4:
                raise ValueError(f"pixel_values must be (num_tiles, C, H, W), got shape {shape}")
            flags = np.ones(shape[0], np.int32) if image_flags is None else np.asarray(image_flags).reshape(-1)
            if flags.shape[0] != shape[0]:
                raise ValueError(f"image_flags has {flags.shape[0]} entries for {shape[0]} tiles")
            v = cfg.vision
            tokens_per_tile = (shape[2] // v.patch_size) * (shape[3] // v.patch_size) // 4
            n_tok = int((ids == cfg.image_token_id).sum())
            n_feat = int((flags != 0).sum()) * tokens_per_tile
            if n_tok != n_feat:
                raise ValueError(f"Image features and image tokens do not match: {n_tok} <IMG_CONTEXT> tokens in "
                                 f"input_ids but {int((flags != 0).sum())} kept tiles give {n_feat} features")
            out["image_flags"] = flags.astype(np.int32)
        return out

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_flags=None, position_ids=None):
        host = self.prepare_inputs(input_ids, attention_mask, pixel_values, image_flags, position_ids)
        pv = None if pixel_values is None else jnp.asarray(np.asarray(pixel_values, np.float32))
        flags = host.get("image_flags")
        hidden, logits = hf_forward(self, host["input_ids"], host["position_ids"], host["segment_ids"], pv,
                                    None if flags is None or flags.all() else jnp.asarray(flags))
        return Output(logits=logits, hidden_states=hidden, position_ids=host["position_ids"])

