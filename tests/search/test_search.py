"""Best-of-N with every aggregation (PRM as ORM included), guided greedy search;
with stand-in PRMs, and once with a real tiny PRM."""

import numpy as np
import pytest

from jaxprm.data import synthetic as syn
from jaxprm.search import aggregate as agg_lib
from jaxprm.search.policy import ScriptedPolicy
from jaxprm.search.search import EMPTY_SCORE, best_of_n, guided_greedy_search
from jaxprm.search.steps import has_answer, split_steps
from tests.fakes import TagPRM


# ------------------------------------------------------------------------------------------------
# best-of-N
# ------------------------------------------------------------------------------------------------
CANDS = [
    "a [p=0.9]\n\nb [p=0.1] \\boxed{1} [orm=0.99]",   # mean .5   min .1  last .1   product .09   orm .99
    "a [p=0.6]\n\nb [p=0.6] \\boxed{2} [orm=0.2]",    # mean .6   min .6  last .6   product .36   orm .2
    "a [p=0.2]\n\nb [p=0.95] \\boxed{3} [orm=0.3]",   # mean .575 min .2  last .95  product .19   orm .3
]


@pytest.mark.parametrize("how,best", [("mean", 1), ("min", 1), ("last", 2), ("product", 1), ("orm", 0),
                                      ("length_normalized", 2)])
def test_best_of_n_each_aggregation(how, best):
    prm = TagPRM()
    res = best_of_n(prm, "IMG", "Q?", CANDS, aggregate=how)
    assert res.best_index == best and res.best == CANDS[best]
    assert res.answer == str(best + 1) and res.finished
    if how == "orm":
        np.testing.assert_allclose(res.aggregated, [0.99, 0.2, 0.3])
        # each whole solution went to the PRM as a single step
        assert prm.calls == [("score_candidates", [[c.strip()] for c in CANDS])]
        assert [len(s) for s in res.scores] == [1, 1, 1]
    else:
        expect = [agg_lib.aggregate(prm.score(None, "", split_steps(c)), how) for c in CANDS]
        np.testing.assert_allclose(res.aggregated, expect, rtol=1e-6)
        assert prm.calls == [("score_candidates", [split_steps(c) for c in CANDS])]
        np.testing.assert_allclose(res.step_scores, prm.score(None, "", split_steps(CANDS[best])))
        assert res.steps == split_steps(CANDS[best])


def test_best_of_n_step_lists_empty_candidates_and_errors():
    prm = TagPRM()
    cands = [["", "  "], ["[Visual Elements]\nx [p=0.3]", "y [p=0.4]"], ["z [p=0.7]"]]
    res = best_of_n(prm, None, "Q?", cands, aggregate="min")
    assert res.best_index == 2 and res.aggregated[0] == EMPTY_SCORE
    # empty candidates are not sent to the PRM; headers are stripped from the steps it sees
    assert prm.calls == [("score_candidates", [["x [p=0.3]", "y [p=0.4]"], ["z [p=0.7]"]])]
    assert res.scores[0].size == 0
    # without score_candidates the PRM's score_batch is used
    class BatchOnly:
        score_batch = TagPRM().score_batch
    assert best_of_n(BatchOnly(), None, "Q?", ["a [p=0.1]", "b [p=0.2]"]).best_index == 1
    with pytest.raises(ValueError, match="unknown aggregation"):
        best_of_n(prm, None, "Q?", CANDS, aggregate="median")
    with pytest.raises(ValueError, match="at least one"):
        best_of_n(prm, None, "Q?", [])
    nan_prm = TagPRM()
    nan_prm.score = lambda image, q, steps: np.asarray([0.8] + [np.nan] * (len(steps) - 1))  # steps past max_length
    assert best_of_n(nan_prm, None, "Q?", ["a\n\nb", "c"], aggregate="mean").aggregated.tolist() == [0.8, 0.8]


# ------------------------------------------------------------------------------------------------
# guided greedy search
# ------------------------------------------------------------------------------------------------
class OraclePRM(TagPRM):
    """Knows the correct solution of each question: a step scores 0.9 while the prefix up to it is
    correct, else 0.1."""

    def __init__(self, records):
        super().__init__()
        self.truth = {r.question: [s.text for s in r.steps] for r in records}

    def score(self, image, question, steps):
        t = self.truth[question]
        ok = [steps[: i + 1] == t[: i + 1] for i in range(len(steps))]
        return np.asarray([0.9 if o else 0.1 for o in ok], np.float32)


@pytest.fixture(scope="module")
def records():
    return syn.generate_records(4, seed=11, error_rate=0.0)


