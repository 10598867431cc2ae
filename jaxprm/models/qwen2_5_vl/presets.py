"""The released Qwen2.5-VL shapes, as the flat (legacy) config.json dicts the checkpoints ship with.

Used for shape checks without weights and for benchmarks with random weights; real runs read the
user's own ``config.json``.
"""
from __future__ import annotations

from .config import Qwen25VLConfig

_VISION = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
    "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
}
_COMMON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_act": "silu",
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
}
HF_CONFIGS = {
    "qwen2.5-vl-3b": {**_COMMON, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                      "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                      "tie_word_embeddings": True, "vision_config": {**_VISION, "out_hidden_size": 2048}},
    "qwen2.5-vl-7b": {**_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                      "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                      "tie_word_embeddings": False, "vision_config": {**_VISION, "out_hidden_size": 3584}},
}


def preset(name: str) -> Qwen25VLConfig:
    if name not in HF_CONFIGS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(HF_CONFIGS)}")
    return Qwen25VLConfig.from_hf_dict(HF_CONFIGS[name])
