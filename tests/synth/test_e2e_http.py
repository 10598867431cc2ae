"""End to end over HTTP: the pipeline against OpenAI-compatible servers started by the test.

1. An independent, minimal judge server (ThreadingHTTPServer on 127.0.0.1, port 0): it answers
   /v1/chat/completions with the judge's JSON verdict (the puzzle's true first error), rate-limits
   the first request with a 429, and refuses to serve more than a fixed number of requests.
2. ``jaxprm.synth.mock_server`` serving both the policy (rollouts and MC continuations, with
   ``continue_final_message`` prefixes) and a noisy judge.
"""
import http.server
import json
import re
import threading

import pytest

from jaxprm.search.openai_client import image_to_data_url
from jaxprm.synth import format as F
from jaxprm.synth import puzzle as PZ
from jaxprm.synth.config import base_config
from jaxprm.synth.judge import ScriptedJudge
from jaxprm.synth.mock_server import MockOpenAIServer
from jaxprm.synth.policies import ScriptedPuzzlePolicy
from jaxprm.synth.run import ShardStore, load_questions, run

MAX_REQUESTS = 200
N_QUESTIONS = 5


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
        part.backoff = 0.01
        part.jitter = 0.0
        part.timeout = 20.0
        part.max_retries = 3
    return c


class _JudgeState:
    def __init__(self, questions):
        self.lock = threading.Lock()
        self.total = 0
        self.ok = 0
        self.auth = []
        self.by_key = {(image_to_data_url(q.images[0]), q.question): q for q in questions}


def _judge_handler(state):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *a):
            pass

        def _send(self, status, obj, headers=None):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.total += 1
                n = state.total
                state.auth.append(self.headers.get("Authorization"))
            if n > MAX_REQUESTS:
                return self._send(400, {"error": {"message": "request budget exhausted"}})
            if self.path != "/v1/chat/completions" or body.get("model") != "judge-model":
                return self._send(404, {"error": {"message": "not found"}})
            if n == 1:
                return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
            content = body["messages"][-1]["content"]
            url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
            text = next(p["text"] for p in content if p["type"] == "text")
            question = re.search(r"<question>\n(.*?)\n</question>", text, re.DOTALL).group(1)
            solution = re.search(r"<solution>\n(.*?)\n</solution>", text, re.DOTALL).group(1)
            q = state.by_key[(url, question)]
            sol = F.parse_solution(solution, require_answer=False)
            fe = PZ.ground_truth_first_error(q, sol.flat())
            if fe is None:
                verdict = {"section": None, "index": None}
            elif fe < len(sol.perception):
                verdict = {"section": "Visual Elements", "index": fe}
            else:
                verdict = {"section": "Reasoning", "index": fe - len(sol.perception)}
            with state.lock:
                state.ok += 1
            reply = "Step by step analysis...\n" + json.dumps(verdict)
            return self._send(200, {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 100},
            })

    return Handler


@pytest.fixture
def judge_server():
    questions = load_questions(_cfg())
    state = _JudgeState(questions)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _judge_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_pipeline_with_http_judge(judge_server, tmp_path, monkeypatch):
    url, state = judge_server
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
    assert state.total == n_judged + 1 and state.ok == n_judged  # one 429, retried
    u = stats["usage"]["judge"]
    assert u["retries"] == 1 and u["requests"] == n_judged
    assert u["prompt_tokens"] == 1000 * n_judged and u["completion_tokens"] == 100 * n_judged
    assert u["cost"] == pytest.approx(n_judged * (1.0 * 0.001 + 0.1 * 0.004))
    assert set(state.auth) == {"Bearer sk-test"}
    # a truthful judge: judge-only labels are exactly right where they are given
    rep = stats["report"]["rules"]
    assert rep["judge"]["accuracy"] == 1.0 and rep["hybrid"]["wrong"] == 0
    for r in ShardStore(str(tmp_path)).read_records():
        assert r.meta["judge"]["first_error"] == r.meta["ground_truth"]["first_error_step"]
        assert r.meta["judge"]["ok"] and r.meta["judge"]["attempts"] == 1


def test_pipeline_with_http_policy_and_judge(tmp_path):
    cfg = _cfg()
    questions = load_questions(cfg)
    with MockOpenAIServer(
        questions,
        policy=ScriptedPuzzlePolicy(malformed_rate=0.2, seed=1),
        judge=ScriptedJudge(noise=0.3, seed=1),
        fail_first={"scripted-policy": 1, "scripted-judge": 1},
        max_requests=2000,
    ) as srv:
        for part in (cfg.policy, cfg.judge):
            part.kind = "openai"
            part.base_url = srv.base_url
            part.api_key_env = ""
        cfg.policy.model, cfg.judge.model = srv.policy_model, srv.judge_model
        cfg.policy.send_seed = True
        cfg.policy.max_workers = 4
        cfg.ground_truth = "canonical"
        stats = run(cfg, str(tmp_path))
        counts = dict(srv.counts)
        mc_bodies = [b for b in srv.bodies if b["model"] == srv.policy_model and b["messages"][-1]["role"] == "assistant"]
    assert stats["complete"] and stats["n_records"] > 0
    assert stats["usage"]["policy"]["retries"] == 1 and stats["usage"]["judge"]["retries"] == 1
    assert counts[srv.policy_model] == stats["usage"]["policy"]["requests"] + 1
    # one request of n=K per step prefix, continued with vLLM's continue_final_message
    assert mc_bodies and all(b["n"] == 4 and b["continue_final_message"] and not b["add_generation_prompt"]
                             for b in mc_bodies)
    assert stats["mc"]["requests"] == stats["n_steps"]
    assert stats["usage"]["judge"]["cost"] > 0 and stats["usage"]["policy"]["cost"] == 0.0
    rep = stats["report"]["rules"]
    assert rep["hybrid"]["wrong"] <= rep["judge"]["wrong"]
