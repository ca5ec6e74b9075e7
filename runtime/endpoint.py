"""The station's local inference endpoint: a ZeroMQ ROUTER server, its client, a latency bench.

Protocol: runtime/PROTOCOL.md ("Inference link"). The server answers `infer_request` and
`status_request` for any backend with ``infer(image, instruction, task=None) -> dict`` and
``status() -> dict`` (the real one is kaizen.runtime.station.Station). Every bad request gets
an `error` reply and the server keeps serving. Requests are answered one at a time, in
arrival order, by one thread (the backend is the bottleneck; clients may be many).

    with InferenceServer(station, "ipc:///run/kaizen/infer.sock") as server:
        with InferenceClient(server.endpoint, timeout_ms=5000) as client:
            print(client.infer(Path("part.png"), "is the part scratched?"))
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from .errors import ConfigError, InputError, KaizenError
from .protocol import MAX_MESSAGE_BYTES, Message, WireError, decode, error_reply, ok_reply, split_envelope

log = logging.getLogger(__name__)

SERVED_TYPES = frozenset({"infer_request", "status_request", "rollback_request"})
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
LATENCY_WINDOW = 1000  # successful infer requests kept for the percentiles


def check_local_endpoint(endpoint: str, allow_remote: bool = False) -> None:
    """Refuse endpoints other than ipc://, inproc:// and tcp:// on loopback (unless allowed)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("ipc", "inproc", "tcp") or not rest:
        raise ConfigError(f"inference endpoint {endpoint!r} must be ipc://PATH or "
                          "tcp://127.0.0.1:PORT")
    if scheme == "tcp":
        host = rest.rsplit(":", 1)[0]
        if host not in LOCAL_HOSTS and not allow_remote:
            raise ConfigError(f"inference endpoint {endpoint!r} binds host {host!r}: the "
                              "inference link has no authentication, so only loopback is "
                              "allowed; pass allow_remote=True to bind other hosts")


class _Stats:
    """Request/error counters and a window of infer latencies (thread-safe reads)."""

    def __init__(self, window: int):
        self.lock = threading.Lock()
        self.requests = 0
        self.errors: collections.Counter = collections.Counter()
        self.latencies = collections.deque(maxlen=window)

    def record(self, msg_type: str | None, reply: Message, seconds: float) -> None:
        with self.lock:
            self.requests += 1
            if reply.msg_type == "error":
                self.errors[reply.body["error"]] += 1
            elif msg_type == "infer_request":
                self.latencies.append(seconds * 1000.0)

    def snapshot(self) -> dict:
        with self.lock:
            lat = np.asarray(self.latencies, dtype=np.float64)
            pct = {f"p{q}": (round(float(np.percentile(lat, q)), 3) if lat.size else None)
                   for q in (50, 95, 99)}
            return {"requests": self.requests, "errors": sum(self.errors.values()),
                    "errors_by_code": dict(self.errors), "latency_ms": {**pct, "n": int(lat.size)}}


