"""load_prm scores with the prompt style saved in the PRM's spec (issue 13): an export trained with
"visualprm" is scored with VisualPRM's layout, an old prm.json without the field with "chat", an HF
directory without prm.json with "vlprm"; an explicit ``prompt_style`` overrides."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxprm import checkpointing as ck
from jaxprm.models.qwen2_5_vl.convert import read_safetensors, write_safetensors
from jaxprm.scoring import PRM, load_prm

QUESTION = "How many squares?"
STEPS = ["I see 3 squares.", "So the answer is 3."]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxprm.data import synthetic as syn
    from jaxprm.data.preprocess import ImageProcessor
    from jaxprm.models.prm import PRMModel
    from jaxprm.models.qwen2_5_vl import Qwen25VL

    tok = syn.build_synthetic_tokenizer()
    cfg = syn.tiny_model_config(tok)
    spec = dataclasses.replace(ck.default_spec(tok), prompt_style="visualprm")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: PRMModel(Qwen25VL(cfg), spec)))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.2, x.shape).astype(x.dtype)), state)
    model = nnx.merge(graphdef, state)
    d = str(tmp_path_factory.mktemp("exp") / "prm")
    ck.export_hf(model, tok, ImageProcessor(), d)
    return d


def _image():
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8))


def _text(prm):
    pv, grid = prm._images(_image())
    return prm._encode(pv, grid, QUESTION, STEPS).text


def test_saved_style_is_used_and_can_be_overridden(export, tmp_path):
    prm = load_prm(export, length_buckets=(1024,), patch_buckets=(64,))
    assert prm.prompt_style.name == "visualprm" and prm.spec.prompt_style == "visualprm"
    assert "user\n### Question:\n<|vision_start|>" in _text(prm)
    assert prm.system_prompt == prm.prompt_style.system_prompt
    s_saved = prm.score(_image(), QUESTION, STEPS)

    other = PRM(prm.model, prm.tokenizer, prm.image_processor, prompt_style="vlprm",
                length_buckets=(1024,), patch_buckets=(64,))
    assert other.prompt_style.name == "vlprm" and "<|vision_end|>\n### Question:" in _text(other)
    s_other = other.score(_image(), QUESTION, STEPS)
    assert not np.allclose(s_saved, s_other)  # a different prompt is a different input
    again = load_prm(export, prompt_style="visualprm", length_buckets=(1024,), patch_buckets=(64,))
    np.testing.assert_allclose(again.score(_image(), QUESTION, STEPS), s_saved, rtol=1e-6)


def test_old_prm_json_is_chat_and_hf_dir_is_vlprm(export, tmp_path):
    old = str(tmp_path / "old")
    shutil.copytree(export, old)
    p = os.path.join(old, "prm.json")
    d = json.loads(open(p).read())
    del d["prompt_style"]
    open(p, "w").write(json.dumps(d))
    prm = load_prm(old, length_buckets=(1024,), patch_buckets=(64,))
    assert prm.prompt_style.name == "chat"
    assert "user\n<|vision_start|>" in _text(prm) and "<|vision_end|>### Question:" in _text(prm)

    hf = str(tmp_path / "hf")
    shutil.copytree(export, hf)
    os.remove(os.path.join(hf, "prm.json"))
    m = os.path.join(hf, "model.safetensors")
    write_safetensors(m, {k: np.array(v) for k, v in read_safetensors(m).items()})  # as transformers writes it
    prm = load_prm(hf, length_buckets=(1024,), patch_buckets=(64,))
    assert prm.prompt_style.name == "vlprm"  # the released VL-PRM checkpoints' training layout
    assert "<|vision_end|>\n### Question:" in _text(prm)
