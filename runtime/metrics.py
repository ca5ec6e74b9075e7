"""Prometheus metrics for the station and the hub, without prometheus_client (stdlib only).

A small thread-safe registry of counters, gauges and fixed-bucket histograms with labels, and
its text exposition (format 0.0.4, what Prometheus scrapes from GET /metrics). Served by
runtime/metrics_http.py; the station's metrics are runtime/station_metrics.py, the hub's
hub/metrics.py.

    reg = Registry()
    requests = reg.counter("kaizen_station_requests_total", "Requests by outcome", ["outcome"])
    requests.inc(outcome="answered")
    latency = reg.histogram("kaizen_station_request_seconds", "Time to answer", buckets=LATENCY_BUCKETS)
    latency.observe(0.012)
    reg.func("kaizen_station_store_bytes", "gauge", "Bytes in the store", lambda: 1234)  # read at scrape
    text = reg.render()

Bounded: every metric keeps at most `max_series` label sets (default 1000); a new label set
past that is folded into one series whose label values are all "other", and label values are
cut to MAX_LABEL_CHARS. A function metric that raises is left out of that scrape (logged), so
one broken reading never breaks the page.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger("kaizen.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_SERIES = 1000
MAX_LABEL_CHARS = 200
OTHER = "other"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: float) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _labels_text(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    """The shared part: name, help, label names, the bounded series table and its lock."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), max_series: int = MAX_SERIES):
        if not NAME_RE.match(name):
            raise ValueError(f"metric name {name!r} is not a Prometheus name ([a-zA-Z_:][a-zA-Z0-9_:]*)")
        self.labelnames = tuple(labels)
        for n in self.labelnames:
            if not LABEL_RE.match(n) or n.startswith("__") or n == "le":
                raise ValueError(f"metric {name}: label name {n!r} is not allowed")
        self.name, self.help, self.max_series = name, help, max_series
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], object] = {}
        self.folded = 0   # updates that went to the "other" series because the table was full

    def _key(self, labels: dict) -> tuple[str, ...]:
        """The series key for `labels` (exactly the declared names); call with the lock held."""
        if len(labels) != len(self.labelnames) or any(n not in labels for n in self.labelnames):
            raise ValueError(f"metric {self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}")
        key = tuple(str(labels[n])[:MAX_LABEL_CHARS] for n in self.labelnames)
        if key not in self._series and len(self._series) >= self.max_series:
            self.folded += 1
            return (OTHER,) * len(self.labelnames)
        return key

    def _items(self) -> list[tuple[tuple[str, ...], object]]:
        with self._lock:
            return sorted((k, self._copy(v)) for k, v in self._series.items())

    @staticmethod
    def _copy(v):
        return v

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for key, value in self._items():
            lines.extend(self._sample_lines(key, value))
        return lines

    def _sample_lines(self, key, value) -> list[str]:
        return [f"{self.name}{_labels_text(self.labelnames, key)} {format_value(value)}"]


class Counter(_Metric):
    """A value that only goes up (name it *_total)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot go down (inc by {amount})")
        with self._lock:
            key = self._key(labels)
            self._series[key] = self._series.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return float(self._series.get(tuple(str(labels[n])[:MAX_LABEL_CHARS] for n in self.labelnames), 0.0))


class Gauge(_Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._series[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            key = self._key(labels)
            self._series[key] = self._series.get(key, 0.0) + amount


class Histogram(_Metric):
    """Observations counted into fixed buckets (upper bounds, seconds for latencies)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), *,
                 buckets: Iterable[float] = LATENCY_BUCKETS, max_series: int = MAX_SERIES):
        super().__init__(name, help, labels, max_series)
        self.buckets = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if not self.buckets:
            raise ValueError(f"histogram {name} needs at least one finite bucket")

    def observe(self, value: float, **labels: str) -> None:
        i = bisect.bisect_left(self.buckets, value)   # le semantics: value <= bound
        with self._lock:
            key = self._key(labels)
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = [[0] * (len(self.buckets) + 1), 0.0, 0]
            series[0][i] += 1
            series[1] += value
            series[2] += 1

    @staticmethod
    def _copy(v):
        return [list(v[0]), v[1], v[2]]

    def _sample_lines(self, key, value) -> list[str]:
        counts, total, n = value
        lines, running = [], 0
        for bound, c in zip([*self.buckets, math.inf], counts):
            running += c
            le = 'le="' + format_value(bound) + '"'
            lines.append(f"{self.name}_bucket{_labels_text(self.labelnames, key, le)} {format_value(running)}")
        lab = _labels_text(self.labelnames, key)
        return [*lines, f"{self.name}_sum{lab} {format_value(total)}", f"{self.name}_count{lab} {format_value(n)}"]


class FuncMetric(_Metric):
    """A counter or gauge read at scrape time: `fn()` returns a number, or {label values tuple: number}."""

    def __init__(self, name: str, kind: str, help: str, fn: Callable, labels: Iterable[str] = (),
                 max_series: int = MAX_SERIES):
        if kind not in ("counter", "gauge"):
            raise ValueError(f"function metric {name}: kind must be counter or gauge, not {kind!r}")
        super().__init__(name, help, labels, max_series)
        self.kind, self.fn = kind, fn

    def _items(self):
        got = self.fn()
        if not isinstance(got, dict):
            return [((), float(got))]
        items = sorted((tuple(str(v)[:MAX_LABEL_CHARS] for v in k), float(n)) for k, n in got.items())
        if len(items) > self.max_series:   # fold the rest into "other", as the stored metrics do
            rest = sum(n for _, n in items[self.max_series:])
            items = [*items[: self.max_series], ((OTHER,) * len(self.labelnames), rest)]
        return items


class Registry:
    """The metrics of one process part (a station or a hub), rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()
        self.render_errors = 0

    def _add(self, metric: _Metric) -> _Metric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is registered twice")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labels: Iterable[str] = (), **kw) -> Counter:
        return self._add(Counter(name, help, labels, **kw))

    def gauge(self, name: str, help: str, labels: Iterable[str] = (), **kw) -> Gauge:
        return self._add(Gauge(name, help, labels, **kw))

    def histogram(self, name: str, help: str, labels: Iterable[str] = (), **kw) -> Histogram:
        return self._add(Histogram(name, help, labels, **kw))

    def func(self, name: str, kind: str, help: str, fn: Callable, labels: Iterable[str] = (), **kw) -> FuncMetric:
        return self._add(FuncMetric(name, kind, help, fn, labels, **kw))

    def render(self) -> str:
        """The whole registry in the text format; a metric that fails to read is left out."""
        with self._lock:
            metrics = list(self._metrics.values())
        out: list[str] = []
        for m in metrics:
            try:
                out.extend(m.render())
            except Exception:   # one broken reading must not break the scrape
                self.render_errors += 1
                log.exception("metrics: %s could not be read; left out of this scrape", m.name)
        return "\n".join(out) + "\n"
