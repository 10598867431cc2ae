"""Parity of the Flax InternVL port against transformers' InternVLForConditionalGeneration (fp32, CPU),
for both checkpoint layouts, and of the InternLM2 path against an InternLM2 reference."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxprm.models import internvl as iv
from jaxprm.models.internvl.vision import bicubic_matrix, pixel_shuffle

from . import hf_reference as R

TOL = 1e-4
ROWS = [[5, 7, 3, 2], [4, 6], [9]]  # row 0: three images; row 1: one image, left-padded; row 2: text only
TILES = [1, 3, 5, 2]  # tiles per image (several tiles = a grid plus its thumbnail)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    hf = R.build_hf_model(R.tiny_config("qwen2"), seed=0)
    d = str(tmp_path_factory.mktemp("qwen"))
    hf.save_pretrained(d)
    return hf, iv.from_pretrained(d), d


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory):
    """A Llama-shaped InternVL (transformers) and the same weights in the remote-code layout with an
    InternLM2 language model (packed wqkv, w1/w2/w3, ...), bf16 on disk in two shards."""
    hf = R.build_hf_model(R.tiny_config("llama"), seed=3, bf16_values=True)
    d = str(tmp_path_factory.mktemp("internlm2"))
    R.save_remote_code(hf, d, internlm2=True, shards=2, dtype=torch.bfloat16)
    return hf, iv.from_pretrained(d), d


def _max_err(got, ref, mask):
    return float(np.abs(np.asarray(got) - ref)[mask.astype(bool)].max())


def test_qwen2_images_tiles_padding_text_only(qwen):
    hf, fm, _ = qwen
    ids, mask, pv = R.make_inputs(ROWS, TILES, seed=1)
    assert (mask == 0).any()
    err = _max_err(fm(ids, attention_mask=mask, pixel_values=pv).logits, R.hf_logits(hf, ids, mask, pv), mask)
    assert err < TOL, err


def test_internlm2_remote_code_layout(internlm2):
    hf, fm, _ = internlm2
    assert fm.config.llm_arch == "internlm2" and fm.config.image_token_id == R.IMG_CONTEXT
    ids, mask, pv = R.make_inputs(ROWS, TILES, seed=1)
    err = _max_err(fm(ids, attention_mask=mask, pixel_values=pv).logits, R.hf_logits(hf, ids, mask, pv), mask)
    assert err < TOL, err


def test_qwen2_remote_code_layout(tmp_path, qwen):
    """InternVL3 / VisualPRM-8B-v1.1 ship the remote-code layout with a Qwen2 language model."""
    hf, _, _ = qwen
    R.save_remote_code(hf, str(tmp_path), internlm2=False)
    fm = iv.from_pretrained(str(tmp_path))
    assert fm.config.llm_arch == "qwen2" and fm.config.template == "internvl2_5"
    ids, mask, pv = R.make_inputs(ROWS, TILES, seed=1)
    err = _max_err(fm(ids, attention_mask=mask, pixel_values=pv).logits, R.hf_logits(hf, ids, mask, pv), mask)
    assert err < TOL, err


def test_internlm2_against_reference(internlm2):
    """The InternLM2 decoder from its own weights (packed wqkv read with the published grouping), with
    image features scattered by transformers, against an independent InternLM2 forward."""
    hf, fm, d = internlm2
    from jaxprm.models.qwen2_5_vl.convert import read_checkpoint_tensors
    sd = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in read_checkpoint_tensors(d).items()}
    cfg = json.load(open(os.path.join(d, "config.json")))["llm_config"]
    ids, mask, pv = R.make_inputs([[3, 5, 2], [6]], [2, 1], seed=4)
    with torch.no_grad():
        emb = hf.model.get_input_embeddings()(torch.tensor(ids))
        feats = hf.model.get_image_features(torch.tensor(pv)).pooler_output
        emb = emb.masked_scatter((torch.tensor(ids) == R.IMG_CONTEXT)[..., None], feats.reshape(-1, emb.shape[-1]))
        ref = R.internlm2_logits(sd, cfg, ids, mask, inputs_embeds=emb)
    err = _max_err(fm(ids, attention_mask=mask, pixel_values=pv).logits, ref, mask)
    assert err < TOL, err


def test_vision_tower_layer_by_layer(qwen):
    hf, fm, _ = qwen
    _, _, pv = R.make_inputs([[1, 1]], [3], seed=5)
    with torch.no_grad():
        out = hf.model.vision_tower(pixel_values=torch.tensor(pv), output_hidden_states=True)
        feats = hf.model.get_image_features(torch.tensor(pv)).pooler_output.numpy()
    n = fm.config.vision.num_hidden_layers
    assert len(out.hidden_states) == n + 1
    encode = nnx.jit(lambda model, x, i: model.vision.encode(x, i), static_argnums=2)
    for i in range(n + 1):  # embeddings, then every block's output
        np.testing.assert_allclose(np.asarray(encode(fm, jnp.asarray(pv), i)), out.hidden_states[i].numpy(),
                                   atol=1e-5, rtol=0, err_msg=f"vision hidden state {i}")
    np.testing.assert_allclose(np.asarray(fm.image_features(jnp.asarray(pv))), feats, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 4, 4, 8), (1, 6, 6, 4), (3, 32, 32, 2)])
def test_pixel_shuffle(qwen, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = qwen[0].model.pixel_shuffle(torch.tensor(x), scale_factor=0.5).numpy()
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), 0.5)), ref)


@pytest.mark.parametrize("out_in", [(6, 4), (3, 4), (5, 4), (7, 32), (32, 32), (23, 16)])
def test_bicubic_matrix_equals_torch_interpolate(out_in):
    o, i = out_in
    x = torch.randn(1, 3, i, i, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(x, size=(o, o), mode="bicubic", align_corners=False).numpy()
    m = bicubic_matrix(o, i)
    np.testing.assert_allclose(np.einsum("hi,cij,wj->chw", m, x[0].numpy(), m), ref[0], atol=1e-12)


@pytest.mark.parametrize("hw", [(84, 84), (42, 70)])
def test_position_embedding_resize(qwen, hw):
    """Tiles whose patch grid differs from the configured one get bicubic-resized position embeddings."""
    hf, fm, _ = qwen
    pv = np.random.default_rng(6).standard_normal((2, 3, *hw)).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=torch.tensor(pv)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(fm.vision.encode(jnp.asarray(pv))), ref, atol=1e-5, rtol=0)


def test_vision_variants_rms_norm_qk_norm_post_layernorm_select_layer(tmp_path):
    """InternViT-6B-style options: RMSNorm, qk-normalisation, no qkv bias, the final LayerNorm of
    transformers' use_mean_pooling=False, and select_layer (vision_feature_layer) -2."""
    vision = dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False, use_mean_pooling=False)
    hf = R.build_hf_model(R.tiny_config("qwen2", vision=vision), seed=7)
    hf.save_pretrained(str(tmp_path))
    fm = iv.from_pretrained(str(tmp_path))
    assert fm.config.vision.qk_normalization and fm.config.vision.post_layernorm
    ids, mask, pv = R.make_inputs([[2, 3], [4, 2, 1]], [2, 1, 3], seed=8)
    err = _max_err(fm(ids, attention_mask=mask, pixel_values=pv).logits, R.hf_logits(hf, ids, mask, pv), mask)
    assert err < TOL, err
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["vision_feature_layer"] = -2
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    fm2 = iv.from_pretrained(str(tmp_path))
    assert fm2.config.vision_layers_used == 2
    with torch.no_grad():
        ref = hf.model.get_image_features(torch.tensor(pv), vision_feature_layer=-2).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(fm2.image_features(jnp.asarray(pv))), ref, atol=1e-5, rtol=0)


