"""The Qwen2.5-VL model: vision tower + image-feature scatter + decoder (+ lm head).

Two ways in:
- ``model(input_ids, attention_mask=, pixel_values=, image_grid_thw=)`` has transformers'
  semantics (3D positions computed from the inputs on the host, as transformers does when given
  ``mm_token_type_ids``) and returns ``.logits`` over the full vocabulary. Handy for parity checks
  and one-off calls; each new shape compiles once.
- ``model.hidden_states(...)`` / ``model.token_logits(...)`` are pure, fixed-shape, jittable pieces
  for training and scoring: positions, segment ids and the vision layout come precomputed from
  the host (``rope.get_rope_index``, ``rope.vision_layout``), and only the rows of the lm head
  that are needed (e.g. "+"/"-") are multiplied.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprm.models import vlm
from jaxprm.models.vlm import VisionLanguageModel, hf_forward, host_ids_and_mask, scatter_features
from jaxprm.sharding import vmap_rows
from . import rope
from .config import Qwen25VLConfig
from .rope import LAYOUT_KEYS
from .vision import VisionTower


@dataclasses.dataclass
class Output(vlm.Output):
    rope_deltas: np.ndarray


class Qwen25VL(VisionLanguageModel):
    def init_vision(self, config: Qwen25VLConfig, **kw):
        self.visual = VisionTower(config.vision, **kw)

    # -- pure, jittable pieces ------------------------------------------------------------------
    def image_features(self, pixel_values, layout: dict):
        """(N, patch_dim) patches of all images -> (N / merge**2, hidden) features, image order."""
        return self.visual(pixel_values, *(layout[k] for k in LAYOUT_KEYS))

    def embed(self, input_ids, image_features=None):
        """Token embeddings with image features scattered, in order, over the image placeholders."""
        x = self.language_model.embed(input_ids)
        if image_features is None:
            return x
        return scatter_features(x, input_ids, self.config.image_token_id, image_features)

    def hidden_states(self, input_ids, position_ids, segment_ids, pixel_values=None, vision_layout=None,
                      past_kv=None, past_segment_ids=None, return_kv: bool = False):
        """Final-normed decoder states (B, L, D). position_ids (3, B, L); segment_ids (B, L).

        Vision inputs are either one flat batch of patches (``pixel_values`` (N, patch_dim), layout
        arrays unbatched, features scattered over the placeholders of all rows in order) or per row
        (``pixel_values`` (B, P, patch_dim), layout arrays with a leading B): the fixed-shape form
        the data pipeline emits, which shards with the batch. ``past_kv`` / ``return_kv``: see
        ``TextModel.__call__``.
        """
        if pixel_values is None:
            embeds = self.embed(input_ids)
        elif pixel_values.ndim == 2:
            embeds = self.embed(input_ids, self.image_features(pixel_values, vision_layout))
        else:
            layout = tuple(vision_layout[k] for k in LAYOUT_KEYS)
            # rows stay split over the mesh's batch axes inside (the Pallas kernels' shard_map)
            feats = vmap_rows(lambda pv, *lay: self.visual(pv, *lay), pixel_values.shape[0])(pixel_values, *layout)
            embeds = jax.vmap(lambda ids, f: self.embed(ids[None], f)[0])(input_ids, feats)
        return self.language_model(embeds, position_ids, segment_ids, past_kv=past_kv,
                                   past_segment_ids=past_segment_ids, return_kv=return_kv)

    # -- transformers-style call -------------------------------------------------------------------
    def prepare_inputs(self, input_ids, attention_mask=None, image_grid_thw=None, position_ids=None) -> dict:
        """Host side of ``__call__``: 3D positions, segment ids and the vision layout (numpy)."""
        cfg = self.config
        ids, mask = host_ids_and_mask(input_ids, attention_mask)
        b, l = ids.shape
        deltas = np.zeros(b, np.int64)
        grid = None if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
        if grid is not None:
            m2 = cfg.vision.spatial_merge_size**2
            n_tok = int((ids == cfg.image_token_id).sum())
            n_feat = int((grid.prod(-1) // m2).sum())
            if n_tok != n_feat:
                raise ValueError(f"Image features and image tokens do not match: {n_tok} <|image_pad|> tokens in "
                                 f"input_ids but image_grid_thw gives {n_feat} features")
        if position_ids is not None:
            pos = np.asarray(position_ids)
            if pos.ndim == 2:
                pos = np.broadcast_to(pos[None], (3, b, l))
        elif grid is not None:
            pos, deltas = rope.get_rope_index(
                ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                spatial_merge_size=cfg.vision.spatial_merge_size, image_grid_thw=grid,
                tokens_per_second=cfg.tokens_per_second, attention_mask=mask)
        else:  # transformers falls back to 0..L-1 on every axis when there is no image
            pos = np.broadcast_to(np.arange(l, dtype=np.int32)[None, None], (3, b, l))
        out = {"input_ids": ids.astype(np.int32), "position_ids": np.asarray(pos, np.int32),
               "segment_ids": mask, "rope_deltas": deltas}
        if grid is not None:
            v = cfg.vision
            out["vision_layout"] = rope.vision_layout(grid, merge=v.spatial_merge_size, window_size=v.window_size,
                                                      patch_size=v.patch_size).as_dict()
        return out

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None):
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pass pixel_values and image_grid_thw together")
        host = self.prepare_inputs(input_ids, attention_mask, image_grid_thw, position_ids)
        pv = None if pixel_values is None else jnp.asarray(np.asarray(pixel_values, np.float32))
        hidden, logits = hf_forward(self, host["input_ids"], host["position_ids"], host["segment_ids"],
                                    pv, host.get("vision_layout"))
        return Output(logits=logits, hidden_states=hidden, position_ids=host["position_ids"],
                      rope_deltas=host["rope_deltas"])

