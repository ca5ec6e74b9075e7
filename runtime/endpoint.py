"""The station's local inference endpoint: a ZeroMQ ROUTER server, its client, a latency bench.

Protocol: runtime/PROTOCOL.md ("Inference link"). The server answers `infer_request`,
`status_request` and `feedback` for any backend with ``infer(image, instruction, task=None) -> dict``,
``status() -> dict`` and ``feedback(answer, part_id, image, instruction, task) -> dict`` (the real
one is kaizen.runtime.station.Station; a backend without `feedback` answers it unsupported_type). Every bad request gets
an `error` reply and the server keeps serving; whatever goes wrong with one message (even a
failed send) is logged and counted, never the end of the thread. Requests are answered one at
a time, in arrival order, by one thread (the backend is the bottleneck; clients may be many).
Admin commands (rollback, install) are not served here: see runtime/admin.py.

    with InferenceServer(station, "ipc:///run/kaizen/infer.sock") as server:
        with InferenceClient(server.endpoint, timeout_ms=5000) as client:
            r = client.infer(Path("part.png"), "is the part scratched?")
            client.feedback("scratched", part_id=r["part_id"])   # the operator's correction
"""

from __future__ import annotations

import collections
import logging
import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from .errors import ConfigError, InputError, KaizenError
from .protocol import (
    IMAGE_FORMATS,
    MAX_MESSAGE_BYTES,
    Message,
    WireError,
    decode,
    error_reply,
    ok_reply,
    split_envelope,
)

log = logging.getLogger(__name__)

SERVED_TYPES = frozenset({"infer_request", "status_request", "feedback"})
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
LATENCY_WINDOW = 1000  # successful infer requests kept for the percentiles


