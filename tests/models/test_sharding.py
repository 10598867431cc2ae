"""Sharding on a (data=2, fsdp=2, tensor=2) mesh of 8 virtual CPU devices: every parameter is placed
as the logical axes it was created with say (through the one rules table), and the decoder's
residual stream is constrained to (batch -> data x fsdp, length -> replicated, embed -> replicated)
when a mesh is set, and not at all without one."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxprm import checkpointing as ckpt
from jaxprm import sharding as shd
from jaxprm.data.synthetic import build_synthetic_tokenizer, tiny_model_config
from jaxprm.models.prm import PRMModel
from jaxprm.models.qwen2_5_vl import Qwen25VL

assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"

BATCH = ("data", "fsdp")
RESIDUAL = P(BATCH, None, None)  # (B, L, D)

# what the rules table says for the tiny model (every dimension here divides its mesh axes)
EXPECTED = {
    "backbone/language_model/embed_tokens": P("tensor", "fsdp"),  # (vocab, embed)
    "backbone/language_model/norm": P(None),
    "backbone/language_model/layers/input_norm": P(None, None),  # (layers, norm)
    "backbone/language_model/layers/q_w": P(None, "fsdp", "tensor"),  # (layers, embed, heads)
    "backbone/language_model/layers/q_b": P(None, "tensor"),
    "backbone/language_model/layers/k_w": P(None, "fsdp", "tensor"),  # (layers, embed, kv)
    "backbone/language_model/layers/v_b": P(None, "tensor"),
    "backbone/language_model/layers/o_w": P(None, "tensor", "fsdp"),  # (layers, heads, embed)
    "backbone/language_model/layers/gate_w": P(None, "fsdp", "tensor"),  # (layers, embed, mlp)
    "backbone/language_model/layers/down_w": P(None, "tensor", "fsdp"),  # (layers, mlp, embed)
    "backbone/lm_head": P("fsdp", "tensor"),  # (embed, vocab)
    "backbone/visual/patch_embed": P(None, "fsdp"),  # (patch, embed)
    "backbone/visual/blocks/qkv_w": P(None, "fsdp", "tensor"),
    "backbone/visual/blocks/proj_w": P(None, "tensor", "fsdp"),
    "backbone/visual/blocks/proj_b": P(None, None),
    "backbone/visual/blocks/up_b": P(None, "tensor"),
    "backbone/visual/merger/fc1_w": P("fsdp", "tensor"),
    "backbone/visual/merger/fc2_w": P("tensor", "fsdp"),
    "step_head": P("fsdp", None),  # (embed, classes)
    "step_bias": P(None),
}


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def placed(mesh):
    """The tiny PRM with a linear head, initialised straight into its shardings (as train.py does)."""
    tok = build_synthetic_tokenizer()
    cfg = tiny_model_config(tok)
    assert not cfg.tie_word_embeddings
    build = lambda: PRMModel(Qwen25VL(cfg, rngs=nnx.Rngs(0)), ckpt.default_spec(tok, head="linear"))  # noqa: E731
    model = nnx.eval_shape(build)
    shardings = shd.param_shardings(nnx.state(model, nnx.Param), mesh)
    nnx.update(model, jax.jit(lambda: nnx.state(build(), nnx.Param), out_shardings=shardings)())
    return model, shardings


def _flat(state) -> dict:
    return {"/".join(map(str, path)): v.get_value() for path, v in state.flat_state()}


def test_parameters_are_placed_by_their_logical_axes(placed, mesh):
    model, shardings = placed
    wanted = _flat(shardings)
    arrays = _flat(nnx.state(model, nnx.Param))
    assert set(wanted) == set(arrays)
    for name, spec in EXPECTED.items():
        assert wanted[name].spec == spec, name
        assert arrays[name].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), arrays[name].ndim), name
    for name, a in arrays.items():  # every parameter, not only the listed ones
        assert a.sharding.is_equivalent_to(wanted[name], a.ndim), name
        axes = shd.param_axes(_var(model, name))
        assert len(axes) == a.ndim, name
        if axes[0] == "layers":  # scanned layer stacks are never split
            assert wanted[name].spec[0] is None, name


def _var(model, name):
    node = model
    for k in name.split("/"):
        node = getattr(node, k)
    return node


def test_dimensions_the_mesh_does_not_divide_stay_replicated(mesh):
    p = nnx.Param(np.zeros((3, 6), np.float32), out_sharding=("embed", "mlp"), eager_sharding=False)
    assert shd.spec_for(p.shape, shd.param_axes(p), mesh) == P(None, "tensor")


def test_a_parameter_without_logical_axes_is_an_error(mesh):
    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.zeros((4, 4), np.float32))

    with pytest.raises(ValueError, match="logical axes"):
        shd.param_shardings(nnx.state(Bare(), nnx.Param), mesh)


def _constraints(jaxpr, out=None) -> list:
    """Shardings of every ``sharding_constraint`` in a jaxpr, including scan/remat bodies."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            out.append(eqn.params["sharding"])
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                if hasattr(sub, "eqns"):
                    _constraints(sub, out)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    _constraints(sub.jaxpr, out)
    return out


def test_residual_stream_is_sharded_over_the_batch(placed, mesh):
    model, _ = placed
    graphdef, state = nnx.split(model)
    b, l = 4, 16
    ids = np.random.default_rng(0).integers(0, 100, (b, l)).astype(np.int32)
    pos = np.broadcast_to(np.arange(l, dtype=np.int32), (3, b, l)).copy()
    batch = shd.shard_batch({"input_ids": ids, "position_ids": pos, "segment_ids": np.ones((b, l), np.int32)}, mesh)
    seen = []

    def hidden(state, batch):
        h = nnx.merge(graphdef, state).backbone.hidden_states(batch["input_ids"], batch["position_ids"],
                                                               batch["segment_ids"])
        jax.debug.inspect_array_sharding(h, callback=seen.append)  # the compiled program's choice
        return h

    # without a mesh (single-device code, the parity tests) the model adds no constraint
    assert _constraints(jax.make_jaxpr(hidden)(state, batch).jaxpr) == []
    with jax.set_mesh(mesh):
        annotated = _constraints(jax.make_jaxpr(hidden)(state, batch).jaxpr)
        h = jax.jit(hidden)(state, batch)
    # embeddings in, every layer's output (inside the scan), the final norm
    assert len(annotated) >= 3
    assert all(s.spec == RESIDUAL for s in annotated), annotated
    assert seen and seen[0].is_equivalent_to(jax.sharding.NamedSharding(mesh, RESIDUAL), 3)
    assert h.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, RESIDUAL), 3)
