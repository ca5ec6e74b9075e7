"""Issue 11's chaos test (slow): a fleet of 50 stations under every fault at once.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -s -m slow tests/test_chaos.py -p no:cacheprovider

One hub and 50 station daemons on loopback (threads in this process, hub/fleet_sim.py), plus one
hostile station: an allow-listed key whose raw DEALER sends the hub garbage the whole run
(malformed frames, huge declared sizes, fetches and reports for packs not published to it,
impersonation, floods; bounded in count and time). Meanwhile: random disconnects, 5 % corrupt
chunks, one hub restart mid-run, and a full disk (ENOSPC injected into one station's download and
store writes) that is lifted once the hub shows `rejected: disk full`. Four packs are published
to groups. Checked: every pack activated on exactly its eligible stations with the right bytes,
the hub's delivery table equals what the stations' stores hold, the hostile peer got no chunk,
no pack and no delivery row, the hub never hit an internal error, and the full-disk station
activated after the disk was freed. Prints a one-line summary (time to converge, chunks
corrupted, disconnects, hostile messages sent). About 20 s on a busy 2-core machine.
"""

import collections
import errno
import json
import math
import os
import random
import threading
import time
import uuid

import pytest
import zmq

from kaizen.hub.db import HubDB
from kaizen.hub.fleet_sim import Fleet, make_test_packs, wait_until
from kaizen.hub.server import HubFaults
from kaizen.runtime import daemon as daemon_mod
from kaizen.runtime import store as store_mod
from kaizen.runtime.keys import TrustedKeys, generate_signing_key, load_curve_keypair, load_curve_public
from kaizen.runtime.outbox import Outbox
from kaizen.runtime.protocol import Message, WireError, decode

FP = "chaos-base-fp"
CHUNK = 32 * 1024
N_LEGIT = 50
HOSTILE = N_LEGIT            # index of the hostile station (allow-listed, in no group)
DISK_STATION = 3             # index of the station whose disk is full at first
CORRUPT = 0.05
DISCONNECT_P = 0.03          # per legit station, per tick of the driver loop (~0.1 s)
DEADLINE_S = 200.0           # to converge; the whole test stays < 5 min
DISK_FULL_HOLD_S = 3.0       # the disk stays full this long after the hub showed `rejected: disk full`
HOSTILE_MAX_MESSAGES = 20000
HOSTILE_MIN_ANSWERED = 1500  # the run goes on after convergence until the hub answered this many
PUBLISH = {"pick": ["@g1"], "count": ["@g2"], "label": ["@g3"], "color": ["@g1", "@g2"]}


def groups_of(i: int) -> list[str]:
    if i == HOSTILE:
        return []
    return ["g1" if i % 2 == 0 else "g2"] + (["g3"] if i % 5 == 0 else [])


def station_id(i: int) -> str:
    return f"line{1 + i % 2}/s{i:02d}"   # as Fleet names them (checked below)


class FullDisk:
    """ENOSPC for the writes under one station's folder while `on`: os.pwrite of its downloads
    (runtime/fetcher.py) and write_synced of its store (runtime/store.py)."""

    def __init__(self, folder):
        self.folder = str(folder) + os.sep
        self.on = True
        self.hits = 0
        self._pwrite = os.pwrite
        self._write_synced = store_mod.write_synced

    def _full(self):
        self.hits += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    def pwrite(self, fd, data, offset):
        if self.on and os.readlink(f"/proc/self/fd/{fd}").startswith(self.folder):
            self._full()
        return self._pwrite(fd, data, offset)

    def write_synced(self, path, data, **kw):
        if self.on and str(path).startswith(self.folder):
            self._full()
        return self._write_synced(path, data, **kw)


def header(msg_type="report", **patch) -> dict:
    h = {"protocol_version": 2, "msg_type": msg_type, "msg_id": uuid.uuid4().hex, "reply_to": None,
         "sent_at": time.time(), "buffers": []}
    h.update(patch)
    return h


def raw(head: dict, body, *extra) -> list[bytes]:
    return [json.dumps(head).encode(), body if isinstance(body, bytes) else json.dumps(body).encode(), *extra]


