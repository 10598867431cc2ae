"""Chat client for OpenAI-compatible servers (vLLM, SGLang, OpenAI) on the official ``openai`` package.

``OpenAIChatClient`` sends Chat Completions requests through ``openai.OpenAI`` (``base_url``,
``api_key``, ``timeout``, ``max_retries``) and adds what this project needs on top: a client-side
rate limit, token usage and cost counters, exactly-``n`` sampling (``chat_n`` tops up when a server
returns fewer choices than asked), and errors of the project's own types (``APIStatusError``,
``APIConnectionError``, both ``APIError``) whose text names the URL, the HTTP status, the server's
own message and the number of attempts. Images go in user messages as ``image_url`` content parts
holding ``data:`` URLs, the format vLLM's and SGLang's OpenAI servers accept for multimodal models;
``image_to_data_url`` builds them from encoded bytes, a PIL image, a numpy array or a file path.

Retries, backoff and timeouts are the ``openai`` package's:
- retried: HTTP 408, 409, 429 and 5xx, connection errors and timeouts; other 4xx raise at once;
- the wait before retry ``k`` (0-based) is ``0.5 * 2**k`` seconds capped at 8 s, less up to 25 %
  random jitter, unless the server sends ``Retry-After`` (or ``retry-after-ms``) within openai's
  limit (120 s in current releases, 60 s in older ones), which is then waited instead;
- ``timeout`` is openai's per-attempt timeout: connecting, sending, and every wait for response
  data each give up after ``timeout`` seconds. A completion that is not streamed arrives in one
  piece once generation ends, so an attempt ends with the answer or after about ``timeout`` s.

Deadlines and size: openai's timeout alone does not bound an attempt (a server trickling one
byte every 0.5 s never trips a per-read timeout), so this client also enforces, on every socket
read and write (headers, body, connect):
- a per-attempt wall-clock limit of ``timeout`` seconds (the attempt is retried like a timeout);
- one overall ``deadline`` per request (default 600 s) over all attempts, raised as
  ``APIConnectionError`` without further retries;
- ``max_response_bytes`` (default 32 MiB) per attempt: a larger response is an ``APIError``.
A 200 response that is not a chat completion (not UTF-8, not JSON, nested too deep, no
``choices`` list, a choice without text) is an ``APIError`` naming what was wrong.

Worst-case time of one request::

    min(deadline, (max_retries + 1) * timeout + backoff) + one retry wait (<= 8 s, or the server's
    Retry-After, <= 120 s) + the rate limiter's wait

With the defaults here (``timeout=120``, ``max_retries=5``, ``deadline=600``) that is at most
600 + 120 = 720 s, and 600 + 8 = 608 s unless the server asks for long waits.

The rate limiter spaces the starts of all attempts (retries included) at least
``1 / max_requests_per_second`` apart. ``usage`` sums ``prompt_tokens`` / ``completion_tokens`` over
successful responses, ``retries`` counts retries over the client's life, ``cost`` prices the usage
with an optional price per 1k tokens. The client is thread-safe: threads may share one instance.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import io
import json
import os
import threading
import time
import urllib.parse
from typing import Any, Callable, Sequence

import httpcore2
import openai

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "OpenAIChatClient",
    "RateLimiter",
    "Usage",
    "build_messages",
    "chat_n",
    "image_to_data_url",
]

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class APIError(RuntimeError):
    """Base class for errors from ``OpenAIChatClient``."""


class APIStatusError(APIError):
    """The server answered with an error status. ``status`` is the HTTP code, ``message`` the
    server's error message, ``body`` the raw response text, ``attempts`` how many were made."""

    def __init__(self, status: int, message: str, body: str = "", url: str = "", attempts: int = 1):
        self.status = status
        self.message = message
        self.body = body
        self.url = url
        self.attempts = attempts
        where = f" from {url}" if url else ""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"HTTP {status}{where}{tries}: {message}")


class APIConnectionError(APIError):
    """The server could not be reached (refused, reset, timed out) after all retries."""


