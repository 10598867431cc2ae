"""OpenAIChatClient (on the openai package) against the tests' fake server (tests/fake_openai.py).

The fake's answer is chosen by the request's ``model`` field:
  echo       -> one choice per ``n`` echoing the last user text; usage = (10, 5 * n)
  flaky429   -> 429 (with or without Retry-After) on the first two requests, then echo
  flaky500   -> 503 on the first request, then echo
  bad400     -> 400 with an OpenAI-style error message
  vllm400    -> 400 with a vLLM-style {"object": "error", "message": ...} body
  fewer      -> always returns a single choice whatever ``n`` is
  images     -> returns the decoded image bytes' length and MIME type of each image part
  slow       -> answers after 0.6 s
Choices come back in reverse index order on purpose: the client sorts them by index.
"""
import base64
import io
import socket
import time

import numpy as np
import pytest

from jaxprm.search.openai_client import (
    APIError,
    APIConnectionError,
    APIStatusError,
    OpenAIChatClient,
    RateLimiter,
    Usage,
    build_messages,
    image_to_data_url,
)
from tests.fake_openai import FakeOpenAIServer, Reply, error_reply

MAX_REQUESTS = 200  # the server refuses to serve more than this many requests


def _reply(body):
    model = body.get("model")
    if model == "bad400":
        return error_reply(400, "max_tokens must be at least 1, got -3.")
    if model == "vllm400":
        return Reply(400, {"object": "error", "message": "This model's maximum context length is 32 tokens.",
                           "code": 400})
    if model == "slow":
        time.sleep(0.6)
    n = int(body.get("n", 1))
    last = body["messages"][-1]["content"]
    if isinstance(last, list):
        texts = [p["text"] for p in last if p.get("type") == "text"]
        images = [p["image_url"]["url"] for p in last if p.get("type") == "image_url"]
    else:
        texts, images = [last], []
    if model == "images":
        content = ";".join(f"{url.split(',', 1)[0]}|{len(base64.b64decode(url.split(',', 1)[1]))}" for url in images)
    else:
        content = " ".join(texts)
    return [f"{content} #{i}" for i in range(1 if model == "fewer" else n)]


@pytest.fixture
def server():
    with FakeOpenAIServer(_reply, max_requests=MAX_REQUESTS, reverse_choices=True, usage=(10, 5)) as srv:
        yield srv.base_url, srv


def _client(base_url, model="echo", **kw):
    kw.setdefault("timeout", 5)
    kw.setdefault("api_key", "sk-test")
    return OpenAIChatClient(base_url, model, **kw)