class InferenceServer:
    """A ROUTER on a local endpoint answering infer/status requests in a background thread."""

    def __init__(self, backend, endpoint: str, *, max_bytes: int = MAX_MESSAGE_BYTES,
                 context: zmq.Context | None = None, allow_remote: bool = False,
                 poll_ms: int = 100, latency_window: int = LATENCY_WINDOW):
        check_local_endpoint(endpoint, allow_remote)
        if max_bytes <= 0:
            raise ConfigError(f"max_bytes must be > 0, got {max_bytes}")
        self.backend = backend
        self.requested_endpoint = endpoint
        self.endpoint: str | None = None  # the bound endpoint (a real port for tcp://...:*)
        self.max_bytes = max_bytes
        self.poll_ms = poll_ms
        self.stats = _Stats(latency_window)
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket: zmq.Socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> InferenceServer:
        """Bind (errors raise here, in the caller's thread) and start serving."""
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError("InferenceServer.start() called twice or after stop(): "
                               "make a new InferenceServer")
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * self.max_bytes)  # hard per-frame cap: disconnect
        try:
            sock.bind(self.requested_endpoint)
        except zmq.ZMQError as err:
            sock.close(0)
            raise ConfigError(f"cannot bind inference endpoint {self.requested_endpoint!r}: "
                              f"{err}") from err
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._socket = sock  # handed to the thread; the thread start is the memory barrier
        self._thread = threading.Thread(target=self._serve, name="kaizen-infer", daemon=True)
        self._thread.start()
        log.info("inference endpoint serving on %s", self.endpoint)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket (and the context if it is ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"inference endpoint thread did not stop in {timeout} s")
            self._thread = None
        if self._own_context and not self._context.closed:
            self._context.term()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self) -> None:
        sock = self._socket
        try:
            while not self._stop.is_set():
                if not sock.poll(self.poll_ms, zmq.POLLIN):
                    continue
                frames = sock.recv_multipart(copy=False)
                envelope, payload = split_envelope(frames)
                reply_frames = self.handle(payload)
                try:
                    sock.send_multipart([*envelope, *reply_frames], flags=zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("dropped a reply: peer %r is gone or not reading", envelope)
        finally:
            sock.close(0)

    def handle(self, payload: list) -> list[bytes]:
        """Answer one request's frames (envelope removed) with the reply's frames."""
        started = time.perf_counter()
        request = None
        try:
            try:
                request = decode(payload, max_bytes=self.max_bytes, allowed_types=SERVED_TYPES)
            except WireError as err:
                reply = error_reply(err.msg_id, err.code, err.detail)
            else:
                reply = self._dispatch(request)
            frames = reply.encode()
        except Exception as err:
            # The one broad catch: whatever a backend does wrong (a bug, a result that is not
            # JSON), the endpoint must answer and keep serving the line. Logged with traceback.
            log.exception("inference endpoint: unexpected error answering %s",
                          request.msg_type if request else "a request")
            reply = error_reply(request, "internal", f"{type(err).__name__}: {err}")
            frames = reply.encode()
        self.stats.record(request.msg_type if request else None, reply,
                          time.perf_counter() - started)
        return frames

    def _rollback(self, request: Message) -> Message:
        return _rollback_of(self.backend, request)

    def _dispatch(self, request: Message) -> Message:
        if request.msg_type == "status_request":
            return ok_reply(request, {"station": self.backend.status(),
                                      "endpoint": self.stats.snapshot()})
        if request.msg_type == "rollback_request":
            return self._rollback(request)
        try:
            image, instruction, task = _infer_args(request)
            result = self.backend.infer(image, instruction, task=task)
        except InputError as err:
            return error_reply(request, "bad_input", str(err))
        except WireError as err:
            return error_reply(request, err.code, err.detail)
        except KaizenError as err:
            return error_reply(request, type(err).__name__, str(err))
        if not isinstance(result, dict):
            raise TypeError(f"backend.infer returned {type(result).__name__}, not a dict")
        return ok_reply(request, {k: v for k, v in result.items() if k != "status"})


def _rollback_of(backend, request: Message) -> Message:
    """rollback_request -> backend.rollback(task_id); PackError (no previous version) -> error reply."""
    if not hasattr(backend, "rollback"):
        return error_reply(request, "unsupported_type", "this backend cannot roll packs back")
    try:
        manifest = backend.rollback(request.body["task_id"])
    except KaizenError as err:
        return error_reply(request, type(err).__name__, str(err))
    return ok_reply(request, {"task_id": manifest.task_id, "version": manifest.version})


def _infer_args(request: Message):
    """(image, instruction, task) from an infer_request; InputError/WireError when unusable."""
    body = request.body
    instruction = body["instruction"]
    if not instruction.strip():
        raise InputError("infer_request instruction is empty: send the question to answer")
    task = body.get("task")
    if task is not None and not isinstance(task, str):
        raise WireError("bad_body", f"infer_request task must be a string or null, got {task!r}")
    image = request.buffers["image"]
    if body["image_format"] == "encoded":
        if not isinstance(image, bytes) or not image:
            raise InputError("infer_request image_format 'encoded' needs buffer 'image' as "
                             "non-empty bytes of a PNG/JPEG file")
    elif not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3 or 0 in image.shape:
        desc = (f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray)
                else "bytes")
        raise InputError(f"infer_request image_format 'array' needs buffer 'image' as uint8 "
                         f"[H, W, 3] (RGB), got {desc}")
    return image, instruction, task