class Hostile:
    """An allow-listed station key in the wrong hands: a raw CURVE DEALER that sends the hub
    hostile messages until stopped (or HOSTILE_MAX_MESSAGES), and counts what comes back."""

    def __init__(self, fleet: Fleet, index: int, packs: dict, victims: list[str], seed: int = 5):
        self.fleet, self.index = fleet, index
        self.station_id = fleet.station_ids[index]
        self.packs = packs          # name -> sha256 of every published pack (none published to it)
        self.victims = victims      # other stations' ids, to impersonate
        self.rng = random.Random(seed)
        self.sent = 0
        self.not_sent = 0           # send queue full (e.g. while the hub restarts)
        self.kinds = collections.Counter()
        self.replies = collections.Counter()   # msg_type or "error:<code>"
        self.chunks = 0
        self.packs_offered = 0      # desired_state entries it was told about (must stay 0)
        self.undecodable = 0
        self.answered = 0           # replies of any kind
        self.expected = 0           # replies due so far (a frame over the limit gets none)
        self.lost = 0               # replies not in within 1 s of their cycle (hub restart, peer dropped)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self):
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "hostile thread did not stop"

    def _socket(self, ctx):
        public, secret = load_curve_keypair(self.fleet.root / "keys" / f"station{self.index}.key")
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_secretkey, sock.curve_publickey = secret, public
        sock.curve_serverkey = load_curve_public(self.fleet.hub_config.public_key_file)
        sock.reconnect_ivl = 100
        sock.connect(self.fleet.hub_config.bind)
        return sock

    def messages(self, cycle: int):
        """(kind, frames) of one cycle: every hostile kind once, a flood every 10th cycle."""
        rng, sid = self.rng, self.station_id
        name = rng.choice(sorted(self.packs))
        sha = self.packs[name]
        victim = rng.choice(self.victims)
        report = {"name": name, "task_id": name.split("-")[0], "version": 1, "state": "activated", "reason": None}
        yield "deep header", [b"[" * 30000, b"{}"]
        yield "not json", [bytes(rng.randrange(256) for _ in range(64)), b"\xff\xfe{"]
        yield "one frame", [json.dumps(header("hello")).encode()]
        yield "no reply_to", raw({k: v for k, v in header().items() if k != "reply_to"}, report)
        yield "sent_at 1e400", [json.dumps(header()).encode().replace(b'"sent_at": ', b'"sent_at": 1' + b"0" * 400
                                                                     + b", \"x\": "), json.dumps(report).encode()]
        yield "NaN body", raw(header(), json.dumps(report).encode()[:-1] + b', "x": NaN}')
        yield "lone surrogate", raw(header(), json.dumps(dict(report, state="rejected")).encode()
                                    .replace(b'"reason": null', b'"reason": "\\ud800"'))
        yield "version 10**400", raw(header(), dict(report, version=10 ** 400))
        yield "wrong protocol", raw(header(protocol_version=99), report)
        yield "hub-only type", raw(header("chunk"), {"name": name, "offset": 0, "sha256_chunk": sha,
                                                      "total_size": 1, "last": True})
        yield "huge nbytes", raw(header("report", buffers=[{"name": "data", "kind": "bytes", "nbytes": 10 ** 15}]),
                                 report, b"x")
        yield "huge shape", raw(header("report", buffers=[{"name": "a", "dtype": "uint8", "shape": [2 ** 40, 2 ** 40]}]),
                                report, b"x")
        yield "huge credit", Message("fetch", {"name": name, "sha256": sha, "offset": 0, "credit": 2 ** 62}).encode()
        yield "huge offset", Message("fetch", {"name": name, "sha256": sha, "offset": 2 ** 62, "credit": CHUNK}).encode()
        yield "fetch unpublished", Message("fetch", {"name": name, "sha256": sha, "offset": 0, "credit": CHUNK}).encode()
        yield "fetch path", Message("fetch", {"name": "../../hub/hub.sqlite", "sha256": "0" * 64, "offset": 0,
                                              "credit": CHUNK}).encode()
        for state in ("activated", "rolled_back", "rejected"):
            yield "report others' pack", Message("report", dict(report, state=state, reason="hostile")).encode()
        yield "report unknown pack", Message("report", dict(report, name="nope-1.kpk")).encode()
        yield "impersonate hello", Message("hello", {"station_id": victim, "base_fingerprint": FP,
                                                     "runtime_version": "0.1.0", "installed": []}).encode()
        yield "impersonate heartbeat", Message("heartbeat", {"station_id": victim, "installed": [],
                                                             "serving": True}).encode()
        yield "own hello, lies", Message("hello", {"station_id": sid, "base_fingerprint": FP, "runtime_version": "x",
                                                   "installed": [{"task_id": "pick", "version": 1}] * 500}).encode()
        if cycle % 5 == 0:
            yield "too large", raw(header(), report, b"x" * 600_000, b"y" * 600_000)
        if cycle in (3, 40):
            yield "frame over the limit", raw(header(), report, b"z" * (2 << 20))   # the hub drops the peer
        if cycle % 10 == 0:
            for _ in range(200):
                yield "flood", Message("heartbeat", {"station_id": sid, "installed": [], "serving": True}).encode()

    def _drain(self, sock):
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(frames)
            except WireError:
                self.undecodable += 1
                continue
            self.answered += 1
            key = f"error:{msg.body['error']}" if msg.msg_type == "error" else msg.msg_type
            self.replies[key] += 1
            if msg.msg_type == "chunk":
                self.chunks += 1
            elif msg.msg_type == "desired_state":
                self.packs_offered += len(msg.body["packs"])

    def _run(self):
        ctx = zmq.Context()
        sock = self._socket(ctx)
        cycle = 0
        try:
            while not self._stop.is_set() and self.sent < HOSTILE_MAX_MESSAGES:
                for kind, frames in self.messages(cycle):
                    try:
                        sock.send_multipart(frames, zmq.NOBLOCK)
                    except zmq.Again:
                        self.not_sent += 1
                        continue
                    self.sent += 1
                    self.kinds[kind] += 1
                    self.expected += kind != "frame over the limit"
                    if self.sent % 50 == 0:
                        self._drain(sock)
                # as fast as the hub answers: wait for this cycle's replies (at most 1 s)
                end = time.monotonic() + 1.0
                while self.answered < self.expected and time.monotonic() < end and not self._stop.is_set():
                    if sock.poll(50, zmq.POLLIN):
                        self._drain(sock)
                if self.answered < self.expected:
                    self.lost += self.expected - self.answered
                    self.expected = self.answered
                cycle += 1
                self._stop.wait(0.05)
            end = time.monotonic() + 2.0     # the last replies
            while time.monotonic() < end and sock.poll(200, zmq.POLLIN):
                self._drain(sock)
        finally:
            sock.close(0)
            ctx.term()

    def ask_hello(self, timeout_s: float = 10.0):
        """A plain hello on a fresh socket after the run: the reply (None if the hub is silent)."""
        ctx = zmq.Context()
        sock = self._socket(ctx)
        try:
            msg = Message("hello", {"station_id": self.station_id, "base_fingerprint": FP,
                                    "runtime_version": "0.1.0", "installed": []})
            sock.send_multipart(msg.encode())
            end = time.monotonic() + timeout_s
            while sock.poll(max(1, int((end - time.monotonic()) * 1000)), zmq.POLLIN):
                reply = decode(sock.recv_multipart())
                if reply.reply_to == msg.msg_id:
                    return reply
            return None
        finally:
            sock.close(0)
            ctx.term()


