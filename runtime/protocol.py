"""The Kaizen wire protocol: versioned ZeroMQ message framing (spec: runtime/PROTOCOL.md).

A message on the wire is the multipart frames ``[header_json, body_json, *buffers]``. The
header names the type, id and version and describes every raw buffer (dtype + shape for
arrays, ``kind: "bytes"`` for opaque bytes); the body is a JSON object. Nothing is pickled.

    from kaizen.runtime.protocol import Message, decode, send_message, recv_message
    frames = Message("fetch", {"name": n, "sha256": h, "offset": 0, "credit": 1 << 20}).encode()
    msg = decode(frames, max_bytes=MAX_MESSAGE_BYTES, allowed_types={"fetch"})

``decode`` validates everything and raises ``WireError`` (a ``ProtocolError`` with an error
``code`` from ERROR_CODES) naming the frame or field at fault. A ROUTER socket prefixes the
peer identity: ``split_envelope`` separates it, ``send_message(..., envelope=...)`` restores it.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from .errors import ProtocolError
from .wire_json import MAX_INT, MAX_JSON_DEPTH, clean_detail, json_problem, strict_loads

PROTOCOL_VERSION = 2
PROTOCOL_MINOR = 1  # 2.1 added optional message types (feedback, sample_chunk/ack): no version bump
MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # total of all frames of one message
CHUNK_SIZE = 256 * 1024  # pack bytes per `chunk` message
MAX_HEADER_BYTES = 64 * 1024  # header frame alone (buffer descriptors included)
MAX_DIMS = 8  # dimensions of an array buffer
MSG_ID_RE = re.compile(r"^[0-9a-f]{32}$")  # uuid4 hex

# Array dtypes allowed on the wire, always little-endian ("f4" means "<f4").
ALLOWED_DTYPES = ("u1", "i1", "u2", "i2", "i4", "i8", "f2", "f4", "f8", "b1")

# Error codes this module and the endpoint produce (PROTOCOL.md has the table). A backend's
# KaizenError travels as its class name (e.g. "PackError"); the fleet link may add its own.
ERROR_CODES = {
    "bad_frames": "too few frames, a frame is not JSON / not an object, or a header field is bad",
    "version_mismatch": "header protocol_version is missing or not the receiver's version",
    "unknown_type": "msg_type is not in the registry",
    "unsupported_type": "msg_type is valid but this socket does not serve it",
    "bad_body": "a required body field is missing or has the wrong type/value",
    "bad_buffer": "buffer count/names/dtype/shape/nbytes do not match the header",
    "too_large": "the message (sum of all frames) is over the receiver's max_bytes, or the "
                 "header frame is over MAX_HEADER_BYTES",
    "bad_input": "unusable content: the image or instruction (backend InputError, image too "
                 "large to decode) or a string that is not valid Unicode (a lone surrogate)",
    "internal": "unexpected failure on the receiver (a bug); the detail names the exception",
    "timeout": "client side only: no reply within the timeout",
}

REPORT_STATES = frozenset({"received", "verified", "activated", "rejected", "rolled_back"})
IMAGE_FORMATS = frozenset({"encoded", "array"})
OPT_STR = (str, type(None))


@dataclass(frozen=True)
class MsgSpec:
    """One registered message type: its link, required body fields, required buffers."""

    link: str  # "inference" or "fleet"
    fields: dict  # name -> type | tuple of types | frozenset of allowed strings
    buffers: tuple = ()
    summary: str = ""


MESSAGE_TYPES: dict[str, MsgSpec] = {
    # inference link: client DEALER -> station ROUTER
    "infer_request": MsgSpec("inference", {"instruction": str, "image_format": IMAGE_FORMATS},
                             ("image",), "answer one image + instruction"),
    "infer_reply": MsgSpec("inference", {"status": str}, (), "the backend's result"),
    "status_request": MsgSpec("inference", {}, (), "ask for health and latency"),
    # added in protocol 2.1 (optional: a 2.0 peer answers unknown_type, see PROTOCOL.md)
    "feedback": MsgSpec("inference", {"answer": str}, (),
                        "an operator's or PLC's correct answer for a part (part_id, or instruction + image)"),
    "feedback_reply": MsgSpec("inference", {"status": str, "sample_id": str, "captured": bool}),
    "status_reply": MsgSpec("inference", {"status": str, "station": dict, "endpoint": dict}),
    # admin link: `kaizen station rollback|install` -> station admin ROUTER (local ipc only)
    "rollback_request": MsgSpec("admin", {"task_id": str}, (),
                                "local admin: return a task to its previous pack"),
    "rollback_reply": MsgSpec("admin", {"status": str, "task_id": str, "version": int}),
    "install_request": MsgSpec("admin", {"path": str}, (),
                               "local admin: install a .kpk file from the station's disk"),
    "install_reply": MsgSpec("admin", {"status": str, "task_id": str, "version": int}),
    "error": MsgSpec("both", {"status": str, "error": str, "detail": str}, (), "error reply"),
    # fleet link: station DEALER <-> hub ROUTER (CURVE); announce over PUB
    "hello": MsgSpec("fleet", {"station_id": str, "base_fingerprint": str,
                               "runtime_version": str, "installed": list}),
    "heartbeat": MsgSpec("fleet", {"station_id": str, "installed": list, "serving": bool}),
    "desired_state": MsgSpec("fleet", {"packs": list}),
    "fetch": MsgSpec("fleet", {"name": str, "sha256": str, "offset": int, "credit": int}),
    "chunk": MsgSpec("fleet", {"name": str, "offset": int, "sha256_chunk": str,
                               "total_size": int, "last": bool}, ("data",)),
    "report": MsgSpec("fleet", {"name": str, "task_id": str, "version": int,
                                "state": REPORT_STATES, "reason": OPT_STR}),
    "ack": MsgSpec("fleet", {"acked_msg_id": str}),
    "announce": MsgSpec("fleet", {"packs": list}),
    # added in protocol 2.1: the improvement loop's upload of captured parts (station -> hub)
    "sample_chunk": MsgSpec("fleet", {"sample_id": str, "offset": int, "total_size": int, "meta": dict},
                            ("data",), "bytes of one captured part's image, with its meta"),
    "sample_ack": MsgSpec("fleet", {"sample_id": str, "offset": int, "done": bool}, (),
                          "bytes of the sample the hub holds; done = stored (or refused, see `refused`)"),
}

# Required keys of the dict items inside list fields (any message that has the field).
LIST_ITEM_FIELDS: dict[str, dict] = {
    "installed": {"task_id": str, "version": int},
    "packs": {"task_id": str, "version": int, "sha256": str, "size": int, "name": str},
}

# Default reply type of a request, used by ok_reply when no msg_type is given.
REPLY_TYPES = {"infer_request": "infer_reply", "status_request": "status_reply",
               "rollback_request": "rollback_reply", "install_request": "install_reply",
               "hello": "desired_state", "fetch": "chunk", "report": "ack",
               "feedback": "feedback_reply", "sample_chunk": "sample_ack"}


class WireError(ProtocolError):
    """A ProtocolError with a short error ``code`` and a human ``detail``.

    ``msg_id`` is the offending message's id when the header was readable (so an error reply
    can carry ``reply_to``), else None.
    """

    def __init__(self, code: str, detail: str, msg_id: str | None = None):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.msg_id = msg_id


def new_msg_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Message:
    """One protocol message. ``buffers`` maps names to C-contiguous arrays or bytes."""

    msg_type: str
    body: dict = field(default_factory=dict)
    buffers: dict[str, Any] = field(default_factory=dict)
    msg_id: str = field(default_factory=new_msg_id)
    reply_to: str | None = None
    sent_at: float | None = None  # set by encode() (sender) / decode() (from the header)

    @property
    def status(self) -> str | None:
        """The body's "status" ("ok" / "error") for replies, None for requests."""
        return self.body.get("status")

    def encode(self) -> list[bytes]:
        """Frames ``[header_json, body_json, *buffers]``; checks type, body and buffers first."""
        if self.msg_type not in MESSAGE_TYPES:
            raise WireError("unknown_type", f"cannot encode unknown msg_type {self.msg_type!r}")
        validate_body(self.msg_type, self.body, self.msg_id)
        descriptors, frames = [], []
        for name, value in self.buffers.items():
            desc, data = _encode_buffer(self.msg_type, name, value)
            descriptors.append(desc)
            frames.append(data)
        _check_required_buffers(self.msg_type, [d["name"] for d in descriptors], self.msg_id)
        self.sent_at = time.time()
        header = {"protocol_version": PROTOCOL_VERSION, "msg_type": self.msg_type,
                  "msg_id": self.msg_id, "reply_to": self.reply_to, "sent_at": self.sent_at,
                  "buffers": descriptors}
        return [_dumps(header, "header"), _dumps(self.body, f"{self.msg_type} body"), *frames]

    @classmethod
    def decode(cls, frames, *, max_bytes: int = MAX_MESSAGE_BYTES,
               allowed_types=None) -> Message:
        return decode(frames, max_bytes=max_bytes, allowed_types=allowed_types)


