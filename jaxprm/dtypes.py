"""Floating-point dtypes by name: the one table of accepted names and aliases.

Names resolve through ``numpy.dtype`` (which is ``jax.numpy.dtype``; ``ml_dtypes`` registers
``bfloat16`` with numpy), so this module does not import JAX and can run in data workers.

    float_dtype("bf16")          # dtype('bfloat16')
    jax_float_type("float32")    # jnp.float32, what Flax modules take as ``dtype=``
"""
from __future__ import annotations

from typing import Any

import ml_dtypes  # registers "bfloat16" with numpy
import numpy as np

FLOAT_NAMES = ("float32", "bfloat16", "float16")
ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}


def float_dtype(dtype: Any) -> np.dtype:
    """The floating dtype named by ``dtype``: one of ``FLOAT_NAMES`` or ``ALIASES`` (any case), or a
    dtype / scalar type (``jnp.bfloat16``, ``np.float32``, ...). Raises ``ValueError`` for an unknown
    name or a non-floating dtype, ``TypeError`` for anything else."""
    if isinstance(dtype, str):
        name = ALIASES.get(dtype.lower(), dtype.lower())
        if name not in FLOAT_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(FLOAT_NAMES + tuple(ALIASES))} "
                             "or a jnp dtype")
        return np.dtype(name)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a string or a jnp dtype, got {dtype!r}") from None
    try:
        ml_dtypes.finfo(dt)  # numpy's floats and ml_dtypes' (bfloat16, float8 ...)
    except ValueError:
        raise ValueError(f"dtype must be a floating type, got {dt}") from None
    return dt


def jax_float_type(dtype: Any):
    """``float_dtype(dtype)`` as JAX's scalar type (``jnp.float32``, ``jnp.bfloat16``, ...)."""
    import jax.numpy as jnp

    return getattr(jnp, float_dtype(dtype).name)


__all__ = ["ALIASES", "FLOAT_NAMES", "float_dtype", "jax_float_type"]