@pytest.mark.slow
def test_chaos_fleet_of_50_with_a_hostile_peer_disconnects_corruption_hub_restart_and_full_disk(
        tmp_path, monkeypatch):
    t_test = time.monotonic()
    monkeypatch.setattr(daemon_mod, "RETRY_FIRST_S", 0.5)
    monkeypatch.setattr(daemon_mod, "RETRY_MAX_S", 2.0)
    key = generate_signing_key()
    tasks = sorted(PUBLISH)
    pack_paths = make_test_packs(tmp_path / "packs", key, [(t, 1) for t in tasks], base_fingerprint=FP, layers=12)
    pack_of = {p.name.split("-")[0]: p for p in pack_paths}
    eligible = {i: {pack_of[t].name for t, targets in PUBLISH.items() if {g[1:] for g in targets} & set(groups_of(i))}
                for i in range(N_LEGIT + 1)}
    assert eligible[HOSTILE] == set() and all(eligible[i] for i in range(N_LEGIT))
    groups = {station_id(i): groups_of(i) for i in range(N_LEGIT + 1)}
    fleet = Fleet(tmp_path / "fleet", N_LEGIT + 1, TrustedKeys([key.public_key()]), FP, heartbeat_s=1.0,
                  hub_timeout_s=4.0, credit=4, chunk_timeout_s=1.0, chunk_size=CHUNK, groups=groups)
    assert fleet.station_ids == [station_id(i) for i in range(N_LEGIT + 1)]
    legit = list(range(N_LEGIT))
    disk = FullDisk(fleet.root / f"station{DISK_STATION}")
    monkeypatch.setattr(os, "pwrite", disk.pwrite)
    monkeypatch.setattr(store_mod, "write_synced", disk.write_synced)
    sizes = {p.name: p.stat().st_size for p in pack_paths}
    total_chunks = sum(math.ceil(sizes[n] / CHUNK) for i in legit for n in eligible[i])
    rng = random.Random(11)
    hostile = None
    db = None
    hub_stats = []
    try:
        fleet.start_hub(HubFaults(corrupt_fraction=CORRUPT, seed=1))
        daemons = [fleet.start_station(i) for i in legit]
        shas = {}
        t0 = time.monotonic()
        for task in tasks:
            for target in PUBLISH[task]:
                fleet.publish(pack_of[task], target)
        db = HubDB(fleet.hub_config.db_path)
        shas = {r.name: r.sha256 for r in db.packs()}
        hostile = Hostile(fleet, HOSTILE, shas, [station_id(i) for i in legit]).start()

        def converged(i):
            return eligible[i] <= set(daemons[i].stats.activated_at)

        disconnects, restarted_at, disk_reason, disk_seen_at, lifted_at = 0, None, None, None, None
        converged_at = None
        next_db_look = 0.0
        end = t0 + DEADLINE_S
        while time.monotonic() < end:
            now = time.monotonic()
            if converged_at is None and lifted_at is not None and all(converged(i) for i in legit):
                converged_at = now
            if converged_at is not None and (hostile.answered >= HOSTILE_MIN_ANSWERED or not hostile.alive()):
                break   # converged, and the hostile peer has had its say (it goes on until here)
            for i in legit:
                if rng.random() < DISCONNECT_P:
                    daemons[i].disconnect()
                    disconnects += 1
            hub = fleet.hub
            if restarted_at is None and hub.stats.chunks_sent >= 0.35 * total_chunks:
                assert hub._thread.is_alive() and hub.stats.internal == 0, "hub died before its restart"
                fleet.stop_hub()
                hub_stats.append(hub.stats)
                time.sleep(0.5)
                fleet.start_hub(HubFaults(corrupt_fraction=CORRUPT, seed=2))
                restarted_at = time.monotonic() - t0
            if disk.on and now >= next_db_look:
                next_db_look = now + 0.5
                for name in eligible[DISK_STATION]:
                    row = db.delivery(station_id(DISK_STATION), name)
                    if disk_reason is None and row and row["state"] == "rejected" and \
                            row["reason"].startswith("disk full"):
                        disk_reason, disk_seen_at = row["reason"], now
                if disk_seen_at is not None and now - disk_seen_at >= DISK_FULL_HOLD_S:
                    assert not any(n in daemons[DISK_STATION].stats.activated_at for n in eligible[DISK_STATION])
                    disk.on = False
                    lifted_at = now - t0
            time.sleep(0.1)
        seconds, ran = (converged_at or time.monotonic()) - t0, time.monotonic() - t0
        hostile.stop()
        missing = {station_id(i): sorted(eligible[i] - set(daemons[i].stats.activated_at))
                   for i in legit if not converged(i)}
        assert converged_at is not None, f"not converged in {DEADLINE_S} s: restart at {restarted_at}, " \
                                         f"disk reason {disk_reason!r}, lifted at {lifted_at}, missing {missing}"
        assert restarted_at is not None

        # every report acked (nothing waits in an outbox), then the hub is still answering
        assert wait_until(lambda: all(len(Outbox(d.state_dir / "outbox")) == 0 for d in daemons), 30.0)
        hub = fleet.hub
        reply = hostile.ask_hello()
        assert reply is not None and reply.msg_type == "desired_state" and reply.body["packs"] == []
        assert hub._thread.is_alive() and not hub.stopped_by_fault
        hub_stats.append(hub.stats)

        # every pack on exactly its eligible stations, byte for byte; the hub's table says the same
        expected_rows = set()
        for i in legit:
            store = fleet.store(i)
            assert {t: p.manifest.version for t, p in store.active().items()} == \
                {n.split("-")[0]: 1 for n in eligible[i]}, station_id(i)
            for name in eligible[i]:
                assert (daemons[i].downloads / name).read_bytes() == pack_of[name.split("-")[0]].read_bytes()
                expected_rows.add((station_id(i), name, "activated"))
        rows = {(r["station_id"], r["pack_name"], r["state"]) for r in db.deliveries()}
        assert rows == expected_rows, (rows ^ expected_rows)

        # the hostile peer changed nothing and got nothing; the other stations did not notice it
        assert db.deliveries(station_id(HOSTILE)) == []
        assert not [f for s in hub_stats for f in s.fetches if f[0] == station_id(HOSTILE)]  # no fetch served
        assert hostile.chunks == 0 and hostile.packs_offered == 0 and hostile.undecodable == 0
        assert hostile.answered >= HOSTILE_MIN_ANSWERED, (hostile.sent, hostile.answered, hostile.kinds)
        assert hostile.replies["error:unknown_pack"] > 0 and hostile.replies["error:identity_mismatch"] > 0
        assert hostile.replies["error:bad_frames"] > 0 and hostile.replies["error:too_large"] > 0
        assert sum(s.internal for s in hub_stats) == 0
        assert sum(s.reports_ignored for s in hub_stats) >= hostile.kinds["report others' pack"] // 2
        for d in daemons:
            assert d._thread.is_alive() and d.stats.loop_errors == 0 and d.stats.dropped == 0, d.link.station_id

        # the full disk: reported, retried, then activated once freed
        assert disk_reason is not None and disk_reason.startswith("disk full (No space left on device)")
        assert disk.hits >= 2 and daemons[DISK_STATION].stats.disk_errors >= 2

        corrupted = sum(s.chunks_corrupted for s in hub_stats)
        detected = sum(d.stats.chunks["corrupt"] for d in daemons)
        assert corrupted > 0 and 0 < detected <= corrupted and disconnects > 0
        print(f"\nchaos: {N_LEGIT} stations + 1 hostile, {len(pack_paths)} packs, {len(expected_rows)} deliveries: "
              f"converged in {seconds:.1f} s, ran {ran:.1f} s (hub restart at {restarted_at:.1f} s, disk freed at {lifted_at:.1f} s); "
              f"chunks sent {sum(s.chunks_sent for s in hub_stats)} (needed {total_chunks}), corrupted {corrupted} "
              f"(detected {detected}); disconnects {disconnects}; hostile messages sent {hostile.sent} "
              f"({len(hostile.kinds)} kinds, {hostile.answered} answered, {hostile.lost} not answered within 1 s "
              f"(hub restart, peer dropped), {hostile.not_sent} refused by a full queue), replies "
              f"{dict(sorted(hostile.replies.items()))}; disk-full hits {disk.hits}; "
              f"test {time.monotonic() - t_test:.1f} s")
    finally:
        if hostile is not None and hostile._thread.is_alive():
            hostile.stop()
        if db is not None:
            db.close()
        fleet.close()
    assert time.monotonic() - t_test < 300