def _dumps(obj: dict, what: str) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise WireError("bad_body", f"{what} is not strict JSON: {err}") from err


def _encode_buffer(msg_type: str, name: str, value) -> tuple[dict, bytes]:
    if not isinstance(name, str) or not name:
        raise WireError("bad_buffer", f"{msg_type}: buffer names must be non-empty strings")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return {"name": name, "kind": "bytes", "nbytes": len(data)}, data
    if isinstance(value, np.ndarray):
        code = value.dtype.str[1:]
        if code not in ALLOWED_DTYPES:
            raise WireError("bad_buffer", f"{msg_type} buffer {name!r}: dtype {value.dtype} "
                            f"is not allowed on the wire (allowed: {', '.join(ALLOWED_DTYPES)})")
        arr = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        desc = {"name": name, "dtype": code, "shape": list(arr.shape), "nbytes": arr.nbytes}
        return desc, arr.tobytes()
    raise WireError("bad_buffer", f"{msg_type} buffer {name!r} must be bytes or a numpy "
                    f"array, not {type(value).__name__}")


def _frame_bytes(frame):
    """bytes / bytearray / memoryview / zmq.Frame -> something with len() and the buffer API."""
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


def decode(frames, *, max_bytes: int = MAX_MESSAGE_BYTES, allowed_types=None) -> Message:
    """Validate and decode the frames of one message (envelope already split off).

    Sizes are checked before any JSON is parsed. Raises WireError naming the frame/field.
    """
    frames = [_frame_bytes(f) for f in frames]
    if len(frames) < 2:
        raise WireError("bad_frames", f"a message needs at least 2 frames (header, body), "
                        f"got {len(frames)}")
    total = sum(len(f) for f in frames)
    if total > max_bytes:
        raise WireError("too_large", f"message is {total} bytes, over the limit of {max_bytes}",
                        _peek_msg_id(frames[0]))
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise WireError("too_large", f"header frame is {len(frames[0])} bytes, over "
                        f"{MAX_HEADER_BYTES}")
    header = _loads(frames[0], "frame 0 (header)", header=True)
    msg_id = header.get("msg_id")
    msg_id = msg_id if isinstance(msg_id, str) and MSG_ID_RE.match(msg_id) else None
    _check_header(header, msg_id)
    msg_type = header["msg_type"]
    if allowed_types is not None and msg_type not in allowed_types:
        raise WireError("unsupported_type", f"msg_type {msg_type!r} is not served here "
                        f"(expected one of {sorted(allowed_types)})", msg_id)
    body = _loads(frames[1], "frame 1 (body)", msg_id)
    validate_body(msg_type, body, msg_id)
    buffers = _decode_buffers(msg_type, header["buffers"], frames[2:], msg_id)
    return Message(msg_type, body, buffers, msg_id, header["reply_to"], header["sent_at"])


