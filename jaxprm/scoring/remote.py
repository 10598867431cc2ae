"""``RemotePRM(url)``: a PRM served by ``python -m jaxprm.serve``, with the in-process ``PRM``'s interface.

    prm = RemotePRM("http://127.0.0.1:8000", api_key=None)   # api_key: default env JAXPRM_API_KEY
    prm.score(image, question, steps)                        # np.ndarray of P(step correct)
    prm.score_batch([(image, question, steps), ...])
    prm.score_candidates(image, question, [steps_a, steps_b])
    prm.incremental_scorer(image, question).score_next(steps, candidates)

so ``jaxprm.search.best_of_n``, ``guided_greedy_search`` and ``python -m jaxprm.eval bon|vpb --prm
http://...`` run unchanged against a server. Images are sent as base64: encoded bytes and files as they
are (the server decodes them as ``PRM.score`` does); PIL images and arrays as lossless PNG of the RGB
pixels ``PRM.score`` would use (``jaxprm.data.preprocess.to_rgb_array``), so the server scores the same
pixels. Scores the server reports as null (steps dropped for the PRM's ``max_length``) are NaN, as in
process.

``incremental_scorer`` keeps a server-side session (``POST /v1/guide`` with a session id): the image and
question are sent on the first call only; the server keeps the prompt's K/V cache between calls (a
bounded LRU: if the session was evicted, the next call sends the image again and the server rebuilds it).

Only the standard library is used for HTTP (``urllib``). Errors: ``RemotePRMError`` (with ``status``);
the server's 4xx for bad input are ``RemoteInputError``, also a ``ValueError`` like the in-process errors.
"""
from __future__ import annotations

import base64
import collections
import io
import json
import os
import types
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence

import numpy as np

__all__ = ["RemotePRM", "RemoteIncrementalScorer", "RemotePRMError", "RemoteInputError", "encode_image"]