def _png_bytes(color=(255, 0, 0)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def test_echo_and_request_body(server):
    base_url, srv = server
    client = _client(base_url)
    out = client.chat(
        [{"role": "user", "content": "hello"}], temperature=0.7, top_p=0.9, max_tokens=16, n=3, stop="\n\n", seed=7
    )
    assert out == ["hello #0", "hello #1", "hello #2"]
    body = srv.bodies[-1]
    assert body["model"] == "echo"
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["max_tokens"] == 16
    assert body["n"] == 3 and body["stop"] == ["\n\n"] and body["seed"] == 7
    assert srv.headers[-1]["Authorization"] == "Bearer sk-test"


def test_unset_sampling_params_are_not_sent(server):
    base_url, srv = server
    _client(base_url).chat([{"role": "user", "content": "x"}])
    body = srv.bodies[-1]
    assert set(body) == {"model", "messages", "n"}


def test_api_key_from_env(server, monkeypatch):
    base_url, srv = server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    client = OpenAIChatClient(base_url, "echo", timeout=5)
    client.chat([{"role": "user", "content": "x"}])
    assert srv.headers[-1]["Authorization"] == "Bearer sk-from-env"
    monkeypatch.delenv("OPENAI_API_KEY")
    OpenAIChatClient(base_url, "echo", timeout=5).chat([{"role": "user", "content": "x"}])
    assert "Authorization" not in srv.headers[-1]


def test_429_twice_then_success_with_backoff(server):
    base_url, srv = server
    srv.fail("flaky429", times=2, status=429, message="rate limited")  # no Retry-After: openai's backoff
    client = _client(base_url, model="flaky429")
    t0 = time.monotonic()
    assert client.chat([{"role": "user", "content": "retry me"}]) == ["retry me #0"]
    elapsed = time.monotonic() - t0
    assert srv.counts["flaky429"] == 3
    assert client.retries == 2
    # exponential backoff as the module docstring states: 0.5 s then 1 s, each less up to 25 % jitter
    assert elapsed >= 0.75 * (0.5 + 1.0)
    assert client.usage.requests == 1  # failed attempts carry no usage


def test_retry_after_header_is_honoured(server):
    base_url, srv = server
    srv.fail("flaky429", times=2, status=429, headers={"Retry-After": "0.05"})
    client = _client(base_url, model="flaky429")
    t0 = time.monotonic()
    client.chat([{"role": "user", "content": "x"}])
    elapsed = time.monotonic() - t0
    # Retry-After overrides the backoff (which would take >= 1.125 s for two retries)
    assert 0.1 <= elapsed < 1.0 and client.retries == 2


def test_retries_exhausted_raises_status_error(server):
    base_url, srv = server
    srv.fail("flaky429", times=2, status=429, headers={"Retry-After": "0.01"}, message="rate limited")
    client = _client(base_url, model="flaky429", max_retries=1)
    with pytest.raises(APIStatusError) as ei:
        client.chat([{"role": "user", "content": "x"}])
    assert ei.value.status == 429 and "rate limited" in str(ei.value)
    assert ei.value.attempts == 2 and "after 2 attempts" in str(ei.value)
    assert srv.counts["flaky429"] == 2 and client.retries == 1


def test_5xx_is_retried(server):
    base_url, srv = server
    srv.fail("flaky500", times=1, status=503, headers={"Retry-After": "0.01"}, message="overloaded")
    client = _client(base_url, model="flaky500")
    assert client.chat([{"role": "user", "content": "y"}]) == ["y #0"]
    assert srv.counts["flaky500"] == 2 and client.retries == 1


def test_400_surfaces_server_message_without_retry(server):
    base_url, srv = server
    client = _client(base_url, model="bad400")
    with pytest.raises(APIStatusError) as ei:
        client.chat([{"role": "user", "content": "x"}], max_tokens=-3)
    err = ei.value
    assert err.status == 400 and err.attempts == 1
    assert err.message == "max_tokens must be at least 1, got -3."
    assert "HTTP 400" in str(err) and "max_tokens must be at least 1" in str(err)
    assert srv.counts["bad400"] == 1 and client.retries == 0


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
    client = OpenAIChatClient(f"http://127.0.0.1:{port}/v1", "m", timeout=2, max_retries=2)
    with pytest.raises(APIConnectionError, match="after 3 attempts") as ei:
        client.chat([{"role": "user", "content": "x"}])
    assert f"127.0.0.1:{port}" in str(ei.value) and client.retries == 2


def test_timeout_per_attempt_and_worst_case(server):
    base_url, srv = server
    client = _client(base_url, model="slow", timeout=0.2, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(APIConnectionError, match="after 2 attempts.*Timeout"):
        client.chat([{"role": "user", "content": "x"}])
    elapsed = time.monotonic() - t0
    # the documented worst case: (max_retries + 1) * timeout + backoff (0.5 s), plus slack for this machine
    assert 2 * 0.2 <= elapsed < 2 * 0.2 + 0.5 + 1.0
    assert srv.counts["slow"] == 2


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
    base_url, srv = server
    png = _png_bytes()
    from PIL import Image

    pil = Image.new("RGB", (8, 8), (0, 255, 0))
    client = _client(base_url, model="images")
    out = client.sample_solutions([png, pil], "what colour?", n=2, system_prompt="be brief", temperature=1.0)
    assert len(out) == 2
    parts = srv.bodies[-1]["messages"]
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
    base_url, srv = server
    client = _client(base_url, model="fewer")
    out = client.sample_solutions(None, "q", n=3)
    assert out == ["q #0"] * 3
    assert [b["n"] for b in srv.bodies] == [3, 2, 1]


def test_rate_limiter_spacing(server):
    base_url, _ = server
    client = _client(base_url, max_requests_per_second=50)  # >= 20 ms between starts
    t0 = time.monotonic()
    for _ in range(4):
        client.chat([{"role": "user", "content": "x"}])
    assert time.monotonic() - t0 >= 0.06 - 1e-3


def test_rate_limiter_spaces_retries_too(server):
    base_url, srv = server
    srv.fail("flaky429", times=2, status=429, headers={"Retry-After": "0.01"})
    client = _client(base_url, model="flaky429", max_requests_per_second=5)  # >= 200 ms between attempts
    t0 = time.monotonic()
    client.chat([{"role": "user", "content": "x"}])
    assert time.monotonic() - t0 >= 0.4 - 1e-3 and srv.counts["flaky429"] == 3


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
    base_url, srv = server
    # a proxy that does not exist: requests to the loopback server must not go through it
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert _client(base_url, max_retries=0).chat([{"role": "user", "content": "p"}]) == ["p #0"]


# ----------------------------------------------------------------------------- hostile servers


class _RawServer:
    """A loopback HTTP server answering every POST with ``respond(sock)`` (raw bytes, trickles)."""

    def __init__(self, respond):
        import socketserver
        import threading

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(10)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, rest = buf.split(b"\r\n\r\n", 1)
                length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n")
                               if l.lower().startswith(b"content-length:")), 0)
                while len(rest) < length:
                    rest += self.request.recv(65536)
                try:
                    respond(self.request)
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _http_200(body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(n).encode()
            + b"\r\n\r\n" + body)


