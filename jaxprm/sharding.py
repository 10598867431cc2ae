"""The one place for sharding: the device mesh and the logical-axis rules.

Every parameter names its logical axes where it is created (``out_sharding`` metadata of the
``nnx.Param``, see ``jaxprm.models.qwen2_5_vl.layers.ParamFactory``), and the model names the axes of
the activations it constrains (``constrain``). ``RULES``, the one rules table, maps logical names
to mesh axes. The mesh has three axes:
- ``data``: pure data parallelism (replicated params),
- ``fsdp``: data parallelism with params and optimizer state sharded along ``embed`` (ZeRO-3 style),
- ``tensor``: tensor parallelism over heads / MLP width / vocabulary.
Batches are split over ``("data", "fsdp")``. A dimension that the mesh axis does not divide is
left replicated, so tiny models run on any mesh.
"""
from __future__ import annotations

import contextvars
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    # the residual stream's hidden dimension: replicated (fsdp shards weights, not activations;
    # tensor-parallel matmuls all-reduce back to a full residual, Megatron style)
    ("activation_embed", None),
    ("layers", None),  # stacked (scanned) layers: never sharded
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("patch", None),
    ("norm", None),  # norm weights and biases of embed-sized outputs: small, replicated
    ("classes", None),
)


def param_axes(var: nnx.Variable) -> tuple[str, ...]:
    """Logical axes of a parameter: the names it was created with (its ``out_sharding`` metadata)."""
    axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    if axes is None or len(axes) != len(var.shape):
        raise ValueError(f"parameter of shape {getattr(var, 'shape', '?')} has logical axes {axes}; create it "
                         "with one name per dimension (jaxprm.models.qwen2_5_vl.layers.param)")
    return tuple(axes)


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


def spec_for(shape, logical: tuple[str, ...], mesh, rules=RULES) -> P:
    """PartitionSpec of an array with these logical axes on ``mesh`` (a Mesh or AbstractMesh).

    A mesh axis is used at most once, axes of size 1 (or missing from the mesh) are dropped, and a
    dimension that its mesh axes do not divide stays replicated."""
    table = dict(rules)
    out, used = [], set(_MAPPED_AXES.get())
    for dim, name in zip(shape, logical):
        if name not in table:
            raise KeyError(f"logical axis {name!r} is not in the rules table; add it to jaxprm/sharding.py RULES")
        axes = table[name]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def param_shardings(state, mesh: Mesh, rules=RULES):
    """NamedShardings for an NNX param state (same structure), from each parameter's logical axes."""
    def one(var):
        return var.replace(NamedSharding(mesh, spec_for(var.shape, param_axes(var), mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# Mesh axes that an enclosing ``vmap_rows`` maps its rows over (its ``spmd_axis_name``): inside it
# they are taken, so ``spec_for`` never gives them to another dimension.
_MAPPED_AXES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("jaxprm_mapped_axes", default=())


def batch_axis_names(rows: int) -> tuple[str, ...] | None:
    """The mesh axes the "batch" rule splits ``rows`` rows over, on the mesh set with ``jax.set_mesh``
    (None without a mesh, or when they do not divide ``rows``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes = spec_for((rows,), ("batch",), mesh)[0]
    return None if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def vmap_rows(fn, rows: int):
    """``jax.vmap(fn)`` over ``rows`` rows that stay split over the mesh's batch axes inside
    (``spmd_axis_name``): a ``shard_map`` in ``fn`` (the Pallas attention kernels) then runs on each
    device's rows instead of gathering every row onto every device."""
    axes = batch_axis_names(rows)
    mapped = jax.vmap(fn, spmd_axis_name=axes)

    def call(*args):
        token = _MAPPED_AXES.set(_MAPPED_AXES.get() + (axes or ()))
        try:
            return mapped(*args)
        finally:
            _MAPPED_AXES.reset(token)

    return call


def constrain(x, logical: tuple[str, ...], rules=RULES):
    """``with_sharding_constraint`` of an activation by its logical axes, on the mesh set with
    ``jax.set_mesh`` (read at trace time); without a mesh (single-device code) ``x`` unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(x.shape, logical, mesh, rules))


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
    """Split dimension ``batch_axis`` as the ``batch`` rule says (data, fsdp); the rest replicated."""
    spec = [None] * ndim
    spec[batch_axis] = dict(RULES)["batch"]
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
