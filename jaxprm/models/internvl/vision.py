"""InternViT (InternVL's vision tower), pixel shuffle and the MLP projector.

InternViT is a plain pre-norm ViT over one tile at a time: a stride == kernel Conv2d patch embedding
(here a matmul over flattened patches), a class token, learned absolute position embeddings (bicubic
resized, as torch's ``F.interpolate(mode="bicubic", align_corners=False)`` does, when a tile's patch
grid differs from the configured one), then blocks of

    h = h + ls1 * attn(norm1(h));   h = h + ls2 * mlp(norm2(h))

with LayerScale vectors ``ls1``/``ls2``, LayerNorm or RMSNorm (``norm_type``), a packed qkv projection
(optional bias) and optional qk-normalisation (RMSNorm over all heads). The blocks share one
parameter layout stacked on a leading layer axis and run under one ``lax.scan`` (with the project's
remat policies); ``select_layer`` runs only the layers it needs.

Features of the selected layer lose the class token, are pixel-shuffled (``downsample_ratio`` 0.5,
``ps_version`` v2: each 2x2 block of patches becomes one token of 4x the width) and projected into
the language model's width by LayerNorm -> Linear -> GELU -> Linear (``mlp1`` / ``multi_modal_projector``).
"""
from __future__ import annotations

import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprm.models import attention as attn_lib
from jaxprm.models.qwen2_5_vl.layers import ParamFactory, activation, dense, rms_norm, values
from jaxprm.models.remat import remat
from .config import InternVLConfig, VisionConfig


