"""InternVL checkpoints <-> the Flax parameter tree, for both published key layouts.

- ``remote_code`` (the released VisualPRM / InternVL checkpoints, ``config.json`` with ``llm_config``):
  ``vision_model.*`` (InternViT: packed ``attn.qkv``, ``ls1``/``ls2``, ``norm1``/``norm2``),
  ``mlp1.{0,1,3}.*`` and ``language_model.*``: for InternLM2 ``model.tok_embeddings``,
  ``layers.N.attention.wqkv`` (packed with grouped heads: per key/value head, its query heads, then
  the key, then the value), ``attention.wo``, ``feed_forward.w1/w2/w3``, ``attention_norm``,
  ``ffn_norm``, ``model.norm``, ``output``; for Qwen2/Llama ``model.*`` and ``lm_head``.
- ``native`` (transformers' ``InternVLForConditionalGeneration``): ``model.vision_tower.*`` (separate
  ``q_proj``/``k_proj``/``v_proj``, ``lambda_1``/``lambda_2``, ``layernorm_before``/``layernorm_after``),
  ``model.multi_modal_projector.*``, ``model.language_model.*`` and ``lm_head``; the older
  ``vision_tower.*`` / ``multi_modal_projector.*`` / ``language_model.model.*`` /
  ``language_model.lm_head.*`` names are read too.

``checkpoint_shapes(config, layout)`` derives every tensor name and shape a checkpoint of that layout
must hold; loading checks the file against it (the first unexpected or missing name is the error),
then converts. The conversion is written against an array namespace (numpy for loading, ``jax.numpy``
under ``jax.eval_shape`` for shape checks of the released configurations without weights).
"""
from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprm.atomic import atomic_write_json
from jaxprm.models.qwen2_5_vl.convert import WRITER_METADATA, read_checkpoint_tensors, write_safetensors

from .config import InternVLConfig, find_token_id, IMG_CONTEXT

LAYOUTS = ("remote_code", "native")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # non-persistent buffers some exporters still write

# (HF name pattern with {i} for the layer, our path, kind). Kinds: linear (transpose), vec, embed,
# conv (Conv2d -> matmul), token ((1, 1, D) -> (D,)), pos ((1, N, D) -> (N, D)), qkv0/1/2 (one third
# of our packed vision qkv), wqkv (InternLM2's packed q/k/v -> our q_w, k_w, v_w).
_VB, _TL = ("vision", "blocks"), ("language_model", "layers")


