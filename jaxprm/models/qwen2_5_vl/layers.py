"""Small pure functions shared by the vision tower and the decoder."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x, weight, eps: float):
    """Qwen2RMSNorm: statistics in fp32, normalised value cast back before the weight multiply."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def dense(x, w, b=None):
    y = jnp.einsum("...i,io->...o", x, w)
    return y if b is None else y + b


ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True), "relu": jax.nn.relu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class ParamFactory:
    """Creates ``nnx.Param``s: N(0, 0.02) kernels, zero biases, unit norm weights.

    Every dimension is given with its logical axis name, ``pf.normal(embed=D, mlp=I)``; the names
    are the param's ``out_sharding`` metadata, and ``jaxprm.sharding.RULES`` (the one rules table)
    maps them to mesh axes. Nothing is placed on devices here (``eager_sharding=False``): callers
    initialise under ``jax.jit(..., out_shardings=jaxprm.sharding.param_shardings(...))``.
    """

    def __init__(self, rngs: nnx.Rngs, param_dtype):
        self.rngs, self.dtype = rngs, param_dtype

    def normal(self, **axes: int):
        shape = tuple(axes.values())
        return param(jax.random.normal(self.rngs.params(), shape, self.dtype) * 0.02, *axes)

    def zeros(self, **axes: int):
        return param(jnp.zeros(tuple(axes.values()), self.dtype), *axes)

    def ones(self, **axes: int):
        return param(jnp.ones(tuple(axes.values()), self.dtype), *axes)


def param(value, *axes: str) -> nnx.Param:
    """An ``nnx.Param`` whose dimensions have the logical axis names ``axes``."""
    if len(axes) != value.ndim:
        raise ValueError(f"a parameter of shape {value.shape} needs {value.ndim} logical axis names, got {axes}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def values(module, dtype):
    """All params of ``module`` (its own attributes, not sub-modules') as arrays cast to ``dtype``."""
    return {n: v[...].astype(dtype) for n, v in vars(module).items() if isinstance(v, nnx.Param)}
