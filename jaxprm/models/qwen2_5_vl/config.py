"""Qwen2.5-VL configuration: plain frozen dataclasses read from an HF ``config.json``.

Accepts both layouts transformers has written: the flat legacy one (text fields at the top level,
``rope_scaling={"type": "mrope", "mrope_section": ...}``) and the nested v5 one (``text_config``,
``rope_parameters``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxprm.models.hf_config import read_config_json, special_token_ids


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6  # Qwen2RMSNorm in the vision tower always uses 1e-6
    rope_theta: float = 10000.0  # axial 2D rope of the vision tower

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    # q/k/v projection biases: Qwen2 has them; Llama-shaped decoders (InternLM2 after the published
    # weight mapping, used by InternVL) do not. Not part of Qwen2.5-VL's config.json.
    attention_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    tokens_per_second: int = 4
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        v, t = self.vision, self.text
        if v.hidden_size % v.num_heads:
            raise ValueError(f"vision hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}")
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(
                f"text hidden_size {t.hidden_size} not divisible by num_attention_heads {t.num_attention_heads}"
            )
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        if (v.window_size // v.spatial_merge_size) % v.patch_size:
            raise ValueError("window_size // spatial_merge_size must be a multiple of patch_size")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} outside [0, depth={v.depth})")

    # -- HF interop -------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen25VLConfig":
        """Build from the dict in an HF ``config.json`` (legacy flat or v5 nested)."""
        text = dict(d.get("text_config") or {})
        # Legacy checkpoints keep the text fields at the top level; nested ones may still keep some there.
        for k, val in d.items():
            if k not in ("text_config", "vision_config") and k not in text:
                text[k] = val
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        mrope = rope.get("mrope_section") or (16, 24, 24)  # transformers' fallback
        theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
        vis = dict(d.get("vision_config") or {})
        vfields = {f.name for f in dataclasses.fields(VisionConfig)}
        vkw = {k: v for k, v in vis.items() if k in vfields}
        if "in_chans" in vis and "in_channels" not in vis:
            vkw["in_channels"] = vis["in_chans"]
        if "num_attention_heads" in vis and "num_heads" not in vis:
            vkw["num_heads"] = vis["num_attention_heads"]
        vrope = vis.get("rope_parameters") or {}
        if "rope_theta" in vrope:
            vkw["rope_theta"] = float(vrope["rope_theta"])
        if "fullatt_block_indexes" in vkw:
            vkw["fullatt_block_indexes"] = tuple(vkw["fullatt_block_indexes"])
        for k in ("patch_size", "temporal_patch_size"):
            if isinstance(vkw.get(k), (list, tuple)):
                vkw[k] = int(vkw[k][0])
        tfields = {f.name for f in dataclasses.fields(TextConfig)}
        tkw = {k: v for k, v in text.items() if k in tfields and k != "attention_bias"}
        tkw["mrope_section"] = tuple(int(x) for x in mrope)
        tkw["rope_theta"] = float(theta)
        if tkw.get("num_key_value_heads") is None:
            tkw["num_key_value_heads"] = tkw.get("num_attention_heads", TextConfig.num_attention_heads)
        tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        top = {
            k: d[k]
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if k in d
        }
        # transformers' default when a checkpoint does not say (real Qwen2.5-VL configs say 2)
        tps = vis.get("tokens_per_second", d.get("tokens_per_second", 4))
        return cls(VisionConfig(**vkw), TextConfig(**tkw), tie_word_embeddings=tie, tokens_per_second=int(tps),
                   **top, **special_token_ids(text))

    @classmethod
    def from_pretrained(cls, path: str) -> "Qwen25VLConfig":
        _, d = read_config_json(path, "an HF Qwen2.5-VL directory")
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """A v5-style nested dict that ``transformers.Qwen2_5_VLConfig(**d)`` accepts."""
        v, t = self.vision, self.text
        vision = dataclasses.asdict(v)
        vision.pop("rms_norm_eps")
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": vision.pop("rope_theta")}
        vision["fullatt_block_indexes"] = list(v.fullatt_block_indexes)
        vision["tokens_per_second"] = self.tokens_per_second
        text = dataclasses.asdict(t)
        text.pop("mrope_section")
        text.pop("rope_theta")
        text.pop("attention_bias")
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        text["bos_token_id"], text["eos_token_id"] = self.bos_token_id, eos
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": t.rope_theta,
            "mrope_section": list(t.mrope_section),
        }
        return {
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
