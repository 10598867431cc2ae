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
    """Creates ``nnx.Param``s: N(0, 0.02) kernels, zero biases, unit norm weights."""

    def __init__(self, rngs: nnx.Rngs, param_dtype):
        self.rngs, self.dtype = rngs, param_dtype

    def normal(self, *shape):
        return nnx.Param(jax.random.normal(self.rngs.params(), shape, self.dtype) * 0.02)

    def zeros(self, *shape):
        return nnx.Param(jnp.zeros(shape, self.dtype))

    def ones(self, *shape):
        return nnx.Param(jnp.ones(shape, self.dtype))


def values(module, names, dtype):
    """Read the named params of ``module`` as arrays cast to the compute ``dtype``."""
    return {n: getattr(module, n)[...].astype(dtype) for n in names}
