"""Issue 11, hub half: hostile messages from an allow-listed station, bad files in the packs
folder, group leaks, duplicate keys, allow-list reload and bounded bookkeeping.

Each test reproduces one finding of the issue against a real hub on loopback (hub/fleet_sim.py
builds the keys and config) and fails on the code before the fix. Bounded waits throughout.
"""

import json
import time
import uuid

import pytest
import zmq

from kaizen.hub.auth import DENIED_KEPT, ZapHandler
from kaizen.hub.catalog import catalogue_pack
from kaizen.hub.config import load_hub_config
from kaizen.hub.db import MAX_REASON_CHARS, HubDB
from kaizen.hub.fleet_sim import Fleet, make_test_packs, wait_until, write_hub_toml
from kaizen.hub.server import FETCHES_KEPT, Hub
from kaizen.runtime.errors import ConfigError, PackError
from kaizen.runtime.keys import (
    TrustedKeys,
    generate_signing_key,
    load_curve_keypair,
    load_curve_public,
    save_signing_key,
)
from kaizen.runtime.protocol import Message, decode

FP = "test-base-fp"



@pytest.fixture(scope="module")
def packs(tmp_path_factory, signing_key):
    folder = tmp_path_factory.mktemp("packs")
    return make_test_packs(folder, signing_key, [("pick", 1), ("count", 1)], base_fingerprint=FP, layers=2)


@pytest.fixture
def fleet(tmp_path, signing_key):
    f = Fleet(tmp_path / "fleet", 2, TrustedKeys([signing_key.public_key()]), FP, chunk_size=32 * 1024,
              groups={"line1/s00": ["line1"], "line2/s01": ["line2"]})
    yield f
    f.close()


class Peer:
    """A raw CURVE DEALER with an allow-listed station's keys: sends any frames, reads replies."""

    def __init__(self, fleet, index):
        self.ctx = zmq.Context()
        public, secret = load_curve_keypair(fleet.root / "keys" / f"station{index}.key")
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.curve_secretkey, self.sock.curve_publickey = secret, public
        self.sock.curve_serverkey = load_curve_public(fleet.hub_config.public_key_file)
        self.sock.connect(fleet.hub_config.bind)
        self.station_id = fleet.station_ids[index]

    def ask(self, frames, timeout_ms=3000):
        """Send frames; the reply to them (pushed desired_states in between are skipped)."""
        try:
            msg_id = json.loads(frames[0]).get("msg_id")
        except (ValueError, RecursionError, AttributeError):
            msg_id = None
        self.sock.send_multipart(frames)
        end = time.monotonic() + timeout_ms / 1000
        while self.sock.poll(max(1, int((end - time.monotonic()) * 1000)), zmq.POLLIN):
            reply = decode(self.sock.recv_multipart())
            if reply.reply_to == msg_id or (reply.reply_to is None and reply.msg_type == "error"):
                return reply
        return None

    def hello(self, timeout_ms=3000):
        return self.ask(Message("hello", {"station_id": self.station_id, "base_fingerprint": FP,
                                          "runtime_version": "0.1.0", "installed": []}).encode(), timeout_ms)

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def header(msg_type="report", **patch):
    h = {"protocol_version": 2, "msg_type": msg_type, "msg_id": uuid.uuid4().hex, "reply_to": None,
         "sent_at": time.time(), "buffers": []}
    h.update(patch)
    return h


def report_body(**patch):
    body = {"name": "pick-1.kpk", "task_id": "pick", "version": 1, "state": "activated", "reason": None}
    body.update(patch)
    return body


@pytest.fixture
def peer(fleet):
    fleet.start_hub()
    p = Peer(fleet, 0)
    yield p
    p.close()


