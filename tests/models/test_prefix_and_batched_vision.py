"""Model pieces the scorer and the trainer rely on: a cached prefix gives the same states as the
full sequence, and per-row (fixed-shape) vision inputs give the same states as the flat HF form."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprm.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, rope

from .hf_reference import IMAGE, make_inputs, tiny_hf_config


def _model():
    cfg = Qwen25VLConfig.from_hf_dict(tiny_hf_config().to_dict())
    return Qwen25VL(cfg, rngs=nnx.Rngs(3))


def test_prefix_kv_matches_full_sequence():
    m = _model()
    ids, mask, pv, grid = make_inputs([(1, 6, 10)], [[6, 9]], seed=0)
    host = m.prepare_inputs(ids, mask, grid)
    full = m.hidden_states(host["input_ids"], host["position_ids"], host["segment_ids"], jnp.asarray(pv),
                           host["vision_layout"])
    cut = 4 + 1 + 15 + 1 + 3  # prefix ends inside the trailing text
    pre_h, kv = m.hidden_states(host["input_ids"][:, :cut], host["position_ids"][:, :, :cut],
                                host["segment_ids"][:, :cut], jnp.asarray(pv), host["vision_layout"], return_kv=True)
    # N=3 continuations of the same prefix, the real one among them
    n = 3
    rest = host["input_ids"][:, cut:]
    cont = np.concatenate([rest, np.random.default_rng(1).integers(0, 200, (n - 1, rest.shape[1]))]).astype(np.int32)
    pos = np.broadcast_to(host["position_ids"][:, :, cut:], (3, n, rest.shape[1]))
    past = tuple(jnp.broadcast_to(x, (x.shape[0], n, *x.shape[2:])) for x in kv)
    got = m.hidden_states(cont, pos, np.ones_like(cont), past_kv=past, past_segment_ids=np.ones((n, cut), np.int32))
    np.testing.assert_allclose(np.asarray(pre_h), np.asarray(full[:, :cut]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(full[0, cut:]), atol=1e-5)
    assert not np.allclose(np.asarray(got[1]), np.asarray(got[0]), atol=1e-3)


def test_per_row_vision_matches_flat():
    m = _model()
    v = m.config.vision
    grids = [(1, 6, 10), (1, 8, 4)]
    ids, mask, pv, grid = make_inputs(grids, [[5, 7], [4, 6]], seed=2)
    host = m.prepare_inputs(ids, mask, grid)
    flat = m.hidden_states(host["input_ids"], host["position_ids"], host["segment_ids"], jnp.asarray(pv),
                           host["vision_layout"])
    # per row: each row's patches padded to a common P, layouts stacked
    P = 64
    counts = [t * h * w for t, h, w in grids]
    starts = np.cumsum([0] + counts)
    pvs, lays = [], []
    for i, g in enumerate(grids):
        x = np.zeros((P, pv.shape[1]), np.float32)
        x[: counts[i]] = pv[starts[i]:starts[i + 1]]
        pvs.append(x)
        lays.append(rope.vision_layout([g], merge=2, window_size=v.window_size, patch_size=v.patch_size, pad_to=P).as_dict())
    layout = {k: np.stack([l[k] for l in lays]) for k in lays[0]}
    per_row = m.hidden_states(host["input_ids"], host["position_ids"], host["segment_ids"], jnp.asarray(np.stack(pvs)),
                              layout)
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(per_row)[keep], np.asarray(flat)[keep], atol=1e-5)
    assert (ids == IMAGE).sum() == sum(c // 4 for c in counts)
