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


def test_splash_under_a_mesh_runs_per_device_and_equals_xla():
    """A Pallas kernel is not partitioned by XLA (on TPU, a sharded jit around it fails to compile):
    under a (data=2, fsdp=2, tensor=2) mesh the kernel runs in a shard_map over the rows (data x
    fsdp) and heads (tensor), with the same values and gradients as XLA's partitioned attention."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxprm import sharding as shd

    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    q, k, v, seg = _qkv(b=4, t=256, n=4, kh=2, h=32, seed=5)
    act = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    q, k, v = (jax.device_put(x, act) for x in (q, k, v))
    seg = jax.device_put(seg, rows)
    ct = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    def loss(impl):
        def f(q, k, v):
            return jnp.sum(A.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl=impl) * ct)
        return f

    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(loss("splash_interpret"))(q, k, v))
        got = jax.jit(jax.value_and_grad(loss("splash_interpret"), argnums=(0, 1, 2)))(q, k, v)
        ref = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    assert "shard_map" in jaxpr
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-5)
    for name, a, b in zip("qkv", got[1], ref[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=0, err_msg=f"d{name}")


def test_auto_resolves_for_the_target_platform():
    """``target_platform`` makes ``impl="auto"`` pick what that device would (ahead-of-time
    compilation for a TPU from a CPU host), and only inside the context."""
    assert A.resolve_impl("auto", jnp.bfloat16) == "xla"  # the tests' CPU backend
    with A.target_platform("tpu"):
        assert A.resolve_impl("auto", jnp.bfloat16) == "splash"
        assert A.resolve_impl("xla", jnp.bfloat16) == "xla"  # an explicit choice stays
    assert A.resolve_impl("auto", jnp.float32) == "xla"


def test_prm_under_a_mesh_with_the_kernel_equals_xla():
    """The tiny PRM's step logits and gradients on a (data=2, fsdp=2, tensor=2) mesh with the kernel
    (decoder and vision window layers through the shard_map, the vision tower vmapped over rows split
    over data x fsdp) equal the XLA implementation's."""
    from flax import nnx

    from bench.score_bench import make_inputs
    from bench.train_bench import make_batch
    from jaxprm import checkpointing as ckpt
    from jaxprm import sharding as shd
    from jaxprm.data.synthetic import build_synthetic_tokenizer, tiny_model_config
    from jaxprm.models.prm import PRMModel
    from jaxprm.models.qwen2_5_vl import Qwen25VL

    tok = build_synthetic_tokenizer()
    cfg = tiny_model_config(tok)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    # a 448² image: 1024 patches, so the vision tower's full layers reach the kernel too, and its
    # window layers' 8 chunks per row would split over the mesh if the rows did not own those axes
    batch = shd.shard_batch(make_batch(cfg, make_inputs(cfg, 4, 512, 448, 4)), mesh)

    def run(impl):
        model = PRMModel(Qwen25VL(cfg, attn_impl=impl, rngs=nnx.Rngs(0)), ckpt.default_spec(tok, head="linear"))
        graphdef, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graphdef, params).step_logits(batch)
            return jnp.sum(jnp.tanh(logits)), logits

        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(loss)(params))
            (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return jaxpr, logits, grads

    jaxpr, logits, grads = run("splash_interpret")
    _, ref_logits, ref_grads = run("xla")
    assert jaxpr.count("shard_map") >= 3  # the decoder's and the vision tower's full and window layers' kernels
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-4, rtol=0)
    for (path, g), (_, r) in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves_with_path(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-4, rtol=1e-3, err_msg=jax.tree_util.keystr(path))