def check_local_endpoint(endpoint: str, allow_remote: bool = False) -> None:
    """Refuse endpoints other than ipc://PATH, inproc:// and tcp:// on loopback (unless allowed).

    Abstract sockets (``ipc://@name``) are refused: anyone on the host may bind or connect them.
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("ipc", "inproc", "tcp") or not rest:
        raise ConfigError(f"inference endpoint {endpoint!r} must be ipc://PATH or "
                          "tcp://127.0.0.1:PORT")
    if scheme == "ipc" and rest.startswith(("@", "\0")):
        raise ConfigError(f"endpoint {endpoint!r} is an abstract socket, which has no file "
                          "permissions (any local user can bind or connect it): use "
                          "ipc:///PATH in a private folder")
    if scheme == "tcp":
        host = rest.rsplit(":", 1)[0]
        if host not in LOCAL_HOSTS and not allow_remote:
            raise ConfigError(f"inference endpoint {endpoint!r} binds host {host!r}: the "
                              "inference link has no authentication, so only loopback is "
                              "allowed; pass allow_remote=True to bind other hosts")


def check_ipc_folder(endpoint: str) -> None:
    """An ipc:// socket's folder must exist and be writable by its owner only (us or root).

    A folder others can write (such as /tmp) lets another user bind the path first and answer
    the station's clients ("squatting"). ConfigError naming the folder if so.
    """
    if not endpoint.startswith("ipc://"):
        return
    folder = Path(endpoint[len("ipc://"):]).parent
    try:
        st = folder.stat()
    except OSError as err:
        raise ConfigError(f"endpoint {endpoint!r}: its folder {folder} is not usable "
                          f"({err.strerror or err}); create it (mode 0700 or 0755)") from None
    if st.st_uid not in (os.getuid(), 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"endpoint {endpoint!r}: folder {folder} is writable by other users "
                          f"(mode {stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid}), so "
                          "another user could bind this path first: put the socket in a "
                          "private runtime folder such as /run/kaizen (systemd "
                          "RuntimeDirectory) or the station's state_dir/run")


class _Stats:
    """Request/error counters and a window of infer latencies (thread-safe reads)."""

    def __init__(self, window: int):
        self.lock = threading.Lock()
        self.requests = 0
        self.dropped = 0   # messages that got no reply (a failed send, a broken envelope)
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
                    "dropped": self.dropped,
                    "errors_by_code": dict(self.errors), "latency_ms": {**pct, "n": int(lat.size)}}


class InferenceServer:
    """A ROUTER on a local endpoint answering infer/status requests in a background thread."""

    def __init__(self, backend, endpoint: str, *, max_bytes: int = MAX_MESSAGE_BYTES,
                 context: zmq.Context | None = None, allow_remote: bool = False,
                 poll_ms: int = 100, latency_window: int = LATENCY_WINDOW, metrics=None):
        check_local_endpoint(endpoint, allow_remote)
        if max_bytes <= 0:
            raise ConfigError(f"max_bytes must be > 0, got {max_bytes}")
        self.backend = backend
        self.requested_endpoint = endpoint
        self.endpoint: str | None = None  # the bound endpoint (a real port for tcp://...:*)
        self.max_bytes = max_bytes
        self.poll_ms = poll_ms
        self.stats = _Stats(latency_window)
        self.metrics = metrics   # a StationMetrics (runtime/station_metrics.py): on_reply per request
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket: zmq.Socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> InferenceServer:
        """Bind (errors raise here, in the caller's thread) and start serving."""
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError(f"{type(self).__name__}.start() called twice or after stop(): "
                               "make a new one")
        if self.requested_endpoint.startswith("ipc://"):
            folder = Path(self.requested_endpoint[len("ipc://"):]).parent
            if not folder.exists():   # e.g. the default state_dir/run: created private
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_ipc_folder(self.requested_endpoint)
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Hard per-frame cap: a peer sending a frame over the whole-message limit is
        # disconnected before the frame is buffered; the sum of frames is checked by decode().
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)
        try:
            sock.bind(self.requested_endpoint)
            self._after_bind(sock)
        except (zmq.ZMQError, OSError) as err:
            sock.close(0)
            raise ConfigError(f"cannot bind endpoint {self.requested_endpoint!r}: "
                              f"{err}") from err
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._socket = sock  # handed to the thread; the thread start is the memory barrier
        self._thread = threading.Thread(target=self._serve, name=self.thread_name, daemon=True)
        self._thread.start()
        log.info("%s serving on %s", self.thread_name, self.endpoint)
        return self

    thread_name = "kaizen-infer"
    served_types = SERVED_TYPES

    def _after_bind(self, sock: zmq.Socket) -> None:
        """Hook for subclasses (the admin server restricts its socket file)."""

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
                if sock.poll(self.poll_ms, zmq.POLLIN):
                    self._serve_one(sock)
        finally:
            sock.close(0)

    def _serve_one(self, sock: zmq.Socket) -> None:
        """Receive one message and answer it; nothing that goes wrong here ends the thread."""
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        try:
            envelope, payload = split_envelope(frames)
            reply_frames = self.handle(payload)
            del frames, payload
            sock.send_multipart([*envelope, *reply_frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            self._drop("dropped a reply: the peer is gone or not reading")
        except Exception:
            log.exception("%s: dropped a message that could not be answered", self.thread_name)
            self._drop(None)

    def _drop(self, why: str | None) -> None:
        if why:
            log.warning("%s: %s", self.thread_name, why)
        with self.stats.lock:
            self.stats.dropped += 1

    def handle(self, payload: list) -> list[bytes]:
        """Answer one request's frames (envelope removed) with the reply's frames."""
        started = time.perf_counter()
        request = None
        try:
            try:
                request = decode(payload, max_bytes=self.max_bytes,
                                 allowed_types=self.served_types)
            except WireError as err:
                reply = error_reply(err.msg_id, err.code, err.detail)
            else:
                reply = self._dispatch(request)
            frames = reply.encode()
        except Exception as err:
            # The one broad catch: whatever a backend does wrong (a bug, a result that is not
            # JSON), the endpoint must answer and keep serving the line. Logged with traceback.
            log.exception("%s: unexpected error answering %s", self.thread_name,
                          request.msg_type if request else "a request")
            reply = error_reply(request, "internal", f"{type(err).__name__}: {err}")
            frames = reply.encode()
        seconds = time.perf_counter() - started
        self.stats.record(request.msg_type if request else None, reply, seconds)
        if self.metrics is not None:
            self.metrics.on_reply(request.msg_type if request else None, reply, seconds)
        return frames

    def _dispatch(self, request: Message) -> Message:
        if request.msg_type == "status_request":
            return ok_reply(request, {"station": self.backend.status(),
                                      "endpoint": self.stats.snapshot()})
        try:
            if request.msg_type == "feedback":
                return feedback_reply(self.backend, request)
            image, instruction, task = _infer_args(request)
            result = self.backend.infer(image, instruction, task=task)
        except InputError as err:
            return error_reply(request, "bad_input", str(err))
        except WireError as err:
            return error_reply(request, err.code, err.detail)
        except KaizenError as err:
            return error_reply(request, type(err).__name__, str(err))
        except Exception as err:
            # content the decoder refuses: PIL's DecompressionBombError (too many pixels; PIL
            # is imported by the backend, not here), a string that is not valid Unicode
            if type(err).__name__ == "DecompressionBombError" or isinstance(err, UnicodeError):
                return error_reply(request, "bad_input", f"unusable image or instruction: "
                                   f"{type(err).__name__}: {err}")
            raise
        if not isinstance(result, dict):
            raise TypeError(f"backend.infer returned {type(result).__name__}, not a dict")
        body = {k: v for k, v in result.items() if k != "status"}
        if isinstance(body.get("scores"), dict):
            body["scores"] = scores_list(body["scores"])
        return ok_reply(request, body)


def scores_list(scores: dict) -> list[dict]:
    """{task: score} -> [{"task_id", "score"}, ...] best first (a JSON object has no order)."""
    items = sorted(scores.items(), key=lambda kv: -float(kv[1]))
    return [{"task_id": str(k), "score": v} for k, v in items]


def _infer_args(request: Message):
    """(image, instruction, task) from an infer_request; InputError/WireError when unusable."""
    body = request.body
    instruction = body["instruction"]
    if not instruction.strip():
        raise InputError("infer_request instruction is empty: send the question to answer")
    task = body.get("task")
    if task is not None and not isinstance(task, str):
        raise WireError("bad_body", f"infer_request task must be a string or null, got {task!r}")
    return _image_arg(request), instruction, task


def _image_arg(request: Message):
    """Buffer "image" checked against body["image_format"]; InputError when they do not fit."""
    image, kind = request.buffers["image"], request.msg_type
    if request.body["image_format"] == "encoded":
        if not isinstance(image, bytes) or not image:
            raise InputError(f"{kind} image_format 'encoded' needs buffer 'image' as "
                             "non-empty bytes of a PNG/JPEG file")
    elif not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3 or 0 in image.shape:
        desc = (f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray)
                else "bytes")
        raise InputError(f"{kind} image_format 'array' needs buffer 'image' as uint8 "
                         f"[H, W, 3] (RGB), got {desc}")
    return image


def feedback_reply(backend, request: Message) -> Message:
    """Answer a `feedback` (the correct answer for a part) with the backend's
    ``feedback(answer, part_id, image, instruction, task)`` -> feedback_reply {sample_id, captured}.
    Unusable fields raise WireError (bad_body) or InputError (bad_input) for _dispatch to answer."""
    handler = getattr(backend, "feedback", None)
    if not callable(handler):
        return error_reply(request, "unsupported_type", "this station's backend takes no feedback")
    body = request.body
    for name in ("part_id", "task", "instruction"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise WireError("bad_body", f"feedback {name} must be a string or absent, got "
                            f"{type(body[name]).__name__}")
    image = None
    if "image" in request.buffers:
        if body.get("image_format") not in IMAGE_FORMATS:
            raise WireError("bad_body", "feedback with buffer 'image' needs image_format "
                            f"'encoded' or 'array', got {body.get('image_format')!r}")
        image = _image_arg(request)
        if body.get("instruction") is None:
            raise InputError("feedback with an image needs the instruction asked about it")
    elif body.get("part_id") is None:
        raise InputError("feedback needs part_id (from an infer_reply), or instruction + "
                         "image_format + buffer 'image'")
    out = handler(body["answer"], part_id=body.get("part_id"), image=image,
                  instruction=body.get("instruction"), task=body.get("task"))
    return ok_reply(request, {"sample_id": str(out["sample_id"]), "captured": bool(out["captured"])})


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
        image = _read_image(image)
        fmt = "array" if isinstance(image, np.ndarray) else "encoded"
        body = {"instruction": instruction, "image_format": fmt}
        if task is not None:
            body["task"] = task
        reply = self.request(Message("infer_request", body, {"image": image}))
        return {k: v for k, v in reply.body.items() if k != "status"}

    def feedback(self, answer: str, part_id: str | None = None, image=None,
                 instruction: str | None = None, task: str | None = None) -> dict:
        """The correct answer for a part: by the part_id of its infer reply (the station keeps its
        last parts), or by image (as for infer) + instruction. -> {"sample_id", "captured"}."""
        body = {"answer": answer}
        body.update({k: v for k, v in (("part_id", part_id), ("instruction", instruction),
                                        ("task", task)) if v is not None})
        buffers = {}
        if image is not None:
            image = _read_image(image)
            body["image_format"] = "array" if isinstance(image, np.ndarray) else "encoded"
            buffers["image"] = image
        reply = self.request(Message("feedback", body, buffers))
        return {"sample_id": reply.body["sample_id"], "captured": reply.body["captured"]}

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


def _read_image(image):
    """A path's bytes; bytes and arrays as they are."""
    if isinstance(image, (str, Path)):
        try:
            return Path(image).read_bytes()
        except OSError as err:
            raise InputError(f"cannot read image file {image}: {err}") from err
    return image


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