def test_trickling_server_hits_the_attempt_timeout_and_request_deadline():
    # one byte every 0.1 s: never idle for `timeout`, so openai's per-read timeout alone never fires
    def trickle(sock):
        head = _http_200(b"", length=10_000)
        sock.sendall(head)
        for _ in range(200):  # bounded: 20 s at most
            sock.sendall(b" ")
            time.sleep(0.1)

    with _RawServer(trickle) as url:
        c = OpenAIChatClient(url, "m", timeout=0.5, max_retries=1, deadline=10)
        t0 = time.monotonic()
        with pytest.raises(APIConnectionError):
            c.chat([{"role": "user", "content": "hi"}])
        assert time.monotonic() - t0 < 4  # two attempts of 0.5 s plus one backoff
        c = OpenAIChatClient(url, "m", timeout=5, max_retries=5, deadline=0.8)
        t0 = time.monotonic()
        with pytest.raises(APIConnectionError, match="deadline of 0.8 s"):
            c.chat([{"role": "user", "content": "hi"}])
        assert time.monotonic() - t0 < 3


def test_response_size_cap():
    big = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "' + b"x" * 300_000 + b'"}}]}'
    with _RawServer(lambda sock: sock.sendall(_http_200(big))) as url:
        c = OpenAIChatClient(url, "m", max_retries=0, max_response_bytes=100_000)
        with pytest.raises(APIError, match="max_response_bytes=100000"):
            c.chat([{"role": "user", "content": "hi"}])
        assert OpenAIChatClient(url, "m", max_retries=0).chat([{"role": "user", "content": "hi"}])[0] == "x" * 300_000


@pytest.mark.parametrize("body, what", [
    (b"\xff\xfe not utf8", "not UTF-8"),
    (b"<html>oops</html>", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"[1, 2]", "JSON list, not an object"),
    (b'{"id": "x"}', "no 'choices' list"),
    (b'{"choices": "abc"}', "no 'choices' list"),
    (b'{"choices": [1]}', r"choices\[0\] is a int"),
    (b'{"choices": [{"index": 0, "message": {"role": "assistant"}}]}', r"choices\[0\].message.content is NoneType"),
    (b'{"choices": [{"index": 0, "message": {"content": 5}}]}', r"choices\[0\].message.content is int"),
    (b'{"choices": [{"index": 0, "message": "hi"}]}', r"choices\[0\].message is a str"),
    (b'{"choices": [{"index": "a", "message": {"content": "x"}}]}', r"choices\[0\].index is not an integer"),
    (b'{"choices": [{"index": 0, "message": {"content": "x"}}], "usage": {"prompt_tokens": "many"}}',
     "usage.prompt_tokens"),
])
def test_malformed_200_is_api_error_naming_the_problem(body, what):
    from jaxprm.search.openai_client import APIError

    with _RawServer(lambda sock: sock.sendall(_http_200(body))) as url:
        c = OpenAIChatClient(url, "m", max_retries=0)
        with pytest.raises(APIError, match=what):
            c.chat([{"role": "user", "content": "hi"}])


def test_default_worst_case_is_bounded():
    c = OpenAIChatClient("http://127.0.0.1:9/v1", "m")
    assert c.deadline is not None and c.deadline <= 600
