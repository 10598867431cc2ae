"""Policies: step-wise continuation logic, the OpenAI-compatible policy against a local HTTP
server, and the scripted policy of the embedded puzzle task."""
import pytest

from jaxprm.data import synthetic as syn
from jaxprm.search.openai_client import OpenAIChatClient
from jaxprm.search.policy import DEFAULT_INSTRUCTION, JaxPolicy, OpenAIPolicy, Policy, ScriptedPolicy
from jaxprm.search.steps import clean_step, extract_final_answer, join_steps, split_steps
from tests.fake_openai import FakeOpenAIServer


# ------------------------------------------------------------------------------------------------
# JaxPolicy over a stand-in sampler (the real Sampler is tested in test_sampler.py)
# ------------------------------------------------------------------------------------------------
class FakeSampler:
    def __init__(self, replies):
        self.replies = list(replies)  # one list of texts per call
        self.calls = []

    def generate(self, image, question, n=1, **kw):
        self.calls.append({"image": image, "question": question, "n": n, **kw})
        out = self.replies.pop(0)
        assert len(out) == n
        return out


def test_jax_policy_continues_the_answer_one_step_at_a_time():
    fake = FakeSampler([["[Reasoning]\n2 + 3 = 5.", "[Reasoning]", "  "], ["So it is \\boxed{5}."]])
    pol = JaxPolicy(fake, temperature=0.9, max_batch=8)
    assert isinstance(pol, Policy)
    steps = pol.sample_next_steps("IMG", "How many?", ["[Visual Elements]\nTwo red.", "Three blue."], 3, top_p=0.8)
    assert steps == ["[Reasoning]\n2 + 3 = 5.", "[Reasoning]\nSo it is \\boxed{5}.", ""]
    first, second = fake.calls
    assert first["assistant_prefix"] == "[Visual Elements]\nTwo red.\n\nThree blue.\n\n"
    assert first["stop"] == ["\n\n"] and first["n"] == 3
    assert first["question"] == f"How many?\n\n{DEFAULT_INSTRUCTION}"
    assert first["temperature"] == 0.9 and first["top_p"] == 0.8 and first["max_new_tokens"] == 256
    # a header-only chunk is completed under its header
    assert second["assistant_prefix"] == first["assistant_prefix"] + "[Reasoning]\n\n" and second["n"] == 1
    assert first["seed"] != second["seed"]


def test_jax_policy_full_solutions_in_batches():
    fake = FakeSampler([["a", "b"], ["c"]])
    pol = JaxPolicy(fake, instruction=None, max_batch=2, max_new_tokens=64)
    assert pol.sample_solutions(None, "Q?", 3, seed=5, max_tokens=32) == ["a", "b", "c"]
    assert [c["n"] for c in fake.calls] == [2, 1]
    assert all(c["stop"] is None and c["assistant_prefix"] == "" and c["max_new_tokens"] == 32 for c in fake.calls)
    assert fake.calls[0]["question"] == "Q?" and fake.calls[0]["seed"] != fake.calls[1]["seed"]


# ------------------------------------------------------------------------------------------------
# OpenAIPolicy against a local server
# ------------------------------------------------------------------------------------------------
def _reply(body):
    n = body.get("n", 1)
    msgs = body["messages"]
    if msgs[-1]["role"] == "assistant":  # continuation of a partial answer
        k = msgs[-1]["content"].count("\n\n")
        texts = [f"Step {k + 1} option {i}." for i in range(n)]
        if msgs[-1]["content"].endswith("[Reasoning]\n\n"):
            texts = ["Thus \\boxed{7}."] * n
        elif k == 1:
            texts[0] = "[Reasoning]"  # a header alone: the policy must ask again
            texts[-1] = "Last.\n\nThis server ignores stop strings."
    else:
        texts = [f"Solution {i}.\n\nThe answer is \\boxed{{{i}}}." for i in range(n)]
    return texts


@pytest.fixture
def server():
    with FakeOpenAIServer(_reply, usage=(3, 2)) as srv:
        yield srv


def _client(srv):
    return OpenAIChatClient(srv.base_url, "policy-model", api_key="k", timeout=10, max_retries=0)


def test_openai_policy_solutions_and_top_up(server):
    server.max_choices = 2  # the server returns at most 2 choices per request
    pol = OpenAIPolicy(_client(server), temperature=0.7)
    sols = pol.sample_solutions(b"\x89PNG\r\n\x1a\nfake", "Count the shapes.", 3, seed=1, max_new_tokens=100)
    assert sols == ["Solution 0.\n\nThe answer is \\boxed{0}.", "Solution 1.\n\nThe answer is \\boxed{1}.",
                    "Solution 0.\n\nThe answer is \\boxed{0}."]
    assert [r["n"] for r in server.bodies] == [3, 1]
    r = server.bodies[0]
    assert r["model"] == "policy-model" and r["temperature"] == 0.7 and r["max_tokens"] == 100 and r["seed"] == 1
    assert "stop" not in r and "continue_final_message" not in r
    (user,) = r["messages"]
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert user["content"][1]["text"] == f"Count the shapes.\n\n{DEFAULT_INSTRUCTION}"


