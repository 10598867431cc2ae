"""A process reward model: a vision-language backbone plus a step head read at label positions.

The backbone is Qwen2.5-VL (``jaxprm.models.qwen2_5_vl.Qwen25VL``, VL-PRM) or InternVL
(``jaxprm.models.internvl.InternVL``, VisualPRM). What the PRM needs of it is small and the same for
both: ``hidden_states(input_ids, position_ids, segment_ids, pixel_values, <vision inputs>, past_kv=,
past_segment_ids=, return_kv=)`` (final-normed decoder states, optionally with the K/V of the tokens
run, or on top of a K/V cache of a shared prefix), ``token_logits`` / ``logits`` (the "+"/"-" rows, or
all of them), ``lm_head`` / ``language_model.embed_tokens`` and ``config.text`` / ``config.image_token_id``.
The vision inputs differ and are read from the batch by ``backbone_vision_inputs``: Qwen2.5-VL's
patches come with their layout (``LAYOUT_KEYS``), InternVL's tiles with ``image_flags`` (0 = a padding tile).

The step head scores each step from the decoder state at the position that predicts the step's
assistant turn ("+" or "-"). Two heads:
- ``"lm_rows"`` (default, what VL-PRM/VisualPRM checkpoints are): the "+" and "-" rows of the
  language-model head; the full-vocabulary logits are never formed.
- ``"linear"``: a separate (D, 2) head initialised from those two rows (plus a zero bias), for
  fine-tuning the head apart from the vocabulary.
Class 0 is "+" (the step is correct), class 1 is "-". ``P(correct) = softmax([l+, l-])[0]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprm.models.qwen2_5_vl import Qwen25VL
from jaxprm.reporting import two_class_f1
from jaxprm.models.qwen2_5_vl.layers import param
from jaxprm.models.qwen2_5_vl.rope import LAYOUT_KEYS
from jaxprm.models.spec import (  # noqa: F401  (re-exported: jaxprm.models.prm.PRMSpec, HEADS, ...)
    DEFAULT_PROMPT_STYLE,
    HEADS,
    HISTORIES,
    LEGACY_PROMPT_STYLE,
    PRMSpec,
)

BACKBONES = ("qwen2_5_vl", "internvl")


def backbone_kind(backbone) -> str:
    """``"qwen2_5_vl"`` or ``"internvl"`` (a name in ``BACKBONES``) for a backbone module."""
    if isinstance(backbone, Qwen25VL):
        return "qwen2_5_vl"
    from jaxprm.models.internvl.model import InternVL

    if isinstance(backbone, InternVL):
        return "internvl"
    raise TypeError(f"unsupported PRM backbone {type(backbone).__name__}: expected Qwen25VL or InternVL")


def backbone_vision_inputs(kind: str, batch: dict):
    """The backbone's vision argument next to ``pixel_values``: Qwen2.5-VL's layout arrays, InternVL's
    ``image_flags`` (None when the batch has no images, or InternVL tiles without flags: all kept)."""
    if "pixel_values" not in batch:
        return None
    if kind == "internvl":
        return batch.get("image_flags")
    return {k: batch[k] for k in LAYOUT_KEYS}


class PRMModel(nnx.Module):
    def __init__(self, backbone, spec: PRMSpec):
        self.backbone_kind = backbone_kind(backbone)
        self.backbone, self.spec = backbone, spec
        spec.check_ids(vocab_size=backbone.config.text.vocab_size)
        if spec.head == "linear":
            rows = self._lm_rows()
            self.step_head = param(rows, "embed", "classes")
            self.step_bias = param(jnp.zeros((2,), rows.dtype), "classes")
        else:
            self.step_head = self.step_bias = None

    def _lm_rows(self):
        b, ids = self.backbone, jnp.asarray([self.spec.plus_id, self.spec.minus_id])
        if b.lm_head is None:
            return b.language_model.embed_tokens[...][ids].T
        return b.lm_head[...][:, ids]

    def head(self, h):
        """(..., D) decoder states -> (..., 2) [plus, minus] logits."""
        if self.step_head is None:
            return self.backbone.token_logits(h, [self.spec.plus_id, self.spec.minus_id])
        dt = self.backbone.dtype
        return jnp.einsum("...d,dc->...c", h, self.step_head[...].astype(dt)) + self.step_bias[...].astype(dt)

    def hidden_states(self, batch: dict, *, past_kv=None, past_segment_ids=None, return_kv: bool = False):
        """Batch from the data pipeline (or the scorer) -> (B, L, D) decoder states; with ``return_kv``
        ``(states, (k, v))``; ``past_kv`` / ``past_segment_ids``: a cached prefix the batch continues
        (see ``TextModel.__call__``)."""
        return self.backbone.hidden_states(batch["input_ids"], batch["position_ids"], batch["segment_ids"],
                                           batch.get("pixel_values"), backbone_vision_inputs(self.backbone_kind, batch),
                                           past_kv=past_kv, past_segment_ids=past_segment_ids, return_kv=return_kv)

    def step_logits(self, batch: dict, hidden=None):
        """Batch from the data pipeline -> (B, S, 2) float32 logits at ``label_positions``."""
        hidden = self.hidden_states(batch) if hidden is None else hidden
        pos = jnp.clip(batch["label_positions"], 0, hidden.shape[1] - 1)
        h = jnp.take_along_axis(hidden, pos[..., None], axis=1)
        return self.head(h).astype(jnp.float32)

    def lm_loss_sum(self, batch: dict, hidden):
        """Summed next-token cross-entropy over ``lm_token_mask(batch)`` (the auxiliary LM loss)."""
        logits = self.backbone.logits(hidden[:, :-1]).astype(jnp.float32)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["input_ids"][:, 1:, None], -1)[..., 0]
        return (ce * lm_token_mask(batch, self.backbone.config.image_token_id)).sum()


def lm_token_mask(batch: dict, image_token_id: int):
    """(B, L-1) positions whose next token is an LM target: inside one example, the next token not an
    image placeholder, and not a step-label position (the step loss owns those)."""
    seg, ids = batch["segment_ids"], batch["input_ids"]
    keep = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1]) & (ids[:, 1:] != image_token_id)
    rows = jnp.arange(seg.shape[0])[:, None]
    pos = jnp.where(batch["label_segment_ids"] > 0, batch["label_positions"], seg.shape[1] - 1)
    label_at = jnp.zeros(seg.shape, bool).at[rows, pos].set(True, mode="drop")
    return keep & ~label_at[:, :-1]


def step_probs(logits):
    """(..., 2) logits -> P(step correct)."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 0]


