"""Every tensor of the released VisualPRM-8B, VisualPRM-8B-v1.1 and InternVL3-8B configurations, in
both checkpoint layouts, maps onto the Flax tree with the right shape, checked abstractly
(jax.eval_shape, no weights). The native key/shape list is also checked against transformers'
InternVLForConditionalGeneration built on the meta device."""
import math

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from flax import nnx

from jaxprm.models.internvl import InternVL
from jaxprm.models.internvl.convert import checkpoint_shapes, hf_to_params
from jaxprm.models.internvl.presets import HF_CONFIGS, preset

# published totals (model cards): InternVL2.5-8B 8.08B, InternVL3-8B 7.94B parameters
TOTALS = {"visualprm-8b": 8.08e9, "visualprm-8b-v1.1": 7.94e9, "internvl3-8b": 7.94e9}


def _ours(cfg):
    model = nnx.eval_shape(lambda: InternVL(cfg))
    return {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.state(model, nnx.Param).flat_state()}


@pytest.mark.parametrize("layout", ["remote_code", "native"])
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_every_checkpoint_tensor_maps(name, layout):
    cfg = preset(name)
    if layout == "native" and cfg.llm_arch == "internlm2":
        import dataclasses
        cfg = dataclasses.replace(cfg, llm_arch="llama")  # transformers stores InternLM2 as llama
    shapes = checkpoint_shapes(cfg, layout)
    if layout == "remote_code" and name == "visualprm-8b":
        assert shapes["language_model.model.layers.0.attention.wqkv.weight"] == ((32 + 2 * 8) * 128, 4096)
        assert shapes["language_model.output.weight"] == (92553, 4096)
    abstract = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in shapes.items()}
    converted = jax.eval_shape(lambda t: hf_to_params(t, cfg, layout, jnp.bfloat16, xp=jnp), abstract)
    ours = _ours(cfg)
    assert set(converted) == set(ours), set(converted) ^ set(ours)
    for path, s in ours.items():
        assert tuple(converted[path].shape) == s, (path, converted[path].shape, s)
    n = sum(math.prod(s) for s in ours.values())
    assert n == sum(math.prod(s) for s in shapes.values())
    assert abs(n - TOTALS[name]) / TOTALS[name] < 0.01, n


@pytest.mark.parametrize("name", ["visualprm-8b", "internvl3-8b"])
def test_native_list_equals_transformers(name):
    import dataclasses
    cfg = preset(name)
    if cfg.llm_arch == "internlm2":
        cfg = dataclasses.replace(cfg, llm_arch="llama")
    hf_cfg = transformers.InternVLConfig(**cfg.to_hf_dict())
    with torch.device("meta"):
        hf = transformers.InternVLForConditionalGeneration(hf_cfg)
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert hf_shapes == checkpoint_shapes(cfg, "native")


@pytest.mark.parametrize("name", ["visualprm-8b", "internvl3-8b"])
def test_every_parameter_has_logical_axes_in_the_rules_table(name):
    """Parameters declare their logical axes like the Qwen port; the one rules table shards them."""
    from jax.sharding import PartitionSpec as P

    from jaxprm.sharding import make_mesh, param_shardings
    model = nnx.eval_shape(lambda: InternVL(preset(name)))
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    sh = param_shardings(nnx.state(model, nnx.Param), mesh)
    flat = {tuple(str(p) for p in path): v.get_value() for path, v in sh.flat_state()}
    assert flat[("language_model", "layers", "q_w")].spec == P(None, "fsdp", "tensor")
    assert flat[("vision", "blocks", "qkv_w")].spec == P(None, "fsdp", "tensor")
    # vocabularies 92553 / 151674 do not divide by 4: the vocab dimension stays replicated
    assert flat[("language_model", "embed_tokens")].spec == P(None, "fsdp")
