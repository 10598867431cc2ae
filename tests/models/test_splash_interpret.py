"""The TPU splash kernel, run by the Pallas interpreter on CPU, against the XLA reference (issue 19
item 3): values and gradients with packed segments, causal and not, grouped-query heads; and the
vision tower's window attention reaching the kernel instead of falling back to XLA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprm.models import attention as A


def _qkv(b=1, t=128, n=4, kh=2, h=64, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32)
    seg = np.ones((b, t), np.int32)
    seg[:, 50:100] = 2  # two packed sequences, then padding (its own segment)
    seg[:, 100:] = 0
    return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize("causal", [False, True])
def test_splash_interpret_equals_xla_values_and_gradients(causal):
    q, k, v, seg = _qkv()
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=causal)
    ref = A.xla_attention(q, k, v, **kw)
    got = A.splash_attention(q, k, v, interpret=True, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=0)

    ct = jnp.asarray(np.random.default_rng(1).normal(size=ref.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, **kw) * ct)

    g_ref = jax.grad(loss(A.xla_attention), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(loss(lambda *a, **k_: A.splash_attention(*a, interpret=True, **k_)), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_got, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=0, err_msg=f"d{name}")


def test_vision_window_chunks_reach_the_kernel(monkeypatch):
    """64-patch windows (the released configs' window) are rounded up to the kernel's 128 block, so
    window attention runs in the kernel, and equals dense segment-masked attention."""
    t, window = 320, 64
    q, k, v, _ = _qkv(t=t, n=2, kh=2, h=32, seed=3)
    seg = jnp.asarray(np.repeat(np.arange(t // window), window)[None].astype(np.int32))
    ref = A.xla_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
    fallbacks = []
    real = A.xla_attention
    monkeypatch.setattr(A, "xla_attention", lambda *a, **kw: fallbacks.append(1) or real(*a, **kw))
    got = A.local_segment_attention(q, k, v, seg, window, impl="splash_interpret")
    assert not fallbacks  # the kernel ran
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=0)
    assert A.splash_fits(128, 384, False) and not A.splash_fits(64, 192, False)