# ----------------------------------------------------------------------------- images


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def _sniff_mime(data: bytes) -> str | None:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_to_data_url(image, format: str = "PNG") -> str:
    """Return a ``data:<mime>;base64,...`` URL for ``image``.

    ``image`` may be: encoded image bytes (PNG/JPEG/GIF/WebP/BMP, sent as they are with their own
    MIME type), a PIL image or an HxW[xC] uint8 numpy array (encoded as ``format``, PNG by
    default), a path to an image file, or a string that already is a data URL (returned as is).
    """
    if isinstance(image, str):
        if image.startswith("data:"):
            return image
        if not os.path.exists(image):
            raise ValueError(f"image path does not exist: {image!r}")
        with open(image, "rb") as f:
            image = f.read()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("image bytes are empty")
        mime = _sniff_mime(data)
        if mime is None:
            raise ValueError("image bytes are not a recognised encoded image (PNG, JPEG, GIF, WebP, BMP)")
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise TypeError("encoding a PIL image or array needs pillow installed") from e
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None and isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"image must be encoded bytes, a PIL image, a numpy array, a file path or a data URL; "
            f"got {type(image).__name__}"
        )
    fmt = format.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = "image/jpeg" if fmt == "JPEG" else f"image/{fmt.lower()}"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def build_messages(image, question: str, system_prompt: str | None = None) -> list[dict]:
    """OpenAI chat messages for one (image(s), question) turn: optional system message, then a
    user message with one ``image_url`` part per image followed by the question text.
    ``image`` may be None, a single image, or a list/tuple of images."""
    if image is None:
        images: list = []
    elif isinstance(image, (list, tuple)):
        images = list(image)
    else:
        images = [image]
    content: list[dict] = [
        {"type": "image_url", "image_url": {"url": image_to_data_url(im)}} for im in images
    ]
    content.append({"type": "text", "text": question})
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": content})
    return messages


# ----------------------------------------------------------------------------- usage / rate


@dataclasses.dataclass
class Usage:
    """Token usage summed over successful responses."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def cost(self, price_per_1k_prompt: float = 0.0, price_per_1k_completion: float | None = None) -> float:
        """Price of the usage; completion tokens cost the prompt price unless given separately."""
        if price_per_1k_completion is None:
            price_per_1k_completion = price_per_1k_prompt
        return (self.prompt_tokens * price_per_1k_prompt + self.completion_tokens * price_per_1k_completion) / 1000.0


class RateLimiter:
    """Spaces request starts at least ``1 / max_per_second`` seconds apart (thread-safe).

    ``clock`` and ``sleep`` are injectable for tests."""

    def __init__(
        self,
        max_per_second: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not max_per_second or max_per_second <= 0:
            raise ValueError(f"max_per_second must be positive, got {max_per_second!r}")
        self.interval = 1.0 / float(max_per_second)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = None  # earliest start time of the next request

    def acquire(self) -> float:
        """Block until a request may start; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            start = now if self._next is None else max(now, self._next)
            self._next = start + self.interval
        wait = start - now
        if wait > 0:
            self._sleep(wait)
        return max(wait, 0.0)


# ----------------------------------------------------------------------------- client


def _error_message(body: str, status: int) -> str:
    """The human-readable message of an error body: OpenAI's ``{"error": {"message": ...}}``,
    vLLM's ``{"message": ...}``, FastAPI's ``{"detail": ...}``, or the text itself."""
    try:
        obj = json.loads(body)
    except (ValueError, TypeError):
        text = (body or "").strip()
        return text[:2000] if text else http.client.responses.get(status, "error")
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        for key in ("message", "detail"):
            if obj.get(key):
                val = obj[key]
                return val if isinstance(val, str) else json.dumps(val)
    return json.dumps(obj)[:2000]


class _LimitExceeded(openai.OpenAIError):
    """Raised inside the transport; openai passes its own errors through without retrying."""


class _Limits(threading.local):
    attempt_end: float | None = None
    request_end: float | None = None
    received: int = 0
    max_bytes: int | None = None


