"""The hub's Prometheus metrics (`kaizen hub serve` with `metrics_listen` in hub.toml).

    view = FleetView(hub.config)
    metrics = HubMetrics(hub, view)       # every value is read at scrape time: no hook in the loop
    server = serve_hub_metrics(hub, view) # the HTTP server on metrics_listen, or None when ""

Metrics (all prefixed kaizen_hub_):
  stations{state}                   allowed | seen | connected (last heartbeat <= connected_within_s)
  deliveries{state}                 (station, pack) pairs by state: pending, received, verified,
                                    activated, rejected, rolled_back (from the database)
  packs, packs_unservable           catalogued packs; catalogued files the hub will not serve
  bytes_served_total, chunks_served_total, fetches_total, reports_total, reports_ignored_total
  rejected_peers_total              CURVE handshakes refused by ZAP (key not allow-listed)
  accepted_peers_total              CURVE handshakes accepted
  messages_dropped_total            station messages not answered (unknown sender, failed send)
  error_replies_total{code}         typed error replies sent
  internal_errors_total, reloads_total, reload_errors_total
  samples{state}                    captured parts stored at the hub: labelled | unlabelled
  samples_bytes                     their image bytes
  sample_chunks_total, samples_received_total, samples_refused_total, sample_store_errors_total
                                    sample_chunk messages answered; samples acked done (stored or
                                    already held); refused for good; answered retry (store's disk failed)
Each scrape reads the hub's counters (plain ints) and one cached FleetView snapshot.
"""

from __future__ import annotations

from kaizen.runtime.metrics import CONTENT_TYPE, Registry
from kaizen.runtime.metrics_http import HttpServer

from .fleet_view import FleetView


class HubMetrics:
    """The hub's registry: function metrics over `hub.stats`, `hub.auth` and the fleet view."""

    def __init__(self, hub, view: FleetView, registry: Registry | None = None):
        r = self.registry = registry or Registry()
        s = hub.stats

        def auth(attr: str) -> int:
            zap = getattr(hub, "auth", None)   # set when the hub's serve() starts
            return int(getattr(zap, attr, 0)) if zap is not None else 0

        def totals() -> dict:
            return view.snapshot()["totals"]

        def samples() -> dict:
            return view.snapshot()["samples"]

        r.func("kaizen_hub_stations", "gauge", "Stations: allow-listed, ever seen, connected now",
               lambda: {(k,): totals()[k] for k in ("allowed", "seen", "connected")}, ["state"])
        r.func("kaizen_hub_deliveries", "gauge", "Deliveries (station, pack) by state",
               lambda: {(k,): v for k, v in totals()["deliveries"].items()}, ["state"])
        r.func("kaizen_hub_packs", "gauge", "Packs in the catalogue", lambda: totals()["packs"])
        r.func("kaizen_hub_packs_unservable", "gauge", "Catalogued pack files the hub does not serve",
               lambda: len(hub.unservable))
        r.func("kaizen_hub_bytes_served_total", "counter", "Pack bytes sent in chunks", lambda: s.bytes_sent)
        r.func("kaizen_hub_chunks_served_total", "counter", "Chunks sent", lambda: s.chunks_sent)
        r.func("kaizen_hub_fetches_total", "counter", "Fetch requests served", lambda: s.fetch_count)
        r.func("kaizen_hub_reports_total", "counter", "Delivery reports stored", lambda: s.reports)
        r.func("kaizen_hub_reports_ignored_total", "counter", "Reports acked but not stored (pack not "
               "published to that station)", lambda: s.reports_ignored)
        r.func("kaizen_hub_rejected_peers_total", "counter", "CURVE handshakes refused (key not allow-listed)",
               lambda: auth("denied_count"))
        r.func("kaizen_hub_accepted_peers_total", "counter", "CURVE handshakes accepted", lambda: auth("accepted"))
        r.func("kaizen_hub_messages_dropped_total", "counter", "Station messages not answered", lambda: s.dropped)
        r.func("kaizen_hub_error_replies_total", "counter", "Error replies sent, by code",
               lambda: {(code,): n for code, n in dict(s.errors).items()}, ["code"])
        r.func("kaizen_hub_internal_errors_total", "counter", "Messages or housekeeping that hit a hub bug",
               lambda: s.internal)
        r.func("kaizen_hub_reloads_total", "counter", "hub.toml reloads applied", lambda: s.reloads)
        r.func("kaizen_hub_reload_errors_total", "counter", "hub.toml reloads refused", lambda: s.reload_errors)
        r.func("kaizen_hub_samples", "gauge", "Captured parts stored at the hub, by label state",
               lambda: {("labelled",): samples()["labelled"], ("unlabelled",): samples()["stored"] - samples()["labelled"]},
               ["state"])
        r.func("kaizen_hub_samples_bytes", "gauge", "Image bytes of the stored captured parts",
               lambda: samples()["bytes"])
        r.func("kaizen_hub_sample_chunks_total", "counter", "sample_chunk messages answered", lambda: s.sample_chunks)
        r.func("kaizen_hub_samples_received_total", "counter", "Captured parts acked done (stored, or held already)",
               lambda: s.samples_done)
        r.func("kaizen_hub_samples_refused_total", "counter", "Captured parts refused for good", lambda: s.samples_refused)
        r.func("kaizen_hub_sample_store_errors_total", "counter", "sample_chunks answered retry: the store's disk failed",
               lambda: s.sample_store_errors)

    def render(self) -> tuple[str, bytes]:
        return CONTENT_TYPE, self.registry.render().encode()


INDEX = b"kaizen hub: Prometheus metrics at /metrics\n"


def serve_hub_metrics(hub, view: FleetView) -> HttpServer | None:
    """Start the metrics HTTP server on hub.toml's metrics_listen; None when it is "" (off)."""
    config = hub.config
    if not config.metrics_listen:
        return None
    metrics = HubMetrics(hub, view)
    routes = {"/metrics": metrics.render, "/": lambda: ("text/plain; charset=utf-8", INDEX)}
    server = HttpServer(config.metrics_listen, routes, allow_remote=config.metrics_allow_remote,
                        name="hub-metrics", source=config.source, field="metrics_listen")
    server.metrics = metrics
    return server.start()