def step_loss(logits, labels, class_weights=(1.0, 1.0)):
    """Weighted cross-entropy over supervised steps (labels 1 = "+", 0 = "-", -1 = ignored).

    Returns (loss, metrics) where loss = sum(w * ce) / sum(w) like torch's weighted CrossEntropyLoss,
    and metrics hold sums (so they add up across micro-batches and devices): the weighted loss sum
    and weight, count of supervised steps, and confusion counts for the "-" class (error detection).
    """
    logits = logits.astype(jnp.float32)
    valid = labels >= 0
    target = jnp.where(labels == 1, 0, 1)  # class index: 0 "+", 1 "-"
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    w = jnp.where(target == 0, class_weights[0], class_weights[1]) * valid
    wsum = w.sum()
    loss = (w * ce).sum() / jnp.maximum(wsum, 1e-9)
    pred_neg = logits[..., 1] > logits[..., 0]
    is_neg = target == 1
    metrics = {
        "loss_sum": (w * ce).sum(), "weight_sum": wsum, "steps": valid.sum(),
        "correct": (valid & (pred_neg == is_neg)).sum(),
        "tp_neg": (valid & pred_neg & is_neg).sum(), "fp_neg": (valid & pred_neg & ~is_neg).sum(),
        "fn_neg": (valid & ~pred_neg & is_neg).sum(), "tn_neg": (valid & ~pred_neg & ~is_neg).sum(),
    }
    return loss, metrics


def f1_from_counts(m: dict) -> dict:
    """Accuracy, F1 of each class and their macro mean from summed ``step_loss`` metrics (host side,
    ``jaxprm.reporting.two_class_f1`` with "-" as the counted class)."""
    r = two_class_f1(*(float(m[k]) for k in ("tp_neg", "fp_neg", "fn_neg", "tn_neg")))
    return {"acc": r["accuracy"], "f1_neg": r["f1"], "f1_pos": r["f1_other"], "macro_f1": r["macro_f1"]}
