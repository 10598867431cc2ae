"""Qwen2 decoder of Qwen2.5-VL: GQA with qkv bias, M-RoPE, SwiGLU, RMSNorm (fp32 statistics).

Also the language model of InternVL (``jaxprm.models.internvl``): there with 1D RoPE, which is M-RoPE
with a single section (``mrope_section=(head_dim // 2,)``) and ``position_ids`` of shape (1, B, L),
and, for Llama-shaped decoders (InternLM2 after its published weight mapping), without q/k/v biases
(``TextConfig.attention_bias=False``).

Layers are stacked on a leading axis and run under one ``lax.scan`` (fast compiles, one remat
policy for all layers). Attention masking is causal within segments: ``segment_ids`` (B, L) are
equal for tokens of one sequence; padding is its own segment.

The residual stream is constrained to its logical axes ``RESIDUAL`` (through
``jaxprm.sharding.constrain``) when a mesh is set with ``jax.set_mesh``; without one (single-device
code) the constraints are no-ops.
"""
from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from jaxprm.models import attention as attn_lib
from jaxprm.models.remat import remat
from jaxprm.sharding import constrain
from .config import TextConfig
from .layers import ParamFactory, activation, dense, rms_norm, rotate_half, values

RESIDUAL = ("batch", "length", "activation_embed")  # logical axes of the residual stream (B, L, D)


class DecoderLayers(nnx.Module):
    def __init__(self, cfg: TextConfig, pf: ParamFactory):
        L, D, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        hd, H, K = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.input_norm, self.post_norm = pf.ones(layers=L, norm=D), pf.ones(layers=L, norm=D)
        self.q_w = pf.normal(layers=L, embed=D, heads=H * hd)
        self.k_w = pf.normal(layers=L, embed=D, kv=K * hd)
        self.v_w = pf.normal(layers=L, embed=D, kv=K * hd)
        if cfg.attention_bias:  # Qwen2; Llama-shaped decoders have no q/k/v biases
            self.q_b, self.k_b, self.v_b = (pf.zeros(layers=L, heads=H * hd), pf.zeros(layers=L, kv=K * hd),
                                            pf.zeros(layers=L, kv=K * hd))
        self.o_w = pf.normal(layers=L, heads=H * hd, embed=D)
        self.gate_w = pf.normal(layers=L, embed=D, mlp=I)
        self.up_w = pf.normal(layers=L, embed=D, mlp=I)
        self.down_w = pf.normal(layers=L, mlp=I, embed=D)


def mrope_cos_sin(position_ids, cfg: TextConfig, dtype):
    """position_ids (3, B, L) -> cos, sin (B, L, 1, head_dim) in ``dtype``.

    Frequency slot i of the rotary half takes its angle from axis t, h or w according to
    ``mrope_section`` (cycled t, h, w, t, ...), then the half is duplicated as in rotate_half rope.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (3, B, L, hd/2)
    parts, start = [], 0
    for i, n in enumerate(cfg.mrope_section):
        parts.append(freqs[i % 3, ..., start:start + n])
        start += n
    f = jnp.concatenate(parts, -1)
    emb = jnp.concatenate([f, f], -1)[:, :, None, :]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attn_impl: str = "auto", remat_policy: str | None = None, rngs: nnx.Rngs):
        self.cfg, self.dtype, self.attn_impl, self.remat_policy = cfg, dtype, attn_impl, remat_policy
        pf = ParamFactory(rngs, param_dtype)
        self.embed_tokens = pf.normal(vocab=cfg.vocab_size, embed=cfg.hidden_size)
        self.layers = DecoderLayers(cfg, pf)
        self.norm = pf.ones(norm=cfg.hidden_size)

    def embed(self, input_ids):
        return self.embed_tokens[...].astype(self.dtype)[input_ids]

    def __call__(self, inputs_embeds, position_ids, segment_ids, past_kv=None, past_segment_ids=None,
                 return_kv: bool = False):
        """inputs_embeds (B, L, D), position_ids (3, B, L), segment_ids (B, L) -> final-normed hidden (B, L, D).

        ``past_kv``: optional (k, v), each (layers, B, S, K, head_dim), of tokens that precede this chunk
        (a shared prompt prefix, or a decoding cache); ``past_segment_ids`` (B, S) says which of them
        each query may see (equal ids; 0 for empty cache slots / padding). With ``return_kv`` also
        returns this chunk's (k, v), each (layers, B, L, K, head_dim), rotary already applied.
        """
        cfg, dt = self.cfg, self.dtype
        b, l, _ = inputs_embeds.shape
        H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        cos, sin = mrope_cos_sin(position_ids, cfg, dt)
        act, eps, impl = activation(cfg.hidden_act), cfg.rms_norm_eps, self.attn_impl
        kv_seg = segment_ids if past_kv is None else jnp.concatenate([past_segment_ids, segment_ids], axis=1)

        def layer(h, xs):
            p, past = xs
            y = rms_norm(h, p["input_norm"], eps)
            q = dense(y, p["q_w"], p.get("q_b")).reshape(b, l, H, hd)
            k = dense(y, p["k_w"], p.get("k_b")).reshape(b, l, K, hd)
            v = dense(y, p["v_w"], p.get("v_b")).reshape(b, l, K, hd)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k_all, v_all = (k, v) if past is None else (jnp.concatenate([past[0].astype(dt), k], 1),
                                                        jnp.concatenate([past[1].astype(dt), v], 1))
            o = attn_lib.attention(q, k_all, v_all, q_segment_ids=segment_ids, kv_segment_ids=kv_seg,
                                   causal=True, impl=impl)
            o = dense(o.reshape(b, l, H * hd), p["o_w"])
            h = h + checkpoint_name(o, "attn_out")
            y = rms_norm(h, p["post_norm"], eps)
            m = dense(act(dense(y, p["gate_w"])) * dense(y, p["up_w"]), p["down_w"])
            h = constrain(h + checkpoint_name(m, "mlp_out"), RESIDUAL)
            return h, ((k, v) if return_kv else None)

        h = constrain(inputs_embeds.astype(dt), RESIDUAL)
        h, kv = jax.lax.scan(remat(layer, self.remat_policy), h, (values(self.layers, dt), past_kv))
        h = constrain(rms_norm(h, self.norm[...].astype(dt), eps), RESIDUAL)
        return (h, kv) if return_kv else h
