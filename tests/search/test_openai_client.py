"""OpenAIChatClient against a small OpenAI-compatible server started by the test on 127.0.0.1.

The server's behaviour is chosen by the request's ``model`` field:
  echo       -> one choice per ``n`` echoing the last user text; usage = (10, 5 * n)
  flaky429   -> 429 (with or without Retry-After) on the first two requests, then echo
  flaky500   -> 503 on the first request, then echo
  bad400     -> 400 with an OpenAI-style error message
  vllm400    -> 400 with a vLLM-style {"object": "error", "message": ...} body
  fewer      -> always returns a single choice whatever ``n`` is
  images     -> returns the decoded image bytes' length and MIME type of each image part
"""
import base64
import http.server
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

from jaxprm.search.openai_client import (
    APIConnectionError,
    APIStatusError,
    OpenAIChatClient,
    RateLimiter,
    Usage,
    build_messages,
    image_to_data_url,
)

MAX_REQUESTS = 200  # the server refuses to serve more than this many requests


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.total = 0
        self.retry_after: str | None = None


def _make_handler(state: _State):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def _send(self, status, obj, extra_headers=None):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra_headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            with state.lock:
                state.total += 1
                over = state.total > MAX_REQUESTS
            if over:
                return self._send(503, {"error": {"message": "test server request budget exhausted"}})
            if self.path != "/v1/chat/completions":
                return self._send(404, {"detail": "Not Found"})
            body = json.loads(raw)
            model = body.get("model")
            with state.lock:
                state.bodies.append(body)
                state.headers.append(dict(self.headers))
                count = state.counts.get(model, 0) + 1
                state.counts[model] = count
            if model == "flaky429" and count <= 2:
                hdrs = {"Retry-After": state.retry_after} if state.retry_after is not None else {}
                return self._send(429, {"error": {"message": "rate limited"}}, hdrs)
            if model == "flaky500" and count <= 1:
                return self._send(503, {"error": {"message": "overloaded"}})
            if model == "bad400":
                return self._send(
                    400,
                    {"error": {"message": "max_tokens must be at least 1, got -3.", "type": "BadRequestError", "code": 400}},
                )
            if model == "vllm400":
                return self._send(400, {"object": "error", "message": "This model's maximum context length is 32 tokens.", "code": 400})

            n = int(body.get("n", 1))
            if model == "fewer":
                n = 1
            last = body["messages"][-1]["content"]
            if isinstance(last, list):
                texts = [p["text"] for p in last if p.get("type") == "text"]
                images = [p["image_url"]["url"] for p in last if p.get("type") == "image_url"]
            else:
                texts, images = [last], []
            if model == "images":
                desc = []
                for url in images:
                    head, b64 = url.split(",", 1)
                    desc.append(f"{head}|{len(base64.b64decode(b64))}")
                content = ";".join(desc)
            else:
                content = " ".join(texts)
            choices = [
                {"index": i, "message": {"role": "assistant", "content": f"{content} #{i}"}, "finish_reason": "stop"}
                for i in reversed(range(n))  # out of order on purpose: the client sorts by index
            ]
            return self._send(
                200,
                {
                    "id": "cmpl-test",
                    "object": "chat.completion",
                    "model": model,
                    "choices": choices,
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5 * n, "total_tokens": 10 + 5 * n},
                },
            )

    return Handler


@pytest.fixture
def server(request):
    state = _State()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def fin():
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    request.addfinalizer(fin)
    host, port = httpd.server_address[:2]
    return f"http://{host}:{port}/v1", state


def _client(base_url, model="echo", **kw):
    kw.setdefault("timeout", 5)
    kw.setdefault("backoff", 0.001)
    kw.setdefault("api_key", "sk-test")
    return OpenAIChatClient(base_url, model, **kw)


