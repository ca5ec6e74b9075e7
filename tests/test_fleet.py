"""The fleet link on loopback: publish -> stations activate; allow-list; rejections; replays.

Hub and station daemons run as threads in this process (hub/fleet_sim.py). Every wait is
bounded; the fixture stops every thread.
"""

import json
import random

import pytest
import zmq

from kaizen.hub import cli as hub_cli
from kaizen.hub.db import HubDB
from kaizen.hub.fleet_sim import Fleet, make_test_packs, wait_until, write_hub_toml
from kaizen.runtime.fetcher import Transfer
from kaizen.runtime.keys import (
    TrustedKeys,
    generate_curve_keypair,
    generate_signing_key,
    load_curve_keypair,
    load_curve_public,
)
from kaizen.runtime.protocol import Message, decode

FP = "test-base-fp"
WAIT = 20.0



@pytest.fixture(scope="module")
def packs(tmp_path_factory, signing_key):
    folder = tmp_path_factory.mktemp("packs")
    return make_test_packs(folder, signing_key, [("pick", 1), ("count", 1), ("pick", 2)], base_fingerprint=FP)


@pytest.fixture
def fleet(tmp_path, signing_key):
    f = Fleet(tmp_path / "fleet", 3, TrustedKeys([signing_key.public_key()]), FP, chunk_size=32 * 1024)
    yield f
    f.close()


def states(fleet, station_id):
    row = next(r for r in fleet.status() if r["station_id"] == station_id)
    return {name: p["state"] for name, p in row["packs"].items()}


def raw_dealer(ctx, fleet, key_file):
    public, secret = load_curve_keypair(key_file)
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_secretkey, sock.curve_publickey = secret, public
    sock.curve_serverkey = load_curve_public(fleet.hub_config.public_key_file)
    sock.connect(fleet.hub_config.bind)
    return sock


def collect(sock, timeout_ms=1500, until=None):
    out = []
    while sock.poll(timeout_ms, zmq.POLLIN):
        out.append(decode(sock.recv_multipart()))
        if until is not None and until(out):
            break
    return out


