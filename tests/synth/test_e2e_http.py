"""End to end over HTTP: the pipeline against the tests' fake OpenAI-compatible server
(tests/fake_openai.py) on 127.0.0.1.

1. A truthful judge: it answers with the judge's JSON verdict (the puzzle's true first error),
   rate-limits the first request with a 429, and refuses to serve more than a fixed number of
   requests.
2. The scripted puzzle policy (rollouts and MC continuations, with ``continue_final_message``
   prefixes) and a noisy scripted judge, both behind one server, routed by the request's model.
"""
import json
import re

import pytest

from jaxprm.search.openai_client import image_to_data_url
from jaxprm.synth import format as F
from jaxprm.synth import puzzle as PZ
from jaxprm.synth.config import base_config
from jaxprm.synth.judge import ScriptedJudge
from jaxprm.synth.policies import GenRequest, ScriptedPuzzlePolicy
from jaxprm.synth.run import ShardStore, load_questions, run
from tests.fake_openai import FakeOpenAIServer, error_reply

MAX_REQUESTS = 200
N_QUESTIONS = 5
_QUESTION_RE = re.compile(r"<question>\s*(.*?)\s*</question>", re.DOTALL)
_SOLUTION_RE = re.compile(r"<solution>\s*(.*?)\s*</solution>", re.DOTALL)


def _cfg():
    c = base_config()
    c.num_questions = N_QUESTIONS
    c.seed = 5
    c.rollouts_per_question = 2
    c.mc.num_continuations = 4
    c.policy.kind = "scripted"
    c.policy.malformed_rate = 0.2
    c.progress = False
    for part in (c.policy, c.judge):
        part.timeout = 20.0
        part.max_retries = 3
    return c


def _user_parts(body):
    """(first image URL, all text) of the request's user messages."""
    url, text = "", ""
    for m in body.get("messages") or []:
        if m.get("role") != "user":
            continue
        content = m.get("content")
        for p in content if isinstance(content, list) else [{"type": "text", "text": content or ""}]:
            if p.get("type") == "image_url" and not url:
                url = p["image_url"]["url"]
            elif p.get("type") == "text":
                text += p.get("text") or ""
    return url, text


def _truthful_judge(questions):
    by_key = {(image_to_data_url(q.images[0]), q.question): q for q in questions}

    def reply(body):
        if body.get("model") != "judge-model":
            return error_reply(404, "not found")
        url, text = _user_parts(body)
        question = re.search(r"<question>\n(.*?)\n</question>", text, re.DOTALL).group(1)
        solution = re.search(r"<solution>\n(.*?)\n</solution>", text, re.DOTALL).group(1)
        q = by_key[(url, question)]
        sol = F.parse_solution(solution, require_answer=False)
        fe = PZ.ground_truth_first_error(q, sol.flat())
        if fe is None:
            verdict = {"section": None, "index": None}
        elif fe < len(sol.perception):
            verdict = {"section": "Visual Elements", "index": fe}
        else:
            verdict = {"section": "Reasoning", "index": fe - len(sol.perception)}
        return ["Step by step analysis...\n" + json.dumps(verdict)]

    return reply


def _scripted_models(questions, policy, judge, policy_model="scripted-policy", judge_model="scripted-judge"):
    """A reply playing ``policy`` and ``judge`` (scripted) for the questions, found by image and
    question text; a policy request ending in an assistant message continues that prefix."""
    by_key = {(image_to_data_url(q.images[0]) if q.images else "", F.format_question(q.question, q.choices).strip()): q
              for q in questions}

    def reply(body):
        model, messages, n = body.get("model"), body.get("messages") or [], int(body.get("n") or 1)
        url, text = _user_parts(body)
        m = _QUESTION_RE.search(text)
        q = by_key.get((url, m.group(1).strip())) if m else None
        if q is None:
            return error_reply(400, "unknown question/image" if m else "no <question> block in the user message")
        if model == policy_model:
            last = messages[-1] if messages else {}
            prefix = last.get("content") if last.get("role") == "assistant" else None
            return policy.generate([GenRequest(q, n, prefix=prefix, tag=f"seed={body.get('seed')}")])[0]
        if model == judge_model:
            m = _SOLUTION_RE.search(text)
            if not m:
                return error_reply(400, "no <solution> block")
            steps = F.parse_solution(m.group(1), require_answer=False).steps()
            return [judge.respond(q, steps) for _ in range(n)]
        return error_reply(404, f"model {model!r} not served")

    return reply