def _png_bytes(color=(255, 0, 0)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def test_echo_and_request_body(server):
    base_url, state = server
    client = _client(base_url)
    out = client.chat(
        [{"role": "user", "content": "hello"}], temperature=0.7, top_p=0.9, max_tokens=16, n=3, stop="\n\n", seed=7
    )
    assert out == ["hello #0", "hello #1", "hello #2"]
    body = state.bodies[-1]
    assert body["model"] == "echo"
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["max_tokens"] == 16
    assert body["n"] == 3 and body["stop"] == ["\n\n"] and body["seed"] == 7
    assert state.headers[-1]["Authorization"] == "Bearer sk-test"


def test_unset_sampling_params_are_not_sent(server):
    base_url, state = server
    _client(base_url).chat([{"role": "user", "content": "x"}])
    body = state.bodies[-1]
    assert set(body) == {"model", "messages", "n"}


def test_api_key_from_env(server, monkeypatch):
    base_url, state = server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    client = OpenAIChatClient(base_url, "echo", timeout=5)
    client.chat([{"role": "user", "content": "x"}])
    assert state.headers[-1]["Authorization"] == "Bearer sk-from-env"
    monkeypatch.delenv("OPENAI_API_KEY")
    OpenAIChatClient(base_url, "echo", timeout=5).chat([{"role": "user", "content": "x"}])
    assert "Authorization" not in state.headers[-1]


def test_429_twice_then_success_with_backoff(server):
    base_url, state = server
    slept = []
    client = _client(base_url, model="flaky429", backoff=0.01, sleep=lambda s: (slept.append(s), time.sleep(s)))
    t0 = time.monotonic()
    assert client.chat([{"role": "user", "content": "retry me"}]) == ["retry me #0"]
    elapsed = time.monotonic() - t0
    assert state.counts["flaky429"] == 3
    assert client.retries == 2
    assert client.retry_delays == pytest.approx([0.01, 0.02])  # exponential: backoff * 2**attempt
    assert slept == pytest.approx([0.01, 0.02])
    assert elapsed >= 0.03
    assert client.usage.requests == 1  # failed attempts carry no usage


def test_retry_after_header_is_honoured(server):
    base_url, state = server
    state.retry_after = "0.05"
    slept = []
    client = _client(base_url, model="flaky429", backoff=10.0, sleep=slept.append)
    client.chat([{"role": "user", "content": "x"}])
    assert slept == pytest.approx([0.05, 0.05])  # Retry-After overrides the 10 s backoff


def test_retries_exhausted_raises_status_error(server):
    base_url, state = server
    client = _client(base_url, model="flaky429", max_retries=1, sleep=lambda s: None)
    with pytest.raises(APIStatusError) as ei:
        client.chat([{"role": "user", "content": "x"}])
    assert ei.value.status == 429 and "rate limited" in str(ei.value)
    assert ei.value.attempts == 2
    assert state.counts["flaky429"] == 2


def test_5xx_is_retried(server):
    base_url, state = server
    client = _client(base_url, model="flaky500", sleep=lambda s: None)
    assert client.chat([{"role": "user", "content": "y"}]) == ["y #0"]
    assert state.counts["flaky500"] == 2 and client.retries == 1


def test_400_surfaces_server_message_without_retry(server):
    base_url, state = server
    client = _client(base_url, model="bad400", sleep=lambda s: pytest.fail("must not retry a 400"))
    with pytest.raises(APIStatusError) as ei:
        client.chat([{"role": "user", "content": "x"}], max_tokens=-3)
    err = ei.value
    assert err.status == 400
    assert err.message == "max_tokens must be at least 1, got -3."
    assert "HTTP 400" in str(err) and "max_tokens must be at least 1" in str(err)
    assert state.counts["bad400"] == 1


def test_vllm_style_error_body(server):
    base_url, _ = server
    with pytest.raises(APIStatusError, match="maximum context length is 32 tokens"):
        _client(base_url, model="vllm400").chat([{"role": "user", "content": "x"}])


def test_404_wrong_base_url(server):
    base_url, _ = server
    client = _client(base_url.replace("/v1", "/v2"))
    with pytest.raises(APIStatusError) as ei:
        client.chat([{"role": "user", "content": "x"}])
    assert ei.value.status == 404 and "Not Found" in ei.value.message


def test_connection_refused_retries_then_raises():
    # a loopback port with nothing listening
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    slept = []
    client = OpenAIChatClient(f"http://127.0.0.1:{port}/v1", "m", timeout=2, max_retries=2, backoff=0.001, sleep=slept.append)
    with pytest.raises(APIConnectionError, match="after 3 attempts"):
        client.chat([{"role": "user", "content": "x"}])
    assert slept == pytest.approx([0.001, 0.002])


def test_usage_and_cost(server):
    base_url, _ = server
    client = _client(base_url, price_per_1k=(0.5, 2.0))
    client.chat([{"role": "user", "content": "a"}], n=2)  # 10 prompt, 10 completion
    client.chat([{"role": "user", "content": "b"}], n=1)  # 10 prompt, 5 completion
    u = client.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.requests) == (20, 15, 35, 2)
    assert client.cost == pytest.approx((20 * 0.5 + 15 * 2.0) / 1000)
    assert _client(base_url).cost is None
    single = _client(base_url, price_per_1k=1.0)
    single.chat([{"role": "user", "content": "c"}])
    assert single.cost == pytest.approx(15 / 1000)
    client.reset_usage()
    assert client.usage == Usage()


