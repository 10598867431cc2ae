"""Incremental guided search: the PRM keeps the prompt's K/V (image, question, steps taken) across
iterations and runs only the candidates' turns (``PRM.incremental_scorer``). It must pick the same
steps with the same scores as scoring every candidate prefix from scratch, and compile nothing new
after warm-up for varied K and step lengths.

A tiny random PRM (synthetic tokenizer, random weights from numpy) is built offline. Its buckets
differ from those of tests/scoring/test_scorer.py (whose warm-up counts its own compilations): the jitted
functions are shared by every PRM of the same model graph.
"""
import numpy as np
import pytest

from jaxprm.data import synthetic as syn
from jaxprm.search.policy import ScriptedPolicy
from jaxprm.search.search import guided_greedy_search
from jaxprm.search.steps import clean_step

from tests.fakes import TagPRM

# cache capacities 512 / 1024 (the synthetic prompt is ~420 tokens before the first step, a step
# turn ~25-110 tokens), candidate turns padded to 64 or 128 tokens, chunks of 4 rows
BUCKETS = dict(batch_size=4, batch_buckets=(4,), length_buckets=(1024,), prefix_buckets=(512, 1024),
               suffix_buckets=(64, 128), patch_buckets=(64,))
WORDS = ("in the top middle bottom row there is are blue red green yellow circle circles triangle "
         "triangles square squares at the left right center adding up so answer").split()


@pytest.fixture(scope="module")
def tok():
    return syn.build_synthetic_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxprm import checkpointing
    from jaxprm.models.prm import PRMModel
    from jaxprm.models.qwen2_5_vl import Qwen25VL

    cfg = syn.tiny_model_config(tok)
    # random weights without the (slow, op-by-op) initialisers: shapes from eval_shape, values from numpy
    graphdef, state = nnx.split(nnx.eval_shape(lambda: PRMModel(Qwen25VL(cfg), checkpointing.default_spec(tok))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.2, x.shape).astype(x.dtype)), state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def prm(model, tok):
    from jaxprm.data.preprocess import ImageProcessor
    from jaxprm.scoring import PRM

    return PRM(model, tok, ImageProcessor(), **BUCKETS)


@pytest.fixture(scope="module")
def records():
    return syn.generate_records(4, seed=11, error_rate=0.0)


class StubPolicy:
    """k distinct next steps of varied length (seeded by the iteration), a duplicate and an empty one
    among them; the candidates of the last iteration state an answer."""

    def __init__(self, last: int = 5, min_words: int = 4, max_words: int = 40, seed: int = 0):
        self.last, self.min_words, self.max_words, self.seed = last, min_words, max_words, seed

    def sample_next_steps(self, image, question, prefix, k, **kw):
        t = len(prefix)
        out = []
        for i in range(k):
            r = np.random.default_rng([self.seed, t, i])
            s = " ".join(r.choice(WORDS, int(r.integers(self.min_words, self.max_words + 1)))).capitalize()
            s += f" {t + i}." + (f" The answer is \\boxed{{{i}}}." if t >= self.last else "")
            out.append(s)
        if k >= 4:
            out[1], out[3] = out[0], ""  # a duplicate (scored once) and an empty candidate (skipped)
        return out


def _sessions(prm, monkeypatch, **kw):
    """Record the IncrementalScorers a search creates (with every split checked by default)."""
    made = []
    orig = type(prm).incremental_scorer

    def make(self, image, question, **k):
        made.append(orig(self, image, question, **{"check": True, **kw, **k}))
        return made[-1]

    monkeypatch.setattr(type(prm), "incremental_scorer", make)
    return made


