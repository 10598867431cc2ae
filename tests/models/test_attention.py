"""The attention entry point: segment/causal masking and GQA against a direct numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprm.models import attention as A


def reference(q, k, v, qs, ks, causal):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for head in range(n):
            kv = head // (n // kh)
            logits = q[bi, :, head] @ k[bi, :, kv].T / np.sqrt(h)
            allowed = np.ones((t, s), bool) if qs is None else qs[bi][:, None] == ks[bi][None, :]
            if causal:
                allowed &= np.tril(np.ones((t, s), bool))
            logits = np.where(allowed, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, head] = p @ v[bi, :, kv]
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("segments", [False, True])
def test_xla_attention_matches_reference(causal, heads, kv_heads, segments):
    rng = np.random.default_rng(0)
    b, t, h = 2, 12, 8
    q = rng.standard_normal((b, t, heads, h)).astype(np.float32)
    k = rng.standard_normal((b, t, kv_heads, h)).astype(np.float32)
    v = rng.standard_normal((b, t, kv_heads, h)).astype(np.float32)
    seg = np.array([[0] * 3 + [1] * 5 + [2] * 4, [1] * 12], np.int32) if segments else None
    got = A.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=seg, kv_segment_ids=seg,
                      causal=causal, impl="xla")
    np.testing.assert_allclose(np.asarray(got), reference(q, k, v, seg, seg, causal), atol=1e-5)


def test_auto_resolves_to_backend():
    assert A.resolve_impl("auto", jnp.float32) == "xla"
    if jax.default_backend() == "cpu":
        assert A.resolve_impl("auto", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="impl"):
        A.resolve_impl("flash3", jnp.float32)


def test_segment_ids_must_come_in_pairs():
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="both"):
        A.attention(x, x, x, q_segment_ids=jnp.zeros((1, 4), jnp.int32))
