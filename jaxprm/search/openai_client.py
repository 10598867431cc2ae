"""A small OpenAI-compatible chat client (vLLM / SGLang / OpenAI) on the standard library only.

``OpenAIChatClient.chat`` POSTs to ``{base_url}/chat/completions`` with the OpenAI Chat
Completions request body (``model``, ``messages``, ``temperature``, ``top_p``, ``max_tokens``,
``n``, ``stop``, ``seed``) and returns the text of every choice. Images go in user messages as
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` content parts, the
format vLLM's and SGLang's OpenAI servers accept for multimodal models; ``image_to_data_url``
builds those URLs from encoded bytes, a PIL image, a numpy array or a file path.

Behaviour:
- retries with exponential backoff (``backoff * 2**attempt``, capped at ``max_backoff``, plus
  optional jitter) on HTTP 429, 5xx (and 408/409, as the openai SDK does) and on connection
  errors/timeouts; a ``Retry-After``
  header (seconds or an HTTP date) overrides the computed delay;
- other 4xx responses raise ``APIStatusError`` at once, carrying the server's error message
  (OpenAI's ``{"error": {"message": ...}}``, vLLM's ``{"message": ...}``, FastAPI's ``{"detail": ...}``);
- ``usage`` sums ``prompt_tokens`` / ``completion_tokens`` over responses; ``cost`` prices them
  with an optional price per 1k tokens;
- an optional client-side rate limiter keeps request starts at most ``max_requests_per_second``.

The client is thread-safe: several threads may share one instance (usage and rate limiting are
locked).
"""
from __future__ import annotations

import base64
import dataclasses
import email.utils
import http.client
import io
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Sequence

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "OpenAIChatClient",
    "RateLimiter",
    "Usage",
    "build_messages",
    "image_to_data_url",
]

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class APIError(RuntimeError):
    """Base class for errors from ``OpenAIChatClient``."""