def _remaining(limits: _Limits, timeout: float | None, kind) -> float | None:
    """``timeout`` clipped to the attempt's and the request's deadlines; raises past either."""
    now = time.monotonic()
    if limits.request_end is not None and now >= limits.request_end:
        raise _LimitExceeded("request deadline exceeded")
    ends = [e for e in (limits.attempt_end, limits.request_end) if e is not None]
    if not ends:
        return timeout
    left = min(ends) - now
    if left <= 0:
        raise kind("attempt took longer than its timeout")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore2.NetworkStream):
    def __init__(self, inner, limits: _Limits):
        self._inner, self._limits = inner, limits

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._inner.read(max_bytes, _remaining(self._limits, timeout, httpcore2.ReadTimeout))
        lim = self._limits
        lim.received += len(data)
        if lim.max_bytes is not None and lim.received > lim.max_bytes:
            raise _LimitExceeded(f"response larger than max_response_bytes={lim.max_bytes}")
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _remaining(self._limits, timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        inner = self._inner.start_tls(ssl_context, server_hostname,
                                      _remaining(self._limits, timeout, httpcore2.ConnectTimeout))
        return _DeadlineStream(inner, self._limits)

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore2.NetworkBackend):
    def __init__(self, inner, limits: _Limits):
        self._inner, self._limits = inner, limits

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        t = _remaining(self._limits, timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_tcp(host, port, t, local_address, socket_options), self._limits)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        t = _remaining(self._limits, timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, t, socket_options), self._limits)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _install_limits(http_client, limits: _Limits) -> int:
    """Wrap the network backend of every connection pool of ``http_client``; returns how many."""
    transports = [getattr(http_client, "_transport", None)]
    transports += list(getattr(http_client, "_mounts", {}).values())
    n = 0
    for t in transports:
        pool = getattr(t, "_pool", None)
        if pool is not None and hasattr(pool, "_network_backend"):
            pool._network_backend = _DeadlineBackend(pool._network_backend, limits)
            n += 1
    return n


