"""Rollouts with re-asks and Monte-Carlo values on the scripted puzzle policy."""
import numpy as np
import pytest

from jaxprm.data import synthetic as S
from jaxprm.synth import format as F
from jaxprm.synth import puzzle as PZ
from jaxprm.synth.policies import GenRequest, ScriptedPuzzlePolicy
from jaxprm.synth.questions import synthetic_questions
from jaxprm.synth.rollout import continuation_correct, mc_counts, sample_rollouts


@pytest.fixture(scope="module")
def questions():
    return synthetic_questions(12, seed=3)


class Counting:
    """Wraps a policy, recording every generate call."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def generate(self, requests):
        self.calls.append(list(requests))
        return self.inner.generate(requests)


class Scripted:
    """Returns the given outputs in order, one per requested sample."""

    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.asked = []

    def generate(self, requests):
        out = []
        for r in requests:
            self.asked.append(r.n)
            out.append([self.outputs.pop(0) for _ in range(r.n)])
        return out


GOOD = F.render_solution(["I see 2 dots."], ["So 2."], "2")


def test_reasks_count_malformed_and_stop():
    bad1 = GOOD.replace("[Reasoning]", "")
    bad2 = GOOD.split("<correct_answer>")[0]
    pol = Scripted([GOOD, bad1, bad2, GOOD, GOOD])
    q = synthetic_questions(1)[0]
    sols, st = sample_rollouts(pol, q, n=3, max_attempts=3)
    assert len(sols) == 3 and all(s.ok for s in sols)
    assert pol.asked == [3, 2]  # re-asked for the two malformed ones only
    assert st["malformed"] == {"no_reasoning_section": 1, "no_boxed_answer": 1}
    assert st["outputs"] == 5 and st["rounds"] == 2 and st["gave_up"] == 0


def test_reasks_give_up_after_max_attempts():
    pol = Scripted(["garbage"] * 10)
    q = synthetic_questions(1)[0]
    sols, st = sample_rollouts(pol, q, n=2, max_attempts=3)
    assert sols == [] and st["gave_up"] == 2 and st["rounds"] == 3 and st["malformed"] == {"no_visual_section": 6}


def test_scripted_solutions_parse_and_are_deterministic(questions):
    pol = ScriptedPuzzlePolicy(error_rate=0.5, malformed_rate=0.0, seed=1)
    for q in questions[:4]:
        a = pol.generate([GenRequest(q, 4, tag="rollout/0")])[0]
        b = ScriptedPuzzlePolicy(error_rate=0.5, malformed_rate=0.0, seed=1).generate(
            [GenRequest(q, 4, tag="rollout/0")])[0]
        assert a == b
        for t in a:
            p = F.parse_solution(t)
            assert p.ok, p.detail
            fe = PZ.ground_truth_first_error(q, p.flat())
            # a solution is wrong exactly when it departs from the correct one
            assert (fe is None) == (p.answer == q.answer)


def test_malformed_rate_one_is_always_malformed(questions):
    pol = ScriptedPuzzlePolicy(malformed_rate=1.0)
    outs = pol.generate([GenRequest(questions[0], 8, tag="x")])[0]
    assert all(not F.parse_solution(t).ok for t in outs)


def _wrong_solution(q, seed=0):
    p = PZ.puzzle_from_question(q)
    clean = S.solve(p)
    for kind in ("perception", "reasoning"):
        try:
            bad, info = S.inject_error(p, clean, np.random.default_rng(seed), kind=kind)
            return [(s.kind, s.text) for s in bad], info["step"]
        except S.InjectionError:
            continue
    return None, None


def test_mc_value_drops_after_an_error(questions):
    pol = Counting(ScriptedPuzzlePolicy(slip_rate=0.05, recovery_rate=0.05, seed=0))
    before, after = [], []
    for q in questions:
        flat, err = _wrong_solution(q)
        if flat is None:
            continue
        sol = F.parse_solution(F.render_solution([t for k, t in flat if k == "perception"],
                                                 [t for k, t in flat if k == "reasoning"], None))
        assert sol.ok
        counts, st = mc_counts(pol, q, [sol], num_continuations=16)
        vals = [c / t for c, t in counts[0]]
        before += vals[:err]
        after += vals[err:]
        assert all(t == 16 for _, t in counts[0])
    assert before and after
    assert np.mean(after) < 0.3 < 0.8 < np.mean(before)
    assert max(after) < 1.0


def test_mc_batches_all_prefixes_of_a_problem_in_one_call(questions):
    base = ScriptedPuzzlePolicy(seed=0, malformed_rate=0.0)
    q = questions[0]
    sols, _ = sample_rollouts(base, q, n=3)
    pol = Counting(base)
    counts, st = mc_counts(pol, q, sols, num_continuations=4)
    assert len(pol.calls) == 1 and st["calls"] == 1
    assert len(pol.calls[0]) == sum(s.num_steps for s in sols) == st["requests"]
    assert all(r.n == 4 and r.prefix is not None for r in pol.calls[0])
    assert st["continuations"] == 4 * st["requests"]


def test_early_stop_leaves_later_steps_unrolled(questions):
    # a policy whose continuations never reach the answer: every prefix has value 0
    class Never:
        def generate(self, requests):
            return [["\n<correct_answer>$\\boxed{-99}$</correct_answer>"] * r.n for r in requests]

    q = questions[0]
    sol = F.parse_solution(F.render_solution(["a", "b", "c"], ["d", "e"], "1"))
    counts, st = mc_counts(Never(), q, [sol], num_continuations=3, early_stop=True, chunk=2)
    assert counts[0] == [(0, 3), (0, 3), (0, 0), (0, 0), (0, 0)]
    assert st["early_stopped"] == 1 and st["calls"] == 1
    counts, st = mc_counts(Never(), q, [sol], num_continuations=3, early_stop=False)
    assert counts[0] == [(0, 3)] * 5


def test_continuation_correctness_uses_gold_answer(questions):
    q = questions[0]
    assert continuation_correct("[Visual Elements]", f"<correct_answer>$\\boxed{{{q.answer}}}$</correct_answer>", q)
    assert not continuation_correct("[Visual Elements]", "no answer here", q)


# ----------------------------------------------------------------------------- one policy interface


class FakeSampler:
    """Stands in for ``jaxprm.search.sampler.Sampler`` under a ``JaxPolicy``."""

    def __init__(self, q):
        self.q, self.calls = q, []

    def generate(self, image, question, n=1, assistant_prefix="", stop=None, **kw):
        self.calls.append({"image": image, "question": question, "n": n, "prefix": assistant_prefix, "stop": stop,
                           "seed": kw.get("seed")})
        if not assistant_prefix:
            return [F.render_solution(["I see shapes."], ["So it is that."], self.q.answer)] * n
        return ["\n<correct_answer>\n$\\boxed{" + str(self.q.answer) + "}$\n</correct_answer>"] * n


def test_a_search_policy_serves_synthesis_requests(questions):
    """The pipeline's requests go to any ``jaxprm.search.policy.Policy``: here the Flax sampler's."""
    from jaxprm.search.policy import JaxPolicy
    from jaxprm.synth.policies import PolicyRollouts

    q = questions[0]
    sampler = FakeSampler(q)
    pol = PolicyRollouts(JaxPolicy(sampler, instruction=None), "jax", send_seed=True)
    sols, st = sample_rollouts(pol, q, n=2)
    assert len(sols) == 2 and st["rounds"] == 1
    (first,) = sampler.calls
    assert first["question"] == F.build_rollout_prompt(q.question, q.choices) and first["image"] == q.images
    assert first["prefix"] == "" and first["stop"] is None and first["n"] == 2
    counts, st = mc_counts(pol, q, sols[:1], num_continuations=3)
    assert counts == [[(3, 3)] * sols[0].num_steps] and st["requests"] == sols[0].num_steps
    cont = sampler.calls[1:]
    assert [c["prefix"] for c in cont] == [F.render_prefix(sols[0].flat(), i + 1) for i in range(sols[0].num_steps)]
    assert all(c["stop"] is None and c["n"] == 3 for c in cont)
    assert len({c["seed"] for c in cont}) == len(cont)  # seeded by (question, tag, prefix)
    assert pol.usage_snapshot()["requests"] == 1 + sols[0].num_steps and pol.name == "jax"


def test_scripted_puzzle_policy_is_a_policy(questions):
    from jaxprm.search.policy import Policy

    exact = dict(error_rate=0.0, malformed_rate=0.0, slip_rate=0.0, recovery_rate=0.0)
    pol = ScriptedPuzzlePolicy(questions=questions, **exact)
    assert isinstance(pol, Policy)
    q = questions[1]
    truth = PZ.correct_flat(q)
    (sol,) = pol.sample_solutions(q.images, q.question, 1)
    assert F.parse_solution(sol).flat() == truth
    # step by step, as guided search asks: each step in the tagged format, the solution rebuilt
    steps = []
    while (nxt := pol.sample_next_steps(q.images[0], q.question, steps, 2))[0]:
        assert nxt[0] == nxt[1]
        steps.append(nxt[0])
    assert F.parse_prefix("\n".join(steps)) == truth and steps[0].startswith("[Visual Elements]\n<step_1>")
    assert any(s.startswith("[Reasoning]\n<step_1>") for s in steps)
    # continuations of a correct prefix reach the gold answer
    prefix = F.render_prefix(truth, 2)
    conts = pol.sample_continuations(q.images, q.question, prefix, 3, seed=1)
    assert all(continuation_correct(prefix, c, q) for c in conts)
    assert conts == ScriptedPuzzlePolicy(questions=questions, **exact).sample_continuations(
        q.images, q.question, prefix, 3, seed=1)
    with pytest.raises(KeyError, match="ScriptedPuzzlePolicy: unknown question"):
        pol.sample_solutions(None, "What?", 1)
