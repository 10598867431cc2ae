"""The tests' one fake OpenAI-compatible server (chat completions) on 127.0.0.1.

    def reply(body):                      # the request's JSON body -> one text per choice
        return [f"answer {i}" for i in range(body.get("n", 1))]

    with FakeOpenAIServer(reply) as srv:  # srv.base_url == "http://127.0.0.1:PORT/v1"
        srv.fail("my-model", times=1, status=429, headers={"Retry-After": "0.01"})
        ...
        srv.bodies, srv.headers, srv.counts  # what the server was sent

``POST /v1/chat/completions`` answers with ``reply(body)``: a list of texts becomes a chat
completion with one choice per text (at most ``max_choices`` of them, in reverse index order when
``reverse_choices``) and ``usage``: ``usage=(prompt, per_choice)`` tokens, or by default about 4
characters per token of the messages and texts. ``reply`` may instead return a ``Reply`` (any
status, body and headers; ``error_reply`` builds an OpenAI-style error). Error injection:
``fail(model, times, status, headers)`` answers the next ``times`` requests for ``model`` with
``status``; other paths get 404 ``{"detail": "Not Found"}``; after ``max_requests`` requests every
answer is 400 (not retried), so a runaway loop in the code under test fails fast. An exception in
``reply`` becomes a 500 naming it, marked ``x-should-retry: false`` so openai does not retry it.
"""
from __future__ import annotations

import dataclasses
import http.server
import json
import threading
from typing import Callable


@dataclasses.dataclass
class Reply:
    status: int = 200
    body: dict | None = None
    headers: dict | None = None


def error_reply(status: int, message: str, headers: dict | None = None) -> Reply:
    """An OpenAI-style error response."""
    return Reply(status, {"error": {"message": message, "type": "error", "code": status}}, headers)


class FakeOpenAIServer:
    def __init__(
        self,
        reply: Callable[[dict], "list[str] | Reply"],
        *,
        max_requests: int = 1000,
        max_choices: int | None = None,
        reverse_choices: bool = False,
        usage: tuple[int, int] | None = None,
    ):
        self.reply = reply
        self.max_requests = int(max_requests)
        self.max_choices = max_choices
        self.reverse_choices = reverse_choices
        self.usage = usage
        self.lock = threading.Lock()
        self.total = 0  # requests received
        self.counts: dict[str, int] = {}  # requests per model
        self.bodies: list[dict] = []  # JSON bodies of the chat-completion requests, in order
        self.headers: list = []  # their headers (case-insensitive ``email.message.Message``)
        self._failures: dict[str, list] = {}  # model -> [times left, status, headers]
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def fail(self, model: str, times: int = 1, status: int = 429, headers: dict | None = None,
             message: str | None = None) -> None:
        """Answer the next ``times`` requests for ``model`` with an error ``status``."""
        self._failures[model] = [int(times), int(status), dict(headers or {}),
                                 message or f"injected error {status}"]

    # -- lifecycle
    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("server not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeOpenAIServer":
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

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- responses
    def completion(self, body: dict, texts: list[str]) -> dict:
        if self.max_choices is not None:
            texts = texts[: self.max_choices]
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                   for i, t in enumerate(texts)]
        if self.reverse_choices:
            choices.reverse()
        if self.usage is not None:
            prompt, completion = self.usage[0], self.usage[1] * len(texts)
        else:
            prompt, completion = len(json.dumps(body.get("messages"))) // 4, sum(len(t) for t in texts) // 4
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }

    def respond(self, path: str, raw: bytes, headers) -> Reply:
        with self.lock:
            self.total += 1
            over = self.total > self.max_requests
        if over:
            return error_reply(400, "fake server request budget exhausted")
        if path.rstrip("/") != "/v1/chat/completions":
            return Reply(404, {"detail": "Not Found"})
        try:
            body = json.loads(raw)
        except ValueError:
            return error_reply(400, "invalid JSON")
        model = body.get("model", "")
        with self.lock:
            self.bodies.append(body)
            self.headers.append(headers)
            self.counts[model] = self.counts.get(model, 0) + 1
            failure = self._failures.get(model)
            if failure and failure[0] > 0:
                failure[0] -= 1
                return error_reply(failure[1], failure[3], failure[2])
        try:
            out = self.reply(body)
        except Exception as e:  # noqa: BLE001 - reported to the client under test
            return error_reply(500, f"fake server reply failed: {type(e).__name__}: {e}", {"x-should-retry": "false"})
        return out if isinstance(out, Reply) else Reply(200, self.completion(body, list(out)))

    def _handler(self):
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body would otherwise wait for a delayed ACK
            wbufsize = -1  # buffered: the response goes out in one write, flushed after do_POST

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server API
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                r = srv.respond(self.path, raw, self.headers)
                data = json.dumps(r.body if r.body is not None else {}).encode("utf-8")
                self.send_response(r.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (r.headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler


__all__ = ["FakeOpenAIServer", "Reply", "error_reply"]