def _peek_msg_id(frame) -> str | None:
    """The msg_id of a small, parseable header (for the reply_to of an oversize error)."""
    if len(frame) > MAX_HEADER_BYTES:
        return None
    try:
        header = _loads(frame, "header", header=True)
    except WireError:
        return None
    msg_id = header.get("msg_id")
    return msg_id if isinstance(msg_id, str) and MSG_ID_RE.match(msg_id) else None


def _loads(frame, what: str, msg_id: str | None = None, *, header: bool = False) -> dict:
    """Parse one JSON frame strictly: no NaN/Infinity, bounded depth and ints, valid Unicode."""
    try:
        obj = strict_loads(bytes(frame))
    except RecursionError:
        raise WireError("bad_frames", f"{what} is nested too deeply (at most {MAX_JSON_DEPTH} "
                        "levels)", msg_id) from None
    except (UnicodeDecodeError, ValueError) as err:
        raise WireError("bad_frames", f"{what} is not JSON (strict JSON: no NaN/Infinity): "
                        f"{err}", msg_id) from None
    if not isinstance(obj, dict):
        raise WireError("bad_frames", f"{what} must be a JSON object, got "
                        f"{type(obj).__name__}", msg_id)
    problem = json_problem(obj)
    if problem is not None:
        kind, text = problem
        code = "bad_frames" if header or kind == "depth" else \
            ("bad_input" if kind == "unicode" else "bad_body")
        raise WireError(code, f"{what}: {text}", None if header else msg_id)
    return obj