def _vision_rules(layout: str, cfg: InternVLConfig):
    v = cfg.vision
    rows = []
    if layout == "remote_code":
        p = "vision_model."
        rows += [(p + "embeddings.class_embedding", ("vision", "embeddings", "class_embedding"), "token"),
                 (p + "embeddings.patch_embedding.weight", ("vision", "embeddings", "patch_w"), "conv"),
                 (p + "embeddings.patch_embedding.bias", ("vision", "embeddings", "patch_b"), "vec"),
                 (p + "embeddings.position_embedding", ("vision", "embeddings", "position_embedding"), "pos")]
        b = p + "encoder.layers.{i}."
        rows += [(b + "norm1.weight", _VB + ("norm1_w",), "vec"), (b + "norm2.weight", _VB + ("norm2_w",), "vec")]
        if v.norm_type == "layer_norm":
            rows += [(b + "norm1.bias", _VB + ("norm1_b",), "vec"), (b + "norm2.bias", _VB + ("norm2_b",), "vec")]
        rows += [(b + "attn.qkv.weight", _VB + ("qkv_w",), "linear")]
        if v.qkv_bias:
            rows += [(b + "attn.qkv.bias", _VB + ("qkv_b",), "vec")]
        if v.qk_normalization:
            rows += [(b + "attn.q_norm.weight", _VB + ("q_norm",), "vec"),
                     (b + "attn.k_norm.weight", _VB + ("k_norm",), "vec")]
        rows += [(b + "attn.proj.weight", _VB + ("proj_w",), "linear"), (b + "attn.proj.bias", _VB + ("proj_b",), "vec"),
                 (b + "ls1", _VB + ("ls1",), "vec"), (b + "ls2", _VB + ("ls2",), "vec"),
                 (b + "mlp.fc1.weight", _VB + ("fc1_w",), "linear"), (b + "mlp.fc1.bias", _VB + ("fc1_b",), "vec"),
                 (b + "mlp.fc2.weight", _VB + ("fc2_w",), "linear"), (b + "mlp.fc2.bias", _VB + ("fc2_b",), "vec")]
        pr = "mlp1."
        rows += [(pr + "0.weight", ("vision", "projector", "ln_w"), "vec"),
                 (pr + "0.bias", ("vision", "projector", "ln_b"), "vec"),
                 (pr + "1.weight", ("vision", "projector", "fc1_w"), "linear"),
                 (pr + "1.bias", ("vision", "projector", "fc1_b"), "vec"),
                 (pr + "3.weight", ("vision", "projector", "fc2_w"), "linear"),
                 (pr + "3.bias", ("vision", "projector", "fc2_b"), "vec")]
        return rows
    p = "model.vision_tower."
    rows += [(p + "embeddings.cls_token", ("vision", "embeddings", "class_embedding"), "token"),
             (p + "embeddings.patch_embeddings.projection.weight", ("vision", "embeddings", "patch_w"), "conv"),
             (p + "embeddings.patch_embeddings.projection.bias", ("vision", "embeddings", "patch_b"), "vec"),
             (p + "embeddings.position_embeddings", ("vision", "embeddings", "position_embedding"), "pos")]
    b = p + "encoder.layer.{i}."
    rows += [(b + "layernorm_before.weight", _VB + ("norm1_w",), "vec"),
             (b + "layernorm_after.weight", _VB + ("norm2_w",), "vec")]
    if v.norm_type == "layer_norm":
        rows += [(b + "layernorm_before.bias", _VB + ("norm1_b",), "vec"),
                 (b + "layernorm_after.bias", _VB + ("norm2_b",), "vec")]
    for j, n in enumerate("qkv"):
        rows += [(b + f"attention.{n}_proj.weight", _VB + ("qkv_w",), f"qkv{j}")]
        if v.qkv_bias:
            rows += [(b + f"attention.{n}_proj.bias", _VB + ("qkv_b",), f"qkv{j}")]
    if v.qk_normalization:
        rows += [(b + "attention.q_norm.weight", _VB + ("q_norm",), "vec"),
                 (b + "attention.k_norm.weight", _VB + ("k_norm",), "vec")]
    rows += [(b + "attention.projection_layer.weight", _VB + ("proj_w",), "linear"),
             (b + "attention.projection_layer.bias", _VB + ("proj_b",), "vec"),
             (b + "lambda_1", _VB + ("ls1",), "vec"), (b + "lambda_2", _VB + ("ls2",), "vec"),
             (b + "mlp.fc1.weight", _VB + ("fc1_w",), "linear"), (b + "mlp.fc1.bias", _VB + ("fc1_b",), "vec"),
             (b + "mlp.fc2.weight", _VB + ("fc2_w",), "linear"), (b + "mlp.fc2.bias", _VB + ("fc2_b",), "vec")]
    if v.post_layernorm:
        rows += [(p + "layernorm.weight", ("vision", "post_norm_w"), "vec"),
                 (p + "layernorm.bias", ("vision", "post_norm_b"), "vec")]
    pr = "model.multi_modal_projector."
    rows += [(pr + "layer_norm.weight", ("vision", "projector", "ln_w"), "vec"),
             (pr + "layer_norm.bias", ("vision", "projector", "ln_b"), "vec"),
             (pr + "linear_1.weight", ("vision", "projector", "fc1_w"), "linear"),
             (pr + "linear_1.bias", ("vision", "projector", "fc1_b"), "vec"),
             (pr + "linear_2.weight", ("vision", "projector", "fc2_w"), "linear"),
             (pr + "linear_2.bias", ("vision", "projector", "fc2_b"), "vec")]
    return rows


