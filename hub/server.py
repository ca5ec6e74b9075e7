"""The fleet hub's server: serves task packs to allow-listed stations over ZeroMQ (CURVE), state in SQLite.

    kaizen hub serve --config hub.toml                    # run the hub (Ctrl-C to stop)
    kaizen hub publish pick-3.kpk --to 'line1/*' --config hub.toml   # or --to @group; works live
    kaizen fleet status --config hub.toml [--json]

A ROUTER socket (CURVE server) takes hello / heartbeat / fetch / report from station DEALERs;
ZAP (hub/auth.py) admits only allow-listed station keys and stamps each message with
the station id, and a hello whose station_id differs from its key's id is refused. Replies:
desired_state to hello and heartbeat, chunks within the credit to fetch, ack to report, sample_ack
to sample_chunk (captured parts, stored by hub/samples.py under samples_dir). A PUB
socket announces new publications (hints: stations reconcile on every heartbeat reply anyway).
Everything durable lives in hub/db.py. No torch here.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field

import zmq

from kaizen.runtime.errors import KaizenError
from kaizen.runtime.keys import TrustedKeys, load_curve_public, load_curve_secret
from kaizen.runtime.protocol import Message, WireError, decode, error_reply, ok_reply

from .auth import ZapHandler
from .catalog import scan_packs
from .config import HubConfig, load_hub_config
from .db import HubDB
from .fleet_ops import hold_on_report
from .samples import SampleLimits, SampleStore

log = logging.getLogger("kaizen.hub")

HUB_TYPES = frozenset({"hello", "heartbeat", "fetch", "report", "sample_chunk"})
REVISION_POLL_S = 0.25
CONFIG_POLL_S = 1.0      # hub.toml (allow-list, trusted keys) is re-read when its mtime changes
FETCHES_KEPT = 1000      # HubStats.fetches keeps the latest; fetch_count counts them all
REFUSED_KEPT = 100
MAX_ID_CHARS = 200       # base_fingerprint / runtime_version stored cut to this
STORE_ERROR_RETRY_S = 60.0   # the sample store's disk failed: stations wait this long before sending again


@dataclass
class HubFaults:
    """Fault injection for tests and the delivery benchmark (all off by default)."""

    corrupt_fraction: float = 0.0       # share of chunks sent with one byte flipped (seeded)
    seed: int = 0
    stop_after_chunks: int | None = None  # the serve loop exits abruptly after sending this many


@dataclass
class HubStats:
    """Counters, plus bounded samples of the latest fetches and refused hellos."""

    chunks_sent: int = 0
    bytes_sent: int = 0
    chunks_corrupted: int = 0
    fetches: collections.deque = field(default_factory=lambda: collections.deque(maxlen=FETCHES_KEPT))
    fetch_count: int = 0
    refused_hellos: collections.deque = field(default_factory=lambda: collections.deque(maxlen=REFUSED_KEPT))
    reports: int = 0
    reports_ignored: int = 0   # acked but not stored: a pack not published to that station
    errors: collections.Counter = field(default_factory=collections.Counter)  # error code -> replies
    internal: int = 0          # messages that hit a hub bug (answered "internal", loop kept going)
    dropped: int = 0           # messages not answered (unknown sender, failed send)
    reloads: int = 0
    reload_errors: int = 0
    sample_chunks: int = 0     # sample_chunk messages answered with a sample_ack
    samples_done: int = 0      # acked done: stored now, or already stored (dedup)
    samples_refused: int = 0
    sample_store_errors: int = 0   # the store's disk failed (answered retry_s; the station keeps the sample)


class Hub:
    """One hub: `start()` runs it in a thread (tests), `serve(stop_event)` in the caller's.

    `trusted` overrides the config's trusted_keys_dir (the signers packs must be signed by)."""

    def __init__(self, config: HubConfig, faults: HubFaults | None = None, *,
                 trusted: TrustedKeys | None = None):
        self.config = config
        self.faults = faults or HubFaults()
        self.stats = HubStats()
        self.stopped_by_fault = False
        self.ready = threading.Event()
        self.unservable: dict[str, str] = {}   # pack name -> why the hub does not serve it
        self._checked: dict = {}               # scan_packs' verdict cache
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._rescan = False                   # a served file went bad: rescan and push
        self._thread: threading.Thread | None = None
        self._rng = random.Random(self.faults.seed)
        self._trusted_override = trusted
        self._peers: dict[str, bytes] = {}   # station id -> ROUTER identity of its latest DEALER
        self._samples: SampleStore | None = None   # opened by the thread that first receives a sample
        self._apply(config)
        self._public = load_curve_public(config.public_key_file)
        self._secret = load_curve_secret(config.secret_key_file)
        self._config_stamp = self._stamp()

    def _apply(self, config: HubConfig) -> None:
        """Take the allow-list, groups and trusted keys of `config` (ConfigError if bad)."""
        allowed = config.allowed_keys()
        trusted = self._trusted_override
        if trusted is None and config.trusted_keys_dir is not None:
            trusted = TrustedKeys.from_dir(config.trusted_keys_dir)
        if trusted is None:
            log.warning("%s: no trusted_keys_dir: packs are served without a signature check "
                        "(stations still verify them)", config.source)
        self._allowed, self._trusted = allowed, trusted
        self._groups = {s.id: list(s.groups) for s in config.stations}
        self.config = config
        self._sample_limits = SampleLimits(config.samples_max_sample_bytes, config.samples_max_total_bytes,
                                           config.samples_max_partial_per_station)
        if self._samples is not None:
            self._samples.limits = self._sample_limits   # hub.toml reloads apply; samples_dir needs a restart

    def request_reload(self) -> None:
        """Re-read hub.toml (allow-list, groups, trusted keys) at the loop's next turn (SIGHUP)."""
        self._reload.set()

    def _stamp(self):
        try:
            st = os.stat(self.config.source)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

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
            self._refresh(db)
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
            if self._samples is not None:
                self._samples.close()
                self._samples = None
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
            sock.maxmsgsize = self.config.max_message_bytes  # per frame; decode checks the sum
        sock.bind(endpoint)
        return sock

    def _refresh(self, db: HubDB) -> None:
        """(Re)scan packs_dir: register new files, verify signatures, list what can't be served."""
        skipped: dict[str, str] = {}
        scan_packs(db, self.config.packs_dir, skipped=skipped, trusted=self._trusted, checked=self._checked)
        for name, reason in skipped.items():
            if self.unservable.get(name) != reason:
                log.warning("hub: not serving %s: %s", name, reason)
        self.unservable = skipped

    # ------------------------------------------------------------ loop

    def _loop(self, stop: threading.Event, db: HubDB, router: zmq.Socket, pub: zmq.Socket) -> None:
        revision = db.revision()
        next_revision_check = next_config_check = time.monotonic()
        while not stop.is_set() and not self.stopped_by_fault:
            if router.poll(50, zmq.POLLIN):
                for _ in range(256):
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(db, router, frames)
                    del frames
                    if self.stopped_by_fault:
                        return
            now = time.monotonic()
            if now >= next_config_check:
                next_config_check = now + CONFIG_POLL_S
                stamp = self._stamp()
                if stamp != self._config_stamp:
                    self._config_stamp = stamp
                    self._reload.set()
            if self._reload.is_set():
                self._reload.clear()
                self._guarded("reload", self._reload_config, db, router, pub)
            if now >= next_revision_check:
                next_revision_check = now + REVISION_POLL_S
                revision = self._guarded("revision check", self._check_revision, db, router, pub, revision)

    def _check_revision(self, db: HubDB, router: zmq.Socket, pub: zmq.Socket, revision: int) -> int:
        """A publish (another process) bumped the DB revision, or a file went bad: rescan and push."""
        current = db.revision()
        if current != revision or self._rescan:
            self._rescan = False
            self._guarded("rescan", self._refresh, db)
            self._guarded("push", self._push_desired, db, router, pub)
        return current

    def _guarded(self, what: str, func, *args):
        """Housekeeping of the loop: a failure is logged and counted, the hub keeps serving.

        Returns func's result, or its last argument when it failed (e.g. the old revision)."""
        try:
            return func(*args)
        except Exception:
            self.stats.internal += 1
            log.exception("hub: %s failed; still serving", what)
            return args[-1] if args else None

    def _reload_config(self, db: HubDB, router: zmq.Socket, pub: zmq.Socket) -> None:
        try:
            config = load_hub_config(self.config.source)
            if (config.bind, config.pub_bind) != (self.config.bind, self.config.pub_bind):
                log.warning("hub: bind / pub_bind changes in %s need a restart", config.source)
            self._apply(config)
        except (KaizenError, OSError) as err:
            self.stats.reload_errors += 1
            log.error("hub: %s not reloaded, the previous allow-list stays: %s", self.config.source, err)
            return
        self.auth.set_allowed(self._allowed)
        self._checked.clear()   # trusted keys may have changed: verify every pack again
        self._refresh(db)
        self.stats.reloads += 1
        log.info("hub: reloaded %s: %d allow-listed stations", self.config.source, len(self._allowed))
        self._push_desired(db, router, pub)

    def _desired(self, db: HubDB, station_id: str) -> dict:
        """The desired_state body for a station: packs (with rollback marks) and removed tasks."""
        return db.desired_state(station_id, self._groups.get(station_id, []), self.unservable)

    def _push_desired(self, db: HubDB, router: zmq.Socket, pub: zmq.Socket) -> None:
        """A publication changed: tell connected stations now, and hint everyone over PUB.

        The announce carries no pack list: PUB reaches every station, and a station may only
        learn about packs published to it (from its own desired_state)."""
        for sid, identity in list(self._peers.items()):
            if sid in self._groups:
                router.send_multipart([identity, *Message("desired_state", self._desired(db, sid)).encode()],
                                      zmq.NOBLOCK)
        pub.send_multipart(Message("announce", {"packs": []}).encode(), zmq.NOBLOCK)

    def _handle(self, db: HubDB, router: zmq.Socket, frames: list) -> None:
        """Answer one message; any failure becomes a typed error reply or a counted drop."""
        try:
            identity = frames[0].bytes
            station_id = frames[1].get("User-Id") if len(frames) > 1 else None
        except zmq.ZMQError:   # no ZAP user id property: never serve an unauthenticated peer
            station_id = None
        if not station_id or station_id not in self._groups:
            # no ZAP user id cannot happen behind ZAP; an id gone from a reloaded allow-list can
            self.stats.dropped += 1
            return

        def send(msg: Message) -> None:
            if msg.msg_type == "error":
                self.stats.errors[msg.body["error"]] += 1
            router.send_multipart([identity, *msg.encode()], zmq.NOBLOCK)

        msg = None
        try:
            try:
                msg = decode(frames[1:], max_bytes=self.config.max_message_bytes, allowed_types=HUB_TYPES)
            except WireError as err:
                send(error_reply(err.msg_id, err.code, err.detail))
                return
            self._dispatch(db, station_id, identity, msg, send)
        except Exception as err:
            self.stats.internal += 1
            log.exception("hub: unexpected error answering %s from %s", msg.msg_type if msg else "a message",
                          station_id)
            try:
                send(error_reply(msg, "internal", f"{type(err).__name__}: {err}"))
            except Exception:  # noqa: BLE001
                self.stats.dropped += 1

    def _dispatch(self, db: HubDB, station_id: str, identity: bytes, msg: Message, send) -> None:
        b = msg.body
        if msg.msg_type in ("hello", "heartbeat") and b["station_id"] != station_id:
            self.stats.refused_hellos.append((station_id, b["station_id"][:MAX_ID_CHARS]))
            send(error_reply(msg, "identity_mismatch", f"this CURVE key belongs to station {station_id!r}, "
                             f"not {b['station_id'][:MAX_ID_CHARS]!r}: fix station_id or the key files"))
            return
        self._peers[station_id] = identity
        if msg.msg_type in ("hello", "heartbeat"):
            hello = msg.msg_type == "hello"
            db.record_seen(station_id, hello=hello, installed=b["installed"],
                           serving=b.get("serving") if isinstance(b.get("serving"), bool) else None,
                           base_fingerprint=b["base_fingerprint"][:MAX_ID_CHARS] if hello else None,
                           runtime_version=b["runtime_version"][:MAX_ID_CHARS] if hello else None)
            send(ok_reply(msg, self._desired(db, station_id), msg_type="desired_state"))
        elif msg.msg_type == "fetch":
            self._serve_fetch(db, station_id, msg, send)
        elif msg.msg_type == "sample_chunk":
            self._receive_sample(station_id, msg, send)
        elif msg.msg_type == "report":
            rec = db.pack(b["name"])
            if rec is None or rec.name not in db.published_to(station_id, self._groups[station_id]):
                self.stats.reports_ignored += 1   # acked so the station's outbox forgets it
            else:
                db.record_report(station_id, rec.name, rec.task_id, rec.version, b["state"], b["reason"] or "")
                self.stats.reports += 1
                if hold_on_report(db, station_id, rec.name, b["state"], b["reason"] or ""):
                    log.warning("hub: rollout of %s held: canary %s rejected it: %s", rec.name, station_id,
                                b["reason"])
            send(ok_reply(msg, {"acked_msg_id": msg.msg_id}, msg_type="ack"))

    def _serve_fetch(self, db: HubDB, station_id: str, msg: Message, send) -> None:
        b = msg.body
        rec = db.pack(b["name"])
        if rec is None or rec.sha256 != b["sha256"] or rec.name in self.unservable or \
                rec.name not in db.published_to(station_id, self._groups[station_id]):
            send(error_reply(msg, "unknown_pack", f"no pack {b['name'][:200]!r} with sha256 {b['sha256'][:12]}... "
                             "published to this station: reconcile against the latest desired_state"))
            return
        if b["offset"] > rec.size:
            send(error_reply(msg, "bad_body", f"fetch offset {b['offset']} is past the end ({rec.size})"))
            return
        self.stats.fetches.append((station_id, rec.name, b["offset"], b["credit"]))
        self.stats.fetch_count += 1
        chunk = self.config.chunk_size
        end = min(rec.size, b["offset"] + min(b["credit"], chunk * self.config.max_credit))
        try:
            f = open(rec.path, "rb")  # noqa: SIM115 (closed by the `with f:` below; open errors answered here)
        except OSError as err:
            self._unavailable(rec.name, f"cannot open {rec.path}: {err.strerror or err}")
            send(error_reply(msg, "unknown_pack", f"pack {rec.name} cannot be served by the hub right now"))
            return
        with f:
            f.seek(b["offset"])
            for offset in range(b["offset"], end, chunk):
                data = f.read(min(chunk, end - offset))
                if len(data) != min(chunk, end - offset):
                    self._unavailable(rec.name, f"{rec.path} is shorter than its catalogued {rec.size} bytes")
                    send(error_reply(msg, "unknown_pack", f"pack {rec.name} cannot be served by the hub right now"))
                    return
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

    def _receive_sample(self, station_id: str, msg: Message, send) -> None:
        """One chunk of a captured part: store it (hub/samples.py) and answer with what the hub holds."""
        data = msg.buffers["data"]
        if not isinstance(data, bytes):
            send(error_reply(msg, "bad_buffer", "sample_chunk buffer 'data' must be raw bytes (kind: bytes), "
                             "not an array"))
            return
        c = self.config
        try:
            if self._samples is None:
                self._samples = SampleStore(c.samples_dir, self._sample_limits)
            ack = self._samples.receive(station_id, msg.body, data)
        except (OSError, sqlite3.Error) as err:   # the hub's disk, not the sample: the station keeps it, retries later
            self.stats.sample_store_errors += 1
            log.error("hub: cannot store samples in %s (%s: %s); stations keep theirs and retry in %.0f s",
                      c.samples_dir, type(err).__name__, err, STORE_ERROR_RETRY_S)
            send(ok_reply(msg, {"sample_id": msg.body["sample_id"][:64], "offset": 0, "done": False,
                                "retry_s": STORE_ERROR_RETRY_S}, msg_type="sample_ack"))
            return
        self.stats.sample_chunks += 1
        if ack["done"]:
            if "refused" in ack:
                self.stats.samples_refused += 1
            else:
                self.stats.samples_done += 1
        send(ok_reply(msg, ack, msg_type="sample_ack"))

    def _unavailable(self, name: str, reason: str) -> None:
        """A catalogued file went missing or short: stop offering it (logged), keep serving."""
        log.error("hub: not serving %s: %s", name, reason)
        self.unservable[name] = reason
        self._checked.clear()   # the rescan looks at the file again
        self._rescan = True     # ...and pushes desired states without it

    def _maybe_corrupt(self, data: bytes) -> bytes:
        if self.faults.corrupt_fraction <= 0 or not data or self._rng.random() >= self.faults.corrupt_fraction:
            return data
        buf = bytearray(data)
        buf[self._rng.randrange(len(buf))] ^= 0xFF
        self.stats.chunks_corrupted += 1
        return bytes(buf)