def test_guided_search_finds_the_correct_solution(records):
    prm = OraclePRM(records)
    for rec in records[:2]:
        pol = ScriptedPolicy(records, step_error_rate=0.6, seed=1)
        res = guided_greedy_search(prm, pol, rec.images[0], rec.question, k=8, max_steps=20)
        assert res.steps == [s.text for s in rec.steps]
        assert res.finished and res.answer == rec.answer and has_answer(res.raw_steps[-1])
        assert len(res.trace) == len(rec.steps)
        np.testing.assert_allclose(res.step_scores, 0.9)
        for t, entry in enumerate(res.trace):
            assert entry["step"] == t and entry["chosen"] is not None
            assert len(entry["candidates"]) == len(set(entry["candidates"])) <= 8
            assert entry["candidates"][entry["chosen"]] == res.raw_steps[t]
            assert all(len(s) == t + 1 for s in entry["scores"])
        # some iteration had to reject an erroneous candidate
        assert any(min(e["aggregated"]) < 0.5 for e in res.trace)


def test_guided_search_step_limit_and_exhausted_policy(records):
    rec = records[0]
    prm = OraclePRM(records)
    res = guided_greedy_search(prm, ScriptedPolicy(records, step_error_rate=0.0), rec.images[0], rec.question,
                               k=2, max_steps=2)
    assert len(res.steps) == 2 and not res.finished and res.answer is None

    class Quiet:
        def sample_next_steps(self, image, question, prefix, k, **kw):
            return ["The image shows shapes."] if not prefix else [""] * k

    res = guided_greedy_search(prm, Quiet(), None, rec.question, k=3, max_steps=5)
    assert res.steps == ["The image shows shapes."] and not res.finished
    assert res.trace[-1]["chosen"] is None and len(res.trace) == 2
    with pytest.raises(ValueError, match="unknown aggregation"):
        guided_greedy_search(prm, Quiet(), None, rec.question, aggregate="orm")


# ------------------------------------------------------------------------------------------------
# a real tiny PRM (random weights), exported and loaded with jaxprm.load_prm
# ------------------------------------------------------------------------------------------------
def test_with_real_tiny_prm(tmp_path, records, monkeypatch):
    scorer = pytest.importorskip("jaxprm.scoring")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxprm import checkpointing
    from jaxprm.data.preprocess import ImageProcessor
    from jaxprm.models.prm import PRMModel
    from jaxprm.models.qwen2_5_vl import Qwen25VL

    tok = syn.build_synthetic_tokenizer()
    cfg = syn.tiny_model_config(tok)
    # random weights without the (slow, op-by-op) initialisers: shapes from eval_shape, values from numpy
    graphdef, state = nnx.split(nnx.eval_shape(lambda: PRMModel(Qwen25VL(cfg), checkpointing.default_spec(tok))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.2, x.shape).astype(x.dtype)), state)
    checkpointing.export_hf(nnx.merge(graphdef, state), tok, ImageProcessor(), str(tmp_path / "prm"))
    # one bucket per dimension: a single compile of the prefix and of the suffix function
    prm = scorer.load_prm(str(tmp_path / "prm"), batch_size=4, batch_buckets=(4,), suffix_buckets=(256,))

    # count this scorer's unshared ("full") scoring calls; compiled functions and their trace
    # counters are shared by every scorer of the same model graph, so earlier tests may have traced them
    full_calls = []
    orig_full = prm.scorer.score_sequences
    monkeypatch.setattr(prm.scorer, "score_sequences", lambda *a, **k: full_calls.append(1) or orig_full(*a, **k))

    rec = records[0]
    pol = ScriptedPolicy(records, solution_error_rate=0.5, seed=0)
    cands = pol.sample_solutions(rec.images[0], rec.question, 3, seed=2)
    assert len(set(cands)) == 3
    res = best_of_n(prm, rec.images[0], rec.question, cands, aggregate="last")
    for c, s in zip(cands, res.scores):
        (one,) = prm.score_candidates(rec.images[0], rec.question, [split_steps(c)])
        np.testing.assert_allclose(s, one, atol=1e-5)
        assert s.shape == (len(split_steps(c)),) and ((s > 0) & (s < 1)).all()
    assert res.aggregated[res.best_index] == max(res.aggregated)
    assert len(set(np.round(res.aggregated, 6))) > 1  # the random PRM does tell the candidates apart
    orm = best_of_n(prm, rec.images[0], rec.question, cands, aggregate="orm")
    assert all(s.shape == (1,) for s in orm.scores)

    g = guided_greedy_search(prm, pol, rec.images[0], rec.question, k=3, max_steps=2)
    assert len(g.steps) == 2 and len(g.step_scores) == 2
    (again,) = prm.score_candidates(rec.images[0], rec.question, [g.steps])
    np.testing.assert_allclose(g.step_scores, again, atol=1e-5)
    assert not full_calls  # everything went through the shared-prefix path