@pytest.fixture
def judge_server():
    with FakeOpenAIServer(_truthful_judge(load_questions(_cfg())), max_requests=MAX_REQUESTS,
                          usage=(1000, 100)) as srv:
        srv.fail("judge-model", times=1, status=429, headers={"Retry-After": "0.01"}, message="slow down")
        yield srv.base_url, srv


def test_pipeline_with_http_judge(judge_server, tmp_path, monkeypatch):
    url, srv = judge_server
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    cfg = _cfg()
    cfg.judge.kind = "openai"
    cfg.judge.base_url = url
    cfg.judge.model = "judge-model"
    cfg.judge.api_key_env = "TEST_JUDGE_KEY"
    cfg.judge.price_per_1k_prompt = 0.001
    cfg.judge.price_per_1k_completion = 0.004
    cfg.judge.max_workers = 2
    stats = run(cfg, str(tmp_path))
    assert stats["complete"] and stats["questions_done"] == N_QUESTIONS
    n_judged = stats["judge"]["calls"]
    assert n_judged == stats["n_records"] > 0
    assert srv.total == srv.counts["judge-model"] == n_judged + 1  # one 429, retried
    u = stats["usage"]["judge"]
    assert u["retries"] == 1 and u["requests"] == n_judged
    assert u["prompt_tokens"] == 1000 * n_judged and u["completion_tokens"] == 100 * n_judged
    assert u["cost"] == pytest.approx(n_judged * (1.0 * 0.001 + 0.1 * 0.004))
    assert {h["Authorization"] for h in srv.headers} == {"Bearer sk-test"}
    # a truthful judge: judge-only labels are exactly right where they are given
    rep = stats["report"]["rules"]
    assert rep["judge"]["accuracy"] == 1.0 and rep["hybrid"]["wrong"] == 0
    for r in ShardStore(str(tmp_path)).read_records():
        assert r.meta["judge"]["first_error"] == r.meta["ground_truth"]["first_error_step"]
        assert r.meta["judge"]["ok"] and r.meta["judge"]["attempts"] == 1


def test_pipeline_with_http_policy_and_judge(tmp_path):
    cfg = _cfg()
    questions = load_questions(cfg)
    reply = _scripted_models(questions, ScriptedPuzzlePolicy(malformed_rate=0.2, seed=1),
                             ScriptedJudge(noise=0.3, seed=1))
    policy_model, judge_model = "scripted-policy", "scripted-judge"
    with FakeOpenAIServer(reply, max_requests=2000) as srv:
        for model in (policy_model, judge_model):
            srv.fail(model, times=1, status=429, headers={"Retry-After": "0.01"})
        for part in (cfg.policy, cfg.judge):
            part.kind = "openai"
            part.base_url = srv.base_url
            part.api_key_env = ""
        cfg.policy.model, cfg.judge.model = policy_model, judge_model
        cfg.policy.send_seed = True
        cfg.policy.max_workers = 4
        cfg.ground_truth = "canonical"
        stats = run(cfg, str(tmp_path))
        counts = dict(srv.counts)
        mc_bodies = [b for b in srv.bodies if b["model"] == policy_model and b["messages"][-1]["role"] == "assistant"]
    assert stats["complete"] and stats["n_records"] > 0
    assert stats["usage"]["policy"]["retries"] == 1 and stats["usage"]["judge"]["retries"] == 1
    assert counts[policy_model] == stats["usage"]["policy"]["requests"] + 1
    # one request of n=K per step prefix, continued with vLLM's continue_final_message
    assert mc_bodies and all(b["n"] == 4 and b["continue_final_message"] and not b["add_generation_prompt"]
                             for b in mc_bodies)
    assert stats["mc"]["requests"] == stats["n_steps"]
    assert stats["usage"]["judge"]["cost"] > 0 and stats["usage"]["policy"]["cost"] == 0.0
    rep = stats["report"]["rules"]
    assert rep["hybrid"]["wrong"] <= rep["judge"]["wrong"]
