"""Qwen2.5-VL vision tower: patch embed, 2D rotary, window/full attention blocks, patch merger.

The ``depth`` blocks share one parameter layout (stacked on a leading layer axis). The layer stack
is split into runs of consecutive blocks of the same kind (window or full attention, from
``fullatt_block_indexes``), and each run is one ``lax.scan`` over its slice of the stacked params;
the kind is static per run, so nothing switches branches at run time (a ``lax.cond`` would become a
select running both branches under the ``vmap`` over per-row vision inputs).

Inputs are in window order (see ``rope.vision_layout``): every window (cu_window_seqlens) is a
contiguous run of at most ``window_patches(cfg)`` patches, padding patches trail as segment -1.
Window blocks use ``attention.local_segment_attention`` with that chunk size: each query compares
only with the keys of its own and the neighbouring chunks, O(N * window) instead of O(N^2), and
exact for every real patch (padding patches only see nearby padding; their outputs are dropped).
When N <= 3 * window the dense segment mask is no more work and is used instead. Full-attention
blocks use per-image (per-frame) segment masks over all N patches. The merger output is put back into image order with the reverse permutation, as
transformers does.
"""
from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprm.models import attention as attn_lib
from jaxprm.models.remat import remat
from .config import VisionConfig
from .layers import ParamFactory, activation, dense, rms_norm, rotate_half, values


