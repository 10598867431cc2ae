"""The FastAPI application of ``python -m jaxprm.serve`` (see docs/serving.md for the API).

``create_app(prm, ...)`` builds the app around a loaded PRM: a ``Worker`` thread owns the PRM (all
device work, dynamic batching, guide sessions); handlers read and validate the body
(``jaxprm.serve.inputs``), decode images off the event loop, submit jobs and await them. Every error is
a JSON body in vLLM's / OpenAI's schema ``{"error": {"message", "type", "param", "code"}}``; the server
never lets a bad request take it down.
"""
import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.concurrency import run_in_threadpool

from jaxprm.serve import inputs as inp
from jaxprm.serve.batcher import Worker
from jaxprm.serve.inputs import Limits, RequestError
from jaxprm.serve.metrics import Metrics

__all__ = ["create_app", "ServerState"]

log = logging.getLogger("jaxprm.serve")

CLASSES = ["+", "-"]  # the order of every [P(+), P(-)] row


class ServerState:
    """What the handlers share: the worker, the metrics, limits, the draining flag, in-flight count."""

    def __init__(self, prm, *, model_name: str, limits: Limits, api_key: str | None, worker: Worker,
                 metrics: Metrics, spec_info: dict):
        self.prm, self.model_name, self.limits = prm, model_name, limits
        self.api_key = api_key.encode() if api_key else None
        self.worker, self.metrics, self.spec_info = worker, metrics, spec_info
        self.draining = False
        self.inflight = 0
        self.started = time.time()


def _aggregations() -> tuple[str, ...]:
    from jaxprm.search.aggregate import AGGREGATIONS

    return tuple(AGGREGATIONS)


def _aggregate(scores: np.ndarray, names) -> dict[str, float | None]:
    from jaxprm.search.aggregate import aggregate

    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]  # steps dropped for max_length are NaN
    return {n: (float(aggregate(s, n)) if s.size else None) for n in names}


def _floats(a) -> list[float | None]:
    return [float(x) if math.isfinite(float(x)) else None for x in np.asarray(a, np.float64).reshape(-1)]


def _spec_info(prm) -> dict:
    spec = getattr(prm, "spec", None)
    out: dict[str, Any] = {"classes": CLASSES}
    for k in ("head", "plus_id", "minus_id", "history", "prompt_style", "task"):
        v = getattr(spec, k, None)
        if v is not None:
            out[k] = v
    out["max_length"] = int(getattr(prm, "max_length", 0) or 0)
    return out