def _check_header(header: dict, msg_id: str | None) -> None:
    version = header.get("protocol_version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError("version_mismatch", f"header protocol_version is {_short(version)}, this peer "
                        f"speaks version {PROTOCOL_VERSION}", msg_id)
    msg_type = header.get("msg_type")
    if not isinstance(msg_type, str) or msg_type not in MESSAGE_TYPES:
        raise WireError("unknown_type", f"header msg_type {_short(msg_type)} is not one of "
                        f"{sorted(MESSAGE_TYPES)}", msg_id)
    if not msg_id:
        raise WireError("bad_frames", "header msg_id is missing or not a uuid4 hex string "
                        "(32 lowercase hex digits)")
    if "reply_to" not in header:
        raise WireError("bad_frames", "header reply_to is missing (null for a request)", msg_id)
    reply_to = header["reply_to"]
    if reply_to is not None and not (isinstance(reply_to, str) and MSG_ID_RE.match(reply_to)):
        raise WireError("bad_frames", "header reply_to must be null or a msg_id (32 lowercase "
                        "hex digits)", msg_id)
    sent_at = header.get("sent_at")
    if not isinstance(sent_at, (int, float)) or isinstance(sent_at, bool) or \
            not math.isfinite(sent_at):
        raise WireError("bad_frames", f"header sent_at must be a unix time, got {_short(sent_at)}",
                        msg_id)
    if not isinstance(header.get("buffers"), list):
        raise WireError("bad_frames", "header buffers must be a list of descriptors", msg_id)


def _field_ok(value, spec) -> bool:
    if isinstance(spec, frozenset):
        return isinstance(value, str) and value in spec
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not an int field
    if not isinstance(value, types):
        return False
    # every int field is a size/offset/version: 0 <= n <= MAX_INT
    return not (isinstance(value, int) and not 0 <= value <= MAX_INT)


def _describe(spec) -> str:
    if isinstance(spec, frozenset):
        return "one of " + ", ".join(sorted(spec))
    types = spec if isinstance(spec, tuple) else (spec,)
    names = [t.__name__.replace("NoneType", "null") for t in types]
    return " or ".join(names) + (" >= 0" if int in types else "")


def validate_body(msg_type: str, body, msg_id: str | None = None) -> None:
    """Check the body's required fields (and list items) against MESSAGE_TYPES."""
    if not isinstance(body, dict):
        raise WireError("bad_body", f"{msg_type} body must be a dict", msg_id)
    for name, spec in MESSAGE_TYPES[msg_type].fields.items():
        if name not in body:
            raise WireError("bad_body", f"{msg_type} body is missing field {name!r}", msg_id)
        if not _field_ok(body[name], spec):
            raise WireError("bad_body", f"{msg_type} body field {name!r} must be "
                            f"{_describe(spec)}, got {_short(body[name])}", msg_id)
        if name in LIST_ITEM_FIELDS:
            _validate_items(msg_type, name, body[name], msg_id)


def _short(value) -> str:
    """A bounded repr of a JSON value for an error detail."""
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'} of {len(value)} items"
    return repr(value)[:60]


def _validate_items(msg_type: str, name: str, items: list, msg_id: str | None) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise WireError("bad_body", f"{msg_type} body {name}[{i}] must be an object", msg_id)
        for key, spec in LIST_ITEM_FIELDS[name].items():
            if key not in item or not _field_ok(item[key], spec):
                raise WireError("bad_body", f"{msg_type} body {name}[{i}].{key} must be "
                                f"{_describe(spec)}", msg_id)


def _check_required_buffers(msg_type: str, names: list, msg_id: str | None) -> None:
    if len(set(names)) != len(names):
        raise WireError("bad_buffer", f"{msg_type} has duplicate buffer names {names}", msg_id)
    for name in MESSAGE_TYPES[msg_type].buffers:
        if name not in names:
            raise WireError("bad_buffer", f"{msg_type} needs buffer {name!r}", msg_id)