def test_openai_policy_next_steps_continue_final_message(server):
    pol = OpenAIPolicy(_client(server))
    assert pol.sample_next_steps(None, "Q?", [], 2) == ["Solution 0.", "Solution 1."]
    first = server.bodies[-1]
    # no steps yet: an ordinary request that stops at the first blank line
    assert first["messages"][-1]["role"] == "user" and first["stop"] == ["\n\n"] and first["max_tokens"] == 256
    steps = pol.sample_next_steps(None, "Q?", ["[Visual Elements]\nA red circle."], 3, temperature=1.0)
    assert steps == ["[Reasoning]\nThus \\boxed{7}.", "Step 2 option 1.", "Last."]
    req, again = server.bodies[-2:]
    assert req["messages"][-1] == {"role": "assistant", "content": "[Visual Elements]\nA red circle.\n\n"}
    assert req["continue_final_message"] is True and req["add_generation_prompt"] is False
    assert req["stop"] == ["\n\n"] and req["n"] == 3 and req["temperature"] == 1.0
    assert again["messages"][-1]["content"] == "[Visual Elements]\nA red circle.\n\n[Reasoning]\n\n" and again["n"] == 1


def test_openai_policy_user_prompt_continuation(server):
    pol = OpenAIPolicy(_client(server), instruction="Solve it.", continuation="user_prompt", system_prompt="Be brief.")
    pol.sample_next_steps(None, "Q?", ["One.", "Two."], 1)
    req = server.bodies[-1]
    assert [m["role"] for m in req["messages"]] == ["system", "user"]
    text = req["messages"][-1]["content"][-1]["text"]
    assert text.startswith("Q?\n\nSolve it.\n\n") and "One.\n\nTwo." in text and "next step" in text
    assert "continue_final_message" not in req
    with pytest.raises(ValueError, match="continuation"):
        OpenAIPolicy(_client(server), continuation="prefill")


def test_openai_policy_continuations_finish_the_answer(server):
    """What label synthesis asks for (Monte-Carlo rollouts): the rest of the answer, not one step."""
    pol = OpenAIPolicy(_client(server), instruction=None)
    prefix = "[Visual Elements]\nA red circle.\n\n"
    outs = pol.sample_continuations(None, "Q?", prefix, 2, seed=3)
    # the texts as the server wrote them: not cut at a blank line, no header completed
    assert outs == ["[Reasoning]", "Last.\n\nThis server ignores stop strings."] and len(server.bodies) == 1
    req = server.bodies[-1]
    assert req["messages"][-1] == {"role": "assistant", "content": prefix} and req["continue_final_message"] is True
    assert "stop" not in req and "max_tokens" not in req and req["seed"] == 3 and req["n"] == 2
    # the VL-PRM rollout script's mode: the prefix as an assistant message, no vLLM fields
    OpenAIPolicy(_client(server), instruction=None, continuation="assistant_message").sample_continuations(
        None, "Q?", prefix, 1)
    req = server.bodies[-1]
    assert req["messages"][-1] == {"role": "assistant", "content": prefix} and "continue_final_message" not in req
    # servers that cannot continue a message: quoted in the user turn, asked to finish (not for one step)
    OpenAIPolicy(_client(server), instruction=None, continuation="user_prompt",
                 continue_instruction="Go on from:\n{partial}").sample_continuations(None, "Q?", prefix, 1)
    (user,) = server.bodies[-1]["messages"]
    assert user["content"][-1]["text"] == "Q?\n\nGo on from:\n[Visual Elements]\nA red circle."
    with pytest.raises(TypeError, match="prefix"):
        pol.sample_continuations(None, "Q?", ["a step"], 1)


def test_top_up_requests_carry_new_seeds(server):
    """Search's policy repeated the seed on top-up requests (a seeded server then repeats its samples);
    synthesis's varied it. One top-up now, varying it."""
    server.max_choices = 2
    pol = OpenAIPolicy(_client(server))
    pol.sample_solutions(None, "Q?", 5, seed=10)
    assert [(r["n"], r["seed"]) for r in server.bodies] == [(5, 10), (3, 11), (1, 12)]
    pol.sample_solutions(None, "Q?", 3)
    assert all("seed" not in r for r in server.bodies[3:])


def test_every_policy_has_the_one_interface(records):
    from jaxprm.synth.policies import ScriptedPuzzlePolicy

    for pol in (JaxPolicy(FakeSampler([])), OpenAIPolicy(object()), ScriptedPolicy(records),
                ScriptedPuzzlePolicy()):
        assert isinstance(pol, Policy), type(pol).__name__


# ------------------------------------------------------------------------------------------------
# ScriptedPolicy on synthetic puzzles
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def records():
    return syn.generate_records(6, seed=3, error_rate=0.0)