def _text_rules(layout: str, cfg: InternVLConfig):
    if cfg.llm_arch == "internlm2":
        if layout != "remote_code":
            raise ValueError("an InternLM2 language model is stored as llama in the native layout")
        p = "language_model.model."
        b = p + "layers.{i}."
        rows = [(p + "tok_embeddings.weight", ("language_model", "embed_tokens"), "embed"),
                (b + "attention_norm.weight", _TL + ("input_norm",), "vec"),
                (b + "ffn_norm.weight", _TL + ("post_norm",), "vec"),
                (b + "attention.wqkv.weight", _TL + ("q_w", "k_w", "v_w"), "wqkv"),
                (b + "attention.wo.weight", _TL + ("o_w",), "linear"),
                (b + "feed_forward.w1.weight", _TL + ("gate_w",), "linear"),
                (b + "feed_forward.w3.weight", _TL + ("up_w",), "linear"),
                (b + "feed_forward.w2.weight", _TL + ("down_w",), "linear"),
                (p + "norm.weight", ("language_model", "norm"), "vec")]
        head = "language_model.output.weight"
    else:
        p = "language_model.model." if layout == "remote_code" else "model.language_model."
        b = p + "layers.{i}."
        rows = [(p + "embed_tokens.weight", ("language_model", "embed_tokens"), "embed"),
                (b + "input_layernorm.weight", _TL + ("input_norm",), "vec"),
                (b + "post_attention_layernorm.weight", _TL + ("post_norm",), "vec")]
        for n in "qkv":
            rows += [(b + f"self_attn.{n}_proj.weight", _TL + (f"{n}_w",), "linear")]
            if cfg.text.attention_bias:
                rows += [(b + f"self_attn.{n}_proj.bias", _TL + (f"{n}_b",), "vec")]
        rows += [(b + "self_attn.o_proj.weight", _TL + ("o_w",), "linear"),
                 (b + "mlp.gate_proj.weight", _TL + ("gate_w",), "linear"),
                 (b + "mlp.up_proj.weight", _TL + ("up_w",), "linear"),
                 (b + "mlp.down_proj.weight", _TL + ("down_w",), "linear"),
                 (p + "norm.weight", ("language_model", "norm"), "vec")]
        head = "language_model.lm_head.weight" if layout == "remote_code" else "lm_head.weight"
    if not cfg.tie_word_embeddings:
        rows += [(head, ("lm_head",), "linear")]
    return rows


def rules(config: InternVLConfig, layout: str):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return _vision_rules(layout, config) + _text_rules(layout, config)


def _depth(config: InternVLConfig, path) -> int:
    return config.vision.num_hidden_layers if path[:2] == _VB else config.text.num_hidden_layers