def test_publish_activates_on_targeted_stations_and_status_shows_it(fleet, packs, tmp_path, capsys):
    fleet.start_hub()
    for i in range(3):
        fleet.start_station(i)
    conf = write_hub_toml(fleet, tmp_path / "hub.toml")
    assert hub_cli.cli_publish([str(packs[0]), "--to", "line1/*", "--config", str(conf)]) == 0
    assert "line1/s00, line1/s02" in capsys.readouterr().out
    s0, s2 = fleet.station_ids[0], fleet.station_ids[2]
    assert wait_until(lambda: states(fleet, s0) == {"pick-1.kpk": "activated"}
                      and states(fleet, s2) == {"pick-1.kpk": "activated"}, WAIT)
    assert fleet.installed(0) == {"pick": 1} and fleet.installed(2) == {"pick": 1}
    assert fleet.installed(1) == {} and states(fleet, fleet.station_ids[1]) == {}
    downloaded = fleet.daemons[s0].state_dir / "downloads" / "pick-1.kpk"
    assert downloaded.read_bytes() == packs[0].read_bytes()

    assert wait_until(lambda: fleet.status()[0]["installed"] == [{"task_id": "pick", "version": 1}], WAIT)
    assert hub_cli.cli_status(["--config", str(conf), "--json"]) == 0
    rows = {r["station_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[s0]["packs"]["pick-1.kpk"]["state"] == "activated"
    assert rows[s0]["installed"] == [{"task_id": "pick", "version": 1}]
    assert rows[fleet.station_ids[1]]["packs"] == {}
    assert hub_cli.cli_status(["--config", str(conf)]) == 0
    table = capsys.readouterr().out
    assert "line1/s00" in table and "pick-1.kpk: activated" in table


def test_newer_version_replaces_older_and_pending_shows_before_delivery(fleet, packs):
    fleet.publish(packs[0], "line1/s00")
    assert states(fleet, fleet.station_ids[0]) == {"pick-1.kpk": "pending"}  # hub not even running
    fleet.start_hub()
    fleet.start_station(0)
    assert wait_until(lambda: fleet.installed(0) == {"pick": 1}, WAIT)
    fleet.publish(packs[2], "@nogroup")          # targets nobody
    fleet.publish(packs[2], "line1/s00")         # pick v2 while the hub runs: pushed live
    assert wait_until(lambda: fleet.installed(0) == {"pick": 2}, WAIT)
    assert wait_until(lambda: states(fleet, fleet.station_ids[0]).get("pick-2.kpk") == "activated", WAIT)


def test_station_offline_during_publish_gets_the_pack_later(fleet, packs):
    fleet.start_hub()
    fleet.publish(packs[1], "*")
    fleet.start_station(0)
    assert wait_until(lambda: fleet.installed(0) == {"count": 1}, WAIT)
    assert fleet.installed(1) == {}          # station 1 was never started
    fleet.start_station(1)
    assert wait_until(lambda: states(fleet, fleet.station_ids[1]) == {"count-1.kpk": "activated"}, WAIT)
    assert fleet.installed(1) == {"count": 1}


def test_station_starts_without_hub_and_catches_up(fleet, packs):
    daemon = fleet.start_station(0, hub_timeout_s=0.6)
    assert wait_until(lambda: daemon.stats.hub_timeouts >= 1, WAIT)   # hub silent: link reopened
    assert daemon._thread.is_alive() and fleet.installed(0) == {}
    fleet.publish(packs[1], "*")
    fleet.start_hub()
    assert wait_until(lambda: states(fleet, fleet.station_ids[0]) == {"count-1.kpk": "activated"}, WAIT)


def test_unknown_station_key_gets_nothing_and_leaves_no_state(fleet, packs, tmp_path):
    hub = fleet.start_hub()
    fleet.publish(packs[0], "*")
    generate_curve_keypair(tmp_path / "rogue", "rogue")
    ctx = zmq.Context()
    try:
        sock = raw_dealer(ctx, fleet, tmp_path / "rogue" / "rogue.key")
        hello = Message("hello", {"station_id": fleet.station_ids[0], "base_fingerprint": FP,
                                  "runtime_version": "0.1.0", "installed": []})
        sock.send_multipart(hello.encode())
        sock.send_multipart(Message("fetch", {"name": "pick-1.kpk", "sha256": "0" * 64, "offset": 0,
                                              "credit": 1 << 20}).encode())
        assert collect(sock, 1500) == []
        sock.close()
    finally:
        ctx.destroy(linger=0)
    assert hub.auth.denied and hub.auth.accepted == 0
    db = HubDB(fleet.hub_config.db_path)
    try:
        assert db.stations() == [] and db.deliveries() == []
    finally:
        db.close()
    assert list(hub.stats.fetches) == []


def test_hello_claiming_another_station_id_is_refused(fleet):
    hub = fleet.start_hub()
    ctx = zmq.Context()
    try:
        sock = raw_dealer(ctx, fleet, fleet.root / "keys" / "station0.key")
        sock.send_multipart(Message("hello", {"station_id": fleet.station_ids[1], "base_fingerprint": FP,
                                              "runtime_version": "0.1.0", "installed": []}).encode())
        replies = collect(sock, 2000, until=lambda out: len(out) >= 1)
        sock.close()
    finally:
        ctx.destroy(linger=0)
    assert [r.msg_type for r in replies] == ["error"]
    assert replies[0].body["error"] == "identity_mismatch"
    assert list(hub.stats.refused_hellos) == [(fleet.station_ids[0], fleet.station_ids[1])]
    db = HubDB(fleet.hub_config.db_path)
    try:
        assert db.stations() == []
    finally:
        db.close()


def test_pack_signed_by_unknown_key_is_rejected_with_reason(fleet, packs, tmp_path):
    rogue = make_test_packs(tmp_path / "rogue", generate_signing_key(), [("count", 1)], base_fingerprint=FP)[0]
    hub = fleet.start_hub()
    fleet.publish(packs[0], "line1/s00")
    daemon = fleet.start_station(0)
    assert wait_until(lambda: fleet.installed(0) == {"pick": 1}, WAIT)
    fleet.publish(rogue, "line1/s00")
    sid = fleet.station_ids[0]
    assert wait_until(lambda: states(fleet, sid).get("count-1.kpk") == "rejected", WAIT)
    row = next(r for r in fleet.status() if r["station_id"] == sid)
    reason = row["packs"]["count-1.kpk"]["reason"]
    assert "refused" in reason and "unknown key" in reason
    assert fleet.installed(0) == {"pick": 1}   # the active set did not change
    fetched = sum(1 for f in hub.stats.fetches if f[1] == "count-1.kpk")
    wait_until(lambda: False, 1.0)              # several heartbeats (desired_state) later...
    assert sum(1 for f in hub.stats.fetches if f[1] == "count-1.kpk") == fetched   # ...not fetched again
    assert daemon.stats.rejected == {"count-1.kpk": reason}


def test_replayed_and_reordered_chunks_and_reports_do_no_harm(fleet, packs, tmp_path):
    fleet.start_hub()
    fleet.publish(packs[0], "line1/s00")
    sid = fleet.station_ids[0]
    ctx = zmq.Context()
    try:
        sock = raw_dealer(ctx, fleet, fleet.root / "keys" / "station0.key")
        sock.send_multipart(Message("hello", {"station_id": sid, "base_fingerprint": FP,
                                              "runtime_version": "0.1.0", "installed": []}).encode())
        [desired] = collect(sock, 3000, until=lambda out: True)
        entry = desired.body["packs"][0]
        assert desired.msg_type == "desired_state" and entry["name"] == "pick-1.kpk"
        fetch = Message("fetch", {"name": entry["name"], "sha256": entry["sha256"], "offset": 0,
                                  "credit": entry["size"]}).encode()
        sock.send_multipart(fetch)
        sock.send_multipart(fetch)  # the very same message again
        n = -(-entry["size"] // fleet.hub_config.chunk_size)
        got = collect(sock, 3000, until=lambda out: sum(m.msg_type == "chunk" for m in out) >= 2 * n)
        chunks = [m for m in got if m.msg_type == "chunk"]   # (a pushed desired_state may come too)
        assert len(chunks) == 2 * n
        random.Random(0).shuffle(chunks)
        t = Transfer(tmp_path / "dl", entry, window=entry["size"])
        results = [t.on_chunk(c.body["offset"], c.buffers["data"], c.body["sha256_chunk"], c.body["total_size"])
                   for c in chunks]
        assert results.count("ok") == n and results.count("duplicate") == n
        assert t.finalize().read_bytes() == packs[0].read_bytes()

        def report(state):
            return Message("report", {"name": entry["name"], "task_id": "pick", "version": 1,
                                      "state": state, "reason": None})
        activated, received = report("activated").encode(), report("received").encode()
        for frames in (activated, received, activated, received):
            sock.send_multipart(frames)
        acks = [m for m in collect(sock, 3000, until=lambda out: sum(m.msg_type == "ack" for m in out) >= 4)
                if m.msg_type != "desired_state"]
        sock.close()
    finally:
        ctx.destroy(linger=0)
    assert [a.msg_type for a in acks] == ["ack"] * 4
    assert states(fleet, sid) == {"pick-1.kpk": "activated"}


FAKE_STATION = """
import sys
from kaizen.runtime import daemon_state
from kaizen.runtime.keys import TrustedKeys
from kaizen.runtime.store import PackStore

FP = sys.argv[2]

class FakeStation:  # a Station without an ONNX bundle: same install/installed/infer/status surface
    def __init__(self, cfg):
        self.store = PackStore(cfg.store_dir, TrustedKeys.from_dir(cfg.trusted_keys_dir), FP)
        self.base_fingerprint = FP
    def install(self, path):
        return self.store.install(path)
    def installed(self):
        return [{"task_id": t, "version": p.manifest.version} for t, p in self.store.active().items()]
    def infer(self, image, instruction, task=None):
        return {"answer": "fake"}
    def status(self):
        return {"packs": self.installed()}

daemon_state.station_from_config = FakeStation
from kaizen.runtime.cli import main
sys.exit(main(["station", "serve", "--config", sys.argv[1]]))
"""


def test_cli_hub_serve_and_station_serve_processes(fleet, packs, signing_key, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys

    from kaizen.runtime.endpoint import InferenceClient
    from kaizen.runtime.keys import save_signing_key

    save_signing_key(signing_key, tmp_path / "trusted", "trainer")
    hub_toml = write_hub_toml(fleet, tmp_path / "hub.toml")
    keys = fleet.root / "keys"
    infer_ep = f"ipc://{tmp_path}/station.ipc"
    import tempfile

    run_dir = tempfile.mkdtemp(prefix="kzrt")   # short: unix socket paths are limited to 107 bytes
    (tmp_path / "station.toml").write_text(f"""
station_id = "{fleet.station_ids[0]}"
hub_endpoint = "{fleet.hub_config.bind}"
hub_announce_endpoint = "{fleet.hub_config.pub_bind}"
hub_public_key_file = "{keys / 'hub.pub'}"
public_key_file = "{keys / 'station0.pub'}"
secret_key_file = "{keys / 'station0.key'}"
bundle_dir = "bundle"
store_dir = "store"
trusted_keys_dir = "trusted"
state_dir = "fleet-state"
inference_endpoint = "{infer_ep}"
runtime_dir = "{run_dir}"
heartbeat_s = 0.2
hub_timeout_s = 2.0
""")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    hub = subprocess.Popen([sys.executable, "-m", "kaizen.runtime.cli", "hub", "serve", "--config", str(hub_toml)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    station = subprocess.Popen([sys.executable, "-c", FAKE_STATION, str(tmp_path / "station.toml"), FP],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert hub_cli.cli_publish([str(packs[1]), "--to", "line1/s00", "--config", str(hub_toml)]) == 0
        assert wait_until(lambda: states(fleet, fleet.station_ids[0]) == {"count-1.kpk": "activated"}, WAIT)
        with InferenceClient(infer_ep, timeout_ms=5000) as client:
            assert client.status()["station"]["packs"] == [{"task_id": "count", "version": 1}]
        # `kaizen station install` reaches the running station over its private admin socket
        from kaizen.runtime.cli import main as kaizen_main

        assert kaizen_main(["station", "install", str(packs[0]), "--config", str(tmp_path / "station.toml")]) == 0
        assert "pick is now at version 1" in capsys.readouterr().out
        with InferenceClient(infer_ep, timeout_ms=5000) as client:
            assert {"task_id": "pick", "version": 1} in client.status()["station"]["packs"]
        assert hub_cli.cli_status(["--config", str(hub_toml)]) == 0
        assert "count-1.kpk: activated" in capsys.readouterr().out
    finally:
        for proc in (station, hub):
            proc.send_signal(signal.SIGTERM)
        outs = []
        for proc in (station, hub):
            try:
                outs.append(proc.communicate(timeout=20)[0])
            except subprocess.TimeoutExpired:
                proc.kill()
                outs.append(proc.communicate(timeout=10)[0])
    assert station.returncode == 0 and hub.returncode == 0, outs
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    assert "hub serving on" in outs[1] and "inference on" in outs[0] and f"admin on ipc://{run_dir}/admin" in outs[0]


def test_local_rollback_is_reported_and_not_undone(fleet, packs):
    fleet.start_hub()
    fleet.publish(packs[0], "line1/s00")
    daemon = fleet.start_station(0)
    assert wait_until(lambda: fleet.installed(0) == {"pick": 1}, WAIT)
    fleet.publish(packs[2], "line1/s00")
    assert wait_until(lambda: fleet.installed(0) == {"pick": 2}, WAIT)
    fleet.store(0).rollback("pick")                  # an operator rolls the station back
    sid = fleet.station_ids[0]
    assert wait_until(lambda: states(fleet, sid).get("pick-2.kpk") == "rolled_back", WAIT)
    wait_until(lambda: False, 1.0)                   # more heartbeats and desired_states...
    assert fleet.installed(0) == {"pick": 1}         # ...do not re-install v2 behind its back
    assert daemon.stats.resumed_from == [("pick-1.kpk", 0), ("pick-2.kpk", 0)]
