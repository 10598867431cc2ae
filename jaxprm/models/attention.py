"""One attention entry point for every model in jaxprm.

``attention`` dispatches on the backend: cuDNN flash attention on GPU (bf16/fp16), the Pallas
splash kernel on TPU, and a plain XLA implementation everywhere else (and as the reference).
Masking is expressed with segment ids: a query attends to a key only when both carry the same
segment id (windows and images in the vision tower, packed sequences and padding in the decoder),
optionally also causally. Padding is its own segment (id 0 by convention in the decoder), so no
row is ever fully masked.

``local_segment_attention`` is the same segment-masked attention for layouts whose segments are
short contiguous runs (the vision tower's windows): it only compares each query with the keys of
its own and the two neighbouring fixed-size chunks, O(T * chunk) instead of O(T^2), and goes
through ``attention`` for the backend dispatch.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp

# "splash_interpret": the splash kernel run by the Pallas interpreter (any backend; for tests on CPU)
IMPLS = ("auto", "xla", "cudnn", "splash", "splash_interpret")
SPLASH_BLOCK = 128  # the splash kernel tiles lengths in multiples of this; others fall back to XLA


_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxprm_attention_target", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Resolve ``impl="auto"`` for ``platform`` ("tpu", "gpu", "cpu") instead of the default backend,
    while tracing a program compiled ahead of time for another device (``bench/pod_bench.py``)."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def resolve_impl(impl: str, dtype) -> str:
    """Pick the concrete implementation for ``impl="auto"`` on the current default backend (or the
    platform set by :func:`target_platform`)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = _TARGET_PLATFORM.get() or jax.default_backend()
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "gpu" and low_precision and _cudnn_flash_supported():
        return "cudnn"
    if backend == "tpu":
        return "splash"
    return "xla"


def _cudnn_flash_supported() -> bool:
    """cuDNN flash attention needs compute capability 8.0 (Ampere) or newer; a T4 (7.5) uses XLA."""
    try:
        cc = getattr(jax.devices()[0], "compute_capability", None)
        return cc is None or float(cc) >= 8.0
    except (ValueError, RuntimeError):
        return True


def segment_mask(q_segment_ids, kv_segment_ids, causal: bool, q_len: int, kv_len: int):
    """Boolean mask (B, 1, T, S): True where the query may attend to the key."""
    mask = None
    if q_segment_ids is not None:
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    if causal:
        c = jnp.tril(jnp.ones((q_len, kv_len), dtype=bool), k=kv_len - q_len)[None, None]
        mask = c if mask is None else mask & c
    return mask


