"""The fleet hub's server: serves task packs to allow-listed stations over ZeroMQ (CURVE), state in SQLite.

    kaizen hub serve --config hub.toml                    # run the hub (Ctrl-C to stop)
    kaizen hub publish pick-3.kpk --to 'line1/*' --config hub.toml   # or --to @group; works live
    kaizen fleet status --config hub.toml [--json]

A ROUTER socket (CURVE server) takes hello / heartbeat / fetch / report from station DEALERs;
ZAP (hub/auth.py) admits only allow-listed station keys and stamps each message with
the station id, and a hello whose station_id differs from its key's id is refused. Replies:
desired_state to hello and heartbeat, chunks within the credit to fetch, ack to report. A PUB
socket announces new publications (hints: stations reconcile on every heartbeat reply anyway).
Everything durable lives in hub/db.py. No torch here.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from dataclasses import dataclass, field

import zmq

from kaizen.runtime.keys import load_curve_public, load_curve_secret
from kaizen.runtime.protocol import Message, WireError, decode, error_reply, ok_reply

from .auth import ZapHandler
from .catalog import scan_packs
from .config import HubConfig
from .db import HubDB

HUB_TYPES = frozenset({"hello", "heartbeat", "fetch", "report"})
REVISION_POLL_S = 0.25


@dataclass
class HubFaults:
    """Fault injection for tests and the delivery benchmark (all off by default)."""

    corrupt_fraction: float = 0.0       # share of chunks sent with one byte flipped (seeded)
    seed: int = 0
    stop_after_chunks: int | None = None  # the serve loop exits abruptly after sending this many


@dataclass
class HubStats:
    chunks_sent: int = 0
    bytes_sent: int = 0
    chunks_corrupted: int = 0
    fetches: list = field(default_factory=list)     # (station_id, name, offset, credit)
    refused_hellos: list = field(default_factory=list)  # (authenticated id, claimed id)
    reports: int = 0


class Hub:
    """One hub: `start()` runs it in a thread (tests), `serve(stop_event)` in the caller's."""

    def __init__(self, config: HubConfig, faults: HubFaults | None = None):
        self.config = config
        self.faults = faults or HubFaults()
        self.stats = HubStats()
        self.stopped_by_fault = False
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random(self.faults.seed)
        self._groups = {s.id: s.groups for s in config.stations}
        self._peers: dict[str, bytes] = {}   # station id -> ROUTER identity of its latest DEALER
        allowed = {}
        for st in config.stations:
            allowed[load_curve_public(st.public_key_file)] = st.id
        self._allowed = allowed
        self._public = load_curve_public(config.public_key_file)
        self._secret = load_curve_secret(config.secret_key_file)

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self.serve, args=(self._stop,), name="hub", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout):
            raise RuntimeError("hub did not become ready")

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "hub thread did not stop"

    def serve(self, stop: threading.Event) -> None:
        """Bind, serve until `stop` is set (or a stop fault fires), then close everything."""
        ctx = zmq.Context()
        auth = ZapHandler(ctx, self._allowed)
        auth.start()
        self.auth = auth
        db = HubDB(self.config.db_path)
        router = pub = None
        try:
            scan_packs(db, self.config.packs_dir)
            router = self._server_socket(ctx, zmq.ROUTER, self.config.bind)
            pub = self._server_socket(ctx, zmq.PUB, self.config.pub_bind)
            self.ready.set()
            self._loop(stop, db, router, pub)
        finally:
            # a stop fault models a crash right after the last chunk left: let those chunks go out
            linger = 2000 if self.stopped_by_fault else 0
            for sock in (router, pub):
                if sock is not None:
                    sock.close(linger=linger)
            auth.stop()
            db.close()
            ctx.term()

    def _server_socket(self, ctx: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self._public
        sock.zap_domain = b"kaizen-fleet"
        if kind == zmq.ROUTER:
            sock.router_handover = True
            sock.sndhwm = 10000
        sock.bind(endpoint)
        return sock

    # ------------------------------------------------------------ loop

    def _loop(self, stop: threading.Event, db: HubDB, router: zmq.Socket, pub: zmq.Socket) -> None:
        revision = db.revision()
        next_revision_check = time.monotonic()
        while not stop.is_set() and not self.stopped_by_fault:
            if router.poll(50, zmq.POLLIN):
                for _ in range(256):
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(db, router, frames)
                    if self.stopped_by_fault:
                        return
            now = time.monotonic()
            if now >= next_revision_check:
                next_revision_check = now + REVISION_POLL_S
                current = db.revision()
                if current != revision:
                    revision = current
                    scan_packs(db, self.config.packs_dir)
                    self._push_desired(db, router, pub)

    def _push_desired(self, db: HubDB, router: zmq.Socket, pub: zmq.Socket) -> None:
        """A publication changed: tell connected stations now, and hint everyone over PUB."""
        for sid, identity in list(self._peers.items()):
            body = {"packs": [r.wire() for r in db.desired_for(sid, self._groups.get(sid, []))]}
            router.send_multipart([identity, *Message("desired_state", body).encode()])
        pub.send_multipart(Message("announce", {"packs": [r.wire() for r in db.packs()]}).encode())

    def _handle(self, db: HubDB, router: zmq.Socket, frames: list) -> None:
        identity = frames[0].bytes
        station_id = frames[1].get("User-Id") if len(frames) > 1 else None
        if not station_id:  # cannot happen behind ZAP; never serve an unauthenticated peer
            return

        def send(msg: Message) -> None:
            router.send_multipart([identity, *msg.encode()])

        try:
            msg = decode(frames[1:], allowed_types=HUB_TYPES)
        except WireError as err:
            send(error_reply(err.msg_id, err.code, err.detail))
            return
        if msg.msg_type in ("hello", "heartbeat") and msg.body["station_id"] != station_id:
            self.stats.refused_hellos.append((station_id, msg.body["station_id"]))
            send(error_reply(msg, "identity_mismatch", f"this CURVE key belongs to station {station_id!r}, "
                             f"not {msg.body['station_id']!r}: fix station_id or the key files"))
            return
        self._peers[station_id] = identity
        if msg.msg_type in ("hello", "heartbeat"):
            hello = msg.msg_type == "hello"
            db.record_seen(station_id, hello=hello, installed=msg.body["installed"],
                           serving=msg.body.get("serving"),
                           base_fingerprint=msg.body.get("base_fingerprint") if hello else None,
                           runtime_version=msg.body.get("runtime_version") if hello else None)
            packs = [r.wire() for r in db.desired_for(station_id, self._groups.get(station_id, []))]
            send(ok_reply(msg, {"packs": packs}, msg_type="desired_state"))
        elif msg.msg_type == "fetch":
            self._serve_fetch(db, station_id, msg, send)
        elif msg.msg_type == "report":
            b = msg.body
            db.record_report(station_id, b["name"], b["task_id"], b["version"], b["state"], b["reason"] or "")
            self.stats.reports += 1
            send(ok_reply(msg, {"acked_msg_id": msg.msg_id}, msg_type="ack"))

    def _serve_fetch(self, db: HubDB, station_id: str, msg: Message, send) -> None:
        b = msg.body
        rec = db.pack(b["name"])
        if rec is None or rec.sha256 != b["sha256"]:
            send(error_reply(msg, "unknown_pack", f"no pack {b['name']!r} with sha256 {b['sha256'][:12]}... "
                             "in the hub catalogue: reconcile against the latest desired_state"))
            return
        if b["offset"] > rec.size:
            send(error_reply(msg, "bad_body", f"fetch offset {b['offset']} is past the end ({rec.size})"))
            return
        self.stats.fetches.append((station_id, rec.name, b["offset"], b["credit"]))
        chunk = self.config.chunk_size
        end = min(rec.size, b["offset"] + min(b["credit"], chunk * self.config.max_credit))
        with open(rec.path, "rb") as f:
            f.seek(b["offset"])
            for offset in range(b["offset"], end, chunk):
                data = f.read(min(chunk, end - offset))
                body = {"name": rec.name, "offset": offset, "total_size": rec.size,
                        "sha256_chunk": hashlib.sha256(data).hexdigest(), "last": offset + len(data) >= rec.size}
                data = self._maybe_corrupt(data)
                send(ok_reply(msg, body, {"data": data}, msg_type="chunk"))
                self.stats.chunks_sent += 1
                self.stats.bytes_sent += len(data)
                limit = self.faults.stop_after_chunks
                if limit is not None and self.stats.chunks_sent >= limit:
                    self.stopped_by_fault = True
                    return

    def _maybe_corrupt(self, data: bytes) -> bytes:
        if self.faults.corrupt_fraction <= 0 or not data or self._rng.random() >= self.faults.corrupt_fraction:
            return data
        buf = bytearray(data)
        buf[self._rng.randrange(len(buf))] ^= 0xFF
        self.stats.chunks_corrupted += 1
        return bytes(buf)
