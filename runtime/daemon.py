"""The station daemon: the fleet link to the hub, next to the inference endpoint.

    daemon = StationDaemon(FleetLink.from_config(cfg, fingerprint), station).start()

(`kaizen station serve`, runtime/station_serve.py, runs it next to the inference endpoint.) A DEALER (CURVE client, own key pair + the hub's public key) says hello on every (re)connect and
heartbeats every `heartbeat_s`; every desired_state reply is reconciled against what the
installer has: each missing pack is pulled with credit (runtime/fetcher.py: staging file,
per-chunk sha256, fsync'd offset, resume), checked whole, installed through the installer
(a Station or a bare PackStore: anything with `install(path)` and `installed()`), and reported
received -> verified -> activated, or rejected(reason). Reports wait in a disk outbox
(runtime/outbox.py) until the hub acks them. A silent hub (no reply for `hub_timeout_s`) gets
the connection reopened with backoff; with no hub at all the station keeps serving from its
local store, and the inference endpoint runs in its own thread, so the fleet loop never
blocks inference. Tests drive `StationDaemon` directly (`start()` / `stop()` / `disconnect()`).

Isolation: an exception while handling one message or one pack never ends the loop. A pack that
fails is reported rejected(reason) once and not fetched again; a full disk (ENOSPC/EDQUOT) is
reported `rejected: disk full ...` and retried with backoff (the partial download is kept),
while the station keeps serving from its store. Trusted keys are reloaded without a restart when
the files in `link.trusted_keys_dir` change (or on reload_keys(), e.g. from SIGHUP).

Captured parts (`capture=` a runtime/capture.py CaptureQueue) are uploaded by runtime/uploader.py
once the hub has answered on the current connection; its sample_ack and error replies go there.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from . import RUNTIME_VERSION
from .daemon_packs import PackOutcomes
from .daemon_state import (
    DaemonMemory,
    DaemonStats,
    FleetLink,
    installed_of,
    keys_folder_state,
)
from .errors import KaizenError
from .fetcher import Transfer
from .keys import TrustedKeys
from .outbox import Outbox
from .protocol import Message, WireError, decode
from .tarsafe import DEFAULT_LIMITS
from .uploader import Uploader

log = logging.getLogger("kaizen.daemon")

STATION_TYPES = frozenset({"desired_state", "chunk", "ack", "error", "announce", "sample_ack"})
PACK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.kpk$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_SHA_FAILURES = 3
RESUMES_KEPT = 1000                       # DaemonStats.resumed_from keeps the latest
KEYS_CHECK_S = 1.0                        # how often the trusted keys folder is looked at
MAX_PACK_BYTES = DEFAULT_LIMITS.max_total_bytes + 2 * 512 * (DEFAULT_LIMITS.max_members + 16)  # as read_pack


class StationDaemon(PackOutcomes):
    """The fleet loop of one station. Owns its sockets; run it in one thread."""

    def __init__(self, link: FleetLink, installer, *, keep_downloads: bool = False,
                 serving: Callable[[], bool] = lambda: True, capture=None, upload_kwargs: dict | None = None):
        self.link = link
        self.installer = installer
        self.keep_downloads = keep_downloads
        self.serving = serving
        self.stats = DaemonStats()
        self.state_dir = Path(link.state_dir)
        self.downloads = self.state_dir / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(self.state_dir / "outbox")
        self.memory = DaemonMemory(self.state_dir / "fleet_state.json")
        self.desired: list[dict] = []
        self.removed: list[str] = []            # tasks the hub unpublished altogether
        self.transfer: Transfer | None = None
        self._sha_failures: dict[str, int] = {}
        self._fetch_ids: dict[str, str] = {}   # fetch msg_id -> pack name
        self._retry_at: dict[str, float] = {}   # sha256 -> monotonic time before which it is not fetched
        self._io_failures: dict[str, int] = {}  # sha256 -> I/O failures in a row
        self._reload_keys = threading.Event()
        folder = link.trusted_keys_dir            # (observed, applied) state of the trusted keys folder
        self._keys_seen = None if folder is None else (keys_folder_state(folder),) * 2
        self._next_keys_check = 0.0
        self._stop = threading.Event()
        self._disconnect = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._dealer: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self.uploader = None if capture is None else Uploader(capture, **{"resend_s": link.resend_s,
                                                                          **(upload_kwargs or {})})
        self._heard = False   # a message from the hub on the current DEALER: uploads may start

    # ------------------------------------------------------------ lifecycle

    def start(self) -> StationDaemon:
        self._thread = threading.Thread(target=self.run, args=(self._stop,), daemon=True,
                                        name=f"daemon-{self.link.station_id}")
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "daemon thread did not stop"

    def disconnect(self) -> None:
        """Close and reopen the DEALER at the loop's next turn (fault tests)."""
        self._disconnect.set()

    def reload_keys(self) -> None:
        """Reload the trusted keys at the loop's next turn (SIGHUP handler, tests)."""
        self._reload_keys.set()

    def run(self, stop: threading.Event) -> None:
        self._ctx = zmq.Context()
        try:
            self._open()
            self._loop(stop)
        finally:
            self._close()
            if self.transfer is not None:
                self.transfer.close()
            self._ctx.term()

    def _curve(self, sock: zmq.Socket) -> None:
        sock.linger = 0
        sock.curve_secretkey = self.link.secret_key
        sock.curve_publickey = self.link.public_key
        sock.curve_serverkey = self.link.hub_public_key

    def _open(self) -> None:
        assert self._ctx is not None
        dealer = self._ctx.socket(zmq.DEALER)
        self._curve(dealer)
        dealer.reconnect_ivl = 100
        dealer.reconnect_ivl_max = 2000
        dealer.connect(self.link.hub_endpoint)
        self._dealer = dealer
        if self.link.announce_endpoint and self._sub is None:
            sub = self._ctx.socket(zmq.SUB)
            self._curve(sub)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(self.link.announce_endpoint)
            self._sub = sub
        now = time.monotonic()
        self._last_rx = now
        self._next_heartbeat = now + self.link.heartbeat_s
        self._send(Message("hello", {"station_id": self.link.station_id,
                                     "base_fingerprint": self.link.base_fingerprint or "unknown",
                                     "runtime_version": RUNTIME_VERSION, "installed": self._installed()}))
        self.outbox.reset_timers()
        if self.transfer is not None:
            self.transfer.restart_window()
        self._heard = False
        if self.uploader is not None:
            self.uploader.reset()

    def _close(self) -> None:
        for sock in (self._dealer, self._sub):
            if sock is not None:
                sock.close(linger=0)
        self._dealer = self._sub = None

    def _reopen(self) -> None:
        self.stats.reconnects += 1
        if self._dealer is not None:
            self._dealer.close(linger=0)
        self._open()

    # ------------------------------------------------------------ loop

    def _loop(self, stop: threading.Event) -> None:
        backoff = [1]
        while not stop.is_set():
            try:
                self._turn(backoff)
            except Exception:  # the last line: one bad turn is logged and counted, the loop goes on
                self.stats.loop_errors += 1
                log.exception("%s: error in the fleet loop (counted, loop continues)", self.link.station_id)
                stop.wait(0.05)

    def _turn(self, backoff: list[int]) -> None:
        """One turn of the loop: poll and receive, timeouts, keys, heartbeat, resends, transfer."""
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        if self._sub is not None:
            poller.register(self._sub, zmq.POLLIN)
        ready = dict(poller.poll(50))
        if self._dealer in ready:
            backoff[0] = 1
            self._drain(self._dealer)
        if self._sub is not None and self._sub in ready:
            self._drain(self._sub)
        now = time.monotonic()
        if self._disconnect.is_set():
            self._disconnect.clear()
            self._reopen()
        elif now - self._last_rx > self.link.hub_timeout_s * backoff[0]:
            self.stats.hub_timeouts += 1
            backoff[0] = min(backoff[0] * 2, 8)
            self._reopen()
        self._check_keys(now)
        if now >= self._next_heartbeat:
            self._heartbeat(now)
        for msg_id, body in self.outbox.due(now, self.link.resend_s):
            self._send(Message("report", body, msg_id=msg_id))
        t = self.transfer
        if t is not None:
            try:
                self._pump_transfer()
            except Exception as err:  # noqa: BLE001 - the pack fails, not the daemon
                self._pack_failed(t.entry, err, t)
        if self.uploader is not None and self._heard:
            self.uploader.pump(now, self._send)

    def _check_keys(self, now: float) -> None:
        """Apply the trusted keys folder when its files changed (seen the same twice, so a key
        being copied in is not read half-written) or when reload_keys() asked for it."""
        folder = self.link.trusted_keys_dir
        forced = self._reload_keys.is_set()
        if folder is None or (now < self._next_keys_check and not forced):
            return
        self._next_keys_check = now + KEYS_CHECK_S
        state = keys_folder_state(folder)
        observed, applied = self._keys_seen
        self._keys_seen = (state, applied)
        if not forced and (state == applied or state != observed):
            return
        self._reload_keys.clear()
        reload = getattr(self.installer, "reload_keys", None)
        if not callable(reload):
            return
        try:
            moved = reload(TrustedKeys.from_dir(folder))
        except KaizenError as err:  # e.g. no key left or a bad .pub: keep the keys in use, say why
            self._keys_seen = (state, state)  # said once; the next change of the folder tries again
            log.error("%s: trusted keys in %s not reloaded, still using the previous ones: %s",
                      self.link.station_id, folder, err)
            return
        self._keys_seen = (state, state)
        self.stats.keys_reloads += 1
        log.info("%s: trusted keys reloaded from %s: %s", self.link.station_id, folder, moved)
        self._next_heartbeat = now  # tell the hub what is installed now

    def _heartbeat(self, now: float) -> None:
        self._next_heartbeat = now + self.link.heartbeat_s
        self._send(Message("heartbeat", {"station_id": self.link.station_id,
                                         "installed": self._installed(), "serving": bool(self.serving())}))

    def _send(self, msg: Message) -> None:
        try:
            self._dealer.send_multipart(msg.encode(), zmq.NOBLOCK)
        except zmq.Again:
            pass  # queue full while the hub is away: heartbeats, resends and timeouts retry

    def _drain(self, sock: zmq.Socket) -> None:
        for _ in range(512):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if sock is self._dealer:
                self._last_rx = time.monotonic()
                self._heard = True
            try:
                msg = decode(frames, allowed_types=STATION_TYPES)
            except WireError as err:
                self.stats.dropped += 1
                log.warning("%s: dropped a bad message from the hub: %s", self.link.station_id, err)
                continue
            t = self.transfer
            try:
                self._on_message(msg)
            except Exception as err:  # noqa: BLE001 - one message never ends the loop
                if msg.msg_type == "chunk" and t is not None and self.transfer is t:
                    self._pack_failed(t.entry, err, t)
                else:
                    self.stats.dropped += 1
                    log.warning("%s: dropped a %s message that failed: %s: %s", self.link.station_id,
                                msg.msg_type, type(err).__name__, err)

    def _on_message(self, msg: Message) -> None:
        kind, body = msg.msg_type, msg.body
        if kind == "desired_state":
            self.desired = [p for p in body["packs"] if PACK_NAME_RE.match(p["name"]) and SHA_RE.match(p["sha256"])]
            if len(self.desired) != len(body["packs"]):
                log.warning("%s: ignored desired packs with an unsafe name or a bad sha256", self.link.station_id)
            removed = body.get("removed", [])   # optional: tasks the hub unpublished altogether
            self.removed = [t for t in removed if isinstance(t, str)] if isinstance(removed, list) else []
            self._reconcile()
        elif kind == "chunk":
            t = self.transfer
            if t is not None and body["name"] == t.name:
                result = t.on_chunk(body["offset"], msg.buffers["data"], body["sha256_chunk"], body["total_size"])
                self.stats.chunks[result] += 1
                if result == "ok":
                    self.stats.bytes_received += len(msg.buffers["data"])
        elif kind == "ack":
            self.outbox.ack(body["acked_msg_id"])
        elif kind == "announce":
            self._next_heartbeat = time.monotonic()  # a hint: ask for desired_state now
        elif kind == "sample_ack" and self.uploader is not None:
            self.uploader.on_ack(body, msg.reply_to)
        elif kind == "error" and self.uploader is not None and self.uploader.on_error(body["error"], msg.reply_to):
            return
        elif kind == "error":
            name = self._fetch_ids.get(msg.reply_to or "")
            log.warning("%s: hub error %s: %s", self.link.station_id, body["error"], body["detail"])
            if name is not None and self.transfer is not None and self.transfer.name == name:
                self.transfer.close()
                self.transfer = None  # the next desired_state decides again

    # ------------------------------------------------------------ reconcile and deliver

    def _installed(self) -> list[dict]:
        return installed_of(self.installer)

    def _reconcile(self) -> None:
        have = {(i["task_id"], i["version"]) for i in self._installed()}
        self._remove_unpublished(have)
        todo = []
        now = time.monotonic()
        for p in self.desired:
            sha, key = p["sha256"], (p["task_id"], p["version"])
            if sha in self.memory.skip or self._retry_at.get(sha, 0.0) > now:
                continue
            if key in have:
                if sha not in self.memory.activated:
                    self._report(p, "activated", "already installed")
                    self.memory.mark_activated(sha, p["name"], p["task_id"])
                continue
            newer = [v for t, v in have if t == p["task_id"] and v > p["version"]]
            if p.get("rollback") is True and newer:
                self._hub_rollback(p, newer[0])
                continue
            if sha in self.memory.activated and any(t == p["task_id"] and v < p["version"] for t, v in have):
                self._report(p, "rolled_back", "rolled back on the station")
                self.memory.mark_skip(sha, "rolled back on the station")
                continue
            if sha in self.memory.activated:
                continue  # this exact file was activated here already: never fetch it again
            size = int(p["size"])
            if not 0 < size <= MAX_PACK_BYTES:
                self._reject_for_good(p, f"pack {p['name']} refused: {'empty' if size <= 0 else 'too large'} "
                                         f"({size} bytes announced, a pack is 1..{MAX_PACK_BYTES} bytes); not fetched")
                continue
            todo.append(p)
        wanted = {p["sha256"] for p in todo}
        if self.transfer is not None and self.transfer.sha256 not in wanted:
            self.transfer.close()  # not desired any more: keep its staging file for later
            self.transfer = None
        if self.transfer is None and todo:
            try:
                self.transfer = Transfer(self.downloads, todo[0], window=self.link.credit * self.link.chunk_bytes,
                                         timeout=self.link.chunk_timeout_s)
            except Exception as err:  # noqa: BLE001 - e.g. no space for the staging file
                self._pack_failed(todo[0], err, None)
                return
            self.stats.resumed_from.append((self.transfer.name, self.transfer.offset))
            del self.stats.resumed_from[:-RESUMES_KEPT]  # bounded: the latest ones

    def _pump_transfer(self) -> None:
        t = self.transfer
        if t is None:
            return
        for offset, credit in t.requests():
            msg = Message("fetch", {"name": t.name, "sha256": t.sha256, "offset": offset, "credit": credit})
            self._fetch_ids[msg.msg_id] = t.name
            if len(self._fetch_ids) > 4096:
                self._fetch_ids.pop(next(iter(self._fetch_ids)))
            self._send(msg)
        if t.complete:
            self._finish(t)

    def _finish(self, t: Transfer) -> None:
        entry = t.entry
        path = t.finalize()
        if path is None:
            fails = self._sha_failures[t.sha256] = self._sha_failures.get(t.sha256, 0) + 1
            if fails >= MAX_SHA_FAILURES:
                self._reject(t, entry, f"whole-file sha256 mismatch after {fails} downloads")
            return
        self.transfer = None
        self.install_download(entry, path)
        self._reconcile()

    def _report(self, entry: dict, state: str, reason: str | None) -> None:
        if reason is not None:   # valid Unicode, bounded, no object reprs: the hub refuses a lone surrogate
            from .wire_json import clean_detail

            reason = clean_detail(reason)
        body = {"name": entry["name"], "task_id": entry["task_id"], "version": entry["version"],
                "state": state, "reason": reason}
        try:
            msg_id = self.outbox.add(body)
        except OSError as err:  # a full disk: send it once, unpersisted, rather than not at all
            log.warning("%s: report not persisted (%s); sent once", self.link.station_id, err.strerror or err)
            self._send(Message("report", body))
        else:
            self._send(Message("report", body, msg_id=msg_id))
            self.outbox.mark_sent(msg_id)
        log.info("%s: %s %s%s", self.link.station_id, entry["name"], state, f" ({reason})" if reason else "")
