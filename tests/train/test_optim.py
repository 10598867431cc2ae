"""Low-memory training pieces: stochastic rounding to bf16 and the fp32-math, bf16-storage update."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from jaxprm.optim import apply_updates, make_optimizer, stochastic_round


def _neighbours(x):
    """The bf16 values just below and above each fp32 value (numpy, independent of the code under test)."""
    lo = x.astype(ml_dtypes.bfloat16)
    lo = np.where(lo.astype(np.float32) > x, np.nextafter(lo, ml_dtypes.bfloat16(-np.inf)), lo)
    hi = np.nextafter(lo, ml_dtypes.bfloat16(np.inf))
    return lo.astype(np.float32), hi.astype(np.float32)


def test_stochastic_round_is_unbiased_and_lands_on_neighbours():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=6), -rng.uniform(1e-3, 1e3, 6)]).astype(np.float32)
    draws = 20000
    xs = jnp.broadcast_to(jnp.asarray(x), (draws, x.size))
    r = np.asarray(stochastic_round(xs, jnp.bfloat16, jax.random.key(1))).astype(np.float32)
    lo, hi = _neighbours(x)
    assert np.all((r == lo) | (r == hi))
    frac_up = (r == hi).mean(0)
    expect_up = (x - lo) / (hi - lo)
    # binomial standard error <= 0.5 / sqrt(draws) = 0.0035
    np.testing.assert_allclose(frac_up, expect_up, atol=0.015)
    np.testing.assert_allclose(r.mean(0), x, atol=0.015 * np.abs(hi - lo).max())


def test_stochastic_round_keeps_exact_values_and_specials():
    x = jnp.asarray([0.0, -0.0, 1.0, -2.5, 3.0e38, np.inf, -np.inf, np.nan], jnp.float32)
    r = np.asarray(stochastic_round(x, jnp.bfloat16, jax.random.key(0))).astype(np.float32)
    np.testing.assert_array_equal(r[:4], [0.0, 0.0, 1.0, -2.5])
    assert np.isinf(r[5]) and r[5] > 0 and np.isinf(r[6]) and r[6] < 0 and np.isnan(r[7])
    # the same key gives the same rounding
    y = jnp.asarray(np.random.default_rng(0).normal(size=1000), jnp.float32)
    np.testing.assert_array_equal(stochastic_round(y, jnp.bfloat16, jax.random.key(3)),
                                  stochastic_round(y, jnp.bfloat16, jax.random.key(3)))


def test_small_updates_survive_only_with_stochastic_rounding():
    """lr-1e-5-sized steps are ~100x below half a bf16 ulp: round-to-nearest drops every one of them,
    stochastic rounding follows the fp32 trajectory."""
    p0 = {"w": jnp.ones((4096,), jnp.bfloat16)}
    u = {"w": jnp.full((4096,), 4e-5, jnp.float32)}
    near, sr = p0, p0
    steps = 500
    for i in range(steps):
        near = apply_updates(near, u, rounding="nearest")
        sr = apply_updates(sr, u, rounding="stochastic", key=jax.random.fold_in(jax.random.key(0), i))
    target = 1.0 + steps * 4e-5
    assert np.all(np.asarray(near["w"], np.float32) == 1.0)
    got = np.asarray(sr["w"], np.float32)
    assert abs(got.mean() - target) < 0.002, (got.mean(), target)


def test_fp32_params_update_exactly_like_optax():
    rng = np.random.default_rng(0)
    p = {"a": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=7), jnp.float32)}
    u = jax.tree.map(lambda x: x * 1e-3, p)
    want = optax.apply_updates(p, u)
    for rounding in ("stochastic", "nearest"):
        got = apply_updates(p, u, rounding=rounding, key=jax.random.key(0))
        jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(ValueError, match="rounding"):
        apply_updates(p, u, rounding="up")


def test_bf16_moments_stay_bf16_and_track_fp32_adam():
    """Adam on bf16 weights with fp32 gradients: the state keeps its bf16 storage dtype, and the first
    steps move the weights like fp32 Adam does (to bf16 resolution)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(64, 64)) * 0.05, jnp.float32)
    opt, _ = make_optimizer(lr=1e-2, total_steps=100, warmup_ratio=0.0, schedule_kind="constant",
                            mu_dtype="bfloat16", clip=None, weight_decay=0.0)
    p16, p32 = {"w": w.astype(jnp.bfloat16)}, {"w": w}
    s16, s32 = opt.init(p16), opt.init(p32)
    for i in range(5):
        g = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)}
        up16, new16 = opt.update(g, s16, p16)
        new16 = jax.tree.map(lambda n, o: n.astype(o.dtype), new16, s16)
        assert {x.dtype for x in jax.tree.leaves(new16) if x.ndim} == {jnp.dtype(jnp.bfloat16)}
        p16, s16 = apply_updates(p16, up16, key=jax.random.key(i)), new16
        up32, s32 = opt.update(g, s32, p32)
        p32 = optax.apply_updates(p32, up32)
    moved16 = np.asarray(p16["w"], np.float32) - np.asarray(w.astype(jnp.bfloat16), np.float32)
    moved32 = np.asarray(p32["w"] - w)
    assert np.corrcoef(moved16.ravel(), moved32.ravel())[0, 1] > 0.98
