"""HF Qwen2.5-VL checkpoints <-> the Flax parameter tree.

Reads ``config.json`` and ``*.safetensors`` (single file or sharded with an index), with either key
layout transformers has written: legacy ``visual.*`` / ``model.*`` or v5
``model.visual.*`` / ``model.language_model.*``. Per-layer tensors are stacked onto the leading
layer axis of our scanned blocks; torch ``Linear`` weights (out, in) become (in, out) kernels; the
stride==kernel Conv3d patch embedding becomes a (C*T*P*P, D) matmul.
"""
from __future__ import annotations

import json
import os
import re
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxprm.atomic import atomic_open, atomic_write_json

from .config import Qwen25VLConfig

# ------------------------------------------------------------------------------------------------
# safetensors I/O (numpy, memory-mapped, bf16 via ml_dtypes)
# ------------------------------------------------------------------------------------------------
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


# written into the ``__metadata__`` of the safetensors files jaxprm writes (``save_pretrained``): how
# ``jaxprm.checkpointing`` tells a jaxprm export from a released HF checkpoint
WRITER_METADATA = {"writer": "jaxprm"}


def written_by_jaxprm(path: str) -> bool:
    """Whether ``path`` (a .safetensors file) carries ``WRITER_METADATA``; False for unreadable files."""
    try:
        header, _ = read_safetensors_header(path)
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__")
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in WRITER_METADATA.items())


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header dict, data start offset) of a .safetensors file, checked against the file's size: a
    ``ValueError`` naming the file (and the tensor) for anything that is not a valid header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n} but the file has {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # JSONDecodeError / UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            shape = [int(d) for d in shape]
            a, b = int(a), int(b)
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: tensor {name!r} has a corrupt header entry {info!r} ({e!r})") from None
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if any(d < 0 for d in shape) or not 0 <= a <= b <= data:
            raise ValueError(f"{path}: tensor {name!r}: shape {shape} / data_offsets [{a}, {b}] do not fit the "
                             f"file ({data} data bytes); the file is corrupt or truncated")
        need = int(np.prod(shape, dtype=object)) * np.dtype(_DTYPES[dtype]).itemsize
        if need != b - a:
            raise ValueError(f"{path}: tensor {name!r}: shape {shape} of {dtype} needs {need} bytes but "
                             f"data_offsets [{a}, {b}] hold {b - a}; the file is corrupt")
    return header, 8 + n


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of one .safetensors file."""
    header, start = read_safetensors_header(path)
    out = {}
    if os.path.getsize(path) == start:  # no data bytes: np.memmap cannot map an empty range
        return {name: np.zeros(info["shape"], _DTYPES[info["dtype"]]) for name, info in header.items()
                if name != "__metadata__"}
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = mm[a:b].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    header, offset = {}, 0
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for k, v in arrays.items():
        header[k] = {"dtype": _NAMES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for v in arrays.values():
            f.write(v.tobytes())


def read_checkpoint_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
    else:
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        # model.safetensors / model-0000k-of-0000n.safetensors; other files (e.g. a PRM's
        # step_head.safetensors) are not backbone weights
        files = [f for f in files if f.startswith("model")] or files
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors weights found (PyTorch .bin checkpoints are not "
                                "supported: re-save with save_pretrained(safe_serialization=True))")
    out = {}
    for fn in files:
        p = os.path.join(hf_dir, fn)
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} is listed in the safetensors index but missing")
        out.update(read_safetensors(p))
    return out


# ------------------------------------------------------------------------------------------------
# key mapping
# ------------------------------------------------------------------------------------------------
def canonical_name(name: str) -> str:
    """Map legacy names onto the v5 layout (model.visual.*, model.language_model.*, lm_head.*)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + name[len("model."):]
    return name


# (regex on the canonical name, our path, how to convert). Stacked entries carry the layer index
# in group 1. Kinds: "linear" (transpose), "vec", "conv" (flatten + transpose), "embed" (as is).
_V, _T = r"model\.visual\.", r"model\.language_model\."
RULES = [
    (_V + r"patch_embed\.proj\.weight", ("visual", "patch_embed"), "conv"),
    (_V + r"blocks\.(\d+)\.norm1\.weight", ("visual", "blocks", "norm1"), "vec"),
    (_V + r"blocks\.(\d+)\.norm2\.weight", ("visual", "blocks", "norm2"), "vec"),
    (_V + r"blocks\.(\d+)\.attn\.qkv\.weight", ("visual", "blocks", "qkv_w"), "linear"),
    (_V + r"blocks\.(\d+)\.attn\.qkv\.bias", ("visual", "blocks", "qkv_b"), "vec"),
    (_V + r"blocks\.(\d+)\.attn\.proj\.weight", ("visual", "blocks", "proj_w"), "linear"),
    (_V + r"blocks\.(\d+)\.attn\.proj\.bias", ("visual", "blocks", "proj_b"), "vec"),
    (_V + r"blocks\.(\d+)\.mlp\.gate_proj\.weight", ("visual", "blocks", "gate_w"), "linear"),
    (_V + r"blocks\.(\d+)\.mlp\.gate_proj\.bias", ("visual", "blocks", "gate_b"), "vec"),
    (_V + r"blocks\.(\d+)\.mlp\.up_proj\.weight", ("visual", "blocks", "up_w"), "linear"),
    (_V + r"blocks\.(\d+)\.mlp\.up_proj\.bias", ("visual", "blocks", "up_b"), "vec"),
    (_V + r"blocks\.(\d+)\.mlp\.down_proj\.weight", ("visual", "blocks", "down_w"), "linear"),
    (_V + r"blocks\.(\d+)\.mlp\.down_proj\.bias", ("visual", "blocks", "down_b"), "vec"),
    (_V + r"merger\.ln_q\.weight", ("visual", "merger", "ln_q"), "vec"),
    (_V + r"merger\.mlp\.0\.weight", ("visual", "merger", "fc1_w"), "linear"),
    (_V + r"merger\.mlp\.0\.bias", ("visual", "merger", "fc1_b"), "vec"),
    (_V + r"merger\.mlp\.2\.weight", ("visual", "merger", "fc2_w"), "linear"),
    (_V + r"merger\.mlp\.2\.bias", ("visual", "merger", "fc2_b"), "vec"),
    (_T + r"embed_tokens\.weight", ("language_model", "embed_tokens"), "embed"),
    (_T + r"layers\.(\d+)\.input_layernorm\.weight", ("language_model", "layers", "input_norm"), "vec"),
    (_T + r"layers\.(\d+)\.post_attention_layernorm\.weight", ("language_model", "layers", "post_norm"), "vec"),
    (_T + r"layers\.(\d+)\.self_attn\.q_proj\.weight", ("language_model", "layers", "q_w"), "linear"),
    (_T + r"layers\.(\d+)\.self_attn\.q_proj\.bias", ("language_model", "layers", "q_b"), "vec"),
    (_T + r"layers\.(\d+)\.self_attn\.k_proj\.weight", ("language_model", "layers", "k_w"), "linear"),
    (_T + r"layers\.(\d+)\.self_attn\.k_proj\.bias", ("language_model", "layers", "k_b"), "vec"),
    (_T + r"layers\.(\d+)\.self_attn\.v_proj\.weight", ("language_model", "layers", "v_w"), "linear"),
    (_T + r"layers\.(\d+)\.self_attn\.v_proj\.bias", ("language_model", "layers", "v_b"), "vec"),
    (_T + r"layers\.(\d+)\.self_attn\.o_proj\.weight", ("language_model", "layers", "o_w"), "linear"),
    (_T + r"layers\.(\d+)\.mlp\.gate_proj\.weight", ("language_model", "layers", "gate_w"), "linear"),
    (_T + r"layers\.(\d+)\.mlp\.up_proj\.weight", ("language_model", "layers", "up_w"), "linear"),
    (_T + r"layers\.(\d+)\.mlp\.down_proj\.weight", ("language_model", "layers", "down_w"), "linear"),
    (_T + r"norm\.weight", ("language_model", "norm"), "vec"),
    (r"lm_head\.weight", ("lm_head",), "linear"),
]
_COMPILED = [(re.compile(p + "$"), path, kind) for p, path, kind in RULES]
# non-persistent buffers some exporters still write
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|rotary_pos_emb\.inv_freq)$")


