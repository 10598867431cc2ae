"""A local OpenAI-compatible server that plays the scripted puzzle policy and/or scripted judge.

It lets the OpenAI code paths of the synthesiser (``policy.kind = judge.kind = "openai"``) run
end to end offline, on 127.0.0.1, for tests and demos::

    with MockOpenAIServer(questions, policy=ScriptedPuzzlePolicy(), judge=ScriptedJudge(0.2)) as srv:
        cfg.policy.base_url = cfg.judge.base_url = srv.base_url   # http://127.0.0.1:PORT/v1
        cfg.policy.model, cfg.judge.model = srv.policy_model, srv.judge_model

``POST /v1/chat/completions`` routes on the request's ``model``. The question is recognised by
its image (data URL) and the text between ``<question>`` tags of the prompt; a policy request
whose last message is an assistant message is a continuation of that prefix; a judge request's
solution is read between ``<solution>`` tags. ``fail_first={model: k}`` answers the first ``k``
requests for ``model`` with HTTP 429 (``Retry-After: 0``) to exercise the client's retries; after
``max_requests`` requests every answer is 503. Responses carry ``usage`` (about 4 characters per
token) so cost accounting can be checked.
"""
from __future__ import annotations

import http.server
import json
import re
import threading
from typing import Sequence

from jaxprm.synth import format as F
from jaxprm.synth.policies import GenRequest
from jaxprm.synth.questions import Question

_QUESTION_RE = re.compile(r"<question>\s*(.*?)\s*</question>", re.DOTALL)
_SOLUTION_RE = re.compile(r"<solution>\s*(.*?)\s*</solution>", re.DOTALL)


class MockOpenAIServer:
    def __init__(
        self,
        questions: Sequence[Question],
        policy=None,
        judge=None,
        policy_model: str = "scripted-policy",
        judge_model: str = "scripted-judge",
        fail_first: dict[str, int] | None = None,
        max_requests: int = 100_000,
    ):
        from jaxprm.search.openai_client import image_to_data_url

        self.policy = policy
        self.judge = judge
        self.policy_model = policy_model
        self.judge_model = judge_model
        self.fail_first = dict(fail_first or {})
        self.max_requests = int(max_requests)
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.total = 0
        self.bodies: list[dict] = []
        self._by_key: dict[tuple[str, str], Question] = {}
        for q in questions:
            url = image_to_data_url(q.images[0]) if q.images else ""
            self._by_key[(url, F.format_question(q.question, q.choices).strip())] = q
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("server not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "MockOpenAIServer":
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "MockOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling
    def _question(self, messages: list[dict]) -> tuple[Question, str]:
        url, text = "", ""
        for m in messages:
            if m.get("role") != "user":
                continue
            content = m.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            for p in parts:
                if p.get("type") == "image_url" and not url:
                    url = p["image_url"]["url"]
                elif p.get("type") == "text":
                    text += p.get("text") or ""
        m = _QUESTION_RE.search(text)
        if not m:
            raise KeyError("no <question> block in the user message")
        key = (url, m.group(1).strip())
        if key not in self._by_key:
            raise KeyError("unknown question/image")
        return self._by_key[key], text

    def respond(self, body: dict) -> tuple[int, dict]:
        model = body.get("model")
        messages = body.get("messages") or []
        n = int(body.get("n") or 1)
        try:
            q, text = self._question(messages)
        except KeyError as e:
            return 400, {"error": {"message": str(e)}}
        if model == self.policy_model and self.policy is not None:
            last = messages[-1] if messages else {}
            prefix = last.get("content") if last.get("role") == "assistant" else None
            tag = f"seed={body.get('seed')}"
            texts = self.policy.generate([GenRequest(q, n, prefix=prefix, tag=tag)])[0]
        elif model == self.judge_model and self.judge is not None:
            m = _SOLUTION_RE.search(text)
            if not m:
                return 400, {"error": {"message": "no <solution> block"}}
            steps = F.parse_solution(m.group(1), require_answer=False).steps()
            texts = [self.judge.respond(q, steps) for _ in range(n)]
        else:
            return 404, {"error": {"message": f"model {model!r} not served"}}
        prompt_chars = len(json.dumps(messages))
        return 200, {
            "id": "mock",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                for i, t in enumerate(texts)
            ],
            "usage": {
                "prompt_tokens": prompt_chars // 4,
                "completion_tokens": sum(len(t) for t in texts) // 4,
                "total_tokens": prompt_chars // 4 + sum(len(t) for t in texts) // 4,
            },
        }

    def _handler(self):
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body would otherwise wait for a delayed ACK
            wbufsize = -1  # buffered: the response goes out in one write, flushed after do_POST

            def log_message(self, *args):
                pass

            def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802 - http.server API
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                try:
                    body = json.loads(raw)
                except ValueError:
                    return self._send(400, {"error": {"message": "invalid JSON"}})
                model = body.get("model", "")
                with srv.lock:
                    srv.total += 1
                    over = srv.total > srv.max_requests
                    srv.counts[model] = srv.counts.get(model, 0) + 1
                    fail = srv.failed.get(model, 0) < srv.fail_first.get(model, 0)
                    if fail:
                        srv.failed[model] = srv.failed.get(model, 0) + 1
                    if len(srv.bodies) < 1000:
                        srv.bodies.append(body)
                if over:
                    return self._send(503, {"error": {"message": "mock server request budget exhausted"}})
                if fail:
                    return self._send(429, {"error": {"message": "rate limited (mock)"}}, {"Retry-After": "0"})
                status, obj = srv.respond(body)
                return self._send(status, obj)

        return Handler


__all__ = ["MockOpenAIServer"]