def xla_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=False, scale=None):
    """Reference attention. q: (B,T,N,H); k, v: (B,S,K,H) with N a multiple of K (GQA).

    Scores and softmax in fp32 (like transformers' eager/sdpa paths), probabilities cast back to
    the value dtype for the second matmul.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = h**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = segment_mask(q_segment_ids, kv_segment_ids, causal, t, s)
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def cudnn_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=False, scale=None):
    t, s = q.shape[1], k.shape[1]
    if causal and t != s:
        # cuDNN's causal mask is aligned top-left; queries that follow a cached prefix need the
        # bottom-right alignment, so spell the mask out.
        mask = segment_mask(q_segment_ids, kv_segment_ids, True, t, s)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    mask = None
    if q_segment_ids is not None:
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
    )


def _splash_kernel(num_heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool = False):
    # Built in each trace, never cached by us: the kernel holds its mask tables as arrays of the trace
    # that built it (a cached one leaks them into the next trace). The splash module caches the
    # mask processing itself, so a rebuild costs ~nothing.
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    base = sa.CausalMask((q_len, kv_len)) if causal else sa.FullMask((q_len, kv_len))
    mask = sa.MultiHeadMask([base] * num_heads)
    return sa.make_splash_mha_single_device(mask=mask, interpret=interpret)


def splash_fits(q_len: int, kv_len: int, causal: bool) -> bool:
    """Whether the splash kernel runs these lengths (else ``splash_attention`` falls back to XLA)."""
    return not (q_len % SPLASH_BLOCK or kv_len % SPLASH_BLOCK or (causal and q_len != kv_len))


def splash_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal=False, scale=None,
                     interpret: bool = False):
    """TPU Pallas splash attention; falls back to XLA for lengths the kernel does not tile
    (``splash_fits``). ``interpret=True`` runs the kernel in the Pallas interpreter (CPU tests)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, n, h = q.shape
    s = k.shape[1]
    if not splash_fits(t, s, causal):
        return xla_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                             causal=causal, scale=scale)
    scale = h**-0.5 if scale is None else scale
    rep = n // k.shape[2]
    k = jnp.repeat(k, rep, axis=2)
    v = jnp.repeat(v, rep, axis=2)
    qh = jnp.swapaxes(q * scale, 1, 2)  # (B, N, T, H)
    kh_, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((b, t), jnp.int32)
        kv_segment_ids = jnp.zeros((b, s), jnp.int32)

    args = (qh, kh_, vh, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
    mesh = jax.sharding.get_abstract_mesh()
    local_heads, specs = n, None
    if not mesh.empty:
        # A Pallas kernel is not partitioned by XLA: under a mesh it runs per device on its rows
        # (the "batch" rule) and heads ("heads"), as the surrounding activations are sharded.
        from jaxprm.sharding import spec_for

        heads = spec_for(qh.shape, ("batch", "heads", "length", "length"), mesh)
        seg = spec_for(args[3].shape, ("batch", "length"), mesh)
        specs = (heads, heads, heads, seg, seg), heads
        split = heads[1] if isinstance(heads[1], tuple) else (heads[1],) if heads[1] else ()
        local_heads = n // math.prod(mesh.shape[a] for a in split)
    kernel = _splash_kernel(local_heads, t, s, causal, bool(interpret))  # built outside the shard_map trace

    def run(qh, kh_, vh, qs, ks):  # one device's rows and heads
        def one(qi, ki, vi, qsi, ksi):
            return kernel(qi, ki, vi, segment_ids=sa.SegmentIds(q=qsi, kv=ksi))

        return jax.vmap(one)(qh, kh_, vh, qs, ks)

    if specs is None:
        out = run(*args)
    else:
        out = jax.shard_map(run, in_specs=specs[0], out_specs=specs[1], check_vma=False)(*args)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal: bool = False,
              scale: float | None = None, impl: str = "auto"):
    """Multi-head / grouped-query attention. q: (B,T,N,H); k, v: (B,S,K,H); segment ids (B,T)/(B,S)."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of key/value heads {k.shape[2]}")
    fn = {"xla": xla_attention, "cudnn": cudnn_attention, "splash": splash_attention,
          "splash_interpret": functools.partial(splash_attention, interpret=True)}[resolve_impl(impl, q.dtype)]
    return fn(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal, scale=scale)


def local_segment_attention(q, k, v, segment_ids, chunk: int, *, scale: float | None = None, impl: str = "auto"):
    """Segment-masked self-attention restricted to neighbouring chunks. q: (B,T,N,H); k, v: (B,T,K,H);
    segment_ids: (B,T).

    The sequence is cut into ``ceil(T / chunk)`` chunks of ``chunk`` positions; the queries of chunk
    i attend to the keys of chunks i-1, i and i+1 (3 * chunk keys) that carry the query's segment id.
    With the splash kernel ``chunk`` is rounded up to a multiple of ``SPLASH_BLOCK`` (the vision tower's
    64-patch windows would otherwise fall back to XLA); the result is the same, as it is for any chunk
    at least as long as the segments.

    That equals ``attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)`` for
    every query whose segment is one contiguous run of at most ``chunk`` positions: such a run lies
    in at most two consecutive chunks, so all of its keys are among the 3 * chunk. Positions of
    longer segments (e.g. trailing padding) only see the part of their segment within that reach;
    every position still sees itself, so no row is fully masked.

    The tail padding up to a multiple of ``chunk`` and the missing neighbours of the first and last
    chunks get segment ids below every id in ``segment_ids`` (zero values), so no real query matches
    them. The chunks are folded into the batch (B * num_chunks rows of ``chunk`` queries and
    3 * ``chunk`` keys) and handed to ``attention``, so the backend dispatch applies unchanged.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    if k.shape[1] != t or v.shape[1] != t or segment_ids.shape != (b, t):
        raise ValueError(f"local attention is self-attention: q {q.shape}, k {k.shape}, v {v.shape}, "
                         f"segment_ids {segment_ids.shape}")
    c = int(chunk)
    if c < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if resolve_impl(impl, q.dtype) in ("splash", "splash_interpret"):
        c = -(-c // SPLASH_BLOCK) * SPLASH_BLOCK
    nc = -(-t // c)
    extra = nc * c - t
    seg = segment_ids.astype(jnp.int32)
    low = jnp.min(seg, axis=1, keepdims=True)  # (B, 1); ids below it never match a real position
    tail_id, edge_id = low - 1, low - 2

    def pad_tail(x):
        return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)) if extra else x

    def neighbours(x):  # (B, nc, c, ...) -> (B, nc, 3c, ...): chunks i-1, i, i+1 side by side
        xp = jnp.pad(x, [(0, 0), (1, 1)] + [(0, 0)] * (x.ndim - 2))
        return jnp.concatenate([xp[:, :-2], xp[:, 1:-1], xp[:, 2:]], axis=2)

    if extra:
        seg = jnp.concatenate([seg, jnp.broadcast_to(tail_id, (b, extra))], axis=1)
    seg_q = seg.reshape(b, nc, c)
    seg_p = jnp.concatenate([jnp.broadcast_to(edge_id[:, :, None], (b, 1, c)), seg_q,
                             jnp.broadcast_to(edge_id[:, :, None], (b, 1, c))], axis=1)
    seg_kv = jnp.concatenate([seg_p[:, :-2], seg_p[:, 1:-1], seg_p[:, 2:]], axis=2)  # (B, nc, 3c)
    qc = pad_tail(q).reshape(b * nc, c, n, h)
    kc = neighbours(pad_tail(k).reshape(b, nc, c, kh, h)).reshape(b * nc, 3 * c, kh, h)
    vc = neighbours(pad_tail(v).reshape(b, nc, c, kh, h)).reshape(b * nc, 3 * c, kh, h)
    out = attention(qc, kc, vc, q_segment_ids=seg_q.reshape(b * nc, c), kv_segment_ids=seg_kv.reshape(b * nc, 3 * c),
                    scale=scale, impl=impl)
    return out.reshape(b, nc * c, n, h)[:, :t]
