"""Prometheus metrics of the station and the hub, and structured JSON logs.

Every scrape is parsed with prometheus_client's own parser (a dev dependency; the runtime writes
the format itself). Covers: the exposition format with hostile label values, bounded label sets,
the bounded HTTP server (404/431/501, connection cap), loopback-only config, station counters
moving with real requests on the tiny base (answered, no_match, error, per pack, installs,
rollbacks, rejections by reason, store bytes), the fleet link gauges, the hub's counters with
a live fleet (bytes served, deliveries by state, refused peers), `kaizen station serve` with
metrics and JSON logs as a process, and the JSON log formatter.

    .venv/bin/python -m pytest -q tests/test_metrics_export.py -p no:cacheprovider
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from kaizen.hub.fleet_sim import Fleet, free_port, make_test_packs, wait_until
from kaizen.hub.fleet_view import FleetView
from kaizen.hub.metrics import serve_hub_metrics
from kaizen.runtime.endpoint import InferenceClient, InferenceServer
from kaizen.runtime.errors import ConfigError, ProtocolError
from kaizen.runtime.keys import (
    TrustedKeys,
    generate_curve_keypair,
    generate_signing_key,
    load_curve_keypair,
    load_curve_public,
)
from kaizen.runtime.logs import JsonFormatter, setup_logging
from kaizen.runtime.metrics import OTHER, Registry
from kaizen.runtime.metrics_http import MAX_CONNECTIONS, HttpServer, parse_listen
from kaizen.runtime.station_metrics import StationMetrics, reason_class, serve_station_metrics

FP = "test-base-fp"
WAIT = 20.0


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, ((label, value), ...)): value} of an exposition, via prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(url: str) -> dict[tuple, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return samples(r.read().decode())


def value(s: dict, name: str, **labels) -> float:
    return s.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


# ---------------------------------------------------------------- format and bounds


def test_exposition_parses_with_hostile_labels_and_bounded_series():
    reg = Registry()
    c = reg.counter("t_requests_total", 'help with \\ and\nnewline', ["task"], max_series=5)
    hostile = ['a"b', "back\\slash", "new\nline", "ünï cødé", "x" * 500]
    for v in hostile:
        c.inc(task=v)
    for i in range(20):            # past max_series: folded into "other"
        c.inc(2, task=f"extra{i}")
    h = reg.histogram("t_seconds", "latency", ["outcome"], buckets=(0.01, 0.1, 1.0))
    for x in (0.005, 0.05, 0.05, 5.0):
        h.observe(x, outcome="answered")
    reg.func("t_broken", "gauge", "raises", lambda: 1 / 0)   # left out, the rest still renders
    reg.func("t_bytes", "gauge", "bytes", lambda: 1234)
    s = samples(reg.render())
    for v in hostile[:4]:
        assert value(s, "t_requests_total", task=v) == 1.0
    assert value(s, "t_requests_total", task="x" * 200) == 1.0   # label values cut to 200 chars
    assert value(s, "t_requests_total", task=OTHER) == 40.0
    assert len([k for k in s if k[0] == "t_requests_total"]) == 6
    assert value(s, "t_seconds_bucket", outcome="answered", le="0.01") == 1
    assert value(s, "t_seconds_bucket", outcome="answered", le="0.1") == 3
    assert value(s, "t_seconds_bucket", outcome="answered", le="+Inf") == 4
    assert value(s, "t_seconds_count", outcome="answered") == 4
    assert value(s, "t_seconds_sum", outcome="answered") == pytest.approx(5.105)
    assert value(s, "t_bytes") == 1234 and not any(k[0] == "t_broken" for k in s)
    assert reg.render_errors == 1


def test_default_cardinality_cap_is_1000_label_sets():
    reg = Registry()
    c = reg.counter("t_total", "x", ["k"])
    for i in range(1500):
        c.inc(k=str(i))
    s = samples(reg.render())
    assert len(s) == 1001 and value(s, "t_total", k=OTHER) == 500


def test_reason_classes_are_few_and_right():
    assert reason_class("pack /x/a.kpk refused: signed by unknown key abc (trusted: k1)") == "signature"
    assert reason_class("pack a.kpk refused: tampered: member prompt.npy does not match its sha256") == "integrity"
    assert reason_class("pack a.kpk refused: wrong base: pack built for base x, this station runs y") == "wrong_base"
    assert reason_class("pack a.kpk refused: version 1 of task t is older than the active version 2") == "version"
    assert reason_class("golden probe failed for t v1: 2 of 3 wrong") == "golden_probe"
    assert reason_class("disk full (No space left on device); still serving") == "disk"
    assert reason_class("something nobody expected") == "other"
    # a file path that looks like a reason does not decide the class
    assert reason_class("pack /srv/signature/golden probe.kpk refused: truncated tar") == "integrity"


# ---------------------------------------------------------------- the HTTP server


def test_listen_is_loopback_only_unless_allowed(tmp_path):
    assert parse_listen("") is None
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("0.0.0.0:9464", "192.168.1.5:9464"):
        with pytest.raises(ConfigError, match="metrics_allow_remote = true"):
            parse_listen(bad)
        assert parse_listen(bad, allow_remote=True)[1] == 9464
    for bad in ("9464", "127.0.0.1:99999", "host.example:80", "127.0.0.1:"):
        with pytest.raises(ConfigError, match="metrics_listen"):
            parse_listen(bad)
    from kaizen.hub.config import load_hub_config
    from kaizen.runtime.config import load_station_config

    station = ('station_id = "s1"\nhub_endpoint = "tcp://127.0.0.1:1"\nhub_public_key_file = "k"\n'
               'public_key_file = "k"\nsecret_key_file = "k"\nbundle_dir = "b"\nstore_dir = "s"\n'
               'trusted_keys_dir = "t"\nstate_dir = "st"\n')
    path = tmp_path / "station.toml"
    path.write_text(station)
    cfg = load_station_config(path)
    assert (cfg.metrics_listen, cfg.metrics_allow_remote, cfg.log_format) == ("", False, "plain")   # off by default
    path.write_text(station + 'metrics_listen = "0.0.0.0:9464"\n')
    with pytest.raises(ConfigError, match=r"station\.toml: field 'metrics_listen'.*metrics_allow_remote"):
        load_station_config(path)
    path.write_text(station + 'metrics_listen = "0.0.0.0:9464"\nmetrics_allow_remote = true\n')
    assert load_station_config(path).metrics_listen == "0.0.0.0:9464"
    path.write_text(station + 'log_format = "xml"\n')
    with pytest.raises(ConfigError, match="field 'log_format'"):
        load_station_config(path)
    hub = ('bind = "tcp://127.0.0.1:1"\npub_bind = "tcp://127.0.0.1:2"\npublic_key_file = "k"\n'
           'secret_key_file = "k"\npacks_dir = "p"\ndb_path = "d"\n')
    path = tmp_path / "hub.toml"
    path.write_text('status_listen = "10.0.0.1:8470"\n' + hub)
    with pytest.raises(ConfigError, match=r"hub\.toml: field 'status_listen'.*status_allow_remote"):
        load_hub_config(path)
    path.write_text('status_listen = "127.0.0.1:8470"\nmetrics_listen = "127.0.0.1:9465"\n' + hub)
    assert load_hub_config(path).status_listen == "127.0.0.1:8470"


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_http_server_is_bounded_and_survives_hostile_clients():
    calls = []

    def page():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a broken page")
        return "text/plain", b"ok\n"

    with HttpServer("127.0.0.1:0", {"/metrics": page}) as server:
        port = server.port
        assert _raw(port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
        assert _raw(port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 500")   # logged, still serving
        assert _raw(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
        assert _raw(port, b"GET /etc/passwd HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404")
        assert _raw(port, b"POST /metrics HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc").startswith(b"HTTP/1.0 501")
        big = b"GET /metrics HTTP/1.0\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
        assert _raw(port, big).startswith(b"HTTP/1.0 431")
        assert b"400 - Bad request" in _raw(port, b"\x00\xff garbage\r\n\r\n")   # an HTTP/0.9-style answer
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(MAX_CONNECTIONS)]
        try:
            wait_until(lambda: server._server.slots._value == 0, 5.0)
            assert _raw(port, b"GET /metrics HTTP/1.0\r\n\r\n") == b""   # over the cap: closed unanswered
        finally:
            for s in idle:
                s.close()
        assert wait_until(lambda: server._server.slots._value == MAX_CONNECTIONS, 10.0)
        assert _raw(port, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
        with pytest.raises(ConfigError, match="cannot listen on"):
            HttpServer(f"127.0.0.1:{port}", {}).start()   # port taken: a clear error, not a crash


# ---------------------------------------------------------------- station


def _pack(path, engine, signer, task, version, image, instruction, seed, fingerprint=None):
    from kaizen.runtime.pack import build_pack

    rng = np.random.default_rng(seed)
    key = engine.clip_image([image])[0] + engine.clip_text([instruction])[0]
    lora = {n: (rng.standard_normal((2, s[1]) if n.endswith(".A") else (s[0], 2)) * 0.3).astype(np.float32)
            for n, s in engine.lora_shapes.items()}
    build_pack(path, task_id=task, version=version, method="kaizen",
               base_fingerprint=fingerprint or engine.bundle.fingerprint,
               prompt=(rng.standard_normal((4, engine.embed.shape[1])) * 0.5).astype(np.float32),
               key=(key / np.linalg.norm(key)).astype(np.float32), text_emb=engine.clip_text([instruction]),
               lora=lora, instructions=[instruction], answers=["yes", "no"], signing_key=signer, lora_rank=2)
    return path


def test_station_metrics_move_with_requests_installs_rollbacks_and_rejections(tiny_llama, tmp_path):
    from kaizen.runtime.errors import PackError
    from kaizen.runtime.station import Station

    signer, stranger = generate_signing_key(), generate_signing_key()
    station = Station(tiny_llama[1], tmp_path / "store", TrustedKeys([signer.public_key()]), threshold=0.3)
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    instr = "Is the seal torn?"
    server = InferenceServer(station, "tcp://127.0.0.1:*")
    cfg = SimpleNamespace(metrics_listen="127.0.0.1:0", metrics_allow_remote=False, station_id="line1/s01",
                          store_dir=tmp_path / "store", source="station.toml")
    metrics = serve_station_metrics(cfg, station, server)
    server.start()
    try:
        e = station.engine
        station.install(_pack(tmp_path / "seal-1.kpk", e, signer, "seal", 1, image, instr, 1))
        station.install(_pack(tmp_path / "seal-2.kpk", e, signer, "seal", 2, image, instr, 2))
        for bad, why in ((_pack(tmp_path / "x-1.kpk", e, stranger, "x", 1, image, instr, 3), "signature"),
                         (_pack(tmp_path / "y-1.kpk", e, signer, "y", 1, image, instr, 4, "other-base"), "wrong_base"),
                         (tmp_path / "seal-1.kpk", "version")):
            with pytest.raises(PackError):
                station.install(bad)
        url = metrics.http.url
        with InferenceClient(server.endpoint, timeout_ms=20000) as client:
            for _ in range(3):
                assert client.infer(image, instr)["outcome"] == "answered"
            station.rollback("seal")
            assert client.infer(image, instr)["pack_version"] == 1
            station.threshold = 1.01          # nothing can match now
            assert client.infer(image, instr)["outcome"] == "no_match"
            with pytest.raises(ProtocolError):
                client.infer(image, "   ")    # empty instruction: error reply
            client.status()
        s = scrape(url)
    finally:
        server.stop()
        metrics.stop()
        station.close()
    assert value(s, "kaizen_station_info", station_id="line1/s01", runtime_version=__import__(
        "kaizen.runtime", fromlist=["RUNTIME_VERSION"]).RUNTIME_VERSION) == 1
    assert value(s, "kaizen_station_requests_total", type="infer", outcome="answered") == 4
    assert value(s, "kaizen_station_requests_total", type="infer", outcome="no_match") == 1
    assert value(s, "kaizen_station_requests_total", type="infer", outcome="error") == 1
    assert value(s, "kaizen_station_requests_total", type="status", outcome="ok") == 1
    assert value(s, "kaizen_station_request_errors_total", code="bad_input") == 1
    assert value(s, "kaizen_station_request_seconds_count", outcome="answered") == 4
    assert value(s, "kaizen_station_request_seconds_bucket", outcome="answered", le="+Inf") == 4
    assert value(s, "kaizen_station_pack_requests_total", task="seal", version=2) == 3
    assert value(s, "kaizen_station_pack_requests_total", task="seal", version=1) == 1
    assert value(s, "kaizen_station_installs_total", task="seal") == 2
    assert value(s, "kaizen_station_rollbacks_total", task="seal") == 1
    for why in ("signature", "wrong_base", "version"):
        assert value(s, "kaizen_station_rejections_total", reason=why) == 1, why
    assert value(s, "kaizen_station_store_bytes") > 10_000
    assert value(s, "kaizen_station_metrics_errors_total") == 0


def test_fleet_link_gauges_follow_the_hub(tmp_path):
    signer = generate_signing_key()
    fleet = Fleet(tmp_path / "fleet", 1, TrustedKeys([signer.public_key()]), FP, chunk_size=32 * 1024,
                  hub_timeout_s=1.0)
    (pack,) = make_test_packs(tmp_path / "packs", signer, [("pick", 1)], base_fingerprint=FP, layers=2)
    metrics = StationMetrics(fleet.station_ids[0])
    try:
        fleet.start_hub()
        daemon = fleet.start_station(0)
        metrics.watch_link(daemon)
        fleet.publish(pack)
        assert wait_until(lambda: fleet.installed(0) == {"pick": 1}, WAIT)
        def connected() -> bool:
            s = samples(metrics.registry.render())
            return (value(s, "kaizen_station_fleet_connected") == 1
                    and value(s, "kaizen_station_fleet_last_reply_age_seconds") < 1.0)
        assert wait_until(connected, WAIT)
        s = samples(metrics.registry.render())
        assert value(s, "kaizen_station_fleet_bytes_received_total") == pack.stat().st_size
        assert value(s, "kaizen_station_fleet_chunks_total", result="ok") >= 1
        assert value(s, "kaizen_station_fleet_disk_errors_total") == 0
        (bad,) = make_test_packs(tmp_path / "bad", generate_signing_key(), [("seal", 1)], base_fingerprint=FP, layers=2)
        fleet.publish(bad)   # signed by a key the station does not trust
        assert wait_until(lambda: value(samples(metrics.registry.render()), "kaizen_station_fleet_rejected_packs",
                                        reason="signature") == 1, WAIT)
        fleet.stop_hub()
        assert wait_until(lambda: value(samples(metrics.registry.render()), "kaizen_station_fleet_connected") == 0,
                          WAIT)
        s = samples(metrics.registry.render())
        assert value(s, "kaizen_station_fleet_last_reply_age_seconds") >= 1.0
        assert wait_until(lambda: value(samples(metrics.registry.render()),
                                        "kaizen_station_fleet_hub_timeouts_total") >= 1, WAIT)
    finally:
        fleet.close()


FAKE_STATION = """
import sys
from kaizen.runtime import daemon_state
from kaizen.runtime.keys import TrustedKeys
from kaizen.runtime.store import PackStore