def _assert_same_search(a, b, atol=1e-5):
    assert a.steps == b.steps and a.raw_steps == b.raw_steps and a.finished == b.finished
    assert a.best_index == b.best_index and a.answer == b.answer
    np.testing.assert_allclose(a.step_scores, b.step_scores, atol=atol, rtol=0)
    np.testing.assert_allclose(a.aggregated, b.aggregated, atol=atol, rtol=0)
    assert len(a.trace) == len(b.trace)
    for x, y in zip(a.trace, b.trace):
        assert x["candidates"] == y["candidates"] and x["chosen"] == y["chosen"]
        assert [len(s) for s in x["scores"]] == [len(s) for s in y["scores"]]
        for sx, sy in zip(x["scores"], y["scores"]):
            np.testing.assert_allclose(sx, sy, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------
# buckets: no recompilation after warm-up (runs first: it warms up what the other tests use)
# ------------------------------------------------------------------------------------------------
def test_incremental_no_recompilation_after_warmup(prm, records, monkeypatch):
    s = prm.scorer
    prm.warmup(full=False, shared=False, incremental=True, text_only=False)
    for key in ("prefix", "suffix_kv", "append", "grow"):
        assert s.trace_counts.get(key, 0) >= 1, s.trace_counts
    assert prm.warmup(full=False, shared=False, incremental=True, text_only=False) == 0
    before, sizes = dict(s.trace_counts), s.cache_sizes()
    made = _sessions(prm, monkeypatch)
    rec = records[0]
    # varied K (chunks of 1..4 rows, padded to 4), step lengths (both suffix buckets) and search lengths
    # (the cache grows from 512 to 1024 slots)
    for k, lo, hi, last in ((1, 3, 6, 2), (3, 20, 60, 4), (8, 4, 40, 5), (5, 30, 70, 3)):
        res = guided_greedy_search(prm, StubPolicy(last, lo, hi, seed=k), rec.images[0], rec.question,
                                   k=k, max_steps=8)
        assert res.finished and len(res.steps) == last + 1
    for k, r in zip((2, 6), records[1:3]):
        pol = ScriptedPolicy(records, step_error_rate=0.5, seed=k)
        guided_greedy_search(prm, pol, r.images[0], r.question, k=k, max_steps=8)
    assert s.trace_counts == before, (before, s.trace_counts)
    assert s.cache_sizes() == sizes
    assert max(m._cache.capacity for m in made) == 1024 and min(m.stats["appends"] for m in made) >= 2
    assert all(m.stats["prefills"] == 1 and not m.stats["rebuilds"] and not m.stats["split_mismatch"] for m in made)


# ------------------------------------------------------------------------------------------------
# the same steps and scores as from scratch
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregate", ["last", "mean"])
def test_incremental_equals_from_scratch_stub_policy(prm, records, monkeypatch, aggregate):
    rec = records[0]
    made = _sessions(prm, monkeypatch)
    prefix_runs = []
    orig_prefix = prm.scorer._fns.prefix
    monkeypatch.setattr(prm.scorer._fns, "prefix", lambda *a: prefix_runs.append(1) or orig_prefix(*a))
    inc = guided_greedy_search(prm, StubPolicy(), rec.images[0], rec.question, k=8, max_steps=6,
                               aggregate=aggregate, incremental=True)
    assert len(prefix_runs) == 1  # the image and the question ran once for the whole search
    scratch = guided_greedy_search(prm, StubPolicy(), rec.images[0], rec.question, k=8, max_steps=6,
                                   aggregate=aggregate, incremental=False)
    assert len(prefix_runs) == 1 + 6 and len(made) == 1  # from scratch: once per iteration
    assert inc.finished and len(inc.steps) == 6
    _assert_same_search(inc, scratch)
    # each iteration scored only the candidates' turns on the cache, never a step twice
    m = made[0]
    assert m.stats["prefills"] == 1 and m.stats["appends"] == 5 and not m.stats["rebuilds"]
    assert not m.stats["split_mismatch"] and not m.stats["uncached"]
    assert m.stats["scored"] == sum(len(e["candidates"]) for e in inc.trace)
    # the final solution's scores equal a single from-scratch scoring of it
    (again,) = prm.score_candidates(rec.images[0], rec.question, [inc.steps])
    np.testing.assert_allclose(inc.step_scores, again, atol=1e-5, rtol=0)
    assert len(set(np.round(inc.trace[0]["aggregated"], 6))) > 1  # the random PRM tells candidates apart


def test_incremental_equals_from_scratch_scripted_policy(prm, records, monkeypatch):
    made = _sessions(prm, monkeypatch)
    for rec in records[:2]:
        a = guided_greedy_search(prm, ScriptedPolicy(records, step_error_rate=0.6, seed=3), rec.images[0],
                                 rec.question, k=6, max_steps=8, aggregate="min")
        b = guided_greedy_search(prm, ScriptedPolicy(records, step_error_rate=0.6, seed=3), rec.images[0],
                                 rec.question, k=6, max_steps=8, aggregate="min", incremental=False)
        _assert_same_search(a, b)
        assert len(a.steps) >= 3
    assert len(made) == 2 and all(m.stats["appends"] >= 2 and not m.stats["rebuilds"] for m in made)


def test_incremental_text_only(prm, records, monkeypatch):
    rec = records[2]
    made = _sessions(prm, monkeypatch)
    a = guided_greedy_search(prm, StubPolicy(3), None, rec.question, k=4, max_steps=5)
    b = guided_greedy_search(prm, StubPolicy(3), None, rec.question, k=4, max_steps=5, incremental=False)
    _assert_same_search(a, b)
    assert made[0].stats["appends"] == 3


# ------------------------------------------------------------------------------------------------
# IncrementalScorer directly: arbitrary call sequences stay exact
# ------------------------------------------------------------------------------------------------
def _ref(prm, rec, steps, cands):
    return prm.score_candidates(rec.images[0], rec.question, [list(steps) + [c] for c in cands])


def test_incremental_scorer_any_call_sequence(prm, records):
    rec = records[1]
    truth = [s.text for s in rec.steps]
    alt = ["There are 7 red squares in the top row.", "Adding up the rows: 1 + 1 = 2."]
    inc = prm.incremental_scorer(rec.images[0], rec.question, check=True)
    calls = [
        ([], [truth[0], alt[0]]),
        ([truth[0]], [truth[1], alt[1], truth[1]]),  # extends by a candidate of the previous call
        ([truth[0]], [alt[0]]),  # the same steps again: the cache is kept
        ([truth[0], alt[0]], [truth[2]]),  # extends by the previous call's candidate
        ([truth[0], truth[1]], [truth[2], alt[1]]),  # branches off: the cache is rebuilt
        ([truth[0], truth[1], alt[0]], [alt[1]]),  # not a candidate of the previous call: rebuilt
    ]
    for steps, cands in calls:
        got = inc.score_next(steps, cands)
        ref = _ref(prm, rec, steps, cands)
        assert [g.shape for g in got] == [(len(steps) + 1,)] * len(cands)
        for g, r in zip(got, ref):
            assert g.dtype == np.float32
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=0)
    assert inc.stats["appends"] == 2 and inc.stats["resets"] == 2 and inc.stats["prefills"] == 3
    assert inc.cached_tokens > 0 and not inc.stats["split_mismatch"]
    assert inc.score_next([truth[0]], []) == []
    with pytest.raises(ValueError, match="special token"):
        inc.score_next([], ["bad <|im_end|> step"])
    with pytest.raises(TypeError, match="candidates must be a list"):
        inc.score_next([], "one step")
    with pytest.raises(TypeError, match=r"steps\[1\] must be a string"):
        inc.score_next([truth[0]], [3])