def map_name(name: str):
    """HF tensor name -> (our path, layer index or None, kind); None for ignorable buffers."""
    c = canonical_name(name)
    if _IGNORED.match(c):
        return None
    for rx, path, kind in _COMPILED:
        m = rx.match(c)
        if m:
            return path, (int(m.group(1)) if m.groups() else None), kind
    raise KeyError(f"unexpected tensor {name!r} in checkpoint: not part of Qwen2.5-VL")


def to_flax(kind: str, a):
    if kind == "linear":
        return a.T
    if kind == "conv":
        return a.reshape(a.shape[0], -1).T
    return a


def to_flax_shape(kind: str, shape: tuple) -> tuple:
    if kind == "linear":
        return tuple(reversed(shape))
    if kind == "conv":
        return (int(np.prod(shape[1:])), shape[0])
    return tuple(shape)


def hf_to_params(tensors: dict[str, np.ndarray], config: Qwen25VLConfig, dtype,
                 names: dict | None = None) -> dict[tuple, np.ndarray]:
    """HF tensors -> {our param path: array in ``dtype``}; stacked per-layer tensors are stacked.
    ``names`` (optional, filled in): our path -> the HF tensor name(s) it came from, for errors."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    single, stacked, stacked_names = {}, {}, {}
    names = {} if names is None else names
    for name, arr in tensors.items():
        m = map_name(name)
        if m is None:
            continue
        path, layer, kind = m
        if path == ("lm_head",) and config.tie_word_embeddings:
            continue  # tied: transformers ignores a saved lm_head too
        try:
            a = np.asarray(to_flax(kind, arr), dtype=np_dtype)
        except ValueError as e:
            raise ValueError(f"tensor {name!r} (shape {tuple(arr.shape)}): cannot convert it to "
                             f"{'/'.join(path)} ({e})") from None
        if layer is None:
            single[path] = a
            names[path] = repr(name)
        else:
            stacked.setdefault(path, {})[layer] = a
            stacked_names.setdefault(path, {})[layer] = name
    depth = {"visual": config.vision.depth, "language_model": config.text.num_hidden_layers}
    for path, layers in stacked.items():
        n = depth[path[0]]
        missing = sorted(set(range(n)) - set(layers))
        extra = sorted(set(layers) - set(range(n)))
        if missing or extra:
            raise ValueError(f"{'/'.join(path)}: checkpoint layers do not match config "
                             f"(missing {missing[:8]}, unexpected {extra[:8]}; config depth {n})")
        bad = next((i for i in range(n) if layers[i].shape != layers[0].shape), None)
        if bad is not None:
            nb, n0 = stacked_names[path][bad], stacked_names[path][0]
            raise ValueError(f"tensor {nb!r} has shape {tuple(tensors[nb].shape)} but {n0!r} has "
                             f"{tuple(tensors[n0].shape)} (layer {bad} of {'/'.join(path)}); "
                             "the checkpoint does not match its config")
        single[path] = np.stack([layers[i] for i in range(n)])
        names[path] = f"{stacked_names[path][0]!r} (and the other layers)"
    return single


def params_to_hf(model) -> dict[str, np.ndarray]:
    """Our params -> HF tensors with v5 names (inverse of ``hf_to_params``)."""
    flat = {tuple(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.state(model, nnx.Param).flat_state()}
    out = {}
    for pattern, path, kind in RULES:
        if path not in flat:
            continue
        a = flat[path]
        name = pattern.replace("\\.", ".")
        inv = (lambda x: x.T) if kind == "linear" else (lambda x: x)
        if kind == "conv":
            v = model.config.vision
            inv = lambda x, v=v: x.T.reshape(x.shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        if "(\\d+)" in pattern:
            for i in range(a.shape[0]):
                out[name.replace("(\\d+)", str(i))] = np.ascontiguousarray(inv(a[i]))
        else:
            out[name] = np.ascontiguousarray(inv(a))
    return out


# ------------------------------------------------------------------------------------------------
# user entry points
# ------------------------------------------------------------------------------------------------
def from_pretrained(hf_dir: str, dtype=jnp.float32, param_dtype=None, attn_impl: str = "auto",
                    remat_policy: str | None = None):
    """Load an HF Qwen2.5-VL directory (config.json + safetensors) as a Flax NNX ``Qwen25VL``.

    ``dtype`` is the compute dtype; ``param_dtype`` (default: ``dtype``) the storage dtype.
    """
    from .model import Qwen25VL

    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir!r} is not a directory: expected an HF Qwen2.5-VL checkpoint dir")
    config = Qwen25VLConfig.from_pretrained(hf_dir)
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(lambda: Qwen25VL(config, dtype=dtype, param_dtype=param_dtype,
                                                attn_impl=attn_impl, remat_policy=remat_policy))
    graphdef, state = nnx.split(abstract)
    tensors = read_checkpoint_tensors(hf_dir)
    names: dict = {}
    try:
        loaded = hf_to_params(tensors, config, param_dtype, names)
    except ValueError as e:
        raise ValueError(f"{hf_dir}: {e}") from None
    flat = dict(state.flat_state())
    new = {}
    for path, var in flat.items():
        key = tuple(str(p) for p in path)
        if key not in loaded:
            raise ValueError(f"{hf_dir}: checkpoint has no weight for {'/'.join(key)}"
                             + (" (config says untied lm_head but lm_head.weight is missing)" if key == ("lm_head",) else ""))
        arr = loaded.pop(key)
        if tuple(arr.shape) != tuple(var.shape):
            raise ValueError(f"{hf_dir}: tensor {names.get(key, '?')} gives weight {'/'.join(key)} the shape "
                             f"{arr.shape}, but config.json implies {var.shape}")
        new[path] = var.replace(jnp.asarray(arr))
    if loaded:
        raise ValueError(f"{hf_dir}: weights not used by the model: {sorted('/'.join(k) for k in loaded)[:8]}")
    return nnx.merge(graphdef, nnx.State.from_flat_path(new))


def save_pretrained(model, out_dir: str, dtype=None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (v5 names) that transformers can load."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = params_to_hf(model)
    if dtype is not None:
        tensors = {k: v.astype(np.dtype(jnp.dtype(dtype))) for k, v in tensors.items()}
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, metadata=WRITER_METADATA)
    cfg = model.config.to_hf_dict()
    cfg["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    atomic_write_json(os.path.join(out_dir, "config.json"), cfg, indent=2)
