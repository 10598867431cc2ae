"""What the vision-language backbones (``qwen2_5_vl``, ``internvl``) share around their decoder: the
language model + lm head (tied to the token embeddings or its own (embed, vocab) param), the scatter
of image features over the image-placeholder tokens, the host-side normalisation of ``input_ids`` /
``attention_mask``, and the jitted transformers-style forward.

A backbone subclasses ``VisionLanguageModel`` and builds its vision tower in ``init_vision``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprm.models.qwen2_5_vl.layers import ParamFactory
from jaxprm.models.qwen2_5_vl.text import TextModel


@dataclasses.dataclass
class Output:
    """What ``model(input_ids, ...)`` returns (transformers' ``.logits``, plus the inputs' positions)."""
    logits: Any
    hidden_states: Any
    position_ids: np.ndarray


def scatter_features(x, input_ids, token_id, features):
    """Token embeddings ``x`` (B, L, D) with ``features`` (N, D) put, in order, over the positions
    where ``input_ids == token_id`` (row-major over the batch)."""
    mask = input_ids == token_id
    idx = jnp.cumsum(mask.reshape(-1)) - 1
    picked = features.astype(x.dtype)[jnp.clip(idx, 0, features.shape[0] - 1)]
    return jnp.where(mask[..., None], picked.reshape(x.shape), x)


def host_ids_and_mask(input_ids, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """(L,) or (B, L) ids and an optional 0/1 mask -> (B, L) ids and (B, L) int32 mask (all ones
    when none is given)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    return ids, mask


class VisionLanguageModel(nnx.Module):
    """Language model + lm head of a backbone; the backbone builds its vision tower in ``init_vision``
    (called first: the params draw from ``rngs`` in creation order) and adds ``hidden_states``.
    ``config`` has ``.text`` (a ``TextConfig``) and ``.tie_word_embeddings``."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=None, attn_impl: str = "auto",
                 remat_policy: str | None = None, rngs: nnx.Rngs | None = None):
        param_dtype = dtype if param_dtype is None else param_dtype
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config, self.dtype = config, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, attn_impl=attn_impl, remat_policy=remat_policy, rngs=rngs)
        self.init_vision(config, **kw)
        self.language_model = TextModel(config.text, **kw)
        t = config.text
        self.lm_head = None if config.tie_word_embeddings else ParamFactory(rngs, param_dtype).normal(
            embed=t.hidden_size, vocab=t.vocab_size)

    def init_vision(self, config, *, dtype, param_dtype, attn_impl, remat_policy, rngs):
        raise NotImplementedError

    def lm_head_weight(self):
        w = self.language_model.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return w.astype(self.dtype)

    def logits(self, hidden):
        return jnp.einsum("...d,dv->...v", hidden, self.lm_head_weight())

    def token_logits(self, hidden, token_ids):
        """Logits of the given vocabulary rows only: (..., D) x (len(token_ids),) -> (..., len(token_ids))."""
        if self.lm_head is None:
            w = self.language_model.embed_tokens[...][jnp.asarray(token_ids)].T
        else:
            w = self.lm_head[...][:, jnp.asarray(token_ids)]
        return jnp.einsum("...d,dv->...v", hidden, w.astype(self.dtype))


@nnx.jit
def hf_forward(model, input_ids, position_ids, segment_ids, pixel_values, vision_inputs):
    """The jitted body of a backbone's ``__call__``: (final-normed hidden states, full-vocabulary
    logits). ``vision_inputs`` is the backbone's fifth ``hidden_states`` argument (Qwen2.5-VL's
    vision layout, InternVL's image flags)."""
    h = model.hidden_states(input_ids, position_ids, segment_ids, pixel_values, vision_inputs)
    return h, model.logits(h)