class FakeStation:  # a Station without an ONNX bundle (same surface as tests/test_fleet.py's)
    def __init__(self, cfg):
        self.store = PackStore(cfg.store_dir, TrustedKeys.from_dir(cfg.trusted_keys_dir), sys.argv[2])
        self.base_fingerprint = sys.argv[2]
    def install(self, path):
        return self.store.install(path)
    def installed(self):
        return [{"task_id": t, "version": p.manifest.version} for t, p in self.store.active().items()]
    def infer(self, image, instruction, task=None):
        return {"outcome": "answered", "answer": "fake", "task_id": "pick", "pack_version": 1}
    def status(self):
        return {"packs": self.installed()}

daemon_state.station_from_config = FakeStation
from kaizen.runtime.cli import main
sys.exit(main(["station", "serve", "--config", sys.argv[1]]))
"""


def test_station_serve_process_exports_metrics_and_json_logs(tmp_path):
    from kaizen.runtime.keys import save_signing_key

    signer = generate_signing_key()
    save_signing_key(signer, tmp_path / "trusted", "trainer")
    fleet = Fleet(tmp_path / "fleet", 1, TrustedKeys([signer.public_key()]), FP)
    keys, port = fleet.root / "keys", free_port()
    (tmp_path / "station.toml").write_text(f"""
