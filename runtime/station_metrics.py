"""The station's Prometheus metrics (served by `kaizen station serve` when `metrics_listen` is set).

    metrics = StationMetrics("line1/s01")
    server = InferenceServer(station, endpoint, metrics=metrics)   # requests, outcomes, latency, pack use
    station.metrics = metrics                                      # installs, rollbacks, rejections
    metrics.watch_store(cfg.store_dir); metrics.watch_link(daemon)  # read at scrape time
    metrics.registry.render()                                      # Prometheus text format 0.0.4

Metrics (all prefixed kaizen_station_):
  requests_total{type,outcome}       infer/status requests; outcome answered | no_match | error (ok: status)
  request_errors_total{code}         error replies by protocol error code
  request_seconds{outcome}           histogram: time to answer one infer_request at the endpoint
  pack_requests_total{task,version}  parts answered with each pack (the top-1 pack)
  installs_total{task}, rollbacks_total{task}, rejections_total{reason}   (reason: reason_class())
  store_bytes                        disk used by the pack store (cached STORE_CACHE_S)
  fleet_connected, fleet_last_reply_age_seconds, fleet_reconnects_total, fleet_hub_timeouts_total,
  fleet_bytes_received_total, fleet_messages_dropped_total, fleet_loop_errors_total,
  fleet_chunks_total{result}, fleet_disk_errors_total, fleet_rejected_packs{reason}
The hot path (on_reply) takes one lock per metric it touches: a few microseconds per part.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

from . import RUNTIME_VERSION
from .metrics import CONTENT_TYPE, Registry
from .metrics_http import HttpServer

log = logging.getLogger("kaizen.metrics")

STORE_CACHE_S = 5.0
MAX_WALK_ENTRIES = 100_000
# (class, pattern) in order: the first match names a refusal's reason (a bounded label set)
REASONS = (
    ("disk", r"disk full|disk error|no space|InstallIOError|ENOSPC"),
    ("signature", r"unsigned|signature|signed by|not signed"),
    ("integrity", r"tampered|sha256|truncated|checksum"),
    ("wrong_base", r"wrong base|another base|base fingerprint"),
    ("runtime_too_old", r"runtime too old|min_runtime_version"),
    ("version", r"older than|already active|rolled back|installed but inactive"),
    ("golden_probe", r"golden probe"),
    ("malformed", r"unsafe member|not a tar|too large|too many|malformed|missing member|unexpected member|"
                  r"bad array|bad member|duplicate member|manifest|schema"),
    ("internal", r"internal error"),
)
_REASON_RES = tuple((name, re.compile(pat, re.IGNORECASE)) for name, pat in REASONS)


def reason_class(reason: str) -> str:
    """A refusal message -> one of the REASONS classes, or "other" (labels stay few)."""
    text = str(reason)
    text = text.split(" refused: ", 1)[1] if " refused: " in text else text   # skip the file path
    for name, pattern in _REASON_RES:
        if pattern.search(text):
            return name
    return "other"


def disk_usage(root: Path, max_entries: int = MAX_WALK_ENTRIES) -> int:
    """Bytes on disk under `root` (allocated blocks; symlinks not followed; at most max_entries)."""
    total, seen, stack = 0, 0, [str(root)]
    while stack and seen < max_entries:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    seen += 1
                    if seen > max_entries:
                        break
                    st = e.stat(follow_symlinks=False)
                    total += getattr(st, "st_blocks", 0) * 512 or st.st_size
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue   # a folder removed while we look (an install finishing): count the rest
    return total


class StationMetrics:
    """The station's registry and the hooks that feed it (endpoint, Station, store, fleet link)."""

    def __init__(self, station_id: str = "", registry: Registry | None = None):
        r = self.registry = registry or Registry()
        r.func("kaizen_station_info", "gauge", "This station: id and runtime version (always 1)",
               lambda: {(station_id, RUNTIME_VERSION): 1}, ["station_id", "runtime_version"])
        self.requests = r.counter("kaizen_station_requests_total", "Requests answered by the inference endpoint, "
                                  "by type (infer, status) and outcome (answered, no_match, error; ok)",
                                  ["type", "outcome"])
        self.errors = r.counter("kaizen_station_request_errors_total",
                                "Error replies of the inference endpoint, by error code", ["code"])
        self.latency = r.histogram("kaizen_station_request_seconds",
                                   "Time to answer one infer_request at the endpoint, by outcome", ["outcome"])
        self.pack_use = r.counter("kaizen_station_pack_requests_total",
                                  "Parts answered with each pack (the top-1 selected pack)", ["task", "version"])
        self.installs = r.counter("kaizen_station_installs_total",
                                  "Packs installed and activated (from the hub or a local file)", ["task"])
        self.rollbacks = r.counter("kaizen_station_rollbacks_total", "Local rollbacks of a task", ["task"])
        self.rejections = r.counter("kaizen_station_rejections_total",
                                    "Packs refused at install, by reason class", ["reason"])
        self._store_cache = (0.0, 0)
        self._store_lock = threading.Lock()
        self.hook_errors = 0
        r.func("kaizen_station_metrics_errors_total", "counter", "Requests the metrics hook failed to count",
               lambda: self.hook_errors)
        self.http: HttpServer | None = None

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None

    # ------------------------------------------------------------ hooks (hot path first)

    def on_reply(self, msg_type: str | None, reply, seconds: float) -> None:
        """One endpoint request answered with `reply` (a protocol Message) after `seconds`.
        Never raises: a metrics bug is logged and counted, the reply still goes out."""
        try:
            self._on_reply(msg_type, reply, seconds)
        except Exception:   # metrics must never cost a part its answer
            self.hook_errors += 1
            log.exception("metrics: a request could not be counted")

    def _on_reply(self, msg_type: str | None, reply, seconds: float) -> None:
        kind = {"infer_request": "infer", "status_request": "status"}.get(msg_type or "", "invalid")
        body = reply.body
        if reply.msg_type == "error":
            outcome = "error"
            self.errors.inc(code=body.get("error", "unknown"))
        elif kind == "infer":
            outcome = "no_match" if body.get("outcome") == "no_match" else "answered"
        else:
            outcome = "ok"
        self.requests.inc(type=kind, outcome=outcome)
        if kind == "infer":
            self.latency.observe(seconds, outcome=outcome)
            if outcome == "answered" and body.get("task_id") is not None:
                self.pack_use.inc(task=body["task_id"], version=body.get("pack_version"))

    def pack_installed(self, manifest) -> None:
        self.installs.inc(task=manifest.task_id)

    def pack_rolled_back(self, task_id: str) -> None:
        self.rollbacks.inc(task=task_id)

    def pack_rejected(self, err: BaseException) -> None:
        self.rejections.inc(reason="disk" if type(err).__name__ == "InstallIOError" else reason_class(str(err)))

    # ------------------------------------------------------------ read at scrape time

    def watch_store(self, store_dir: Path) -> None:
        def used() -> float:
            with self._store_lock:
                at, value = self._store_cache
                if time.monotonic() - at > STORE_CACHE_S or at == 0.0:
                    value = disk_usage(Path(store_dir))
                    self._store_cache = (time.monotonic(), value)
                return value
        self.registry.func("kaizen_station_store_bytes", "gauge", "Bytes on disk in the pack store", used)

    def watch_endpoint(self, server) -> None:
        """The endpoint's own counter of messages it could not answer."""
        self.registry.func("kaizen_station_requests_dropped_total", "counter",
                           "Endpoint messages that got no reply (broken envelope, peer gone)",
                           lambda: server.stats.dropped)

    def watch_link(self, daemon) -> None:
        """The fleet link of a StationDaemon: connected (the hub answered within hub_timeout_s)."""
        r, s = self.registry, daemon.stats

        def age() -> float:
            last = getattr(daemon, "_last_rx", None)   # monotonic time of the hub's last message
            return float("inf") if last is None else max(0.0, time.monotonic() - last)

        r.func("kaizen_station_fleet_connected", "gauge",
               "1 if the hub answered within hub_timeout_s, else 0", lambda: age() < daemon.link.hub_timeout_s)
        r.func("kaizen_station_fleet_last_reply_age_seconds", "gauge",
               "Seconds since the hub's last message (+Inf: never)", age)
        r.func("kaizen_station_fleet_reconnects_total", "counter", "Fleet link reopened", lambda: s.reconnects)
        r.func("kaizen_station_fleet_hub_timeouts_total", "counter", "Hub silent past hub_timeout_s",
               lambda: s.hub_timeouts)
        r.func("kaizen_station_fleet_bytes_received_total", "counter", "Pack bytes received (good chunks)",
               lambda: s.bytes_received)
        r.func("kaizen_station_fleet_messages_dropped_total", "counter",
               "Hub messages dropped (malformed or failed)", lambda: s.dropped)
        r.func("kaizen_station_fleet_loop_errors_total", "counter", "Fleet loop turns that raised",
               lambda: s.loop_errors)
        r.func("kaizen_station_fleet_chunks_total", "counter", "Chunks received, by result (ok, duplicate, "
               "corrupt, bad)", lambda: {(k,): v for k, v in dict(s.chunks).items()}, ["result"])
        r.func("kaizen_station_fleet_disk_errors_total", "counter", "Downloads/installs that hit a full disk or "
               "an I/O error (retried)", lambda: s.disk_errors)

        def rejected() -> dict:
            classes: dict = {}
            for reason in list(dict(s.rejected).values()):
                key = (reason_class(reason),)
                classes[key] = classes.get(key, 0) + 1
            return classes
        r.func("kaizen_station_fleet_rejected_packs", "gauge", "Packs the fleet link reported rejected since "
               "start (download or install), by reason class", rejected, ["reason"])


INDEX = b"kaizen station: Prometheus metrics at /metrics\n"


def serve_station_metrics(cfg, station, server) -> StationMetrics | None:
    """For `kaizen station serve`: metrics hooked into `station` (a Station) and `server` (the
    InferenceServer), served on cfg.metrics_listen. None when metrics_listen is "" (off)."""
    if not cfg.metrics_listen:
        return None
    metrics = StationMetrics(cfg.station_id)
    station.metrics = metrics
    server.metrics = metrics
    metrics.watch_store(cfg.store_dir)
    metrics.watch_endpoint(server)
    routes = {"/metrics": lambda: (CONTENT_TYPE, metrics.registry.render().encode()),
              "/": lambda: ("text/plain; charset=utf-8", INDEX)}
    metrics.http = HttpServer(cfg.metrics_listen, routes, allow_remote=cfg.metrics_allow_remote,
                              name="station-metrics", source=cfg.source, field="metrics_listen").start()
    return metrics
