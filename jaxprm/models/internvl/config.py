"""InternVL configuration: plain frozen dataclasses read from either ``config.json`` layout.

- The original remote-code layout the released checkpoints ship (``model_type: internvl_chat``):
  ``vision_config`` (InternViT: ``qkv_bias``, ``qk_normalization``, ``norm_type``, ...) and
  ``llm_config`` (``InternLM2ForCausalLM``, ``Qwen2ForCausalLM`` or ``LlamaForCausalLM``), with
  ``downsample_ratio``, ``select_layer``, ``ps_version`` and ``template`` at the top level. The
  ``<IMG_CONTEXT>`` token id is not in this file (the remote code reads it from the tokenizer);
  ``from_pretrained`` looks it up in the tokenizer files next to it.
- transformers' native layout (``model_type: internvl``): ``vision_config`` (``attention_bias``,
  ``use_qk_norm``, ``norm_type``, ``use_mean_pooling``, ...), ``text_config`` (``qwen2`` or
  ``llama``; an InternLM2 language model is stored as ``llama`` after the published weight mapping),
  ``image_token_id``, ``vision_feature_layer``, ``projector_hidden_act``.

The language model is the project's Qwen2 decoder (``jaxprm.models.qwen2_5_vl.text``) with 1D RoPE:
a ``TextConfig`` whose single M-RoPE section covers the whole rotary half.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxprm.models.hf_config import read_config_json, special_token_ids
from jaxprm.models.qwen2_5_vl.config import TextConfig

LLM_ARCHS = ("qwen2", "llama", "internlm2")
_ARCH_OF = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "InternLM2ForCausalLM": "internlm2",
            "qwen2": "qwen2", "llama": "llama", "internlm2": "internlm2"}
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """InternViT. Defaults: InternViT-300M-448px(-V2_5), the vision tower of InternVL2.5-8B / InternVL3-8B."""
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    qk_normalization: bool = False
    qk_norm_eps: float = 1e-6  # remote code: layer_norm_eps; transformers: InternVLVisionRMSNorm's 1e-6
    norm_type: str = "layer_norm"  # or "rms_norm" (InternViT-6B)
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    # transformers' InternVLVisionModel applies a final LayerNorm when use_mean_pooling is False;
    # InternViT (remote code) has none
    post_layernorm: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """Patches per side of a tile (32 for 448 px tiles of 14 px patches)."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=lambda: _text_config(
        dict(vocab_size=151674, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
             max_position_embeddings=32768), attention_bias=True))
    llm_arch: str = "qwen2"  # qwen2 | llama | internlm2 (checkpoint key layout of the language model)
    image_token_id: int | None = 151667  # <IMG_CONTEXT>; None when unknown (remote-code config, no tokenizer)
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1  # vision_feature_layer
    projector_hidden_act: str = "gelu"
    projector_ln_eps: float = 1e-5  # nn.LayerNorm's default, both layouts
    tie_word_embeddings: bool = False
    template: str | None = None  # remote code's chat template name (e.g. "internvl2_5")
    # {"type": "dynamic", "factor": 2.0}: plain RoPE up to max_position_embeddings (a dict: left out of the
    # hash, which jit caches keyed by the model graph need)
    rope_scaling: dict | None = dataclasses.field(default=None, hash=False)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        v, t = self.vision, self.text
        if self.llm_arch not in LLM_ARCHS:
            raise ValueError(f"llm_arch must be one of {LLM_ARCHS}, got {self.llm_arch!r}")
        if v.hidden_size % v.num_attention_heads:
            raise ValueError(f"vision hidden_size {v.hidden_size} not divisible by num_attention_heads "
                             f"{v.num_attention_heads}")
        if v.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"vision norm_type must be 'layer_norm' or 'rms_norm', got {v.norm_type!r}")
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(f"text hidden_size {t.hidden_size} / heads {t.num_attention_heads} / kv heads "
                             f"{t.num_key_value_heads} do not divide")
        if tuple(t.mrope_section) != (t.head_dim // 2,):
            raise ValueError(f"InternVL uses 1D RoPE: mrope_section must be ({t.head_dim // 2},), got {t.mrope_section}")
        if self.downsample_ratio != 0.5:
            raise ValueError(f"only downsample_ratio 0.5 is supported (every released InternVL), got {self.downsample_ratio}")
        if self.ps_version != "v2":
            raise ValueError(f"only ps_version 'v2' is supported (InternVL >= 1.5), got {self.ps_version!r}")
        if v.grid % 2:
            raise ValueError(f"image_size // patch_size = {v.grid} must be even for the 0.5 pixel shuffle")
        n = v.num_hidden_layers
        if not -(n + 1) <= self.select_layer <= n:
            raise ValueError(f"select_layer {self.select_layer} outside [-{n + 1}, {n}] for {n} vision layers")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("dynamic", "default", None):
                raise ValueError(f"rope_scaling {self.rope_scaling} is not supported (only 'dynamic' NTK, "
                                 "which is plain RoPE up to max_position_embeddings)")

    @property
    def image_seq_length(self) -> int:
        """LLM tokens per tile: (image_size / patch_size)**2 * downsample_ratio**2 (256 for 448 px)."""
        return int(self.vision.grid**2 * self.downsample_ratio**2)

    @property
    def vision_layers_used(self) -> int:
        """How many encoder layers ``select_layer`` runs (hidden_states[k] of embeddings + layer outputs)."""
        return self.select_layer % (self.vision.num_hidden_layers + 1)

    # -- HF interop -------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], image_token_id: int | None = None) -> "InternVLConfig":
        """Build from an HF ``config.json`` dict, either layout (see the module docstring)."""
        if "llm_config" in d:
            return cls._from_remote_code(d, image_token_id)
        if "text_config" in d or d.get("model_type") == "internvl":
            return cls._from_native(d, image_token_id)
        raise ValueError("not an InternVL config: expected 'llm_config' (remote-code layout, model_type "
                         f"internvl_chat) or 'text_config' (model_type internvl); got keys {sorted(d)[:12]}")

    @classmethod
    def _from_remote_code(cls, d, image_token_id):
        vis, llm = dict(d.get("vision_config") or {}), dict(d["llm_config"])
        arch = _llm_arch(llm)
        if arch == "internlm2" and llm.get("bias", False):
            raise ValueError("InternLM2 with bias=True is not supported (no released InternVL uses it)")
        if vis.get("use_moe"):
            raise ValueError("InternViT with use_moe=True is not supported")
        image_size = d.get("force_image_size") or vis.get("image_size", 448)
        vkw = dict(
            hidden_size=vis.get("hidden_size", 1024), num_hidden_layers=vis.get("num_hidden_layers", 24),
            num_attention_heads=vis.get("num_attention_heads", 16),
            intermediate_size=vis.get("intermediate_size", 4096), image_size=_int(image_size),
            patch_size=_int(vis.get("patch_size", 14)), num_channels=vis.get("num_channels", 3),
            qkv_bias=bool(vis.get("qkv_bias", True)), qk_normalization=bool(vis.get("qk_normalization", False)),
            norm_type=vis.get("norm_type", "rms_norm"), layer_norm_eps=float(vis.get("layer_norm_eps", 1e-6)),
            hidden_act=vis.get("hidden_act", "gelu"), post_layernorm=False)
        vkw["qk_norm_eps"] = vkw["layer_norm_eps"]
        tie = bool(llm.get("tie_word_embeddings", d.get("tie_word_embeddings", False)))
        return cls(VisionConfig(**vkw), _text_config(llm, attention_bias=arch == "qwen2"), llm_arch=arch,
                   image_token_id=image_token_id, downsample_ratio=float(d.get("downsample_ratio", 0.5)),
                   ps_version=d.get("ps_version", "v1"), select_layer=int(d.get("select_layer", -1)),
                   tie_word_embeddings=tie, template=d.get("template"),
                   rope_scaling=llm.get("rope_scaling"), **special_token_ids(llm))

    @classmethod
    def _from_native(cls, d, image_token_id):
        vis, text = dict(d.get("vision_config") or {}), dict(d.get("text_config") or {})
        arch = _llm_arch(text) if text else "qwen2"
        if arch == "internlm2":
            raise ValueError("transformers' InternVL layout stores InternLM2 as a llama text_config")
        if vis.get("use_absolute_position_embeddings") is False or vis.get("use_mask_token"):
            raise ValueError("InternVL vision configs without absolute position embeddings or with a mask "
                             "token are not supported")
        if d.get("vision_feature_select_strategy", "default") != "default":
            raise ValueError("only vision_feature_select_strategy 'default' (drop the class token) is supported")
        layer = d.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be one int, got {layer!r}")
        if text.get("attention_bias") and arch == "llama":
            raise ValueError("llama text_config with attention_bias=True (o_proj bias) is not supported")
        if arch == "llama" and text.get("mlp_bias"):
            raise ValueError("llama text_config with mlp_bias=True is not supported")
        vkw = dict(
            hidden_size=vis.get("hidden_size", 1024), num_hidden_layers=vis.get("num_hidden_layers", 24),
            num_attention_heads=vis.get("num_attention_heads", 16),
            intermediate_size=vis.get("intermediate_size", 4096), image_size=_int(vis.get("image_size", 448)),
            patch_size=_int(vis.get("patch_size", 14)), num_channels=vis.get("num_channels", 3),
            qkv_bias=bool(vis.get("attention_bias", False)), qk_normalization=bool(vis.get("use_qk_norm", False)),
            qk_norm_eps=1e-6, norm_type=vis.get("norm_type", "layer_norm"),
            layer_norm_eps=float(vis.get("layer_norm_eps", 1e-6)), hidden_act=vis.get("hidden_act", "gelu"),
            post_layernorm=not vis.get("use_mean_pooling", True))
        # transformers ties InternVL's lm_head by the top-level flag (default True), not text_config's
        tie = bool(d.get("tie_word_embeddings", True))
        rope = text.get("rope_parameters") or text.get("rope_scaling")
        return cls(VisionConfig(**vkw), _text_config(text, attention_bias=arch == "qwen2"), llm_arch=arch,
                   image_token_id=int(d.get("image_token_id", 151667)) if image_token_id is None else image_token_id,
                   downsample_ratio=float(d.get("downsample_ratio", 0.5)), ps_version="v2", select_layer=layer,
                   projector_hidden_act=d.get("projector_hidden_act", "gelu"), tie_word_embeddings=tie,
                   rope_scaling=_scaling_of(rope), **special_token_ids(text))

    @classmethod
    def from_pretrained(cls, path: str, image_token_id: int | None = None) -> "InternVLConfig":
        """Read ``config.json``; for the remote-code layout the ``<IMG_CONTEXT>`` id comes from
        ``image_token_id`` or, when not given, from the tokenizer files in the same directory."""
        f, d = read_config_json(path, "an InternVL directory")
        if image_token_id is None and "llm_config" in d:
            image_token_id = find_token_id(os.path.dirname(f), IMG_CONTEXT)
        try:
            return cls.from_hf_dict(d, image_token_id)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{f}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers' native layout: a dict ``transformers.InternVLConfig(**d)`` accepts."""
        v, t = self.vision, self.text
        vision = dict(
            model_type="internvl_vision", hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
            image_size=[v.image_size, v.image_size], patch_size=[v.patch_size, v.patch_size],
            num_channels=v.num_channels, attention_bias=v.qkv_bias, use_qk_norm=v.qk_normalization,
            norm_type=v.norm_type, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act,
            use_mean_pooling=not v.post_layernorm)
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        rope = {"rope_type": "default", "rope_theta": t.rope_theta}
        if self.rope_scaling and self.rope_scaling.get("factor") is not None:
            rope = {"rope_type": "dynamic", "rope_theta": t.rope_theta, "factor": float(self.rope_scaling["factor"])}
        text = dict(
            model_type="qwen2" if self.llm_arch == "qwen2" else "llama", vocab_size=t.vocab_size,
            hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps, hidden_act=t.hidden_act,
            max_position_embeddings=t.max_position_embeddings, rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id, eos_token_id=eos)
        if self.llm_arch != "qwen2":
            text.update(attention_bias=False, mlp_bias=False, head_dim=t.head_dim)
        if self.image_token_id is None:
            raise ValueError("image_token_id is unknown (remote-code config without tokenizer files); pass "
                             "image_token_id= to from_pretrained before saving the native layout")
        return {
            "model_type": "internvl", "vision_config": vision, "text_config": text,
            "image_token_id": self.image_token_id, "image_seq_length": self.image_seq_length,
            "downsample_ratio": self.downsample_ratio, "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": self.select_layer, "vision_feature_select_strategy": "default",
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def _int(x) -> int:
    return int(x[0]) if isinstance(x, (list, tuple)) else int(x)


def _llm_arch(llm: dict) -> str:
    names = list(llm.get("architectures") or []) + [llm.get("model_type")]
    for n in names:
        if n in _ARCH_OF:
            return _ARCH_OF[n]
    raise ValueError(f"unsupported InternVL language model {names}: expected one of Qwen2ForCausalLM, "
                     "LlamaForCausalLM, InternLM2ForCausalLM")


def _scaling_of(rope):
    if not rope:
        return None
    kind = rope.get("rope_type", rope.get("type"))
    return None if kind in (None, "default") else dict(rope)


def _text_config(llm: dict, attention_bias: bool) -> TextConfig:
    hidden, heads = int(llm.get("hidden_size", 4096)), int(llm.get("num_attention_heads", 32))
    hd = hidden // heads
    if llm.get("head_dim") not in (None, hd):
        raise ValueError(f"text head_dim {llm['head_dim']} != hidden_size / num_attention_heads = {hd} "
                         "is not supported")
    if llm.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window=True is not supported")
    if llm.get("hidden_act", "silu") != "silu":
        raise ValueError(f"text hidden_act {llm.get('hidden_act')!r} is not supported (silu only)")
    rope = llm.get("rope_parameters") or {}
    theta = rope.get("rope_theta", llm.get("rope_theta", 10000.0))
    return TextConfig(
        vocab_size=int(llm.get("vocab_size", 32000)), hidden_size=hidden,
        intermediate_size=int(llm.get("intermediate_size", 11008)),
        num_hidden_layers=int(llm.get("num_hidden_layers", 32)), num_attention_heads=heads,
        num_key_value_heads=int(llm.get("num_key_value_heads") or heads),
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), mrope_section=(hd // 2,),
        hidden_act="silu", max_position_embeddings=int(llm.get("max_position_embeddings", 32768)),
        attention_bias=attention_bias)


def find_token_id(directory: str, token: str) -> int | None:
    """The id of an added token (e.g. ``<IMG_CONTEXT>``) from the tokenizer files in ``directory``
    (``added_tokens.json``, ``tokenizer_config.json``'s ``added_tokens_decoder``, ``tokenizer.json``'s
    ``added_tokens``); None when none of them names it."""
    def load(name):
        p = os.path.join(directory, name)
        if not os.path.isfile(p):
            return None
        try:
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    added = load("added_tokens.json")
    if isinstance(added, dict) and isinstance(added.get(token), int):
        return added[token]
    tc = load("tokenizer_config.json")
    if isinstance(tc, dict):
        for i, entry in (tc.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and entry.get("content") == token:
                return int(i)
    tj = load("tokenizer.json")
    if isinstance(tj, dict):
        for entry in tj.get("added_tokens") or []:
            if isinstance(entry, dict) and entry.get("content") == token:
                return int(entry["id"])
    return None
