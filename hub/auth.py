"""ZAP authentication for the hub: only allow-listed station CURVE keys may connect.

libzmq asks the ZAP handler bound at inproc://zeromq.zap.01 (in the socket's context) about
every CURVE handshake. This handler accepts a client public key only if it is in the allow
list and answers with the station id as ZAP user id, so every message the hub's ROUTER
receives carries the sender's authenticated station id in its "User-Id" frame property:

    auth = ZapHandler(ctx, {b"<z85 public key>": "line1/s01"})
    auth.start()                     # before the ROUTER binds
    ...                              # frame.get("User-Id") == "line1/s01"
    auth.stop()

A refused station gets no connection at all: no reply, and nothing reaches the hub's loop.
Refusals are counted; only the last DENIED_KEPT are kept (anyone can try a handshake, so the
record must not grow). `set_allowed` swaps the allow-list in one assignment (config reload).
"""

from __future__ import annotations

import collections
import threading

import zmq
from zmq.utils import z85

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
DENIED_KEPT = 100


class ZapHandler:
    """A small ZAP handler thread: CURVE key -> station id, everything else refused."""

    def __init__(self, ctx: zmq.Context, allowed: dict[bytes, str]):
        self.ctx = ctx
        self.allowed = dict(allowed)
        # (peer address, z85 key) of the latest refused handshakes; denied_count counts them all
        self.denied: collections.deque = collections.deque(maxlen=DENIED_KEPT)
        self.denied_count = 0
        self.accepted = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket | None = None

    def set_allowed(self, allowed: dict[bytes, str]) -> None:
        """Replace the allow-list (new handshakes only; the hub drops messages of removed ids)."""
        self.allowed = dict(allowed)

    def start(self) -> None:
        # Bind in the caller's thread so the handler exists before any server socket binds.
        self._sock = self.ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="hub-zap", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "ZAP thread did not stop"

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while not self._stop.is_set():
                if sock.poll(100, zmq.POLLIN):
                    frames = sock.recv_multipart()
                    try:
                        reply = self._answer(frames)
                    except Exception:  # noqa: BLE001 - a ZAP thread that dies locks every station out
                        request_id = frames[1] if len(frames) > 1 else b""
                        reply = [ZAP_VERSION, request_id, b"500", b"internal error", b"", b""]
                    sock.send_multipart(reply)
        finally:
            sock.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [ZAP_VERSION, b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        creds = frames[6:]
        if version != ZAP_VERSION:
            return [ZAP_VERSION, request_id, b"500", b"unsupported ZAP version", b"", b""]
        if mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            return [version, request_id, b"400", b"CURVE required", b"", b""]
        key = z85.encode(creds[0])
        station_id = self.allowed.get(key)
        if station_id is None:
            self.denied.append((address[:64].decode(errors="replace"), key.decode()))
            self.denied_count += 1
            return [version, request_id, b"400", b"key not allow-listed", b"", b""]
        self.accepted += 1
        return [version, request_id, b"200", b"OK", station_id.encode(), b""]
