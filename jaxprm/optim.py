"""Optimizer: AdamW + warmup/cosine schedule + global-norm clipping (the VL-PRM recipe).

Weight decay applies to matrices only (names ending in ``_w``, embeddings, heads), not to norms
and biases, as transformers' Trainer does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_DECAY_SINGLES = {"patch_embed", "embed_tokens", "lm_head", "step_head"}


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
    raise ValueError(f"unknown schedule {kind!r}: expected cosine, linear or constant")


def make_optimizer(*, lr: float, total_steps: int, warmup_ratio: float = 0.05, schedule_kind: str = "cosine",
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 1e-4,
                   clip: float | None = 1.0, mu_dtype: str | None = None):
    sched = schedule(lr, total_steps, warmup_ratio, schedule_kind)
    chain = []
    if clip:
        chain.append(optax.clip_by_global_norm(clip))
    chain.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask,
                             mu_dtype=None if mu_dtype in (None, "float32") else jnp.dtype(mu_dtype)))
    return optax.chain(*chain), sched