class APIStatusError(APIError):
    """The server answered with an error status. ``status`` is the HTTP code, ``message`` the
    server's error message, ``body`` the raw response text."""

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
    """Pull the human-readable message out of an error body."""
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


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIChatClient:
    """Chat-completions client for an OpenAI-compatible server.

    Args:
      base_url: server root including the API prefix, e.g. ``http://127.0.0.1:8000/v1``.
      model: model name sent in every request.
      api_key: bearer token; defaults to ``$OPENAI_API_KEY``; no Authorization header when unset.
      timeout: socket timeout per request, seconds.
      max_retries: retries after the first attempt on 429/5xx/connection errors.
      backoff: base delay; attempt ``k`` (0-based) waits ``backoff * 2**k`` seconds.
      max_backoff: cap on one delay (a Retry-After header is capped by it too).
      jitter: fraction of random extra delay (0 = deterministic).
      max_requests_per_second: client-side rate limit; None disables it.
      price_per_1k: price per 1000 tokens, a float for both kinds or ``(prompt, completion)``.
      extra_headers: added to every request.
      proxies: ``{"http": ..., "https": ...}``; None uses the environment's proxy settings, ``{}``
        none. Loopback hosts (127.0.0.1, localhost, ::1) never go through a proxy.
      sleep: the sleep function (injectable for tests).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        jitter: float = 0.0,
        max_requests_per_second: float | None = None,
        price_per_1k: float | tuple[float, float] | None = None,
        extra_headers: dict[str, str] | None = None,
        proxies: dict[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not base_url:
            raise ValueError("base_url is required, e.g. 'http://127.0.0.1:8000/v1'")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff < 0 or max_backoff < 0 or jitter < 0:
            raise ValueError("backoff, max_backoff and jitter must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.jitter = float(jitter)
        self.extra_headers = dict(extra_headers or {})
        host = (urllib.parse.urlsplit(self.base_url).hostname or "").lower()
        if host in _LOOPBACK_HOSTS:
            proxies = {}  # a proxy cannot reach this machine's loopback server
        # proxies=None: the environment's (http_proxy, https_proxy, no_proxy), as urllib does.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
        self._sleep = sleep
        self.rate_limiter = (
            RateLimiter(max_requests_per_second, sleep=sleep) if max_requests_per_second else None
        )
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
        self.retry_delays: list[float] = []  # every backoff delay slept, in order
        self._lock = threading.Lock()
        self._rng = random.Random()

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
            self.retry_delays = []

    def _add_usage(self, response: dict) -> None:
        u = response.get("usage") or {}
        with self._lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += int(u.get("prompt_tokens") or 0)
            self.usage.completion_tokens += int(u.get("completion_tokens") or 0)

    # -- transport ----------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        h.update(self.extra_headers)
        return h

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            delay = retry_after
        else:
            delay = self.backoff * (2.0**attempt)
            if self.jitter:
                delay *= 1.0 + self.jitter * self._rng.random()
        return min(delay, self.max_backoff)

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload).encode("utf-8")
        headers = self._headers()
        attempt = 0
        while True:
            if self.rate_limiter is not None:
                self.rate_limiter.acquire()
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            retry_after = None
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    body = resp.read().decode("utf-8")
                try:
                    obj = json.loads(body)
                except ValueError:
                    raise APIError(f"invalid JSON in response from {self.url}: {body[:500]!r}") from None
                if not isinstance(obj, dict):
                    raise APIError(f"unexpected response from {self.url}: {body[:500]!r}")
                return obj
            except urllib.error.HTTPError as e:
                try:
                    body = e.read().decode("utf-8", errors="replace")
                except Exception:  # noqa: BLE001 - the body is only for the message
                    body = ""
                finally:
                    e.close()
                status = int(e.code)
                message = _error_message(body, status)
                if status not in RETRYABLE_STATUS or attempt >= self.max_retries:
                    raise APIStatusError(status, message, body, self.url, attempts=attempt + 1) from None
                retry_after = _retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                if attempt >= self.max_retries:
                    raise APIConnectionError(
                        f"could not reach {self.url} after {attempt + 1} attempts: {reason}"
                    ) from e
            delay = self._delay(attempt, retry_after)
            with self._lock:
                self.retries += 1
                self.retry_delays.append(delay)
            if delay > 0:
                self._sleep(delay)
            attempt += 1

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
    ) -> dict:
        """POST one chat completion request and return the parsed JSON response.

        ``extra`` keys are added to the request body as they are (e.g. ``top_k``,
        ``repetition_penalty`` for vLLM)."""
        if not messages:
            raise ValueError("messages must be a non-empty list of chat messages")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        payload: dict[str, Any] = {"model": self.model, "messages": list(messages), "n": int(n)}
        for key, val in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens), ("seed", seed)):
            if val is not None:
                payload[key] = val
        if stop is not None:
            payload["stop"] = [stop] if isinstance(stop, str) else list(stop)
        payload.update({k: v for k, v in extra.items() if v is not None})
        response = self._post(payload)
        self._add_usage(response)
        return response

    def chat(
        self,
        messages: Sequence[dict],
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        n: int = 1,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        **extra: Any,
    ) -> list[str]:
        """Return the text of each returned choice (ordered by choice index)."""
        response = self.chat_completion(
            messages, temperature=temperature, top_p=top_p, max_tokens=max_tokens, n=n, stop=stop, seed=seed, **extra
        )
        choices = response.get("choices")
        if not isinstance(choices, list):
            raise APIError(f"response from {self.url} has no 'choices' list: {json.dumps(response)[:500]}")
        ordered = sorted(enumerate(choices), key=lambda ic: (ic[1].get("index", ic[0]) if isinstance(ic[1], dict) else ic[0]))
        texts = []
        for _, choice in ordered:
            msg = choice.get("message") if isinstance(choice, dict) else None
            content = msg.get("content") if isinstance(msg, dict) else None
            if content is None and isinstance(choice, dict):
                content = choice.get("text")  # completions-style servers
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            texts.append(content or "")
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
        """Exactly ``n`` choices for ``messages``: one request for all of them, topped up with further
        requests when a server returns fewer than asked (some cap ``n``)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        out: list[str] = []
        for _ in range(n):  # bounded: each round returns at least one choice or fails
            got = self.chat(messages, n=n - len(out), **kwargs)
            if not got:
                raise APIError(f"server returned no choices for a request with n={n - len(out)}")
            out.extend(got)
            if len(out) >= n:
                break
        return out[:n]