def checkpoint_shapes(config: InternVLConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every tensor name (in order) and shape a checkpoint of ``layout`` holds for ``config``."""
    v, t = config.vision, config.text
    D, I, P, C = v.hidden_size, v.intermediate_size, v.patch_size, v.num_channels
    Dt, hd = t.hidden_size, t.head_dim
    H, K = t.num_attention_heads, t.num_key_value_heads
    din = D * 4
    ours = {  # our (unstacked) shapes by last path element, in HF orientation
        "class_embedding": (1, 1, D), "patch_w": (D, C, P, P), "patch_b": (D,),
        "position_embedding": (1, v.grid**2 + 1, D), "qkv_w": (3 * D, D), "qkv_b": (3 * D,),
        "proj_w": (D, D), "fc1_w": None, "embed_tokens": (t.vocab_size, Dt),
        "q_w": (H * hd, Dt), "k_w": (K * hd, Dt), "v_w": (K * hd, Dt), "q_b": (H * hd,), "k_b": (K * hd,),
        "v_b": (K * hd,), "o_w": (Dt, H * hd), "gate_w": (t.intermediate_size, Dt), "up_w": (t.intermediate_size, Dt),
        "down_w": (Dt, t.intermediate_size), "lm_head": (t.vocab_size, Dt),
    }
    out = {}
    for pattern, path, kind in rules(config, layout):
        leaf = path[-1]
        if path[:2] == ("vision", "projector"):
            shape = {"ln_w": (din,), "ln_b": (din,), "fc1_w": (Dt, din), "fc1_b": (Dt,), "fc2_w": (Dt, Dt),
                     "fc2_b": (Dt,)}[leaf]
        elif path[:2] == _VB:
            shape = {"fc1_w": (I, D), "fc1_b": (I,), "fc2_w": (D, I)}.get(leaf) or ours.get(leaf) or (D,)
            if kind.startswith("qkv") and kind != "qkv":
                shape = (D,) + shape[1:]  # one of q/k/v
        elif kind == "wqkv":
            shape = ((H + 2 * K) * hd, Dt)
        elif leaf in ("input_norm", "post_norm", "norm"):
            shape = (Dt,)
        else:
            shape = ours.get(leaf) or (D,)
        if "{i}" in pattern:
            for i in range(_depth(config, path)):
                out[pattern.format(i=i)] = shape
        else:
            out[pattern] = shape
    return out


def _convert(kind: str, a, config: InternVLConfig, xp):
    """One HF tensor -> [(path index, array in our orientation)] (index into the rule's paths)."""
    if kind in ("linear", "qkv0", "qkv1", "qkv2") and a.ndim == 2:
        return [a.T]
    if kind == "conv":
        return [a.reshape(a.shape[0], -1).T]
    if kind == "token":
        return [a.reshape(-1)]
    if kind == "pos":
        return [a.reshape(a.shape[-2], a.shape[-1])]
    if kind == "wqkv":
        t = config.text
        K, g, hd = t.num_key_value_heads, t.num_attention_heads // t.num_key_value_heads, t.head_dim
        w = a.reshape(K, g + 2, hd, a.shape[-1])
        return [w[:, :g].reshape(K * g * hd, -1).T, w[:, g].reshape(K * hd, -1).T, w[:, g + 1].reshape(K * hd, -1).T]
    return [a]


def hf_to_params(tensors: dict, config: InternVLConfig, layout: str, dtype=jnp.float32, xp=np) -> dict:
    """HF tensors (already checked against ``checkpoint_shapes``) -> {our param path: array}.
    ``xp``: numpy (loading) or jax.numpy (under ``jax.eval_shape``)."""
    dt = jnp.dtype(dtype) if xp is jnp else np.dtype(jnp.dtype(dtype))
    single, stacked = {}, {}
    for pattern, path, kind in rules(config, layout):
        paths = [path[:-3] + (leaf,) for leaf in path[-3:]] if kind == "wqkv" else [path]
        layers = range(_depth(config, path)) if "{i}" in pattern else [None]
        for i in layers:
            name = pattern if i is None else pattern.format(i=i)
            if name not in tensors:
                continue  # only with a tied head: checked by the caller
            arrays = _convert(kind, xp.asarray(tensors[name]), config, xp)
            for pth, arr in zip(paths, arrays):
                arr = xp.asarray(arr, dtype=dt)
                if kind in ("qkv0", "qkv1", "qkv2"):
                    stacked.setdefault(pth, {}).setdefault(i, [None] * 3)[int(kind[-1])] = arr
                elif i is None:
                    single[pth] = arr
                else:
                    stacked.setdefault(pth, {})[i] = arr
    for pth, layers in stacked.items():
        rows = [layers[i] for i in range(len(layers))]
        rows = [xp.concatenate(r, axis=-1) if isinstance(r, list) else r for r in rows]
        single[pth] = xp.stack(rows)
    return single


def detect_layout(hf_config: dict) -> str:
    return "remote_code" if "llm_config" in hf_config else "native"


def canonical_native_name(name: str) -> str:
    """Older transformers InternVL names -> the v5 ones this module uses."""
    for old, new in (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def check_tensors(tensors: dict, config: InternVLConfig, layout: str, where: str = "checkpoint") -> dict:
    """Drop ignorable buffers (and a saved head when tied), then name the first unexpected tensor, the
    first missing one, or the first with a wrong shape. Returns the kept tensors."""
    expected = checkpoint_shapes(config, layout)
    head = {"remote_code": ("language_model.output.weight" if config.llm_arch == "internlm2"
                            else "language_model.lm_head.weight"), "native": "lm_head.weight"}[layout]
    kept = {}
    for name in sorted(tensors):
        if _IGNORED.match(name) or (config.tie_word_embeddings and name == head):
            continue
        if name not in expected:
            raise ValueError(f"{where}: unexpected tensor {name!r}: not part of an InternVL checkpoint of this "
                             f"config ({layout} layout, {config.llm_arch} language model)")
        kept[name] = tensors[name]
    for name, shape in expected.items():
        if name not in kept:
            raise ValueError(f"{where}: missing tensor {name!r} ({layout} layout, {config.llm_arch} language model"
                             f"{', untied lm_head' if name == head else ''})")
        if tuple(kept[name].shape) != tuple(shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(kept[name].shape)} but config.json implies "
                             f"{tuple(shape)}")
    return kept


# ------------------------------------------------------------------------------------------------
# user entry points
# ------------------------------------------------------------------------------------------------
def from_pretrained(hf_dir: str, dtype=jnp.float32, param_dtype=None, attn_impl: str = "auto",
                    remat_policy: str | None = None, image_token_id: int | None = None):
    """Load an InternVL directory (either layout, config.json + safetensors, sharded or not) as a Flax
    NNX ``InternVL``. ``dtype`` is the compute dtype; ``param_dtype`` (default ``dtype``) the storage
    dtype. ``image_token_id`` overrides the ``<IMG_CONTEXT>`` id (remote-code layout: read from the
    tokenizer files when not given)."""
    from .model import InternVL

    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir!r} is not a directory: expected an InternVL checkpoint dir")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: expected an InternVL directory with config.json")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    layout = detect_layout(raw)
    config = InternVLConfig.from_pretrained(hf_dir, image_token_id=image_token_id)
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(lambda: InternVL(config, dtype=dtype, param_dtype=param_dtype,
                                               attn_impl=attn_impl, remat_policy=remat_policy))
    graphdef, state = nnx.split(abstract)
    tensors = read_checkpoint_tensors(hf_dir)
    if layout == "native":
        tensors = {canonical_native_name(k): v for k, v in tensors.items()}
    tensors = check_tensors(tensors, config, layout, where=hf_dir)
    loaded = hf_to_params(tensors, config, layout, param_dtype)
    new = {}
    for p, var in state.flat_state():
        key = tuple(str(x) for x in p)
        arr = loaded.pop(key)
        if tuple(arr.shape) != tuple(var.shape):  # checked above; a bug if it happens
            raise AssertionError(f"{'/'.join(key)}: converted shape {arr.shape} != {var.shape}")
        new[p] = var.replace(jnp.asarray(arr))
    if loaded:
        raise AssertionError(f"converted weights not in the model: {sorted('/'.join(k) for k in loaded)[:8]}")
    return nnx.merge(graphdef, nnx.State.from_flat_path(new))