def _check_completion(raw: bytes, url: str) -> None:
    """Raise ``APIError`` naming what is wrong when a 200 body is not a usable chat completion."""
    def bad(what: str) -> APIError:
        return APIError(f"bad response from {url}: {what}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"body is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    except ValueError as e:
        raise bad(f"body is not JSON ({e}): {text[:200]!r}") from None
    if not isinstance(obj, dict):
        raise bad(f"body is a JSON {type(obj).__name__}, not an object")
    choices = obj.get("choices")
    if not isinstance(choices, list):
        raise bad(f"no 'choices' list (got {type(choices).__name__}): {text[:200]!r}")
    for i, c in enumerate(choices):
        if not isinstance(c, dict):
            raise bad(f"choices[{i}] is a {type(c).__name__}, not an object")
        if c.get("index") is not None and (not isinstance(c["index"], int) or isinstance(c["index"], bool)):
            raise bad(f"choices[{i}].index is not an integer: {c['index']!r}")
        msg = c.get("message")
        content = msg.get("content") if isinstance(msg, dict) else None
        if content is None and isinstance(c.get("text"), str):
            continue  # completions-style servers
        if msg is not None and not isinstance(msg, dict):
            raise bad(f"choices[{i}].message is a {type(msg).__name__}, not an object")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
                raise bad(f"choices[{i}].message.content has a part that is not a text part")
            continue
        if not isinstance(content, str):
            raise bad(f"choices[{i}].message.content is {type(content).__name__}, not text")
    usage = obj.get("usage")
    if usage is not None:
        if not isinstance(usage, dict):
            raise bad(f"'usage' is a {type(usage).__name__}, not an object")
        for key in ("prompt_tokens", "completion_tokens"):
            v = usage.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise bad(f"usage.{key} is not a non-negative integer: {v!r}")


class OpenAIChatClient:
    """Chat-completions client for an OpenAI-compatible server (see the module docstring).

    Args:
      base_url: server root including the API prefix, e.g. ``http://127.0.0.1:8000/v1``.
      model: model name sent in every request.
      api_key: bearer token; defaults to ``$OPENAI_API_KEY``; no Authorization header when neither
        is set (or ``api_key=""``), as local vLLM/SGLang servers need none.
      timeout: openai's per-attempt timeout in seconds.
      max_retries: retries after the first attempt on 408/409/429/5xx and connection errors.
      deadline: wall-clock limit in seconds of one request over all its attempts (None: none).
      max_response_bytes: largest response accepted per attempt (None: no limit).
      max_requests_per_second: client-side rate limit over all attempts; None disables it.
      price_per_1k: price per 1000 tokens, a float for both kinds or ``(prompt, completion)``.
      extra_headers: added to every request.

    Requests to a loopback host (127.0.0.1, localhost, ::1) ignore the environment's proxy
    settings; others follow them as ``httpx`` does (``HTTPS_PROXY``, ``NO_PROXY``, ...).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        max_requests_per_second: float | None = None,
        price_per_1k: float | tuple[float, float] | None = None,
        extra_headers: dict[str, str] | None = None,
        deadline: float | None = 600.0,
        max_response_bytes: int | None = 32 * 2**20,
    ):
        if not base_url:
            raise ValueError("base_url is required, e.g. 'http://127.0.0.1:8000/v1'")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if deadline is not None and deadline <= 0:
            raise ValueError(f"deadline must be a positive number of seconds or None, got {deadline!r}")
        if max_response_bytes is not None and max_response_bytes <= 0:
            raise ValueError(f"max_response_bytes must be positive or None, got {max_response_bytes!r}")
        self.deadline = None if deadline is None else float(deadline)
        self.max_response_bytes = None if max_response_bytes is None else int(max_response_bytes)
        self._limits = _Limits()
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.rate_limiter = RateLimiter(max_requests_per_second) if max_requests_per_second else None
        if price_per_1k is None:
            self.price_per_1k: tuple[float, float] | None = None
        elif isinstance(price_per_1k, (tuple, list)):
            if len(price_per_1k) != 2:
                raise ValueError("price_per_1k must be a float or a (prompt, completion) pair")
            self.price_per_1k = (float(price_per_1k[0]), float(price_per_1k[1]))
        else:
            self.price_per_1k = (float(price_per_1k), float(price_per_1k))
        self.usage = Usage()
        self.retries = 0  # total retries made over the client's life
        self._lock = threading.Lock()
        self._local = threading.local()  # attempts of the request in flight on this thread
        host = (urllib.parse.urlsplit(self.base_url).hostname or "").lower()
        http_client = openai.DefaultHttpxClient(
            event_hooks={"request": [self._before_attempt]},
            trust_env=host not in _LOOPBACK_HOSTS,  # a proxy cannot reach this machine's loopback
        )
        if not _install_limits(http_client, self._limits):  # pragma: no cover - httpx internals changed
            raise RuntimeError("cannot install the request deadline on this httpx version")
        self._openai = openai.OpenAI(
            base_url=self.base_url,
            # openai insists on a key; without one the placeholder's header is dropped before sending
            api_key=self.api_key or "no-key",
            timeout=self.timeout,
            max_retries=self.max_retries,
            default_headers=dict(extra_headers or {}),
            http_client=http_client,
        )

    def close(self) -> None:
        """Close the connection pool (the client is unusable afterwards)."""
        self._openai.close()

    # -- accounting -------------------------------------------------------------------

    @property
    def cost(self) -> float | None:
        """Cost of the usage so far, or None when no price was given."""
        if self.price_per_1k is None:
            return None
        with self._lock:
            return self.usage.cost(*self.price_per_1k)

    def reset_usage(self) -> None:
        with self._lock:
            self.usage = Usage()
            self.retries = 0

    def _before_attempt(self, request) -> None:
        """httpx request hook: runs before every attempt, retries included."""
        if self.rate_limiter is not None:
            self.rate_limiter.acquire()
        if not self.api_key:
            request.headers.pop("Authorization", None)
        self._local.attempts = getattr(self._local, "attempts", 0) + 1
        lim = self._limits
        now = time.monotonic()
        if lim.request_end is not None and now >= lim.request_end:
            raise _LimitExceeded("request deadline exceeded")
        lim.attempt_end = now + self.timeout
        lim.received = 0
        lim.max_bytes = self.max_response_bytes

    # -- public API ---------------------------------------------------------------------

    def chat_completion(
        self,
        messages: Sequence[dict],
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        n: int = 1,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        **extra: Any,
    ):
        """One chat completion request; returns openai's ``ChatCompletion``.

        Arguments left None are not sent. ``extra`` keys go into the request body as they are
        (e.g. ``top_k``, ``continue_final_message`` for vLLM, ``max_completion_tokens``)."""
        if not messages:
            raise ValueError("messages must be a non-empty list of chat messages")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        kwargs: dict[str, Any] = {"model": self.model, "messages": list(messages), "n": int(n)}
        for key, val in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens), ("seed", seed)):
            if val is not None:
                kwargs[key] = val
        if stop is not None:
            kwargs["stop"] = [stop] if isinstance(stop, str) else list(stop)
        body = {k: v for k, v in extra.items() if v is not None}
        if body:
            kwargs["extra_body"] = body
        self._local.attempts = 0
        lim = self._limits
        lim.request_end = None if self.deadline is None else time.monotonic() + self.deadline
        try:
            raw = self._openai.chat.completions.with_raw_response.create(**kwargs)
            body = raw.http_response.content
        except _LimitExceeded as e:
            attempts = self._attempts()
            if "deadline" in str(e):
                raise APIConnectionError(f"no answer from {self.url} within the request deadline of "
                                         f"{self.deadline:g} s ({attempts} attempts)") from None
            raise APIError(f"bad response from {self.url}: {e}") from None
        except openai.APIStatusError as e:
            text = e.response.text
            raise APIStatusError(e.status_code, _error_message(text, e.status_code), text, self.url,
                                 attempts=self._attempts()) from e
        except openai.APIConnectionError as e:  # APITimeoutError included
            reason = e.__cause__ or e
            raise APIConnectionError(f"could not reach {self.url} after {self._attempts()} attempts: "
                                     f"{type(reason).__name__}: {reason}") from e
        except openai.APIError as e:  # e.g. a response that is not a chat completion
            self._attempts()
            raise APIError(f"bad response from {self.url}: {e}") from e
        finally:
            lim.request_end = lim.attempt_end = None
        self._attempts()
        _check_completion(body, self.url)
        try:
            response = raw.parse()
        except Exception as e:  # noqa: BLE001 - openai's model rejected what the checks let through
            raise APIError(f"bad response from {self.url}: {type(e).__name__}: {e}") from None
        if not isinstance(getattr(response, "choices", None), list):
            raise APIError(f"response from {self.url} has no 'choices' list: {str(response)[:500]}")
        u = response.usage
        with self._lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += int(getattr(u, "prompt_tokens", 0) or 0)
            self.usage.completion_tokens += int(getattr(u, "completion_tokens", 0) or 0)
        return response

    def _attempts(self) -> int:
        """Attempts made by this thread's request; adds its retries to ``retries``."""
        attempts = max(1, getattr(self._local, "attempts", 1))
        with self._lock:
            self.retries += attempts - 1
        return attempts

    def chat(self, messages: Sequence[dict], *args: Any, **kwargs: Any) -> list[str]:
        """The text of each returned choice, ordered by choice index. Arguments as for ``chat_completion``."""
        response = self.chat_completion(messages, *args, **kwargs)
        ordered = sorted(enumerate(response.choices), key=lambda ic: (ic[0] if ic[1].index is None else ic[1].index))
        texts = []
        for _, choice in ordered:
            content = choice.message.content if choice.message is not None else None
            if content is None:
                content = getattr(choice, "text", None)  # completions-style servers
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):  # _check_completion lets none through; never a silent ""
                raise APIError(f"bad response from {self.url}: a choice without text")
            texts.append(content)
        return texts

    def sample_solutions(
        self,
        image,
        question: str,
        n: int,
        system_prompt: str | None = None,
        **sampling: Any,
    ) -> list[str]:
        """Sample ``n`` completions for (image(s), question) — the policy interface used by
        best-of-N search. Asks for ``n`` choices in one request and tops up with further requests
        when a server returns fewer than asked."""
        return self.chat_n(build_messages(image, question, system_prompt), n, **sampling)

    def chat_n(self, messages: Sequence[dict], n: int, **kwargs: Any) -> list[str]:
        """Exactly ``n`` choices for ``messages`` (see ``chat_n``)."""
        return chat_n(self, messages, n, **kwargs)


def chat_n(client, messages: Sequence[dict], n: int, seed: int | None = None, **kwargs: Any) -> list[str]:
    """Exactly ``n`` choices for ``messages`` from ``client.chat``: one request for all of them,
    topped up with further requests when a server returns fewer than asked (some cap ``n``). A
    top-up request carries ``seed + round`` so that a seeded server does not repeat the samples it
    already gave."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out: list[str] = []
    for round_ in range(n):  # bounded: each round returns at least one choice or fails
        got = client.chat(messages, n=n - len(out), seed=None if seed is None else int(seed) + round_, **kwargs)
        if not got:
            raise APIError(f"server returned no choices for a request with n={n - len(out)}")
        out.extend(got)
        if len(out) >= n:
            break
    return out[:n]