def test_images_received_as_data_urls(server):
    base_url, state = server
    png = _png_bytes()
    from PIL import Image

    pil = Image.new("RGB", (8, 8), (0, 255, 0))
    client = _client(base_url, model="images")
    out = client.sample_solutions([png, pil], "what colour?", n=2, system_prompt="be brief", temperature=1.0)
    assert len(out) == 2
    parts = state.bodies[-1]["messages"]
    assert parts[0] == {"role": "system", "content": "be brief"}
    content = parts[1]["content"]
    assert [p["type"] for p in content] == ["image_url", "image_url", "text"]
    assert content[2]["text"] == "what colour?"
    # the server decoded exactly our PNG bytes
    first_url = content[0]["image_url"]["url"]
    assert first_url.startswith("data:image/png;base64,")
    assert base64.b64decode(first_url.split(",", 1)[1]) == png
    second = base64.b64decode(content[1]["image_url"]["url"].split(",", 1)[1])
    assert Image.open(io.BytesIO(second)).getpixel((0, 0)) == (0, 255, 0)
    assert out[0].startswith(f"data:image/png;base64|{len(png)};data:image/png;base64|")


def test_sample_solutions_tops_up_when_server_ignores_n(server):
    base_url, state = server
    client = _client(base_url, model="fewer")
    out = client.sample_solutions(None, "q", n=3)
    assert out == ["q #0"] * 3
    assert [b["n"] for b in state.bodies] == [3, 2, 1]


def test_rate_limiter_spacing(server):
    base_url, _ = server
    client = _client(base_url, max_requests_per_second=50)  # >= 20 ms between starts
    t0 = time.monotonic()
    for _ in range(4):
        client.chat([{"role": "user", "content": "x"}])
    assert time.monotonic() - t0 >= 0.06 - 1e-3


def test_rate_limiter_unit():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    rl = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    assert rl.acquire() == 0.0
    assert rl.acquire() == pytest.approx(0.25)
    now[0] += 1.0  # idle for a while: no wait
    assert rl.acquire() == 0.0
    assert slept == pytest.approx([0.25])
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_image_to_data_url_variants(tmp_path):
    png = _png_bytes()
    url = image_to_data_url(png)
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",")[1]) == png
    jpeg = b"\xff\xd8\xff\xe0" + b"\x00" * 16
    assert image_to_data_url(jpeg).startswith("data:image/jpeg;base64,")
    arr = np.zeros((5, 6, 3), dtype=np.uint8)
    from PIL import Image

    decoded = Image.open(io.BytesIO(base64.b64decode(image_to_data_url(arr).split(",")[1])))
    assert decoded.size == (6, 5) and decoded.format == "PNG"
    assert image_to_data_url(arr, format="JPEG").startswith("data:image/jpeg;base64,")
    path = tmp_path / "x.png"
    path.write_bytes(png)
    assert image_to_data_url(str(path)) == url
    assert image_to_data_url(url) == url
    with pytest.raises(ValueError, match="not a recognised"):
        image_to_data_url(b"hello")
    with pytest.raises(ValueError, match="does not exist"):
        image_to_data_url(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError):
        image_to_data_url(12)


def test_build_messages_without_image():
    msgs = build_messages(None, "2+2?")
    assert msgs == [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]}]


def test_argument_validation(server):
    base_url, _ = server
    with pytest.raises(ValueError):
        OpenAIChatClient("", "m")
    client = _client(base_url)
    with pytest.raises(ValueError):
        client.chat([])
    with pytest.raises(ValueError):
        client.chat([{"role": "user", "content": "x"}], n=0)


def test_loopback_bypasses_env_proxy(server, monkeypatch):
    base_url, state = server
    # a proxy that does not exist: requests to the loopback server must not go through it
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert _client(base_url, max_retries=0).chat([{"role": "user", "content": "p"}]) == ["p #0"]
