"""jaxprm: train and use vision-language process reward models (Qwen2.5-VL) in JAX/Flax.

Public API (imported lazily, so ``import jaxprm`` stays light)::

    prm = jaxprm.load_prm(path)                      # training workdir, exported PRM or HF dir
    prm.score(image, question, steps)                # per-step P(correct), np.float32
    prm.score_batch([(image, question, steps), ...])
    prm.score_candidates(image, question, [steps_1, steps_2, ...])  # shared prefix encoded once
"""
from __future__ import annotations

import importlib

__all__ = ["PRM", "Scorer", "load_prm"]

_LAZY = {"PRM": "jaxprm.scoring", "Scorer": "jaxprm.scoring", "load_prm": "jaxprm.scoring"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'jaxprm' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
