"""The device worker of the scoring server: one thread owns the PRM, so every JAX call happens on it.

Request handlers submit jobs and await their futures:

* ``items``: solutions to score whole (``/v1/score`` steps / items, ``/pooling``, ``/classify``). The
  worker gathers the items of concurrent jobs -- waiting at most ``max_wait_ms`` after the first, and
  never for more than ``max_batch`` items -- and scores them with one ``PRM.score_batch`` call, which
  packs them into the scorer's batch / length / patch buckets. So N clients cost about one batched
  forward, not N. If the gathered call fails (one job's solution is too long, say), each job is
  scored again on its own, so only the bad job gets the error.
* ``candidates``: N solutions of one problem (``PRM.score_candidates``: the prompt prefix runs once).
* ``guide``: one guided-search iteration (``IncrementalScorer.score_next``) on the session's K/V cache.
  Sessions live in an LRU of at most ``max_sessions`` entries (``OrderedDict``; the least recently
  used is dropped, and its K/V freed, when a new one would exceed the bound).

Metrics: batches, items per batch (the batch fill), compilations (``Scorer.num_compiles``).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any

from jaxprm.serve.inputs import Item, RequestError
from jaxprm.serve.metrics import BATCH_FILL_BUCKETS, Metrics

__all__ = ["Worker", "UnknownSession"]

log = logging.getLogger("jaxprm.serve")


class UnknownSession(RequestError):
    def __init__(self, sid: str):
        super().__init__(404, f"unknown or expired session {sid!r}: send 'image' and 'question' again to start it "
                              "anew (the server keeps a bounded LRU of sessions)", "session_id")


@dataclasses.dataclass
class _Job:
    kind: str  # "items" | "candidates" | "guide" | "drop_session"
    payload: Any
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    n: int = 1  # items it holds


_STOP = object()


class Worker:
    """Owns ``prm``; ``submit_*`` return ``concurrent.futures.Future``s resolved on the worker thread."""

    def __init__(self, prm, metrics: Metrics, *, max_batch: int | None = None, max_wait_ms: float = 5.0,
                 max_sessions: int = 64):
        self.prm = prm
        self.metrics = metrics
        self.max_batch = int(max_batch or getattr(getattr(prm, "scorer", None), "batch_size", 8))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_sessions = int(max_sessions)
        self.sessions: collections.OrderedDict[str, tuple[str, Any]] = collections.OrderedDict()
        self._q: queue.Queue = queue.Queue()
        self._pending: collections.deque = collections.deque()
        self._thread = threading.Thread(target=self._run, name="jaxprm-serve-worker", daemon=True)
        self.compiles_at_start = self.num_compiles

    # -- public ----------------------------------------------------------------------------------
    @property
    def num_compiles(self) -> int:
        s = getattr(self.prm, "scorer", None)
        return int(s.num_compiles) if s is not None else 0

    def start(self) -> "Worker":
        self.compiles_at_start = self.num_compiles
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return self._q.qsize() + len(self._pending)

    def submit_items(self, items: list[Item]) -> concurrent.futures.Future:
        return self._submit(_Job("items", items, n=len(items)))

    def submit_candidates(self, item: Item, candidates: list[list[str]]) -> concurrent.futures.Future:
        return self._submit(_Job("candidates", (item, candidates), n=len(candidates)))

    def submit_guide(self, sid: str, item: Item | None, steps: list[str], candidates: list[str]):
        return self._submit(_Job("guide", (sid, item, steps, candidates), n=len(candidates)))

    def submit_drop_session(self, sid: str) -> concurrent.futures.Future:
        return self._submit(_Job("drop_session", sid))

    def _submit(self, job: _Job) -> concurrent.futures.Future:
        self._q.put(job)
        return job.future

    # -- the loop --------------------------------------------------------------------------------
    def _next(self, timeout: float | None = None):
        if self._pending:
            return self._pending.popleft()
        return self._q.get(timeout=timeout) if timeout is not None else self._q.get()

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is _STOP:
                self._fail_pending()
                return
            try:
                if job.kind == "items":
                    self._gather_and_score(job)
                else:
                    self._run_one(job)
            except BaseException as e:  # noqa: BLE001 - the worker must survive anything
                log.exception("worker error")
                if not job.future.done():
                    job.future.set_exception(e)

    def _fail_pending(self) -> None:
        while True:
            try:
                job = self._pending.popleft() if self._pending else self._q.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and not job.future.done():
                job.future.set_exception(RequestError(503, "the server is shutting down"))

    def _gather_and_score(self, first: _Job) -> None:
        batch, n = [first], first.n
        deadline = time.monotonic() + self.max_wait
        stop_seen = False
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                stop_seen = True
                break
            if nxt.kind == "items":
                batch.append(nxt)
                n += nxt.n
            else:
                self._pending.append(nxt)
        self._score_items(batch)
        if stop_seen:
            self._pending.append(_STOP)

    def _score_items(self, jobs: list[_Job]) -> None:
        items = [it for j in jobs for it in j.payload]
        try:
            scores = self._score_batch(items)
        except Exception as e:  # noqa: BLE001
            if len(jobs) == 1:
                jobs[0].future.set_exception(e)
                return
            for j in jobs:  # isolate the bad job
                self._score_items([j])
            return
        at = 0
        for j in jobs:
            j.future.set_result(scores[at: at + j.n])
            at += j.n

    def _score_batch(self, items: list[Item]):
        t = time.perf_counter()
        out = self.prm.score_batch([(it.images, it.question, it.steps) for it in items])
        self._record("items", len(items), time.perf_counter() - t)
        return out

    def _record(self, kind: str, n: int, seconds: float) -> None:
        m = self.metrics
        m.inc("jaxprm_batches_total", 1, {"kind": kind}, help="device calls of the worker (one gathered batch each)")
        m.inc("jaxprm_batch_items_total", n, {"kind": kind}, help="solutions scored in those calls")
        m.observe("jaxprm_batch_fill", n, {"kind": kind}, buckets=BATCH_FILL_BUCKETS,
                  help="solutions per device call (gathered from concurrent requests for 'items')")
        m.observe("jaxprm_batch_seconds", seconds, {"kind": kind}, help="time of one device call, host work included")

    def _run_one(self, job: _Job) -> None:
        if job.kind == "candidates":
            item, cands = job.payload
            t = time.perf_counter()
            try:
                out = self.prm.score_candidates(item.images, item.question, cands)
            except Exception as e:  # noqa: BLE001
                job.future.set_exception(e)
                return
            self._record("candidates", len(cands), time.perf_counter() - t)
            job.future.set_result(out)
        elif job.kind == "guide":
            try:
                job.future.set_result(self._guide(*job.payload))
            except Exception as e:  # noqa: BLE001
                job.future.set_exception(e)
        elif job.kind == "drop_session":
            job.future.set_result(self.sessions.pop(job.payload, None) is not None)
        else:  # pragma: no cover
            job.future.set_exception(RuntimeError(f"unknown job kind {job.kind!r}"))

    def _guide(self, sid: str, item: Item | None, steps: list[str], cands: list[str]):
        entry = self.sessions.get(sid)
        status = "reused"
        if item is not None and (entry is None or entry[0] != item.image_key):
            status = "new" if entry is None else "replaced"
            self.sessions.pop(sid, None)
            entry = (item.image_key, self.prm.incremental_scorer(item.images, item.question))
            self.sessions[sid] = entry
            while len(self.sessions) > self.max_sessions:
                old, _ = self.sessions.popitem(last=False)
                self.metrics.inc("jaxprm_sessions_evicted_total", 1, help="guide sessions dropped by the LRU bound")
                log.info("session %s evicted (LRU, max_sessions=%d)", old, self.max_sessions)
        elif entry is None:
            raise UnknownSession(sid)
        self.sessions.move_to_end(sid)
        scorer = entry[1]
        t = time.perf_counter()
        out = scorer.score_next(steps, cands)
        self._record("guide", len(cands), time.perf_counter() - t)
        return out, status, int(getattr(scorer, "cached_tokens", 0))
