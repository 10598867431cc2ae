"""jaxprm: train and use vision-language process reward models (Qwen2.5-VL) in JAX/Flax.

Public API (imported lazily, so ``import jaxprm`` stays light)::

    prm = jaxprm.load_prm(path)                      # training workdir, exported PRM or HF dir
    prm.score(image, question, steps)                # per-step P(correct), np.float32
    prm.score_batch([(image, question, steps), ...])
    prm.score_candidates(image, question, [steps_1, steps_2, ...])  # shared prefix encoded once
"""
from __future__ import annotations

from jaxprm._lazy import lazy_attributes

__all__ = ["PRM", "Scorer", "load_prm"]

__getattr__, __dir__ = lazy_attributes(__name__, dict.fromkeys(__all__, "jaxprm.scoring"))
