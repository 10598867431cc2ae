"""Flax NNX port of Qwen2.5-VL with transformers-exact numerics.

Imported lazily: ``jaxprm.models.qwen2_5_vl.rope`` (numpy only) is used in Grain workers, which
should not pay for importing JAX/Flax.
"""
import importlib

_LAZY = {
    "Qwen25VLConfig": ".config", "TextConfig": ".config", "VisionConfig": ".config",
    "from_pretrained": ".convert", "save_pretrained": ".convert",
    "Output": ".model", "Qwen25VL": ".model",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
