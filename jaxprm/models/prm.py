"""A process reward model: the Qwen2.5-VL backbone plus a step head read at label positions.

The step head scores each step from the decoder state at the position that predicts the step's
assistant turn ("+" or "-"). Two heads:
- ``"lm_rows"`` (default, what VL-PRM/VisualPRM checkpoints are): the "+" and "-" rows of the
  language-model head; the full-vocabulary logits are never formed.
- ``"linear"``: a separate (D, 2) head initialised from those two rows (plus a zero bias), for
  fine-tuning the head apart from the vocabulary.
Class 0 is "+" (the step is correct), class 1 is "-". ``P(correct) = softmax([l+, l-])[0]``.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprm.models.qwen2_5_vl import Qwen25VL
from jaxprm.models.qwen2_5_vl.layers import param
from jaxprm.models.qwen2_5_vl.model import LAYOUT_KEYS

HEADS = ("lm_rows", "linear")


@dataclasses.dataclass(frozen=True)
class PRMSpec:
    """What turns a backbone into a PRM; saved as ``prm.json`` next to weights."""

    plus_id: int
    minus_id: int
    head: str = "lm_rows"
    system_prompt: str | None = None  # None: jaxprm.data.prompt.PRM_SYSTEM_PROMPT

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"PRM head must be one of {HEADS}, got {self.head!r}")
        if self.plus_id == self.minus_id:
            raise ValueError("plus_id and minus_id must differ")

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "prm.json"), "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "PRMSpec | None":
        p = os.path.join(directory, "prm.json")
        if not os.path.exists(p):
            return None
        with open(p) as f:
            return cls(**json.load(f))


class PRMModel(nnx.Module):
    def __init__(self, backbone: Qwen25VL, spec: PRMSpec):
        self.backbone, self.spec = backbone, spec
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

    def step_logits(self, batch: dict):
        """Batch from the data pipeline -> (B, S, 2) float32 logits at ``label_positions``."""
        layout = {k: batch[k] for k in LAYOUT_KEYS} if "pixel_values" in batch else None
        hidden = self.backbone.hidden_states(batch["input_ids"], batch["position_ids"], batch["segment_ids"],
                                             batch.get("pixel_values"), layout)
        pos = jnp.clip(batch["label_positions"], 0, hidden.shape[1] - 1)
        h = jnp.take_along_axis(hidden, pos[..., None], axis=1)
        return self.head(h).astype(jnp.float32)


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
    """Accuracy, F1 of each class and their macro mean from summed ``step_loss`` metrics."""
    tp, fp, fn, tn = (float(m[k]) for k in ("tp_neg", "fp_neg", "fn_neg", "tn_neg"))

    def f1(tp_, fp_, fn_):
        return 2 * tp_ / (2 * tp_ + fp_ + fn_) if tp_ + fp_ + fn_ else 0.0

    f_neg, f_pos = f1(tp, fp, fn), f1(tn, fn, fp)
    n = tp + fp + fn + tn
    return {"acc": (tp + tn) / n if n else 0.0, "f1_neg": f_neg, "f1_pos": f_pos, "macro_f1": (f_neg + f_pos) / 2}