def test_tied_head_text_only(tmp_path):
    hf = R.build_hf_model(R.tiny_config("qwen2", tie=True), seed=9)
    assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    hf.save_pretrained(str(tmp_path))
    fm = iv.from_pretrained(str(tmp_path))
    assert fm.lm_head is None
    # as in transformers, the top-level flag (default True) decides, not text_config's
    d = R.tiny_config("qwen2", tie=False).to_dict()
    d.pop("tie_word_embeddings")
    assert iv.InternVLConfig.from_hf_dict(d).tie_word_embeddings
    assert transformers.InternVLConfig(**{k: v for k, v in d.items() if k != "model_type"}).tie_word_embeddings
    ids, mask, _ = R.make_inputs([[7], [12]], [], seed=10)
    err = _max_err(fm(ids, attention_mask=mask).logits, R.hf_logits(hf, ids, mask, None), mask)
    assert err < TOL, err


def test_image_flags_and_per_row_tiles(qwen):
    """Tiles flagged 0 are dropped (the remote code's image_flags); the per-row (B, N, C, H, W) form
    with padding tiles gives the same states as the flat one."""
    _, fm, _ = qwen
    ids, mask, pv = R.make_inputs([[3, 4], [2, 5]], [2, 1], seed=11)
    base = np.asarray(fm(ids, attention_mask=mask, pixel_values=pv).logits)
    dummy = np.random.default_rng(0).standard_normal((1, *pv.shape[1:])).astype(np.float32)
    pv2 = np.concatenate([pv[:2], dummy, pv[2:]])
    flags = np.array([1, 1, 0, 1])
    got = np.asarray(fm(ids, attention_mask=mask, pixel_values=pv2, image_flags=flags).logits)
    np.testing.assert_allclose(got, base, atol=1e-5)
    host = fm.prepare_inputs(ids, mask)
    per_row = np.stack([pv[:2], np.concatenate([pv[2:], dummy])])  # (2, 2, C, H, W): row 1 has a padding tile

    @nnx.jit
    def per_row_logits(model, ids, pos, seg, pv, flags):
        return model.logits(model.hidden_states(ids, pos, seg, pv, flags))

    got = per_row_logits(fm, host["input_ids"], host["position_ids"], host["segment_ids"], jnp.asarray(per_row),
                         jnp.asarray([[1, 1], [1, 0]]))
    np.testing.assert_allclose(np.asarray(got), base, atol=1e-5)


