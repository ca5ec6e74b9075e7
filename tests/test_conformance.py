"""Conformance: drive the inference endpoint and the hub only through what runtime/PROTOCOL.md says.

Requests are built by hand from the spec's tables (raw JSON frames, no kaizen Message class),
replies are checked against them: header fields, reply_to, the body fields of each reply type,
and every error code of the spec's table is produced by some request (`timeout` by the client,
`<ErrorClass>` by a station error). A change on either side that breaks the spec fails here.
"""

import json
import re
import time
import uuid
from pathlib import Path

import pytest
import zmq

from kaizen.hub.fleet_sim import Fleet, make_test_packs
from kaizen.runtime.endpoint import InferenceClient, InferenceServer
from kaizen.runtime.errors import InputError, PackError
from kaizen.runtime.keys import TrustedKeys, generate_signing_key, load_curve_keypair, load_curve_public

SPEC = (Path(__file__).resolve().parents[1] / "runtime" / "PROTOCOL.md").read_text()
VERSION = int(re.search(r"^# Kaizen wire protocol, version (\d+)$", SPEC, re.MULTILINE).group(1))
ERROR_TABLE = SPEC[SPEC.index("| code | meaning |"):]
ERROR_TABLE = ERROR_TABLE[:ERROR_TABLE.index("\n\n")]
SPEC_CODES = set(re.findall(r"^\| `([a-z_]+)` \|", ERROR_TABLE, re.MULTILINE))
HEADER_FIELDS = re.findall(r"^  \| `([a-z_]+)` \| (?:int|string|number|list|string or null) \|", SPEC, re.MULTILINE)
MSG_ROWS = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z_]+)` \| (?:inference|admin|fleet|both) \|.*$",
                                                        SPEC, re.MULTILINE)}
HEX32 = re.compile(r"^[0-9a-f]{32}$")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24


def spec_fields(msg_type):
    """Backticked names in the body-fields column of the spec's row for msg_type."""
    cells = MSG_ROWS[msg_type].split("|")
    return set(re.findall(r"`([a-z_0-9]+)`", cells[4])) - set(re.findall(r"`([a-z_0-9]+)`", cells[5]))


def frames(msg_type, body, buffers=(), **header_patch):
    """[header, body, *buffers] exactly as the spec's Framing section describes them."""
    descriptors = [{"name": name, "kind": "bytes", "nbytes": len(data)} for name, data in buffers]
    header = {"protocol_version": VERSION, "msg_type": msg_type, "msg_id": uuid.uuid4().hex, "reply_to": None,
              "sent_at": time.time(), "buffers": descriptors}
    header.update(header_patch)
    return [json.dumps(header).encode(), json.dumps(body).encode(), *[data for _, data in buffers]]


def parse_reply(raw, request):
    """Check a reply against the spec's framing and return (header, body)."""
    header, body = json.loads(raw[0]), json.loads(raw[1])
    assert set(HEADER_FIELDS) <= set(header) and header["protocol_version"] == VERSION
    assert HEX32.match(header["msg_id"])
    req_id = json.loads(request[0]).get("msg_id") if request[0].startswith(b"{") else None
    if header["msg_type"] == "error":
        assert set(body) >= {"status", "error", "detail"} and body["status"] == "error"
        assert " at 0x" not in body["detail"]
        assert header["reply_to"] in (req_id, None)
    else:
        assert body["status"] == "ok" and header["reply_to"] == req_id
        assert spec_fields(header["msg_type"]) - {"ok"} <= set(body), header["msg_type"]
    assert len(raw) == 2 + len(header["buffers"])
    return header, body


class SpecBackend:
    def infer(self, image, instruction, task=None):
        if instruction == "crash":
            raise RuntimeError("a station bug")
        if instruction == "pack":
            raise PackError("pack x refused")
        if task == "nope":
            raise InputError("task 'nope' is not installed here")
        return {"outcome": "answered", "answer": "yes", "task_id": "holes", "pack_version": 1,
                "selected": ["holes"], "scores": {"seal": 0.1, "holes": 0.8}, "confidence": 0.9,
                "timings_ms": {"preprocess_ms": 1.0, "select_ms": 1.0, "decode_ms": 1.0, "total_ms": 3.0,
                               "batch": 1}}

    def status(self):
        return {"packs": []}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conf")
    with InferenceServer(SpecBackend(), f"ipc://{folder}/s.ipc", max_bytes=128 * 1024, poll_ms=10) as server:
        yield server.endpoint


def ask(endpoint, request, envelope=()):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send_multipart([*envelope, *request])
        assert sock.poll(3000), "no reply"
        raw = sock.recv_multipart()
        assert raw[:len(envelope)] == list(envelope)
        return parse_reply(raw[len(envelope):], request)
    finally:
        sock.close(0)


INFER = {"instruction": "is it torn?", "image_format": "encoded"}
ENDPOINT_CASES = [  # (request, expected error code or None for ok)
    (frames("infer_request", INFER, [("image", PNG)]), None),
    (frames("status_request", {}), None),
    ([b'{"protocol_version": 2}'], "bad_frames"),
    (frames("infer_request", INFER, [("image", PNG)], protocol_version=VERSION - 1), "version_mismatch"),
    (frames("frobnicate", {}), "unknown_type"),
    (frames("hello", {"station_id": "s", "base_fingerprint": "f", "runtime_version": "1", "installed": []}),
     "unsupported_type"),
    (frames("rollback_request", {"task_id": "holes"}), "unsupported_type"),
    (frames("infer_request", {"image_format": "encoded"}, [("image", PNG)]), "bad_body"),
    (frames("infer_request", dict(INFER, image_format="gif"), [("image", PNG)]), "bad_body"),
    (frames("infer_request", dict(INFER, task=3), [("image", PNG)]), "bad_body"),
    (frames("infer_request", INFER), "bad_buffer"),
    (frames("infer_request", INFER, [("image", PNG), ("a", b"x" * 70_000), ("b", b"y" * 70_000)]), "too_large"),
    (frames("infer_request", INFER, [("image", PNG)], pad="x" * 70_000), "too_large"),   # header > 64 KiB
    (frames("infer_request", dict(INFER, instruction=" "), [("image", PNG)]), "bad_input"),
    (frames("infer_request", dict(INFER, task="nope"), [("image", PNG)]), "bad_input"),
    (frames("infer_request", dict(INFER, instruction="crash"), [("image", PNG)]), "internal"),
    (frames("infer_request", dict(INFER, instruction="pack"), [("image", PNG)]), "PackError"),
]


@pytest.mark.parametrize("request_frames, code", ENDPOINT_CASES)
def test_endpoint_answers_as_the_spec_says(endpoint, request_frames, code):
    header, body = ask(endpoint, request_frames)
    if code is None:
        assert header["msg_type"] != "error", body
    else:
        assert header["msg_type"] == "error" and body["error"] == code, body


def test_infer_reply_and_status_reply_fields(endpoint):
    _, body = ask(endpoint, frames("infer_request", INFER, [("image", PNG)]))
    assert body["scores"] == [{"task_id": "holes", "score": 0.8}, {"task_id": "seal", "score": 0.1}]
    assert set(body["timings_ms"]) == {"preprocess_ms", "select_ms", "decode_ms", "total_ms", "batch"}
    _, status = ask(endpoint, frames("status_request", {}))
    assert {"requests", "errors", "dropped", "errors_by_code", "latency_ms"} <= set(status["endpoint"])
    assert set(status["endpoint"]["latency_ms"]) == {"p50", "p95", "p99", "n"}


def test_req_delimiter_is_echoed(endpoint):
    header, _ = ask(endpoint, frames("status_request", {}), envelope=(b"",))
    assert header["msg_type"] == "status_reply"


def test_client_timeout_code(tmp_path):
    with InferenceClient(f"ipc://{tmp_path}/nobody.ipc", timeout_ms=200) as client, \
            pytest.raises(Exception) as err:
        client.status()
    assert err.value.code == "timeout"


# ---------------------------------------------------------------- the hub


@pytest.fixture(scope="module")
def hub_fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("conf-hub")
    key = generate_signing_key()
    fleet = Fleet(root / "fleet", 2, TrustedKeys([key.public_key()]), "fp", chunk_size=32 * 1024,
                  groups={"line1/s00": ["a"], "line2/s01": ["b"]})
    pack = make_test_packs(root / "packs", key, [("pick", 1)], base_fingerprint="fp", layers=2)[0]
    fleet.publish(pack, "@a")
    fleet.start_hub()
    yield fleet
    fleet.close()


def hub_ask(fleet, request, index=0, until_type=None):
    ctx = zmq.Context()
    public, secret = load_curve_keypair(fleet.root / "keys" / f"station{index}.key")
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_secretkey, sock.curve_publickey = secret, public
    sock.curve_serverkey = load_curve_public(fleet.hub_config.public_key_file)
    try:
        sock.connect(fleet.hub_config.bind)
        sock.send_multipart(request)
        replies = []
        while sock.poll(3000):
            raw = sock.recv_multipart()
            replies.append(parse_reply(raw, request))
            if until_type is None or replies[-1][0]["msg_type"] in (until_type, "error"):
                break
        return replies
    finally:
        sock.close(0)
        ctx.term()


def hello(station_id):
    return frames("hello", {"station_id": station_id, "base_fingerprint": "fp", "runtime_version": "0.1",
                            "installed": []})


def test_hub_conversation_as_the_spec_says(hub_fleet):
    (header, desired), = hub_ask(hub_fleet, hello("line1/s00"))
    assert header["msg_type"] == "desired_state"
    (pack,) = desired["packs"]
    assert set(pack) == {"task_id", "version", "sha256", "size", "name"}
    got = hub_ask(hub_fleet, frames("fetch", {"name": pack["name"], "sha256": pack["sha256"], "offset": 0,
                                              "credit": pack["size"]}), until_type="never")
    chunks = [(h, b) for h, b in got if h["msg_type"] == "chunk"]
    assert chunks and chunks[-1][1]["last"] is True and all(len(h["buffers"]) == 1 for h, _ in chunks)
    assert sum(h["buffers"][0]["nbytes"] for h, _ in chunks) == pack["size"]
    report = {"name": pack["name"], "task_id": "pick", "version": 1, "state": "activated", "reason": None}
    ((header, ack),) = hub_ask(hub_fleet, frames("report", report))
    assert header["msg_type"] == "ack" and HEX32.match(ack["acked_msg_id"])


HUB_CASES = [
    (hello("line2/s01"), "identity_mismatch"),                                   # key of line1/s00
    (frames("fetch", {"name": "pick-1.kpk", "sha256": "0" * 64, "offset": 0, "credit": 1024}), "unknown_pack"),
    (frames("fetch", {"name": "pick-1.kpk", "sha256": "0" * 64, "offset": 0}), "bad_body"),
    (frames("infer_request", INFER, [("image", PNG)]), "unsupported_type"),
    (frames("report", {"name": "a", "task_id": "t", "version": 1, "state": "received", "reason": "\ud800"}),
     None),   # json.dumps escapes the lone surrogate as \ud800 -> bad_input
    (frames("heartbeat", {"station_id": "line1/s00", "installed": [], "serving": True},
            [("x", b"a" * 600_000), ("y", b"b" * 600_000)]), "too_large"),   # each frame under 1 MiB, the sum not
    ([b"", *hello("line1/s00")], "bad_frames"),      # no REQ delimiter on the fleet link
]


@pytest.mark.parametrize("request_frames, code", HUB_CASES)
def test_hub_errors_as_the_spec_says(hub_fleet, request_frames, code):
    replies = hub_ask(hub_fleet, request_frames)
    assert replies, "no reply"
    header, body = replies[0]
    assert header["msg_type"] == "error" and body["error"] == (code or "bad_input"), body


def test_every_error_code_of_the_spec_is_produced(endpoint, hub_fleet, tmp_path):
    """Every row of the spec's error table comes out of the endpoint, the hub or the client."""
    assert SPEC_CODES, "the spec's error table was not found"
    seen = set()
    for request_frames, _ in ENDPOINT_CASES:
        _header, body = ask(endpoint, request_frames)
        seen.add(body.get("error"))
    for request_frames, _ in HUB_CASES:
        replies = hub_ask(hub_fleet, request_frames)
        seen.add(replies[0][1].get("error") if replies else None)
    with InferenceClient(f"ipc://{tmp_path}/nobody.ipc", timeout_ms=100) as client, \
            pytest.raises(Exception) as err:
        client.status()
    seen.add(err.value.code)
    CODES_SEEN = seen - {None}
    missing = SPEC_CODES - CODES_SEEN
    assert not missing, f"error codes in PROTOCOL.md that no request produced: {sorted(missing)}"
    assert "PackError" in CODES_SEEN   # the `<ErrorClass>` row