def test_incremental_scorer_falls_back_when_the_split_tokenization_differs(prm, records, monkeypatch):
    """If tokenizing only the new turn ever disagrees with the full encoding, every candidate is
    encoded in full from then on; the scores stay exact."""
    from jaxprm.scoring import prm as scorer_lib

    rec = records[0]
    truth = [s.text for s in rec.steps]
    orig = scorer_lib.IncrementalScorer._from_split

    def broken(self, steps):
        c = orig(self, steps)
        if c is not None:
            c.ids = c.ids.copy()
            c.ids[2] = (int(c.ids[2]) + 1) % 100  # a wrong token
        return c

    monkeypatch.setattr(scorer_lib.IncrementalScorer, "_from_split", broken)
    inc = prm.incremental_scorer(rec.images[0], rec.question)
    for t in range(3):
        cands = [truth[t], "So the answer is \\boxed{5}."]
        for g, r in zip(inc.score_next(truth[:t], cands), _ref(prm, rec, truth[:t], cands)):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=0)
    assert inc.stats["split_mismatch"] == 1 and inc.stats["appends"] == 2 and not inc.stats["rebuilds"]


def test_incremental_scorer_max_length(prm, model, tok, records):
    """Candidates that lose steps to max_length are scored without the cache (NaN for dropped steps)."""
    from jaxprm.scoring import PRM

    rec = records[0]
    truth = [s.text for s in rec.steps]
    enc = prm._encode(*prm._images(rec.images[0]), rec.question, truth)
    short = PRM(model, tok, prm.image_processor, max_length=int(enc.label_positions[2]) + 4, **BUCKETS)
    inc = short.incremental_scorer(rec.images[0], rec.question, check=True)
    for t in range(len(truth)):
        cands = [truth[t], "So the answer is \\boxed{5}."]
        got = inc.score_next(truth[:t], cands)
        ref = short.score_candidates(rec.images[0], rec.question, [truth[:t] + [c] for c in cands])
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=0)
    assert np.isnan(got[0][3:]).all() and inc.stats["uncached"] >= 1


def test_incremental_flag_needs_a_capable_prm(records):
    rec = records[0]
    with pytest.raises(TypeError, match="incremental_scorer"):
        guided_greedy_search(TagPRM(), StubPolicy(), None, rec.question, k=2, max_steps=2, incremental=True)
    res = guided_greedy_search(TagPRM(), StubPolicy(1), None, rec.question, k=2, max_steps=3)  # auto: not there
    assert len(res.steps) == 2 and res.steps[0] == clean_step(res.raw_steps[0])