def test_scripted_solutions_deterministic_and_mixed(records):
    rec = records[0]
    pol = ScriptedPolicy(records, solution_error_rate=0.5)
    a = pol.sample_solutions(rec.images[0], rec.question, 12, seed=4)
    b = ScriptedPolicy(records, solution_error_rate=0.5).sample_solutions(rec.images[0], rec.question, 12, seed=4)
    assert a == b
    answers = [extract_final_answer(t) for t in a]
    n_right = sum(x == rec.answer for x in answers)
    assert 0 < n_right < 12  # some correct, some with an injected error (always a wrong answer)
    correct_text = syn.format_solution(rec.steps)
    assert all(t == correct_text for t, x in zip(a, answers) if x == rec.answer)
    assert all(split_steps(t) for t in a)
    with pytest.raises(KeyError, match="unknown question"):
        pol.sample_solutions(rec.images[0], "What?", 1)


def test_scripted_next_steps_follow_their_prefix(records):
    rec = records[1]
    truth = [s.text for s in rec.steps]
    pol = ScriptedPolicy(records, step_error_rate=0.5, seed=0)
    first = pol.sample_next_steps(rec.images[0], rec.question, [], 16)
    assert truth[0] in first and any(s != truth[0] for s in first)
    wrong = next(s for s in first if s != truth[0])
    # after a wrong step the policy continues that wrong solution consistently
    cont = pol.sample_next_steps(rec.images[0], rec.question, [wrong], 4)
    assert len(set(cont)) == 1 and cont[0] != ""
    # a correct prefix ending at the last step: nothing more to say
    assert pol.sample_next_steps(rec.images[0], rec.question, truth, 2) == ["", ""]
    # the policy writes the correct solution when it makes no errors
    clean = ScriptedPolicy(records, step_error_rate=0.0)
    prefix = []
    for _ in range(len(truth)):
        (step,) = clean.sample_next_steps(rec.images[0], rec.question, prefix, 1)
        prefix.append(step)
    assert prefix == truth and extract_final_answer(join_steps(prefix)) == rec.answer
    assert [clean_step(s) for s in prefix] == truth


def test_scripted_continuations_complete_their_prefix(records):
    rec = records[2]
    truth = [s.text for s in rec.steps]
    clean = ScriptedPolicy(records, step_error_rate=0.0)
    full = syn.format_solution(rec.steps)
    assert clean.sample_continuations(rec.images[0], rec.question, "", 2) == [full, full]
    for i in range(1, len(truth)):
        prefix = syn.format_solution(rec.steps[:i])
        for sep in ("", "\n\n"):
            (cont,) = clean.sample_continuations(rec.images[0], rec.question, prefix + sep, 1)
            assert prefix + sep + cont == full, (i, sep)
    assert clean.sample_continuations(rec.images[0], rec.question, full, 1) == [""]  # nothing left to write
    # with errors: each continuation spells out a solution the policy knows, consistent with its prefix
    noisy = ScriptedPolicy(records, step_error_rate=0.5, seed=1)
    prefix = syn.format_solution(rec.steps[:1]) + "\n\n"
    conts = noisy.sample_continuations(rec.images[0], rec.question, prefix, 12, seed=7)
    assert conts == ScriptedPolicy(records, step_error_rate=0.5, seed=1).sample_continuations(
        rec.images[0], rec.question, prefix, 12, seed=7)
    answers = [extract_final_answer(prefix + c) for c in conts]
    assert rec.answer in answers and any(a != rec.answer for a in answers)
    for c in conts:
        steps = split_steps(prefix + c)
        assert steps[0] == truth[0] and len(steps) >= 2


def test_scripted_policy_makes_the_errors_of_its_task():
    """perception_error_share=0: every wrong solution and every wrong candidate step is a reasoning
    error (the policy the tiny default's PRM is evaluated with); 1: only perception errors."""
    from jaxprm.data import synthetic as syn
    from jaxprm.data.solution import split_steps
    from jaxprm.search import ScriptedPolicy

    recs = syn.generate_records(6, seed=2, image_size=(56, 56), question_types=("sum", "compare"))
    for share, allowed in ((0.0, {syn.REASONING}), (1.0, {syn.PERCEPTION})):
        pol = ScriptedPolicy(recs, solution_error_rate=1.0, step_error_rate=1.0, perception_error_share=share, seed=0)
        kinds = set()
        for r in recs:
            good = syn.solve(syn.puzzle_from_record(r))
            for sol in pol.sample_solutions(r.images[0], r.question, 8, seed=1):
                steps = split_steps(sol)
                first = next(i for i, (a, b) in enumerate(zip(steps, good)) if a != b.text)
                kinds.add(good[first].kind)
            for i, step in enumerate(good):
                cands = pol.sample_next_steps(r.images[0], r.question, [s.text for s in good[:i]], 4)
                if step.kind not in allowed:
                    assert cands == [step.text] * 4
        assert kinds == allowed