HOSTILE = [  # finding 1: each of these killed the hub thread
    ("no reply_to", [json.dumps({k: v for k, v in header().items() if k != "reply_to"}).encode(),
                     json.dumps(report_body()).encode()], "bad_frames"),
    ("sent_at 10**400", [b'{"protocol_version":2,"msg_type":"report","msg_id":"' + b"a" * 32
                         + b'","reply_to":null,"sent_at":1' + b"0" * 400 + b',"buffers":[]}',
                         json.dumps(report_body()).encode()], "bad_frames"),
    ("deep header", [b"[" * 30000, b"{}"], "bad_frames"),
    ("lone surrogate", [json.dumps(header()).encode(), b'{"name":"pick-1.kpk","task_id":"pick","version":1,'
                        b'"state":"rejected","reason":"\\ud800"}'], "bad_input"),
    ("version 10**400", [json.dumps(header()).encode(), json.dumps(report_body(version=10 ** 400)).encode()],
     "bad_body"),
    ("NaN", [json.dumps(header()).encode(), b'{"name":"a","task_id":"t","version":1,"state":"received",'
             b'"reason":null,"x":NaN}'], "bad_frames"),
]


@pytest.mark.parametrize("what, frames, code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_message_gets_a_typed_error_and_the_hub_keeps_serving(peer, fleet, what, frames, code):
    reply = peer.ask(frames)
    assert reply is not None and reply.msg_type == "error", what
    assert reply.body["error"] == code, reply.body
    assert fleet.hub.stats.internal == 0
    assert peer.hello().msg_type == "desired_state"   # the hub thread is alive


def test_total_size_over_the_hub_limit_is_refused(peer, fleet):
    """Finding 6: the hub had no size limit at all (a 200 MiB frame was read whole)."""
    assert fleet.hub_config.max_message_bytes == 1 << 20
    frames = [json.dumps(header()).encode(), json.dumps(report_body()).encode(), b"x" * 600_000, b"y" * 600_000]
    reply = peer.ask(frames)
    assert reply is not None and reply.body["error"] == "too_large"
    assert peer.hello().msg_type == "desired_state"
    # one frame over the limit is never buffered whole: the peer is disconnected, no reply
    assert peer.ask([json.dumps(header()).encode(), b"{}", b"z" * (2 << 20)], timeout_ms=1000) is None
    again = Peer(fleet, 0)
    try:
        assert again.hello().msg_type == "desired_state"
    finally:
        again.close()


def test_deleted_and_truncated_pack_files_are_skipped_not_fatal(fleet, packs):
    """Finding 2: a catalogued .kpk deleted or truncated in packs_dir killed (or blocked) the hub."""
    fleet.publish(packs[0], "*")
    fleet.publish(packs[1], "*")
    folder = fleet.hub_config.packs_dir
    data = (folder / "count-1.kpk").read_bytes()
    (folder / "count-1.kpk").write_bytes(data[: len(data) // 2])     # truncated before the start
    hub = fleet.start_hub()                                          # old code: PackError here
    assert "count-1.kpk" in hub.unservable
    peer = Peer(fleet, 0)
    try:
        hello = peer.hello()
        assert [p["name"] for p in hello.body["packs"]] == ["pick-1.kpk"]
        pick = hello.body["packs"][0]
        (folder / "pick-1.kpk").unlink()                             # deleted while the hub runs
        reply = peer.ask(Message("fetch", {"name": "pick-1.kpk", "sha256": pick["sha256"], "offset": 0,
                                           "credit": 32 * 1024}).encode())
        assert reply.msg_type == "error" and reply.body["error"] == "unknown_pack"
        assert wait_until(lambda: peer.hello().body["packs"] == [], 5)
        assert hub.stats.internal == 0
    finally:
        peer.close()


def test_hub_verifies_signatures_at_publish_and_at_start(fleet, packs, tmp_path):
    """Finding 10 (hub): the hub served packs without checking who signed them."""
    trusted = fleet.trusted
    rogue = make_test_packs(tmp_path / "rogue", generate_signing_key(), [("label", 1)], base_fingerprint=FP,
                            layers=2)[0]
    db = HubDB(fleet.hub_config.db_path)
    try:
        with pytest.raises(PackError, match="label-1.kpk"):
            catalogue_pack(db, fleet.hub_config.packs_dir, rogue, trusted)
        assert db.packs() == []
    finally:
        db.close()
    fleet.publish(packs[0], "*")
    fleet.hub_config.packs_dir.joinpath("label-1.kpk").write_bytes(rogue.read_bytes())  # dropped in by hand
    hub = Hub(fleet.hub_config, trusted=trusted)
    hub.start()
    try:
        assert "label-1.kpk" in hub.unservable and "pick-1.kpk" not in hub.unservable
    finally:
        hub.stop()


def test_packs_do_not_leak_across_groups(fleet, packs):
    """Finding 9: announce named every pack to every station; a line2 station fetched a line1 pack."""
    name = fleet.publish(packs[0], "@line1")
    fleet.start_hub()
    sub_ctx = zmq.Context()
    line1, line2 = Peer(fleet, 0), Peer(fleet, 1)
    sub = sub_ctx.socket(zmq.SUB)
    try:
        public, secret = load_curve_keypair(fleet.root / "keys" / "station1.key")
        sub.linger = 0
        sub.curve_secretkey, sub.curve_publickey = secret, public
        sub.curve_serverkey = load_curve_public(fleet.hub_config.public_key_file)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(fleet.hub_config.pub_bind)
        sha = line1.hello().body["packs"][0]["sha256"]
        assert line2.hello().body["packs"] == []
        reply = line2.ask(Message("fetch", {"name": name, "sha256": sha, "offset": 0, "credit": 32 * 1024}).encode())
        assert reply.msg_type == "error" and reply.body["error"] == "unknown_pack"
        time.sleep(0.3)   # let the SUB connect, then publish again: the announce must name nothing
        fleet.publish(packs[1], "@line1")
        assert sub.poll(5000, zmq.POLLIN)
        announce = decode(sub.recv_multipart())
        assert announce.msg_type == "announce" and announce.body["packs"] == []
        got = line1.ask(Message("fetch", {"name": name, "sha256": sha, "offset": 0, "credit": 32 * 1024}).encode())
        assert got.msg_type in ("chunk", "desired_state")   # the line1 station is served
    finally:
        sub.close(0)
        sub_ctx.term()
        line1.close()
        line2.close()


def test_duplicate_station_keys_are_refused_at_config_load(fleet, tmp_path):
    path = write_hub_toml(fleet, tmp_path / "hub.toml")
    text = path.read_text().replace("station1.pub", "station0.pub")
    path.write_text(text)
    with pytest.raises(ConfigError, match="one key per station"):
        load_hub_config(path)
    (tmp_path / "copy.pub").write_bytes((fleet.root / "keys" / "station0.pub").read_bytes())
    path.write_text(text.replace(str(fleet.root / "keys" / "station0.pub"), str(tmp_path / "copy.pub"), 1))
    with pytest.raises(ConfigError, match="same key as station"):
        load_hub_config(path)


def test_allow_list_reloads_on_file_change_and_on_request(fleet, tmp_path):
    """Finding 10: the allow-list only changed with a restart."""
    path = write_hub_toml(fleet, tmp_path / "hub.toml")
    full = path.read_text()
    first, _, rest = full.partition("[[stations]]")
    station0, _, _station1 = rest.partition("[[stations]]")
    path.write_text(first + "[[stations]]" + station0)           # station1 not allow-listed yet
    hub = Hub(load_hub_config(path))
    hub.start()
    peer1 = Peer(fleet, 1)
    try:
        assert peer1.hello(timeout_ms=1000) is None               # refused at the handshake
        path.write_text(full)                                     # now it is (file change)
        assert wait_until(lambda: hub.stats.reloads >= 1, 5)
        peer1.close()
        peer1 = Peer(fleet, 1)
        assert peer1.hello().msg_type == "desired_state"
        path.write_text(first + "[[stations]]" + station0)        # removed again, SIGHUP-style
        hub.request_reload()
        assert wait_until(lambda: hub.stats.reloads >= 2, 5)
        assert peer1.hello(timeout_ms=1000) is None               # its open connection is dropped
        path.write_text("not toml [")                             # a broken file keeps the old list
        hub.request_reload()
        assert wait_until(lambda: hub.stats.reload_errors >= 1, 5)
        assert hub.stats.internal == 0
    finally:
        peer1.close()
        hub.stop()


def test_zap_denied_list_and_fetch_bookkeeping_are_bounded(peer, fleet, packs):
    """Finding 6: ZAP's denied list (reachable without authentication) and per-fetch records grew."""
    zap = ZapHandler(zmq.Context.instance(), {})
    for i in range(3 * DENIED_KEPT):
        zap._answer([b"1.0", b"%d" % i, b"kaizen-fleet", b"10.0.0.1", b"", b"CURVE", bytes(32)])
    assert len(zap.denied) == DENIED_KEPT and zap.denied_count == 3 * DENIED_KEPT
    assert fleet.hub.stats.fetches.maxlen == FETCHES_KEPT


def test_report_reasons_are_capped_and_unpublished_names_not_stored(peer, fleet, packs):
    """Finding 6: 200 reports with 1 MiB reasons grew the database by 204 MB."""
    fleet.publish(packs[0], "*")
    assert wait_until(lambda: peer.hello().body["packs"] != [], 5)
    ack = peer.ask(Message("report", report_body(state="rejected", reason="r" * 500_000)).encode())
    assert ack.msg_type == "ack"
    for i in range(50):   # made-up pack names: acked, never stored
        assert peer.ask(Message("report", report_body(name=f"junk-{i}.kpk")).encode()).msg_type == "ack"
    db = HubDB(fleet.hub_config.db_path)
    try:
        rows = db.deliveries()
    finally:
        db.close()
    assert [r["pack_name"] for r in rows] == ["pick-1.kpk"]
    assert len(rows[0]["reason"]) <= MAX_REASON_CHARS + 3
    assert fleet.hub.stats.reports_ignored == 50


def test_hub_cli_publish_verifies_with_trusted_keys_dir(fleet, signing_key, tmp_path, capsys):
    from kaizen.hub import cli as hub_cli

    save_signing_key(signing_key, tmp_path / "trusted", "trainer")
    path = write_hub_toml(fleet, tmp_path / "hub.toml")
    path.write_text(f'trusted_keys_dir = "{tmp_path / "trusted"}"\n' + path.read_text())
    rogue = make_test_packs(tmp_path / "rogue", generate_signing_key(), [("label", 1)], base_fingerprint=FP,
                            layers=2)[0]
    with pytest.raises(PackError):
        hub_cli.cli_publish([str(rogue), "--to", "*", "--config", str(path)])
    good = make_test_packs(tmp_path / "good", signing_key, [("label", 2)], base_fingerprint=FP, layers=2)[0]
    assert hub_cli.cli_publish([str(good), "--to", "*", "--config", str(path)]) == 0


def test_revoking_a_signer_on_the_hub_stops_serving_its_packs_after_reload(fleet, packs, signing_key, tmp_path):
    """Finding 10: trusted keys only changed with a restart."""
    trusted = tmp_path / "trusted"
    save_signing_key(signing_key, trusted, "trainer")
    path = write_hub_toml(fleet, tmp_path / "hub.toml")
    path.write_text(f'trusted_keys_dir = "{trusted}"\n' + path.read_text())
    fleet.publish(packs[0], "*")
    hub = Hub(load_hub_config(path))
    hub.start()
    peer = Peer(fleet, 0)
    try:
        assert [p["name"] for p in peer.hello().body["packs"]] == ["pick-1.kpk"]
        (trusted / "trainer.ed25519.pub").unlink()
        save_signing_key(generate_signing_key(), trusted, "other")
        hub.request_reload()
        assert wait_until(lambda: hub.stats.reloads >= 1, 5)
        assert "pick-1.kpk" in hub.unservable and peer.hello().body["packs"] == []
    finally:
        peer.close()
        hub.stop()