class InferenceClient:
    """A DEALER client: one request in flight, replies matched by reply_to, Lazy-Pirate reset
    of the socket after a timeout. Raises WireError (a ProtocolError) on error replies/timeouts."""

    def __init__(self, endpoint: str, timeout_ms: int = 5000, *,
                 max_bytes: int = MAX_MESSAGE_BYTES, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.max_bytes = max_bytes
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._lock = threading.Lock()
        self._socket = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        sock.connect(self.endpoint)
        return sock

    def _reset(self) -> None:
        """Drop the socket (and any queued request, so it can't be answered later); reconnect."""
        self._socket.close(0)
        self._socket = self._connect()

    def infer(self, image, instruction: str, task: str | None = None) -> dict:
        """image: PNG/JPEG bytes, a path to such a file, or a uint8 [H, W, 3] array."""
        if isinstance(image, (str, Path)):
            try:
                image = Path(image).read_bytes()
            except OSError as err:
                raise InputError(f"cannot read image file {image}: {err}") from err
        fmt = "array" if isinstance(image, np.ndarray) else "encoded"
        body = {"instruction": instruction, "image_format": fmt}
        if task is not None:
            body["task"] = task
        reply = self.request(Message("infer_request", body, {"image": image}))
        return {k: v for k, v in reply.body.items() if k != "status"}

    def rollback(self, task_id: str) -> dict:
        """Ask the station to return `task_id` to its previous pack: {"task_id", "version"}."""
        reply = self.request(Message("rollback_request", {"task_id": task_id}))
        return {k: v for k, v in reply.body.items() if k != "status"}

    def status(self) -> dict:
        """{"station": backend.status(), "endpoint": counters and latency percentiles}."""
        reply = self.request(Message("status_request", {}))
        return {k: v for k, v in reply.body.items() if k != "status"}

    def request(self, message: Message) -> Message:
        """Send one request and return its ok reply; error replies raise WireError."""
        with self._lock:
            frames = message.encode()
            try:
                self._socket.send_multipart(frames)
            except zmq.Again:
                self._reset()
                raise WireError("timeout", f"cannot send to {self.endpoint} within "
                                f"{self.timeout_ms} ms: is the station running?") from None
            deadline = time.monotonic() + self.timeout_ms / 1000.0
            while (left := deadline - time.monotonic()) > 0:
                if not self._socket.poll(max(1, int(left * 1000)), zmq.POLLIN):
                    break
                reply = decode(self._socket.recv_multipart(copy=False), max_bytes=self.max_bytes)
                if reply.reply_to not in (message.msg_id, None):
                    continue  # a late reply to an earlier, timed-out request
                if reply.msg_type == "error":
                    raise WireError(reply.body["error"], f"{reply.body['detail']} "
                                    f"(from {self.endpoint})", message.msg_id)
                return reply
            self._reset()
        raise WireError("timeout", f"no reply from {self.endpoint} within {self.timeout_ms} ms "
                        f"to {message.msg_type}: is the station running on that endpoint?")

    def close(self) -> None:
        self._socket.close(0)
        if self._own_context:
            self._context.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _EchoBackend:
    """A no-work backend for measuring the endpoint's own overhead."""

    def infer(self, image, instruction, task=None) -> dict:
        return {"answer": "ok", "task_id": task, "shape": list(np.shape(image))}

    def status(self) -> dict:
        return {"backend": "echo"}


def bench_roundtrip(n: int = 1000, *, endpoint: str = "tcp://127.0.0.1:*",
                    image_shape=(224, 224, 3), backend=None) -> dict:
    """Round-trip latency of n infer requests through a server with a no-op backend.

    Returns {"n", "endpoint", "image_bytes", "mean_ms", "p50_ms", "p95_ms", "p99_ms"} measured
    at the client, so it is the protocol + socket overhead a real station adds per request.
    """
    image = np.random.default_rng(0).integers(0, 256, image_shape, dtype=np.uint8)
    with InferenceServer(backend or _EchoBackend(), endpoint) as server, \
            InferenceClient(server.endpoint, timeout_ms=10000) as client:
        client.infer(image, "warm up")
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.infer(image, "is it scratched?")
            times.append((time.perf_counter() - t0) * 1000.0)
    ms = np.asarray(times)
    return {"n": n, "endpoint": server.endpoint, "image_bytes": int(image.nbytes),
            "mean_ms": float(ms.mean()),
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}}
