"""Every parameter of the released 3B and 7B checkpoints maps onto the Flax tree with the right
shape: transformers builds the model on the meta device, we build ours abstractly (no allocation)."""
import math

import pytest
import torch
import transformers
from flax import nnx

from jaxprm.models.qwen2_5_vl import Qwen25VL
from jaxprm.models.qwen2_5_vl.convert import map_name, to_flax_shape
from jaxprm.models.qwen2_5_vl.presets import HF_CONFIGS, preset


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_every_hf_parameter_maps(name):
    hf_cfg = transformers.Qwen2_5_VLConfig(**HF_CONFIGS[name])
    with torch.device("meta"):
        hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg)
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    cfg = preset(name)
    model = nnx.eval_shape(lambda: Qwen25VL(cfg))
    ours = {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.state(model, nnx.Param).flat_state()}
    depth = {"visual": cfg.vision.depth, "language_model": cfg.text.num_hidden_layers}
    covered = {}
    for hf_name, shape in hf_shapes.items():
        m = map_name(hf_name)
        assert m is not None, hf_name
        path, layer, kind = m
        if path == ("lm_head",) and cfg.tie_word_embeddings:
            continue
        assert path in ours, f"{hf_name} -> {path} not in the Flax tree"
        expect = to_flax_shape(kind, shape)
        if layer is None:
            assert ours[path] == expect, (hf_name, ours[path], expect)
            covered[path] = 1
        else:
            assert ours[path] == (depth[path[0]], *expect), (hf_name, ours[path], expect)
            covered[path] = covered.get(path, 0) + 1
    for path in ours:
        n = depth[path[0]] if path[1:2] in (("blocks",), ("layers",)) else 1
        assert covered.get(path) == n, f"{path}: {covered.get(path)} HF tensors for {n} layers"
    n_ours = sum(math.prod(s) for s in ours.values())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf
