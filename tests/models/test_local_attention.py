"""Chunked local (window) attention: equal to the dense segment-mask attention for window layouts,
and the vision tower with it equal to the dense-window reference path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprm.models import attention as A
from jaxprm.models.qwen2_5_vl import Qwen25VLConfig, rope
from jaxprm.models.qwen2_5_vl.vision import VisionTower, layer_runs, window_patches

from .hf_reference import make_inputs, tiny_hf_config


def window_layout(rng, t, chunk, n_pad, first_id=0):
    """(t,) segment ids: contiguous windows of random lengths in [1, chunk], then n_pad padding (-1)."""
    seg, sid, n_real = [], first_id, t - n_pad
    while len(seg) < n_real:
        seg += [sid] * min(int(rng.integers(1, chunk + 1)), n_real - len(seg))
        sid += 1
    return np.array(seg + [-1] * n_pad, np.int32)


def dense(q, k, v, seg):
    return A.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="xla")


@pytest.mark.parametrize("t,chunk,n_pad", [(37, 8, 0), (40, 8, 5), (64, 16, 0), (100, 16, 13), (5, 8, 2),
                                           (97, 1, 0), (50, 7, 3)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_local_matches_dense(t, chunk, n_pad, heads, kv_heads):
    rng = np.random.default_rng(t * 31 + chunk)
    b, h = 3, 8
    q = jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, kv_heads, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, kv_heads, h)), jnp.float32)
    seg = np.stack([window_layout(rng, t, chunk, n_pad * (i % 2), first_id=5 * i) for i in range(b)])
    got = np.asarray(A.local_segment_attention(q, k, v, jnp.asarray(seg), chunk, impl="xla"))
    ref = np.asarray(dense(q, k, v, jnp.asarray(seg)))
    assert got.shape == ref.shape == (b, t, heads, h)
    real = seg >= 0
    np.testing.assert_allclose(got[real], ref[real], atol=1e-6, rtol=1e-6)
    assert np.isfinite(got).all()
    if n_pad <= chunk:  # padding shorter than a chunk is a regular segment: equal as well
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-6)


def test_windows_straddling_chunk_boundaries():
    """Full-length windows shifted off the chunk grid: every window crosses a boundary."""
    chunk, t = 8, 61
    seg = np.array([0] * 3 + [i // chunk + 1 for i in range(t - 3)], np.int32)[None]
    assert max(np.bincount(seg[0])) == chunk
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, 2, 4)), jnp.float32) for _ in range(3))
    got = A.local_segment_attention(q, k, v, jnp.asarray(seg), chunk, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense(q, k, v, jnp.asarray(seg))), atol=1e-6)


def test_does_not_collide_with_negative_ids():
    """Internal padding ids are below every given id, whatever ids the caller uses."""
    chunk, t = 4, 10
    seg = jnp.asarray([[-3, -3, -2, -2, -2, -4, -4, -4, -4, -5]], jnp.int32)
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, 1, 4)), jnp.float32) for _ in range(3))
    got = A.local_segment_attention(q, k, v, seg, chunk, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense(q, k, v, seg)), atol=1e-6)


def test_under_vmap_and_jit():
    chunk, t = 8, 45
    rng = np.random.default_rng(3)
    seg = jnp.asarray(np.stack([window_layout(rng, t, chunk, p) for p in (0, 6)]))
    q, k, v = (jnp.asarray(rng.standard_normal((2, t, 2, 4)), jnp.float32) for _ in range(3))
    f = jax.jit(jax.vmap(lambda q, k, v, s: A.local_segment_attention(q[None], k[None], v[None], s[None], chunk)[0]))
    got = np.asarray(f(q, k, v, seg))
    ref = np.asarray(dense(q, k, v, seg))
    real = np.asarray(seg) >= 0
    np.testing.assert_allclose(got[real], ref[real], atol=1e-6)


def test_gradients_match_dense():
    chunk, t = 8, 53
    rng = np.random.default_rng(4)
    seg = jnp.asarray(window_layout(rng, t, chunk, 11)[None])
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, 4, 8)), jnp.float32) for _ in range(3))
    w = jnp.asarray(rng.standard_normal((1, t, 4, 8)), jnp.float32) * (seg >= 0)[..., None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    got = jax.grad(loss(lambda q, k, v: A.local_segment_attention(q, k, v, seg, chunk, impl="xla")), (0, 1, 2))(q, k, v)
    ref = jax.grad(loss(lambda q, k, v: dense(q, k, v, seg)), (0, 1, 2))(q, k, v)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)


def test_rejects_cross_attention_shapes():
    x = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="self-attention"):
        A.local_segment_attention(x, x[:, :4], x[:, :4], jnp.zeros((1, 8), jnp.int32), 4)


# ------------------------------------------------------------------------------------------------
# vision tower
# ------------------------------------------------------------------------------------------------
def test_window_patches_and_layer_runs():
    from jaxprm.models.qwen2_5_vl.presets import preset
    assert window_patches(preset("qwen2.5-vl-3b").vision) == 64
    tiny = Qwen25VLConfig.from_hf_dict(tiny_hf_config().to_dict()).vision
    assert window_patches(tiny) == 16
    assert layer_runs((False,) * 3 + (True,) + (False,) * 2 + (True, True)) == [
        (0, 3, False), (3, 4, True), (4, 6, False), (6, 8, True)]
    full = np.zeros(32, bool)
    full[[7, 15, 23, 31]] = True
    runs = layer_runs(tuple(full))
    assert len(runs) == 8 and runs[0] == (0, 7, False) and runs[-1] == (31, 32, True)


@pytest.mark.parametrize("grids,window_size,pad", [
    ([(1, 6, 10), (1, 8, 4), (1, 4, 4), (1, 10, 6)], 56, 0),  # llm grids not divisible by the 2x2 window
    ([(1, 14, 18), (1, 2, 2), (2, 6, 8)], 56, 36),            # incl. a 2-frame grid; padded patches
    ([(1, 10, 22), (1, 18, 6)], 112, 20),                     # 4x4 merged-token windows (64 patches)
])
def test_vision_tower_local_matches_dense(grids, window_size, pad):
    hf = tiny_hf_config(vision={"window_size": window_size, "depth": 5, "fullatt_block_indexes": [1, 4]})
    v = Qwen25VLConfig.from_hf_dict(hf.to_dict()).vision
    assert window_patches(v) == (16 if window_size == 56 else 64)
    tower = VisionTower(v, rngs=nnx.Rngs(4))
    _, _, pv, grid = make_inputs(grids, [[1] * (len(grids) + 1)], seed=11)
    n = pv.shape[0]
    pv = np.concatenate([pv, np.random.default_rng(0).standard_normal((pad, pv.shape[1])).astype(np.float32)])
    lay = rope.vision_layout(grid, merge=2, window_size=window_size, patch_size=14, pad_to=n + pad).as_dict()
    assert n + pad > 3 * window_patches(v)  # the chunked path is taken
    seg = lay["window_segment_ids"]
    assert np.bincount(seg[seg >= 0]).max() <= window_patches(v)
    fwd = nnx.jit(lambda m, pv, lay, d: m(pv, *(lay[k] for k in ("window_index", "reverse_index",
                                                                 "window_segment_ids", "full_segment_ids",
                                                                 "rotary_positions")),
                                         dense_window_attention=d), static_argnums=3)
    got = np.asarray(fwd(tower, jnp.asarray(pv), lay, False))
    ref = np.asarray(fwd(tower, jnp.asarray(pv), lay, True))
    m = n // 4
    np.testing.assert_allclose(got[:m], ref[:m], atol=2e-6, rtol=1e-5)
    assert np.abs(ref[:m]).max() > 1e-2


def test_vision_tower_per_row_vmap():
    """Per-row (B, P) vision inputs under vmap, as ``Qwen25VL.hidden_states`` runs them."""
    v = Qwen25VLConfig.from_hf_dict(tiny_hf_config().to_dict()).vision
    tower = VisionTower(v, rngs=nnx.Rngs(5))
    grids, P = [(1, 6, 10), (1, 8, 8)], 80
    keys = ("window_index", "reverse_index", "window_segment_ids", "full_segment_ids", "rotary_positions")
    pvs, lays, counts = [], [], []
    for i, g in enumerate(grids):
        _, _, pv, grid = make_inputs([g], [[1, 1]], seed=20 + i)
        x = np.zeros((P, pv.shape[1]), np.float32)
        x[: pv.shape[0]] = pv
        pvs.append(x)
        counts.append(pv.shape[0] // 4)
        lays.append(rope.vision_layout(grid, merge=2, window_size=v.window_size, patch_size=14, pad_to=P).as_dict())
    layout = [jnp.asarray(np.stack([l[k] for l in lays])) for k in keys]

    @nnx.jit(static_argnums=3)
    def fwd(m, pv, layout, d):
        return jax.vmap(lambda x, *l: m(x, *l, dense_window_attention=d))(pv, *layout)

    got = np.asarray(fwd(tower, jnp.asarray(np.stack(pvs)), layout, False))
    ref = np.asarray(fwd(tower, jnp.asarray(np.stack(pvs)), layout, True))
    for i, c in enumerate(counts):
        np.testing.assert_allclose(got[i, :c], ref[i, :c], atol=2e-6, rtol=1e-5)
