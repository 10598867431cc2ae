"""The released InternVL-based shapes, as the remote-code ``config.json`` dicts the checkpoints ship
(trimmed to the fields that shape the model), with the ``<IMG_CONTEXT>`` id of each tokenizer.

- ``visualprm-8b``: OpenGVLab/VisualPRM-8B, an InternVL2.5-8B: InternViT-300M-448px-V2_5 +
  internlm2_5-7b-chat (InternLM2, vocabulary 92553, ``<IMG_CONTEXT>`` = 92546);
- ``visualprm-8b-v1.1``: OpenGVLab/VisualPRM-8B-v1_1, an InternVL3-8B;
- ``internvl3-8b``: OpenGVLab/InternVL3-8B: InternViT-300M-448px-V2_5 + Qwen2.5-7B (vocabulary
  151674 with InternVL's added tokens, ``<IMG_CONTEXT>`` = 151667).

Used for shape checks without weights and for benchmarks with random weights; real runs read the
checkpoint's own ``config.json``.
"""
from __future__ import annotations

from .config import InternVLConfig

_INTERNVIT_300M = {
    "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 1024,
    "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24, "image_size": 448,
    "patch_size": 14, "num_channels": 3, "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
    "layer_norm_eps": 1e-06, "hidden_act": "gelu", "use_flash_attn": True, "drop_path_rate": 0.0,
}
_TOP = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
    "dynamic_image_size": True, "force_image_size": 448, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
    "ps_version": "v2", "select_layer": -1, "template": "internvl2_5", "use_thumbnail": True,
    "tie_word_embeddings": False, "vision_config": _INTERNVIT_300M,
}
_INTERNLM2_5_7B = {
    "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": 92553, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "max_position_embeddings": 32768, "bias": False, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
_QWEN2_5_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151674, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}, "max_position_embeddings": 32768,
    "use_sliding_window": False, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151645,
}
HF_CONFIGS = {
    "visualprm-8b": {**_TOP, "llm_config": _INTERNLM2_5_7B},
    "visualprm-8b-v1.1": {**_TOP, "llm_config": _QWEN2_5_7B},
    "internvl3-8b": {**_TOP, "llm_config": _QWEN2_5_7B},
}
IMAGE_TOKEN_IDS = {"visualprm-8b": 92546, "visualprm-8b-v1.1": 151667, "internvl3-8b": 151667}


def preset(name: str) -> InternVLConfig:
    if name not in HF_CONFIGS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(HF_CONFIGS)}")
    return InternVLConfig.from_hf_dict(HF_CONFIGS[name], image_token_id=IMAGE_TOKEN_IDS[name])
