"""Tiny random InternVL checkpoints built offline with transformers, the remote-code layout written
from them by the published weight mapping, an InternLM2 reference, and inputs."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers

from ..reference_inputs import fill_random, image_rows, left_pad

IMG_START, IMG_END, IMG_CONTEXT = 247, 248, 250
TILE = 56  # px: 4x4 patches of 14 px -> 4 tokens per tile after the pixel shuffle
TOKENS_PER_TILE = 4


def tiny_config(text_type: str = "qwen2", tie: bool = False, vision: dict | None = None, **over):
    vis = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=TILE,
               patch_size=14, attention_bias=True, norm_type="layer_norm", use_qk_norm=False, hidden_act="gelu",
               layer_norm_eps=1e-6, use_mean_pooling=True)
    vis.update(vision or {})
    text = dict(model_type=text_type, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=tie,
                hidden_act="silu")
    if text_type == "llama":
        text.update(attention_bias=False, mlp_bias=False)
    return transformers.InternVLConfig(vision_config=vis, text_config=text, image_token_id=IMG_CONTEXT,
                                       image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=tie, **over)


def build_hf_model(config, seed: int = 0, bf16_values: bool = False):
    """Random weights with non-trivial norms, biases and LayerScales (HF's init leaves those at 1 / 0 /
    0.1); with ``bf16_values`` every weight is rounded to a bf16-representable value."""
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(config).eval()

    def value(name, noise):
        if "norm" in name and "weight" in name:
            x = 1.0 + 0.1 * noise
        elif "lambda" in name:
            x = 0.5 + 0.2 * noise
        elif "position_embeddings" in name or "cls_token" in name:
            x = 0.5 * noise
        else:
            x = 0.05 * noise
        return x.to(torch.bfloat16).to(torch.float32) if bf16_values else x

    return fill_random(model, seed + 1, value)


# ------------------------------------------------------------------------------------------------
# the remote-code layout (what VisualPRM / InternVL ship), written from a native model
# ------------------------------------------------------------------------------------------------
def pack_wqkv(q, k, v, num_heads: int, num_kv_heads: int):
    """InternLM2's packed ``wqkv`` from Llama q/k/v weights: per key/value head, its query heads,
    then the key head, then the value head (the published mapping, read in reverse)."""
    hd = q.shape[0] // num_heads
    g = num_heads // num_kv_heads
    d = q.shape[1]
    qq = q.reshape(num_kv_heads, g, hd, d)
    kk = k.reshape(num_kv_heads, 1, hd, d)
    vv = v.reshape(num_kv_heads, 1, hd, d)
    return torch.cat([qq, kk, vv], dim=1).reshape(-1, d)


def remote_code_state_dict(model, internlm2: bool) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tc = model.config.text_config
    out = {}
    nv = model.config.vision_config.num_hidden_layers
    vt = "model.vision_tower."
    out["vision_model.embeddings.class_embedding"] = sd.pop(vt + "embeddings.cls_token")
    out["vision_model.embeddings.patch_embedding.weight"] = sd.pop(vt + "embeddings.patch_embeddings.projection.weight")
    out["vision_model.embeddings.patch_embedding.bias"] = sd.pop(vt + "embeddings.patch_embeddings.projection.bias")
    out["vision_model.embeddings.position_embedding"] = sd.pop(vt + "embeddings.position_embeddings")
    for i in range(nv):
        a, b = f"{vt}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        for suf in ("weight", "bias"):
            if a + f"layernorm_before.{suf}" in sd:
                out[b + f"norm1.{suf}"] = sd.pop(a + f"layernorm_before.{suf}")
                out[b + f"norm2.{suf}"] = sd.pop(a + f"layernorm_after.{suf}")
            if a + f"attention.q_proj.{suf}" in sd:
                out[b + f"attn.qkv.{suf}"] = torch.cat([sd.pop(a + f"attention.{n}_proj.{suf}") for n in "qkv"])
            out[b + f"attn.proj.{suf}"] = sd.pop(a + f"attention.projection_layer.{suf}")
            out[b + f"mlp.fc1.{suf}"] = sd.pop(a + f"mlp.fc1.{suf}")
            out[b + f"mlp.fc2.{suf}"] = sd.pop(a + f"mlp.fc2.{suf}")
        for n in ("q_norm", "k_norm"):
            if a + f"attention.{n}.weight" in sd:
                out[b + f"attn.{n}.weight"] = sd.pop(a + f"attention.{n}.weight")
        out[b + "ls1"] = sd.pop(a + "lambda_1")
        out[b + "ls2"] = sd.pop(a + "lambda_2")
    pr = "model.multi_modal_projector."
    for old, new in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
        for suf in ("weight", "bias"):
            out[f"mlp1.{new}.{suf}"] = sd.pop(f"{pr}{old}.{suf}")
    lm = "model.language_model."
    if not internlm2:
        for k in list(sd):
            if k.startswith(lm):
                out["language_model.model." + k[len(lm):]] = sd.pop(k)
        if "lm_head.weight" in sd:
            out["language_model.lm_head.weight"] = sd.pop("lm_head.weight")
    else:
        out["language_model.model.tok_embeddings.weight"] = sd.pop(lm + "embed_tokens.weight")
        out["language_model.model.norm.weight"] = sd.pop(lm + "norm.weight")
        out["language_model.output.weight"] = sd.pop("lm_head.weight")
        for i in range(tc.num_hidden_layers):
            a, b = f"{lm}layers.{i}.", f"language_model.model.layers.{i}."
            out[b + "attention.wqkv.weight"] = pack_wqkv(*(sd.pop(a + f"self_attn.{n}_proj.weight") for n in "qkv"),
                                                         tc.num_attention_heads, tc.num_key_value_heads)
            out[b + "attention.wo.weight"] = sd.pop(a + "self_attn.o_proj.weight")
            out[b + "feed_forward.w1.weight"] = sd.pop(a + "mlp.gate_proj.weight")
            out[b + "feed_forward.w3.weight"] = sd.pop(a + "mlp.up_proj.weight")
            out[b + "feed_forward.w2.weight"] = sd.pop(a + "mlp.down_proj.weight")
            out[b + "attention_norm.weight"] = sd.pop(a + "input_layernorm.weight")
            out[b + "ffn_norm.weight"] = sd.pop(a + "post_attention_layernorm.weight")
    assert not sd, f"unconverted: {sorted(sd)}"
    return out


def remote_code_config(model, internlm2: bool) -> dict:
    c = model.config
    v, t = c.vision_config, c.text_config
    vision = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=v.hidden_size,
                  num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                  intermediate_size=v.intermediate_size, image_size=v.image_size[0], patch_size=v.patch_size[0],
                  num_channels=3, qkv_bias=v.attention_bias, qk_normalization=v.use_qk_norm, norm_type=v.norm_type,
                  layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act, use_flash_attn=False)
    llm = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
               num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
               num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
               rope_theta=t.rope_parameters["rope_theta"], max_position_embeddings=t.max_position_embeddings,
               hidden_act="silu", tie_word_embeddings=c.tie_word_embeddings)
    if internlm2:
        llm.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False,
                   rope_scaling={"type": "dynamic", "factor": 2.0})
    else:
        llm.update(architectures=[f"{t.model_type.capitalize()}ForCausalLM"], model_type=t.model_type)
    return dict(architectures=["InternVLChatModel"], model_type="internvl_chat", llm_config=llm, vision_config=vision,
                downsample_ratio=0.5, ps_version="v2", select_layer=c.vision_feature_layer, template="internvl2_5",
                force_image_size=v.image_size[0], tie_word_embeddings=c.tie_word_embeddings)


def save_remote_code(model, path, internlm2: bool, shards: int = 1, dtype=None):
    from jaxprm.models.qwen2_5_vl.convert import write_safetensors
    os.makedirs(path, exist_ok=True)
    sd = remote_code_state_dict(model, internlm2)
    t = {k: (v.to(dtype) if dtype is not None else v) for k, v in sd.items()}
    arrays = {k: (v.view(torch.int16).numpy().view("bfloat16") if v.dtype == torch.bfloat16 else v.numpy())
              for k, v in t.items()}
    import ml_dtypes  # noqa: F401  (registers the bfloat16 numpy dtype)
    names = sorted(arrays)
    if shards == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), arrays)
    else:
        wm = {}
        for s in range(shards):
            fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            write_safetensors(os.path.join(path, fn), {k: arrays[k] for k in part})
            wm.update({k: fn for k in part})
        json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    json.dump(remote_code_config(model, internlm2), open(os.path.join(path, "config.json"), "w"))
    # the remote code reads <IMG_CONTEXT> from the tokenizer: a tokenizer_config.json that names it
    json.dump({"added_tokens_decoder": {str(IMG_START): {"content": "<img>"}, str(IMG_END): {"content": "</img>"},
                                        str(IMG_CONTEXT): {"content": "<IMG_CONTEXT>"}}},
              open(os.path.join(path, "tokenizer_config.json"), "w"))
    return path


# ------------------------------------------------------------------------------------------------
# InternLM2 reference (torch), written from the published architecture: RMSNorm, packed wqkv with
# grouped heads, rotate-half RoPE, GQA causal attention, SwiGLU (w2(silu(w1 x) * w3 x)), untied output
# ------------------------------------------------------------------------------------------------
def internlm2_logits(sd: dict, cfg: dict, input_ids: np.ndarray, attention_mask: np.ndarray,
                     inputs_embeds: torch.Tensor | None = None) -> np.ndarray:
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg["hidden_size"]
    hd, g = D // H, H // K
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    p = "language_model.model."

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    ids = torch.tensor(input_ids)
    mask = torch.tensor(attention_mask).bool()
    b, l = ids.shape
    x = sd[p + "tok_embeddings.weight"][ids] if inputs_embeds is None else inputs_embeds
    pos = torch.arange(l, dtype=torch.float32)
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = ang.cos()[None, None], ang.sin()[None, None]

    def rot(t):
        return torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)

    allowed = torch.tril(torch.ones(l, l, dtype=torch.bool))[None] & mask[:, None, :]
    for i in range(cfg["num_hidden_layers"]):
        lp = f"{p}layers.{i}."
        y = rms(x, sd[lp + "attention_norm.weight"])
        qkv = (y @ sd[lp + "attention.wqkv.weight"].T).view(b, l, K, g + 2, hd)
        q = qkv[..., :g, :].reshape(b, l, H, hd).transpose(1, 2)
        k = qkv[..., g, :].transpose(1, 2)
        v = qkv[..., g + 1, :].transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = (q @ k.transpose(-1, -2)) / hd**0.5
        s = s.masked_fill(~allowed[:, None], torch.finfo(s.dtype).min)
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, l, D)
        x = x + o @ sd[lp + "attention.wo.weight"].T
        y = rms(x, sd[lp + "ffn_norm.weight"])
        m = torch.nn.functional.silu(y @ sd[lp + "feed_forward.w1.weight"].T) * (y @ sd[lp + "feed_forward.w3.weight"].T)
        x = x + m @ sd[lp + "feed_forward.w2.weight"].T
    x = rms(x, sd[p + "norm.weight"])
    return (x @ sd["language_model.output.weight"].T).numpy()


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def make_inputs(rows, tiles, seed=0, vocab=240, tokens_per_tile=TOKENS_PER_TILE, tile=TILE):
    """``rows``: per row, the text segment lengths (images between segments, consuming ``tiles``:
    the tile count of each image in order). Left-pads rows to equal length. Returns
    (input_ids, attention_mask, pixel_values (sum(tiles), 3, tile, tile))."""
    rng = np.random.default_rng(seed)
    it = iter(tiles)
    input_ids, mask = left_pad(image_rows(
        rng, rows, vocab, lambda: [IMG_START] + [IMG_CONTEXT] * (next(it) * tokens_per_tile) + [IMG_END]))
    pv = rng.standard_normal((int(sum(tiles)), 3, tile, tile)).astype(np.float32)
    return input_ids, mask, pv


def hf_logits(model, input_ids, mask, pixel_values):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask),
                    pixel_values=None if pixel_values is None else torch.tensor(pixel_values))
    return out.logits.float().numpy()