def window_patches(cfg: VisionConfig) -> int:
    """Most patches one attention window can hold: (window_size / merge / patch)**2 merged tokens
    of merge**2 patches each (64 for the released configs, 16 for the tiny test config)."""
    merge = cfg.spatial_merge_size
    return (cfg.window_size // merge // cfg.patch_size) ** 2 * merge**2


def layer_runs(full_attention) -> list[tuple[int, int, bool]]:
    """Maximal runs of consecutive same-kind layers: [(start, stop, is_full), ...]."""
    runs = []
    for i, f in enumerate(full_attention):
        if runs and runs[-1][2] == f:
            runs[-1] = (runs[-1][0], i + 1, f)
        else:
            runs.append((i, i + 1, f))
    return runs


class VisionBlocks(nnx.Module):
    def __init__(self, cfg: VisionConfig, pf: ParamFactory):
        L, D, I = cfg.depth, cfg.hidden_size, cfg.intermediate_size
        self.norm1, self.norm2 = pf.ones(layers=L, norm=D), pf.ones(layers=L, norm=D)
        self.qkv_w, self.qkv_b = pf.normal(layers=L, embed=D, heads=3 * D), pf.zeros(layers=L, heads=3 * D)
        self.proj_w, self.proj_b = pf.normal(layers=L, heads=D, embed=D), pf.zeros(layers=L, norm=D)
        self.gate_w, self.gate_b = pf.normal(layers=L, embed=D, mlp=I), pf.zeros(layers=L, mlp=I)
        self.up_w, self.up_b = pf.normal(layers=L, embed=D, mlp=I), pf.zeros(layers=L, mlp=I)
        self.down_w, self.down_b = pf.normal(layers=L, mlp=I, embed=D), pf.zeros(layers=L, norm=D)


class PatchMerger(nnx.Module):
    def __init__(self, cfg: VisionConfig, pf: ParamFactory):
        D, m2 = cfg.hidden_size, cfg.spatial_merge_size**2
        self.ln_q = pf.ones(norm=D)
        self.fc1_w, self.fc1_b = pf.normal(embed=D * m2, mlp=D * m2), pf.zeros(mlp=D * m2)
        self.fc2_w, self.fc2_b = pf.normal(mlp=D * m2, embed=cfg.out_hidden_size), pf.zeros(norm=cfg.out_hidden_size)


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attn_impl: str = "auto", remat_policy: str | None = None, rngs: nnx.Rngs):
        self.cfg, self.dtype, self.attn_impl, self.remat_policy = cfg, dtype, attn_impl, remat_policy
        pf = ParamFactory(rngs, param_dtype)
        self.patch_embed = pf.normal(patch=cfg.patch_dim, embed=cfg.hidden_size)  # Conv3d, stride == kernel
        self.blocks = VisionBlocks(cfg, pf)
        self.merger = PatchMerger(cfg, pf)
        full = np.zeros(cfg.depth, bool)
        full[list(cfg.fullatt_block_indexes)] = True
        self.full_attention = tuple(bool(x) for x in full)

    def inv_freq(self):
        half = self.cfg.head_dim // 2
        return 1.0 / (self.cfg.rope_theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))

    def __call__(self, pixel_values, window_index, reverse_index, window_segment_ids, full_segment_ids,
                 rotary_positions, *, dense_window_attention: bool = False):
        """pixel_values: (N, C*T*P*P) in image order; index arrays from ``rope.vision_layout``.
        Returns (N / merge**2, out_hidden_size) merged features in image order.

        ``dense_window_attention``: run the window blocks as dense segment-masked attention over all
        N patches (the O(N^2) reference the chunked path is tested against)."""
        cfg, dt = self.cfg, self.dtype
        unit = cfg.spatial_merge_size**2
        n = pixel_values.shape[0]
        x = dense(pixel_values.astype(dt), self.patch_embed[...].astype(dt))
        x = x.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)

        freqs = rotary_positions.astype(jnp.float32)[..., None] * self.inv_freq()  # (N, 2, Dh/4)
        freqs = freqs.reshape(n, -1)
        emb = jnp.concatenate([freqs, freqs], -1)
        cos, sin = jnp.cos(emb)[:, None, :], jnp.sin(emb)[:, None, :]  # (N, 1, Dh), fp32

        heads, hd = cfg.num_heads, cfg.head_dim
        act = activation(cfg.hidden_act)
        eps = cfg.rms_norm_eps
        impl = self.attn_impl
        chunk = window_patches(cfg)
        # chunked attention reads 3 * chunk keys per query; below that the dense mask is cheaper
        local = not dense_window_attention and 0 < chunk and 3 * chunk < n

        def attend(q, k, v, is_full):
            if is_full or not local:
                seg = (full_segment_ids if is_full else window_segment_ids)[None]
                return attn_lib.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=impl)
            return attn_lib.local_segment_attention(q, k, v, window_segment_ids[None], chunk, impl=impl)

        def make_block(is_full: bool):
            def block(h, p):
                y = rms_norm(h, p["norm1"], eps)
                qkv = dense(y, p["qkv_w"], p["qkv_b"]).reshape(n, 3, heads, hd)
                q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
                qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
                q = (qf * cos + rotate_half(qf) * sin).astype(dt)
                k = (kf * cos + rotate_half(kf) * sin).astype(dt)
                o = attend(q[None], k[None], v[None], is_full)
                o = dense(o[0].reshape(n, -1), p["proj_w"], p["proj_b"])
                h = h + checkpoint_name(o, "attn_out")
                y = rms_norm(h, p["norm2"], eps)
                m = dense(act(dense(y, p["gate_w"], p["gate_b"])) * dense(y, p["up_w"], p["up_b"]),
                          p["down_w"], p["down_b"])
                return h + checkpoint_name(m, "mlp_out"), None
            return remat(block, self.remat_policy)

        params = values(self.blocks, dt)
        # one scan per run of same-kind layers (length-1 runs too, so remat behaves the same)
        for start, stop, is_full in layer_runs(self.full_attention):
            run = {name: a[start:stop] for name, a in params.items()}
            x, _ = jax.lax.scan(make_block(is_full), x, run)

        mp = values(self.merger, dt)
        y = rms_norm(x, mp["ln_q"], 1e-6).reshape(n // unit, -1)
        y = dense(jax.nn.gelu(dense(y, mp["fc1_w"], mp["fc1_b"]), approximate=False), mp["fc2_w"], mp["fc2_b"])
        return y[reverse_index]