class RemotePRMError(RuntimeError):
    """The server could not be reached or answered with an error (``status``: HTTP status or None)."""

    def __init__(self, message: str, status: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.body = status, body


class RemoteInputError(RemotePRMError, ValueError):
    """The server refused the input (HTTP 400 / 413 / 422): the message says which field and why."""


def _single_image(x) -> bool:
    from jaxprm.scoring.prm import _is_single_image

    return _is_single_image(x)


def encode_image(image) -> str:
    """One image -> base64 text: bytes and files as they are, anything else as PNG of its RGB pixels."""
    from PIL import Image

    from jaxprm.data.preprocess import to_rgb_array

    if isinstance(image, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(image)).decode("ascii")
    if isinstance(image, str) and image.startswith("data:"):
        return image
    if isinstance(image, (str, os.PathLike)):
        s = os.fspath(image)
        if "://" in s[:16]:
            raise ValueError(f"image {s[:60]!r}: URLs are not fetched; pass the image bytes, a file or an array")
        try:
            with open(s, "rb") as f:
                return base64.b64encode(f.read()).decode("ascii")
        except OSError as e:
            raise ValueError(f"could not read image file {s!r}: {e}") from e
    buf = io.BytesIO()
    Image.fromarray(to_rgb_array(image)).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _encode_images(image):
    if image is None:
        return None
    if _single_image(image):
        return encode_image(image)
    if isinstance(image, dict) or not isinstance(image, Sequence):
        raise TypeError(f"image must be a PIL image, bytes, a path, a uint8 array, a list of those or None; "
                        f"got {type(image).__name__}")
    out = [encode_image(im) for im in image]
    return out or None


def _steps(question, steps, where: str = "") -> list[str]:
    from jaxprm.scoring.prm import _check_question_steps

    return _check_question_steps(question, steps, where)


def _scores(v) -> np.ndarray:
    return np.asarray([np.nan if x is None else x for x in v], np.float32)


class RemotePRM:
    """A PRM behind ``python -m jaxprm.serve`` (see the module docstring)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 600.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        url = url.rstrip("/")
        if url.endswith("/v1"):
            url = url[:-3]
        self.url = url
        self.api_key = api_key if api_key is not None else os.environ.get("JAXPRM_API_KEY") or None
        self.timeout = float(timeout)
        self._info: dict | None = None

    def __repr__(self) -> str:
        return f"RemotePRM({self.url!r})"

    # -- HTTP ------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)
                msg = err.get("error", {}).get("message") or raw.decode("utf-8", "replace")
            except (ValueError, AttributeError):
                err, msg = None, raw.decode("utf-8", "replace")[:500]
            cls = RemoteInputError if e.code in (400, 413, 422) else RemotePRMError
            raise cls(f"{method} {self.url}{path}: HTTP {e.code}: {msg}", e.code, err) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RemotePRMError(f"{method} {self.url}{path}: cannot reach the PRM server: {reason}") from None

    def health(self) -> dict:
        return self._request("GET", "/health")

    def info(self) -> dict:
        """The served model's card (``GET /v1/models``): spec, limits, max_length."""
        if self._info is None:
            data = self._request("GET", "/v1/models")["data"]
            self._info = data[0]
        return self._info

    @property
    def spec(self):
        """The served PRM's spec as a namespace (head, plus_id, minus_id, history, task, ...)."""
        return types.SimpleNamespace(**{k: v for k, v in self.info().get("jaxprm", {}).items()
                                        if k not in ("limits", "aggregations")})

    @property
    def max_length(self) -> int:
        return int(self.info().get("max_model_len") or 0)

    def _limit(self, name: str, default: int) -> int:
        try:
            return int(self.info()["jaxprm"]["limits"][name])
        except (KeyError, TypeError, ValueError, RemotePRMError):
            return default

    # -- the PRM interface -----------------------------------------------------------------------
    def score(self, image, question: str, steps: Sequence[str]) -> np.ndarray:
        """Per-step P(correct), float32 of shape (len(steps),)."""
        steps = _steps(question, steps)
        got = self._request("POST", "/v1/score", {"image": _encode_images(image), "question": question,
                                                  "steps": steps, "aggregations": []})
        return _scores(got["scores"])

    def score_batch(self, items) -> list[np.ndarray]:
        """``items``: a list of (image, question, steps); one request per ``max_items`` of them."""
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise TypeError(f"items must be a list of (image, question, steps) tuples, got {type(items).__name__}")
        body = []
        for n, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != 3:
                raise TypeError(f"items[{n}] must be an (image, question, steps) tuple, got {type(item).__name__}")
            image, question, steps = item
            body.append({"image": _encode_images(image), "question": question,
                         "steps": _steps(question, steps, f"items[{n}]")})
        out: list[np.ndarray] = []
        chunk = max(1, self._limit("max_items", 64)) if body else 1
        for s in range(0, len(body), chunk):
            got = self._request("POST", "/v1/score", {"items": body[s: s + chunk], "aggregations": []})
            out += [_scores(g["scores"]) for g in got["items"]]
        return out

    def score_candidates(self, image, question: str, candidates: Sequence[Sequence[str]], *,
                         share_prefix: bool = True) -> list[np.ndarray]:  # noqa: ARG002 - the server shares
        """N candidate solutions of one problem (the server runs their shared prompt prefix once)."""
        if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
            raise TypeError(f"candidates must be a list of step lists, got {type(candidates).__name__}")
        if not candidates:
            return []
        lists = [_steps(question, c, f"candidates[{i}]") for i, c in enumerate(candidates)]
        img = _encode_images(image)
        out: list[np.ndarray] = []
        chunk = max(1, self._limit("max_candidates", 64))
        for s in range(0, len(lists), chunk):
            got = self._request("POST", "/v1/score", {"image": img, "question": question,
                                                      "candidates": lists[s: s + chunk], "aggregations": []})
            out += [_scores(c["scores"]) for c in got["candidates"]]
        return out

    def incremental_scorer(self, image, question: str, **_) -> "RemoteIncrementalScorer":
        """A scorer for one solution that grows step by step, on a server-side session."""
        return RemoteIncrementalScorer(self, image, question)


class RemoteIncrementalScorer:
    """``score_next(steps, candidates)`` through ``POST /v1/guide`` on one server session (see
    ``jaxprm.scoring.IncrementalScorer`` for the semantics: the scores of ``steps + [c]`` per candidate)."""

    def __init__(self, prm: RemotePRM, image, question: str):
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        self.prm, self.question = prm, question
        self.image = _encode_images(image)
        self.session_id = uuid.uuid4().hex
        self._started = False
        self.stats: collections.Counter = collections.Counter()
        self.cached_tokens = 0

    def score_next(self, steps: Sequence[str], candidates: Sequence[str]) -> list[np.ndarray]:
        from jaxprm.scoring.prm import _check_step_lists  # lazily, like _steps: the client needs no JAX to import

        steps, cands = _check_step_lists(steps, candidates)
        if not cands:
            return []
        for i, c in enumerate(cands):
            _steps(self.question, steps + [c], f"candidates[{i}]")
        body = {"session_id": self.session_id, "steps": steps, "candidates": cands}
        if not self._started:
            body.update(image=self.image, question=self.question)
        try:
            got = self.prm._request("POST", "/v1/guide", body)
        except RemotePRMError as e:
            if e.status != 404 or not self._started:
                raise
            self.stats["restarts"] += 1  # the server dropped the session (LRU): start it anew
            got = self.prm._request("POST", "/v1/guide", {**body, "image": self.image, "question": self.question})
        self._started = True
        self.stats["calls"] += 1
        self.stats[f"session_{got.get('session', 'reused')}"] += 1
        self.cached_tokens = int(got.get("cached_tokens", 0))
        return [_scores(s) for s in got["scores"]]

    def close(self) -> None:
        """Free the server's session (its K/V cache); a later ``score_next`` starts a new one."""
        if self._started:
            try:
                self.prm._request("DELETE", f"/v1/guide/{self.session_id}")
            except RemotePRMError as e:
                if e.status != 404:
                    raise
        self._started = False