def params_to_native(model) -> dict[str, np.ndarray]:
    """Our params -> transformers' native InternVL tensors (inverse of ``hf_to_params``)."""
    cfg = model.config
    flat = {tuple(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.state(model, nnx.Param).flat_state()}
    native_cfg = cfg if cfg.llm_arch != "internlm2" else _as_llama(cfg)
    out = {}
    for pattern, path, kind in rules(native_cfg, "native"):
        a = flat[path]
        for i in (range(a.shape[0]) if "{i}" in pattern else [None]):
            x = a if i is None else a[i]
            name = pattern if i is None else pattern.format(i=i)
            if kind.startswith("qkv"):
                d = x.shape[-1] // 3
                j = int(kind[-1])
                x = x[..., j * d:(j + 1) * d]
                x = x.T if x.ndim == 2 else x
            elif kind == "linear":
                x = x.T
            elif kind == "conv":
                v = cfg.vision
                x = x.T.reshape(x.shape[1], v.num_channels, v.patch_size, v.patch_size)
            elif kind == "token":
                x = x.reshape(1, 1, -1)
            elif kind == "pos":
                x = x[None]
            out[name] = np.ascontiguousarray(x)
    return out


def _as_llama(cfg: InternVLConfig) -> InternVLConfig:
    import dataclasses
    return dataclasses.replace(cfg, llm_arch="llama")


def save_pretrained(model, out_dir: str, dtype=None) -> None:
    """Write ``config.json`` + ``model.safetensors`` in transformers' native InternVL layout (an
    InternLM2 language model is written as its Llama equivalent: q/k/v split out of ``wqkv``)."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.config.to_hf_dict()  # raises first if the image token id is unknown
    tensors = params_to_native(model)
    if dtype is not None:
        tensors = {k: v.astype(np.dtype(jnp.dtype(dtype))) for k, v in tensors.items()}
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, metadata=WRITER_METADATA)
    cfg["architectures"] = ["InternVLForConditionalGeneration"]
    atomic_write_json(os.path.join(out_dir, "config.json"), cfg, indent=2)


__all__ = ["IMG_CONTEXT", "LAYOUTS", "check_tensors", "checkpoint_shapes", "find_token_id", "from_pretrained",
           "hf_to_params", "params_to_native", "save_pretrained"]