def test_save_pretrained_native_round_trip(tmp_path, qwen, internlm2):
    """Our params written in the native layout load into transformers with the original values (an
    InternLM2 model is written as its Llama equivalent)."""
    for name, (hf, fm, _) in {"qwen": qwen, "internlm2": internlm2}.items():
        d = str(tmp_path / name)
        iv.save_pretrained(fm, d)
        hf2 = transformers.InternVLForConditionalGeneration.from_pretrained(d).eval()
        ref, got = hf.state_dict(), hf2.state_dict()
        assert set(ref) == set(got), name
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=f"{name}: {k}")


def test_errors_name_the_tensor(tmp_path, internlm2):
    from jaxprm.models.qwen2_5_vl.convert import read_checkpoint_tensors, write_safetensors
    _, fm, d = internlm2
    t = {k: np.array(v) for k, v in read_checkpoint_tensors(d).items()}
    cfg = json.load(open(os.path.join(d, "config.json")))

    def write(tensors):
        for f in os.listdir(tmp_path):
            os.remove(tmp_path / f)
        write_safetensors(str(tmp_path / "model.safetensors"), tensors)
        json.dump(cfg, open(tmp_path / "config.json", "w"))

    write({**t, "vision_model.encoder.layers.0.attn.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'vision_model\.encoder\.layers\.0\.attn\.extra\.weight'"):
        iv.from_pretrained(str(tmp_path))
    missing = "language_model.model.layers.1.attention.wqkv.weight"
    write({k: v for k, v in t.items() if k != missing})
    with pytest.raises(ValueError, match=f"missing tensor '{missing}'"):
        iv.from_pretrained(str(tmp_path))
    write({**t, "mlp1.1.bias": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match=r"'mlp1\.1\.bias' has shape \(7,\)"):
        iv.from_pretrained(str(tmp_path))
    # no tokenizer files: the image token id is unknown until given
    write(t)
    fm2 = iv.from_pretrained(str(tmp_path))
    assert fm2.config.image_token_id is None
    ids, mask, pv = R.make_inputs([[2, 2]], [1], seed=12)
    with pytest.raises(ValueError, match="image_token_id is unknown"):
        fm2(ids, attention_mask=mask, pixel_values=pv)
    assert iv.from_pretrained(str(tmp_path), image_token_id=R.IMG_CONTEXT).config.image_token_id == R.IMG_CONTEXT
    with pytest.raises(ValueError, match="image tokens do not match"):
        fm(ids, attention_mask=mask, pixel_values=np.concatenate([pv, pv]))


def test_bf16_forward_close(internlm2):
    """bf16 compute runs end to end and stays near the fp32 logits."""
    hf, _, d = internlm2
    fm = iv.from_pretrained(d, dtype=jnp.bfloat16)
    ids, mask, pv = R.make_inputs([[3, 4]], [2], seed=13)
    got = np.asarray(fm(ids, attention_mask=mask, pixel_values=pv).logits, np.float32)
    ref = R.hf_logits(hf, ids, mask, pv)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.slow  # two gradient compiles (~16 s on 2 cores)
def test_remat_policy_same_gradients(qwen):
    """The scanned vision blocks and decoder layers under a remat policy give the same gradients."""
    _, _, d = qwen
    ids, mask, pv = R.make_inputs([[3, 2]], [1], seed=14)
    grads = []
    for policy in (None, "full"):
        fm = iv.from_pretrained(d, remat_policy=policy)
        host = fm.prepare_inputs(ids, mask)

        def loss(pixels, model=fm, host=host):
            h = model.hidden_states(host["input_ids"], host["position_ids"], host["segment_ids"], pixels)
            return model.token_logits(h, [1, 2]).sum()

        grads.append(np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(pv))))
    np.testing.assert_allclose(grads[1], grads[0], atol=1e-5)


def test_shared_prefix_kv_cache(qwen):
    """A prompt prefix (with its image) encoded once, then the continuation through its K/V cache,
    gives the states of encoding everything at once (what the PRM's shared-prefix scoring relies on)."""
    _, fm, _ = qwen
    ids, mask, pv = R.make_inputs([[4, 9]], [2], seed=15)
    host = fm.prepare_inputs(ids, mask, pv)
    cut = ids.shape[1] - 5

    @nnx.jit
    def run(model, ids, pos, seg, pv):
        full = model.hidden_states(ids, pos, seg, pv)
        h1, kv = model.hidden_states(ids[:, :cut], pos[:, :, :cut], seg[:, :cut], pv, return_kv=True)
        h2 = model.hidden_states(ids[:, cut:], pos[:, :, cut:], seg[:, cut:], past_kv=kv,
                                 past_segment_ids=seg[:, :cut])
        return full, jnp.concatenate([h1, h2], axis=1)

    full, split = run(fm, host["input_ids"], host["position_ids"], host["segment_ids"], jnp.asarray(pv))
    np.testing.assert_allclose(np.asarray(split), np.asarray(full), atol=1e-5)