def _decode_buffers(msg_type: str, descriptors: list, frames: list, msg_id) -> dict:
    if len(descriptors) != len(frames):
        raise WireError("bad_buffer", f"header describes {len(descriptors)} buffers but "
                        f"{len(frames)} buffer frames follow the body", msg_id)
    buffers = {}
    for i, (desc, frame) in enumerate(zip(descriptors, frames)):
        where = f"{msg_type} buffer {i} (frame {i + 2})"
        if not isinstance(desc, dict) or not isinstance(desc.get("name"), str) or not desc["name"]:
            raise WireError("bad_buffer", f"{where}: descriptor needs a non-empty name", msg_id)
        nbytes = desc.get("nbytes")
        if nbytes != len(frame) or isinstance(nbytes, bool):
            raise WireError("bad_buffer", f"{where} {desc['name']!r}: nbytes {nbytes!r} but "
                            f"the frame has {len(frame)} bytes", msg_id)
        if desc.get("kind") == "bytes":
            buffers[desc["name"]] = bytes(frame)
        else:
            buffers[desc["name"]] = _decode_array(where, desc, frame, msg_id)
    _check_required_buffers(msg_type, [d["name"] for d in descriptors], msg_id)
    return buffers


def _decode_array(where: str, desc: dict, frame, msg_id) -> np.ndarray:
    name, dtype, shape = desc["name"], desc.get("dtype"), desc.get("shape")
    if dtype not in ALLOWED_DTYPES:
        raise WireError("bad_buffer", f"{where} {name!r}: dtype {dtype!r} is not allowed "
                        f"(allowed: {', '.join(ALLOWED_DTYPES)})", msg_id)
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise WireError("bad_buffer", f"{where} {name!r}: shape must be a list of at most "
                        f"{MAX_DIMS} ints >= 0, got {_short(shape)}", msg_id)
    dt = np.dtype("<" + dtype)
    expected = math.prod(shape) * dt.itemsize
    if 0 in shape and any(d > MAX_INT // 8 for d in shape):
        raise WireError("bad_buffer", f"{where} {name!r}: shape {_short(shape)} has a "
                        "dimension too large for an array", msg_id)
    if expected != len(frame):
        raise WireError("bad_buffer", f"{where} {name!r}: shape {shape} of {dtype} needs "
                        f"{expected} bytes, the frame has {len(frame)}", msg_id)
    return np.frombuffer(frame, dtype=dt).reshape(shape)  # read-only view, no copy


def error_reply(request, error: str, detail: str) -> Message:
    """An "error" message replying to ``request`` (a Message, a msg_id string, or None)."""
    reply_to = request.msg_id if isinstance(request, Message) else request
    return Message("error", {"status": "error", "error": str(error), "detail": clean_detail(detail)},
                   reply_to=reply_to)


def ok_reply(request: Message, body: dict | None = None, buffers: dict | None = None, *,
             msg_type: str | None = None) -> Message:
    """A reply with status "ok"; msg_type defaults to REPLY_TYPES[request.msg_type]."""
    msg_type = msg_type or REPLY_TYPES.get(request.msg_type)
    if msg_type is None:
        raise ValueError(f"no default reply type for {request.msg_type!r}: pass msg_type=")
    return Message(msg_type, {**(body or {}), "status": "ok"}, dict(buffers or {}),
                   reply_to=request.msg_id)


def split_envelope(frames: list) -> tuple[list, list]:
    """Split a ROUTER's frames into (envelope, payload).

    The envelope is the identity frame, plus the empty delimiter a REQ peer adds (a header
    frame is never empty, so the empty frame is unambiguous).
    """
    if len(frames) >= 2 and len(_frame_bytes(frames[1])) == 0:
        return list(frames[:2]), list(frames[2:])
    return list(frames[:1]), list(frames[1:])


def send_message(socket: zmq.Socket, message: Message, envelope=(), flags: int = 0) -> None:
    socket.send_multipart([*envelope, *message.encode()], flags=flags)


def recv_message(socket: zmq.Socket, *, max_bytes: int = MAX_MESSAGE_BYTES,
                 allowed_types=None, router: bool = False):
    """Receive one message; returns the Message, or (envelope, Message) when router=True."""
    frames = socket.recv_multipart(copy=False)
    envelope, payload = split_envelope(frames) if router else ([], frames)
    message = decode(payload, max_bytes=max_bytes, allowed_types=allowed_types)
    return (envelope, message) if router else message
