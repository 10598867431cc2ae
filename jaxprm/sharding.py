"""The one place for sharding: the device mesh and the logical-axis rules.

Every parameter has logical axis names (``param_axes``); ``RULES`` maps logical names to mesh
axes. The mesh has three axes:
- ``data``: pure data parallelism (replicated params),
- ``fsdp``: data parallelism with params and optimizer state sharded along ``embed`` (ZeRO-3 style),
- ``tensor``: tensor parallelism over heads / MLP width / vocabulary.
Batches are split over ``("data", "fsdp")``. A dimension that the mesh axis does not divide is
left replicated, so tiny models run on any mesh.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("patch", None),
    ("norm", None),
    ("classes", None),
)

_BLOCK = {  # stacked per-layer params: leading "layers" axis
    "norm1": ("norm",), "norm2": ("norm",), "input_norm": ("norm",), "post_norm": ("norm",),
    "qkv_w": ("embed", "heads"), "qkv_b": ("heads",), "proj_w": ("heads", "embed"), "proj_b": ("norm",),
    "q_w": ("embed", "heads"), "q_b": ("heads",), "k_w": ("embed", "kv"), "k_b": ("kv",),
    "v_w": ("embed", "kv"), "v_b": ("kv",), "o_w": ("heads", "embed"),
    "gate_w": ("embed", "mlp"), "gate_b": ("mlp",), "up_w": ("embed", "mlp"), "up_b": ("mlp",),
    "down_w": ("mlp", "embed"), "down_b": ("norm",),
}
_SINGLE = {
    "patch_embed": ("patch", "embed"), "ln_q": ("norm",), "fc1_w": ("embed", "mlp"), "fc1_b": ("mlp",),
    "fc2_w": ("mlp", "embed"), "fc2_b": ("norm",), "embed_tokens": ("vocab", "embed"), "norm": ("norm",),
    "lm_head": ("embed", "vocab"), "step_head": ("embed", "classes"), "step_bias": ("classes",),
}


def param_axes(path: tuple) -> tuple[str, ...]:
    """Logical axes of the parameter at ``path`` (a tuple of keys in the NNX state)."""
    keys = [str(k) for k in path]
    name = keys[-1]
    if ("blocks" in keys or "layers" in keys) and name in _BLOCK:
        return ("layers",) + _BLOCK[name]
    if name in _SINGLE:
        return _SINGLE[name]
    raise KeyError(f"no logical axes for parameter {'/'.join(keys)}; add it to jaxprm/sharding.py")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one of the sizes may be -1 (= all remaining devices)."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices are not divisible by fsdp*tensor*... = {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                         f"does not match the {n} available devices")
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(tuple(sizes), devices=devices)
    except Exception:  # non-TPU/odd topologies: plain order
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, AXES)


def spec_for(shape, logical: tuple[str, ...], mesh: Mesh, rules=RULES) -> P:
    table = dict(rules)
    out, used = [], set()
    for dim, name in zip(shape, logical):
        axes = table.get(name)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def param_shardings(state, mesh: Mesh, rules=RULES):
    """NamedShardings for an NNX param state (or its pure dict), following ``param_axes``."""
    def one(path, x):
        keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
        keys = tuple(k for k in keys if k != "value")
        return NamedSharding(mesh, spec_for(x.shape, param_axes(keys), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, state)


def opt_state_shardings(opt_abstract, param_sh, mesh: Mesh):
    """Optimizer state: every sub-tree shaped like the params shards like them (Adam's moments);
    everything else (step counts, schedule state) is replicated."""
    repl = NamedSharding(mesh, P())
    p_struct = jax.tree.structure(param_sh)
    p_leaves = jax.tree.leaves(param_sh)

    def walk(node):
        try:
            if jax.tree.structure(node) == p_struct:
                return jax.tree.unflatten(p_struct, p_leaves)
        except Exception:
            pass
        if isinstance(node, jax.ShapeDtypeStruct):
            return repl
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*[walk(x) for x in node])
        if isinstance(node, (tuple, list)):
            return type(node)(walk(x) for x in node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return jax.tree.map(lambda _: repl, node)

    return walk(opt_abstract)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Split dimension ``batch_axis`` over (data, fsdp); everything else replicated."""
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, P(*spec))


BATCH_AXIS = {"position_ids": 1}  # (3, B, L): the batch is the second dimension


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch (this process's rows) -> global jax arrays split over (data, fsdp)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sh = batch_sharding(mesh, v.ndim, BATCH_AXIS.get(k, 0))
        if jax.process_count() == 1:
            out[k] = jax.device_put(v, sh)
        else:
            out[k] = jax.make_array_from_process_local_data(sh, v)
    return out