station_id = "{fleet.station_ids[0]}"
hub_endpoint = "{fleet.hub_config.bind}"
hub_public_key_file = "{keys / 'hub.pub'}"
public_key_file = "{keys / 'station0.pub'}"
secret_key_file = "{keys / 'station0.key'}"
bundle_dir = "bundle"
store_dir = "store"
trusted_keys_dir = "trusted"
state_dir = "fleet-state"
inference_endpoint = "ipc://{tmp_path}/station.ipc"
heartbeat_s = 0.2
hub_timeout_s = 2.0
metrics_listen = "127.0.0.1:{port}"
log_format = "json"
""")
    fleet.start_hub()
    proc = subprocess.Popen([sys.executable, "-c", FAKE_STATION, str(tmp_path / "station.toml"), FP],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        def connected() -> bool:
            try:
                return value(scrape(url), "kaizen_station_fleet_connected") == 1
            except (OSError, urllib.error.URLError):
                return proc.poll() is not None
        assert wait_until(connected, WAIT, step=0.2) and proc.poll() is None
        with InferenceClient(f"ipc://{tmp_path}/station.ipc", timeout_ms=5000) as client:
            client.infer(np.zeros((8, 8, 3), np.uint8), "count the holes")
        s = scrape(url)
        assert value(s, "kaizen_station_requests_total", type="infer", outcome="answered") == 1
        assert value(s, "kaizen_station_pack_requests_total", task="pick", version=1) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            err = proc.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate(timeout=10)[1]
        fleet.close()
    assert proc.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in err.splitlines() if line.strip()]   # every stderr line is JSON
    assert records and all({"ts", "level", "logger", "msg", "fields"} <= set(r) for r in records)
    assert any(r["logger"] == "kaizen.metrics" and "station-metrics" in r["msg"] for r in records)


# ---------------------------------------------------------------- hub


def test_hub_metrics_count_bytes_deliveries_and_refused_peers(tmp_path):
    signer = generate_signing_key()
    fleet = Fleet(tmp_path / "fleet", 2, TrustedKeys([signer.public_key()]), FP, chunk_size=32 * 1024)
    fleet.hub_config.metrics_listen = "127.0.0.1:0"
    packs = make_test_packs(tmp_path / "packs", signer, [("pick", 1), ("count", 1)], base_fingerprint=FP, layers=2)
    server = None
    ctx = zmq.Context()
    try:
        hub = fleet.start_hub()
        server = serve_hub_metrics(hub, FleetView(fleet.hub_config, cache_s=0.0))
        s = scrape(server.url)
        assert value(s, "kaizen_hub_stations", state="allowed") == 2
        assert value(s, "kaizen_hub_bytes_served_total") == 0
        for i in range(2):
            fleet.start_station(i)
        for p in packs:
            fleet.publish(p)
        assert wait_until(lambda: value(scrape(server.url), "kaizen_hub_deliveries", state="activated") == 4, WAIT)
        s = scrape(server.url)
        # every byte of both packs went to both stations (a chunk re-sent after a timeout counts again)
        assert value(s, "kaizen_hub_bytes_served_total") >= 2 * sum(p.stat().st_size for p in packs)
        assert value(s, "kaizen_hub_stations", state="connected") == 2
        assert value(s, "kaizen_hub_stations", state="seen") == 2
        assert value(s, "kaizen_hub_packs") == 2 and value(s, "kaizen_hub_reports_total") >= 4
        assert value(s, "kaizen_hub_accepted_peers_total") >= 2
        assert value(s, "kaizen_hub_rejected_peers_total") == 0
        generate_curve_keypair(tmp_path / "stranger", "x")   # a key the hub does not know
        public, secret = load_curve_keypair(tmp_path / "stranger" / "x.key")
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_secretkey, sock.curve_publickey = secret, public
        sock.curve_serverkey = load_curve_public(fleet.hub_config.public_key_file)
        sock.connect(fleet.hub_config.bind)
        sock.send_multipart([b"{}"])
        assert wait_until(lambda: value(scrape(server.url), "kaizen_hub_rejected_peers_total") >= 1, WAIT)
        sock.close()
    finally:
        if server is not None:
            server.stop()
        fleet.close()
        ctx.term()


def test_hub_metrics_are_off_by_default():
    config = SimpleNamespace(metrics_listen="", metrics_allow_remote=False, source="hub.toml")
    assert serve_hub_metrics(SimpleNamespace(config=config), None) is None


# ---------------------------------------------------------------- logs


def test_json_logs_one_object_per_line_with_fields_and_exceptions():
    stream = io.StringIO()
    handler = setup_logging("json", stream=stream)
    try:
        log = logging.getLogger("kaizen.test")
        log.info("installed %s", "pick-3.kpk", extra={"task": "pick", "version": 3, "obj": object()})
        try:
            raise ValueError('bad "thing"\nhere')
        except ValueError:
            log.exception("failed on %s", "line1/s01")
        setup_logging("json", stream=stream)   # called again: replaces its handler, no double lines
        log.warning("once")
    finally:
        root = logging.getLogger()
        for h in list(root.handlers):
            if getattr(h, "kaizen_setup", False):
                root.removeHandler(h)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["level"] == "INFO" and first["logger"] == "kaizen.test" and first["msg"] == "installed pick-3.kpk"
    assert first["fields"]["task"] == "pick" and first["fields"]["version"] == 3
    assert first["fields"]["obj"].startswith("<object object")
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "ERROR" and 'ValueError: bad "thing"' in second["exc"]
    assert third["msg"] == "once" and isinstance(handler.formatter, JsonFormatter)
