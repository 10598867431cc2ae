"""Named rematerialisation policies (what a layer keeps for the backward pass)."""
from __future__ import annotations

import jax

POLICIES = {
    # keep nothing: recompute the whole layer in the backward pass (least memory)
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep matmul outputs that have no batch dims (the projections); recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep every matmul output
    "dots": jax.checkpoint_policies.checkpoint_dots,
    # keep only what is tagged "attn_out" / "mlp_out" in the layer body
    "save_out": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}
NAMES = ("none",) + tuple(POLICIES)


def remat(fn, policy: str | None):
    """Wrap a scan body with ``jax.checkpoint`` under a named policy (``None``/"none": no remat)."""
    if policy in (None, "none"):
        return fn
    if policy not in POLICIES:
        raise ValueError(f"remat policy must be one of {NAMES}, got {policy!r}")
    return jax.checkpoint(fn, policy=POLICIES[policy], prevent_cse=False)