def layer_norm(x, weight, bias, eps: float):
    """torch LayerNorm with fp32 statistics; the result is cast back to ``x``'s dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """torch's bicubic convolution weights for the 4 taps around a fractional offset ``t``."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) matrix M with ``M @ x`` = torch ``F.interpolate(x, size=out_size,
    mode="bicubic", align_corners=False)`` along one axis (border taps clamped, no antialiasing)."""
    m = np.zeros((out_size, in_size), np.float64)
    if out_size == in_size:
        np.fill_diagonal(m, 1.0)
        return m
    scale = in_size / out_size
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        base = int(np.floor(src))
        w = _cubic_weights(np.asarray(src - base))
        for k in range(4):
            m[i, min(max(base - 1 + k, 0), in_size - 1)] += w[k]
    return m


def resize_position_embedding(pos, grid: int, out_h: int, out_w: int):
    """(grid*grid, D) patch position embeddings -> (out_h*out_w, D), bicubic (torch semantics)."""
    if (out_h, out_w) == (grid, grid):
        return pos
    d = pos.shape[-1]
    mh = jnp.asarray(bicubic_matrix(out_h, grid), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(out_w, grid), jnp.float32)
    p = pos.astype(jnp.float32).reshape(grid, grid, d)
    p = jnp.einsum("hi,ijd,wj->hwd", mh, p, mw, precision=jax.lax.Precision.HIGHEST)
    return p.reshape(out_h * out_w, d).astype(pos.dtype)


def pixel_shuffle(x, scale: float = 0.5):
    """InternVL's pixel shuffle (ps_version v2). x: (N, W, H, C) -> (N, W*s, H*s, C/s**2)."""
    n, w, h, c = x.shape
    r = int(round(1 / scale))
    if w % r or h % r:
        raise ValueError(f"pixel shuffle needs a patch grid divisible by {r}, got {w}x{h}")
    x = x.reshape(n, w, h // r, c * r)
    x = jnp.swapaxes(x, 1, 2)  # (n, h/r, w, c*r)
    x = x.reshape(n, h // r, w // r, c * r * r)
    return jnp.swapaxes(x, 1, 2)  # (n, w/r, h/r, c*r*r)


class VisionBlocks(nnx.Module):
    def __init__(self, cfg: VisionConfig, pf: ParamFactory):
        L, D, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        self.norm1_w, self.norm2_w = pf.ones(layers=L, norm=D), pf.ones(layers=L, norm=D)
        if cfg.norm_type == "layer_norm":
            self.norm1_b, self.norm2_b = pf.zeros(layers=L, norm=D), pf.zeros(layers=L, norm=D)
        self.qkv_w = pf.normal(layers=L, embed=D, heads=3 * D)
        if cfg.qkv_bias:
            self.qkv_b = pf.zeros(layers=L, heads=3 * D)
        if cfg.qk_normalization:
            self.q_norm, self.k_norm = pf.ones(layers=L, norm=D), pf.ones(layers=L, norm=D)
        self.proj_w, self.proj_b = pf.normal(layers=L, heads=D, embed=D), pf.zeros(layers=L, norm=D)
        self.ls1, self.ls2 = pf.ones(layers=L, norm=D), pf.ones(layers=L, norm=D)
        self.fc1_w, self.fc1_b = pf.normal(layers=L, embed=D, mlp=I), pf.zeros(layers=L, mlp=I)
        self.fc2_w, self.fc2_b = pf.normal(layers=L, mlp=I, embed=D), pf.zeros(layers=L, norm=D)


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, pf: ParamFactory):
        D = cfg.hidden_size
        self.patch_w, self.patch_b = pf.normal(patch=cfg.patch_dim, embed=D), pf.zeros(norm=D)
        self.class_embedding = pf.normal(norm=D)
        self.position_embedding = pf.normal(patch=cfg.grid**2 + 1, embed=D)


class Projector(nnx.Module):
    """mlp1 / multi_modal_projector: LayerNorm -> Linear -> act -> Linear."""

    def __init__(self, cfg: InternVLConfig, pf: ParamFactory):
        din = cfg.vision.hidden_size * int(round(1 / cfg.downsample_ratio)) ** 2
        dt = cfg.text.hidden_size
        self.ln_w, self.ln_b = pf.ones(norm=din), pf.zeros(norm=din)
        self.fc1_w, self.fc1_b = pf.normal(embed=din, mlp=dt), pf.zeros(mlp=dt)
        self.fc2_w, self.fc2_b = pf.normal(mlp=dt, embed=dt), pf.zeros(norm=dt)


class VisionTower(nnx.Module):
    """InternViT + pixel shuffle + projector: (N, C, H, W) tiles -> (N, tokens per tile, text hidden)."""

    def __init__(self, cfg: InternVLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attn_impl: str = "auto", remat_policy: str | None = None, rngs: nnx.Rngs):
        self.cfg, self.dtype, self.attn_impl, self.remat_policy = cfg, dtype, attn_impl, remat_policy
        v = cfg.vision
        pf = ParamFactory(rngs, param_dtype)
        self.embeddings = VisionEmbeddings(v, pf)
        self.blocks = VisionBlocks(v, pf)
        if v.post_layernorm:
            self.post_norm_w, self.post_norm_b = pf.ones(norm=v.hidden_size), pf.zeros(norm=v.hidden_size)
        self.projector = Projector(cfg, pf)

    def _norm(self, x, w, b):
        v = self.cfg.vision
        if v.norm_type == "layer_norm":
            return layer_norm(x, w, b, v.layer_norm_eps)
        return rms_norm(x, w, v.layer_norm_eps)

    def embed(self, pixel_values):
        """(N, C, H, W) -> (N, 1 + h*w, D): class token + patch embeddings + position embeddings."""
        v, dt = self.cfg.vision, self.dtype
        n, c, hh, ww = pixel_values.shape
        p = v.patch_size
        if c != v.num_channels or hh % p or ww % p:
            raise ValueError(f"pixel_values of shape {pixel_values.shape}: expected (N, {v.num_channels}, H, W) "
                             f"with H and W multiples of patch_size {p}")
        h, w = hh // p, ww // p
        x = pixel_values.astype(dt).reshape(n, c, h, p, w, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, h * w, c * p * p)
        e = values(self.embeddings, dt)
        x = dense(x, e["patch_w"], e["patch_b"])
        pos = e["position_embedding"]
        patch_pos = resize_position_embedding(pos[1:], v.grid, h, w)
        cls = jnp.broadcast_to((e["class_embedding"] + pos[0])[None, None], (n, 1, x.shape[-1]))
        return jnp.concatenate([cls, x + patch_pos[None]], axis=1)

    def encode(self, pixel_values, num_layers: int | None = None):
        """Embeddings then the first ``num_layers`` blocks (default: all): (N, 1 + h*w, D)."""
        v, dt = self.cfg.vision, self.dtype
        n_layers = v.num_hidden_layers if num_layers is None else num_layers
        x = self.embed(pixel_values)
        n, t, d = x.shape
        heads, hd = v.num_attention_heads, v.head_dim
        act, impl = activation(v.hidden_act), self.attn_impl

        def block(h, p):
            y = self._norm(h, p["norm1_w"], p.get("norm1_b"))
            qkv = dense(y, p["qkv_w"], p.get("qkv_b")).reshape(n, t, 3, d)
            q, k, val = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            if "q_norm" in p:
                q, k = rms_norm(q, p["q_norm"], v.qk_norm_eps), rms_norm(k, p["k_norm"], v.qk_norm_eps)
            o = attn_lib.attention(q.reshape(n, t, heads, hd), k.reshape(n, t, heads, hd),
                                   val.reshape(n, t, heads, hd), impl=impl)
            o = dense(o.reshape(n, t, d), p["proj_w"], p["proj_b"])
            h = h + checkpoint_name(o * p["ls1"], "attn_out")
            y = self._norm(h, p["norm2_w"], p.get("norm2_b"))
            m = dense(act(dense(y, p["fc1_w"], p["fc1_b"])), p["fc2_w"], p["fc2_b"])
            return h + checkpoint_name(m * p["ls2"], "mlp_out"), None

        if n_layers:
            params = {k: a[:n_layers] for k, a in values(self.blocks, dt).items()}
            x, _ = jax.lax.scan(remat(block, self.remat_policy), x, params)
        return x

    def features(self, pixel_values):
        """The vision features InternVL uses (hidden state of ``select_layer``), class token included."""
        cfg = self.cfg
        x = self.encode(pixel_values, cfg.vision_layers_used)
        if cfg.select_layer == -1 and cfg.vision.post_layernorm:
            x = layer_norm(x, self.post_norm_w[...].astype(self.dtype), self.post_norm_b[...].astype(self.dtype),
                           cfg.vision.layer_norm_eps)
        return x

    def __call__(self, pixel_values):
        """(N, C, H, W) tiles -> (N, h*w/4, text hidden) projected image tokens."""
        cfg, dt = self.cfg, self.dtype
        x = self.features(pixel_values)[:, 1:]
        n, t, d = x.shape
        side = int(round(t**0.5))
        if side * side != t:
            raise ValueError(f"InternVL tiles must be square: got {t} patches")
        x = pixel_shuffle(x.reshape(n, side, side, d), cfg.downsample_ratio).reshape(n, t // 4, 4 * d)
        p = values(self.projector, dt)
        y = layer_norm(x, p["ln_w"], p["ln_b"], cfg.projector_ln_eps)
        y = activation(cfg.projector_hidden_act)(dense(y, p["fc1_w"], p["fc1_b"]))
        return dense(y, p["fc2_w"], p["fc2_b"])
