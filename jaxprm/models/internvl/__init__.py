"""Flax NNX port of InternVL (InternViT + pixel shuffle + MLP projector + Qwen2 / Llama / InternLM2
language model) with transformers-exact numerics; loads the released remote-code checkpoints
(VisualPRM-8B, VisualPRM-8B-v1.1, InternVL2.5 / InternVL3) and transformers' native layout.

Imported lazily, like ``jaxprm.models.qwen2_5_vl``.
"""
from jaxprm._lazy import lazy_attributes

_LAZY = {
    "InternVLConfig": ".config", "VisionConfig": ".config",
    "from_pretrained": ".convert", "save_pretrained": ".convert", "checkpoint_shapes": ".convert",
    "InternVL": ".model", "Output": ".model",
    "preset": ".presets",
}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
