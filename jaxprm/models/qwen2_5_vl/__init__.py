"""Flax NNX port of Qwen2.5-VL with transformers-exact numerics.

Imported lazily: ``jaxprm.models.qwen2_5_vl.rope`` (numpy only) is used in Grain workers, which
should not pay for importing JAX/Flax.
"""
from jaxprm._lazy import lazy_attributes

_LAZY = {
    "Qwen25VLConfig": ".config", "TextConfig": ".config", "VisionConfig": ".config",
    "from_pretrained": ".convert", "save_pretrained": ".convert",
    "Output": ".model", "Qwen25VL": ".model",
}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
