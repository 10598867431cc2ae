"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

``Metrics`` holds counters and histograms (thread-safe: the device worker and the request handlers
both record); ``Metrics.render(gauges)`` writes them plus the given gauges as text.
``parse_prometheus(text)`` reads such text back into ``{(name, labels): value}`` (for tests and
``bench/serve_bench.py``).
"""
from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Iterable, Mapping

__all__ = ["Metrics", "parse_prometheus", "LATENCY_BUCKETS", "BATCH_FILL_BUCKETS"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_FILL_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Mapping[str, str] | None) -> Labels:
    return tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items()))


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')) for k, v in items]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _fmt_value(v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v)) if isinstance(v, float) else str(v)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, float(v))] += 1
        self.sum += float(v)
        self.count += 1


class Metrics:
    """Counters and histograms by name and labels; ``help`` texts are given at first use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {}
        self._hists: dict[str, dict[Labels, _Histogram]] = {}
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._help: dict[str, str] = {}

    def inc(self, name: str, value: float = 1.0, labels: Mapping[str, str] | None = None, help: str = "") -> None:
        with self._lock:
            self._help.setdefault(name, help)
            d = self._counters.setdefault(name, {})
            key = _labels(labels)
            d[key] = d.get(key, 0.0) + float(value)

    def observe(self, name: str, value: float, labels: Mapping[str, str] | None = None,
                buckets: tuple[float, ...] = LATENCY_BUCKETS, help: str = "") -> None:
        with self._lock:
            self._help.setdefault(name, help)
            self._buckets.setdefault(name, tuple(buckets))
            d = self._hists.setdefault(name, {})
            key = _labels(labels)
            h = d.get(key)
            if h is None:
                h = d[key] = _Histogram(self._buckets[name])
            h.observe(value)

    def counter(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(_labels(labels), 0.0)

    def render(self, gauges: Iterable[tuple[str, str, Mapping[str, str] | None, float]] = ()) -> str:
        """The text exposition: ``gauges`` are ``(name, help, labels, value)`` read at render time."""
        out: list[str] = []
        seen_gauges: set[str] = set()
        for name, help_, labels, value in gauges:
            if name not in seen_gauges:
                out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
                seen_gauges.add(name)
            out.append(f"{name}{_fmt_labels(_labels(labels))} {_fmt_value(float(value))}")
        with self._lock:
            for name in sorted(self._counters):
                out += [f"# HELP {name} {self._help.get(name, '')}", f"# TYPE {name} counter"]
                for key, v in sorted(self._counters[name].items()):
                    out.append(f"{name}{_fmt_labels(key)} {_fmt_value(v)}")
            for name in sorted(self._hists):
                out += [f"# HELP {name} {self._help.get(name, '')}", f"# TYPE {name} histogram"]
                for key, h in sorted(self._hists[name].items()):
                    cum = 0
                    for b, c in zip(h.buckets + (math.inf,), h.counts):
                        cum += c
                        out.append(f"{name}_bucket{_fmt_labels(key, (('le', _fmt_value(b) if math.isinf(b) else repr(b)),))} {cum}")
                    out.append(f"{name}_sum{_fmt_labels(key)} {_fmt_value(h.sum)}")
                    out.append(f"{name}_count{_fmt_labels(key)} {h.count}")
        return "\n".join(out) + "\n"


_LINE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, Labels], float]:
    """``{(name, sorted label pairs): value}`` of every sample line (comments skipped)."""
    out: dict[tuple[str, Labels], float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        labels = tuple(sorted((k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                              for k, v in _LABEL.findall(m.group(3) or "")))
        out[(m.group(1), labels)] = float(m.group(4))
    return out