def create_app(prm, *, model_name: str = "jaxprm-prm", limits: Limits | None = None, api_key: str | None = None,
               max_batch: int | None = None, max_wait_ms: float = 5.0, max_sessions: int = 64):
    limits = limits or Limits()
    metrics = Metrics()
    worker = Worker(prm, metrics, max_batch=max_batch, max_wait_ms=max_wait_ms, max_sessions=max_sessions)
    state = ServerState(prm, model_name=model_name, limits=limits, api_key=api_key, worker=worker, metrics=metrics,
                        spec_info=_spec_info(prm))
    tok = getattr(prm, "tokenizer", None)
    ip = getattr(prm, "image_processor", None)
    merge = getattr(ip, "merge_size", 2)
    inp.configure_budget(tok, (lambda h, w: int(np.prod(ip.grid_thw(h, w))) // merge**2) if ip is not None else None)
    aggs = _aggregations()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="jaxprm PRM server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jaxprm = state

    def error(e: RequestError, headers: dict | None = None):
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    # -- middleware: draining, API key, in-flight, latency -----------------------------------------
    # a plain ASGI middleware (cheaper per request than @app.middleware's BaseHTTPMiddleware)
    async def guard(scope, receive, send, inner):
        if scope["type"] != "http":
            return await inner(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if state.draining and path != "/metrics":
            resp = error(RequestError(503, "the server is shutting down"), {"Connection": "close", "Retry-After": "1"})
            if path == "/health":
                resp = JSONResponse({"status": "draining"}, status_code=503, headers={"Connection": "close"})
            await resp(scope, receive, send_status)
        elif state.api_key is not None and path != "/health" and not _authorized(scope, state.api_key):
            await error(RequestError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')"),
                        {"WWW-Authenticate": "Bearer"})(scope, receive, send_status)
        else:
            state.inflight += 1
            started = [False]

            async def send_tracked(message):
                started[0] = True
                await send_status(message)

            try:
                await inner(scope, receive, send_tracked)
            except Exception as e:  # noqa: BLE001 - never take the server down
                log.exception("unhandled error on %s", path)
                if not started[0]:
                    await JSONResponse(RequestError(500, f"internal error: {type(e).__name__}: {e}",
                                                    type="internal_error").body(), status_code=500)(
                        scope, receive, send_status)
            finally:
                state.inflight -= 1
        metrics.inc("jaxprm_requests_total", 1, {"endpoint": endpoint, "status": str(status[0])},
                    help="HTTP requests by endpoint and status")
        if endpoint in _TIMED:
            metrics.observe("jaxprm_request_latency_seconds", time.perf_counter() - t0, {"endpoint": endpoint},
                            help="request latency (read, validate, queue, score, respond)")

    class _Guard:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            await guard(scope, receive, send, self.inner)

    app.add_middleware(_Guard)

    async def body_json(request: Request):
        n = request.headers.get("content-length")
        if n is not None:
            try:
                if int(n) > limits.max_body_bytes:
                    raise RequestError(413, f"request body of {int(n)} bytes is over the limit of "
                                            f"{limits.max_body_bytes} bytes")
            except ValueError:
                raise RequestError(400, "invalid Content-Length header") from None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestError(413, f"request body is over the limit of {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise RequestError(400, "empty request body: expected a JSON object")
        try:
            return json.loads(raw)
        except UnicodeDecodeError:
            raise RequestError(400, "the request body is not UTF-8 encoded JSON") from None
        except json.JSONDecodeError as e:
            raise RequestError(400, f"malformed JSON body: {e.msg} at line {e.lineno} column {e.colno}") from None

    async def wait(fut):
        try:
            return await asyncio.wrap_future(fut)
        except RequestError:
            raise
        except ValueError as e:
            msg = str(e)
            raise RequestError(413 if "too long" in msg else 422, msg) from None
        except TypeError as e:
            raise RequestError(422, str(e)) from None

    def handler(fn):
        async def run(request: Request):
            try:
                return await fn(request)
            except RequestError as e:
                return error(e)
        run.__name__ = fn.__name__
        return run

    # -- endpoints ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "jaxprm",
            "max_model_len": state.spec_info["max_length"], "task": "token_classify",
            "jaxprm": {**state.spec_info, "aggregations": list(aggs), "limits": _limits_dict(limits),
                       "max_batch": worker.max_batch, "max_sessions": worker.max_sessions}}]}

    @app.get("/metrics")
    async def metrics_text():
        s = getattr(prm, "scorer", None)
        gauges = [("jaxprm_compilations", "jitted programs traced (compiled) so far, warm-up included", None,
                   worker.num_compiles),
                  ("jaxprm_compilations_after_warmup", "compilations since the server started serving", None,
                   worker.num_compiles - worker.compiles_at_start),
                  ("jaxprm_inflight_requests", "requests being handled", None, state.inflight),
                  ("jaxprm_queue_depth", "jobs waiting for the device worker", None, worker.queue_depth),
                  ("jaxprm_sessions", "live guide sessions (K/V caches)", None, len(worker.sessions)),
                  ("jaxprm_draining", "1 after SIGTERM while in-flight requests finish", None, int(state.draining))]
        if s is not None:
            gauges += [("jaxprm_compilations_by_function", "traces per jitted function", {"function": k}, v)
                       for k, v in sorted(s.trace_counts.items())]
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/score")
    @handler
    async def score(request: Request):
        body = await body_json(request)
        form, parsed, names = await run_in_threadpool(inp.parse_score, body, limits, aggs)
        if form == "steps":
            got = await wait(worker.submit_items([parsed]))
            return _one(got[0], names) | {"object": "score", "model": state.model_name}
        if form == "items":
            got = await wait(worker.submit_items(parsed))
            return {"object": "score", "model": state.model_name, "items": [_one(g, names) for g in got]}
        item, lists = parsed
        got = await wait(worker.submit_candidates(item, lists))
        cands = [_one(g, names) | {"index": i} for i, g in enumerate(got)]
        best = {}
        for n in names:
            vals = [c["aggregates"][n] for c in cands]
            ok = [i for i, v in enumerate(vals) if v is not None]
            best[n] = max(ok, key=lambda i: vals[i]) if ok else None
        return {"object": "score", "model": state.model_name, "candidates": cands, "best_index": best}

    @app.post("/v1/guide")
    @handler
    async def guide(request: Request):
        body = await body_json(request)
        g = await run_in_threadpool(inp.parse_guide, body, limits, aggs)
        sid = g["session_id"] or uuid.uuid4().hex
        got, status, cached = await wait(worker.submit_guide(sid, g["item"], g["steps"], g["candidates"]))
        agg = [_aggregate(s, [g["aggregate"]])[g["aggregate"]] for s in got]
        ok = [i for i, v in enumerate(agg) if v is not None]
        return {"object": "guide", "model": state.model_name, "session_id": sid, "session": status,
                "cached_tokens": cached, "scores": [_floats(s) for s in got], "aggregate": g["aggregate"],
                "aggregated": agg, "best_index": max(ok, key=lambda i: agg[i]) if ok else None}

    @app.delete("/v1/guide/{session_id}")
    @handler
    async def drop_session(request: Request):
        sid = request.path_params["session_id"]
        existed = await wait(worker.submit_drop_session(sid))
        if not existed:
            raise RequestError(404, f"unknown or expired session {sid!r}", "session_id")
        return {"object": "guide.session", "session_id": sid, "deleted": True}

    async def pooled(request: Request, endpoint: str):
        body = await body_json(request)
        items = await run_in_threadpool(inp.parse_pooling, body, limits, getattr(prm, "system_prompt", ""), tok,
                                        endpoint=endpoint)
        got = await wait(worker.submit_items(items))
        usage_n = sum(inp.count_tokens(it) for it in items)
        return items, got, {"prompt_tokens": usage_n, "total_tokens": usage_n, "completion_tokens": 0}

    @app.post("/pooling")
    @handler
    async def pooling(request: Request):
        items, got, usage = await pooled(request, "pooling")
        data = [{"index": i, "object": "pooling", "data": [[p, None if p is None else 1.0 - p] for p in _floats(g)]}
                for i, g in enumerate(got)]
        return {"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": state.model_name, "data": data, "usage": usage}

    @app.post("/classify")
    @handler
    async def classify(request: Request):
        items, got, usage = await pooled(request, "classify")
        data = []
        for i, g in enumerate(got):
            s = np.asarray(g, np.float64)
            s = s[np.isfinite(s)]
            p = float(s[-1]) if s.size else float("nan")
            probs = [p, 1.0 - p] if s.size else [None, None]
            data.append({"index": i, "label": (CLASSES[0] if p >= 0.5 else CLASSES[1]) if s.size else None,
                         "probs": probs, "num_classes": 2})
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": state.model_name, "data": data, "usage": usage}

    @app.exception_handler(404)
    async def not_found(request, exc):
        return error(RequestError(404, f"no route {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def not_allowed(request, exc):
        return JSONResponse(RequestError(405, f"method {request.method} not allowed on {request.url.path}",
                                         type="method_not_allowed").body(), status_code=405)

    def _one(g, names) -> dict:
        s = np.asarray(g, np.float64)
        return {"scores": _floats(s), "aggregates": _aggregate(s, names), "truncated": bool(np.isnan(s).any())}

    return app


_ENDPOINTS = {"/health", "/v1/models", "/metrics", "/v1/score", "/v1/guide", "/pooling", "/classify"}
_TIMED = {"/v1/score", "/v1/guide", "/pooling", "/classify"}


def _limits_dict(limits: Limits) -> dict:
    import dataclasses

    return dataclasses.asdict(limits)


def _authorized(scope, key: bytes) -> bool:
    headers = dict(scope.get("headers") or ())
    got = headers.get(b"authorization", b"").decode("latin-1")
    if got[:7].lower() == "bearer ":
        got = got[7:].strip()
    else:
        got = headers.get(b"x-api-key", b"").decode("latin-1")
    return hmac.compare_digest(got.encode("utf-8", "surrogateescape"), key)
