"""Optimizer: AdamW + warmup/cosine schedule + global-norm clipping (the VL-PRM recipe).

Weight decay applies to matrices only (names ending in ``_w``, embeddings, heads), not to norms
and biases, as transformers' Trainer does.

Low-memory training (what lets 7B fit on one 80 GB card): with bf16 parameters the optimizer math
still runs in fp32 (the train step upcasts gradients; Adam's moments are stored in the parameter
dtype), and the fp32 result is written back to the bf16 weights with *stochastic rounding*
(``apply_updates``). Round-to-nearest would drop every update smaller than half a bf16 ulp of the
weight (lr 1e-5 steps are ~100x smaller than that); stochastic rounding keeps them in expectation.
The random bits come from (seed, step, leaf), so a resumed run rounds exactly as an uninterrupted one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_DECAY_SINGLES = {"patch_embed", "embed_tokens", "lm_head", "step_head"}
ROUNDINGS = ("stochastic", "nearest")
SCHEDULES = ("cosine", "linear", "constant")


def decay_mask(params):
    def one(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name.endswith("_w") or name in _DECAY_SINGLES

    return jax.tree_util.tree_map_with_path(one, params)


def schedule(lr: float, total_steps: int, warmup_ratio: float = 0.05, kind: str = "cosine", end_factor: float = 0.0):
    warmup = max(int(round(total_steps * warmup_ratio)), 0)
    if kind == "cosine":
        if warmup == 0:
            return optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=end_factor)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end_value=lr * end_factor)
    if kind == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                     optax.linear_schedule(lr, lr * end_factor, max(total_steps - warmup, 1))], [warmup])
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup])
    raise ValueError(f"unknown schedule {kind!r}: expected one of {SCHEDULES}")


def stochastic_round(x, dtype, key):
    """Round fp32 ``x`` to bf16 stochastically: up with probability equal to the dropped fraction.

    Adds 16 random bits below bf16's mantissa and truncates, so E[result] = x exactly (for finite
    x whose rounding does not overflow). Other target dtypes round to nearest.
    """
    x = jnp.asarray(x, jnp.float32)
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return x.astype(dtype)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    out = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)  # exact: low bits are 0
    return jnp.where(jnp.isfinite(x), out, x.astype(jnp.bfloat16))


def apply_updates(params, updates, *, rounding: str = "stochastic", key=None):
    """``params + updates`` computed in fp32, stored back in each parameter's dtype.

    ``rounding="stochastic"`` (needs ``key``) rounds low-precision (bf16) parameters stochastically;
    ``"nearest"`` rounds to nearest. fp32 parameters are unaffected by the choice.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    leaves, treedef = jax.tree.flatten(params)
    ups = treedef.flatten_up_to(updates)
    out = []
    for i, (p, u) in enumerate(zip(leaves, ups)):
        new = p.astype(jnp.float32) + u.astype(jnp.float32)
        if rounding == "stochastic" and p.dtype == jnp.bfloat16:
            if key is None:
                raise ValueError("stochastic rounding needs a PRNG key")
            out.append(stochastic_round(new, p.dtype, jax.random.fold_in(key, i)))
        else:
            out.append(new.astype(p.dtype))
    return treedef.unflatten(out)



def make_optimizer(*, lr: float, total_steps: int, warmup_ratio: float = 0.05, schedule_kind: str = "cosine",
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 1e-4,
                   clip: float | None = 1.0, mu_dtype: str | None = None):
    """AdamW with the VL-PRM defaults. ``mu_dtype``: storage dtype of the first moment (default: the
    parameters' dtype); the second moment is stored in the parameters' dtype."""
    sched = schedule(lr, total_steps, warmup_ratio, schedule_kind)
    chain = []
    if clip:
        chain.append(optax.clip_by_global_norm(clip))
    chain.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask,
                             mu_dtype=None if mu_dtype is None else jnp.dtype(mu_dtype)))
    return optax.chain(*chain), sched
