"""The wire protocol's framing and validation (kaizen.runtime.protocol), and PROTOCOL.md's ties."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import zmq

from kaizen.runtime import protocol as P
from kaizen.runtime.errors import ProtocolError

SPEC = Path(__file__).resolve().parents[1] / "runtime" / "PROTOCOL.md"

GOOD_BODIES = {
    "infer_request": {"instruction": "is it scratched?", "image_format": "encoded"},
    "infer_reply": {"status": "ok", "answer": "yes"},
    "status_request": {},
    "status_reply": {"status": "ok", "station": {}, "endpoint": {}},
    "rollback_request": {"task_id": "holes"},
    "rollback_reply": {"status": "ok", "task_id": "holes", "version": 2},
    "install_request": {"path": "/var/lib/kaizen/incoming/holes-3.kpk"},
    "install_reply": {"status": "ok", "task_id": "holes", "version": 3},
    "error": {"status": "error", "error": "bad_input", "detail": "empty"},
    "hello": {"station_id": "s1", "base_fingerprint": "ab", "runtime_version": "0.1.0",
              "installed": [{"task_id": "holes", "version": 2}]},
    "heartbeat": {"station_id": "s1", "installed": [], "serving": True},
    "desired_state": {"packs": [{"task_id": "t", "version": 1, "sha256": "00", "size": 10,
                                 "name": "t-1.kpk"}]},
    "fetch": {"name": "t-1.kpk", "sha256": "00", "offset": 0, "credit": 1 << 20},
    "chunk": {"name": "t-1.kpk", "offset": 0, "sha256_chunk": "00", "total_size": 3,
              "last": True},
    "report": {"name": "t-1.kpk", "task_id": "t", "version": 1, "state": "rejected",
               "reason": "bad signature"},
    "ack": {"acked_msg_id": "ab" * 16},
    "announce": {"packs": []},
    "feedback": {"answer": "yes", "part_id": "ab" * 16},
    "feedback_reply": {"status": "ok", "sample_id": "cd" * 32, "captured": True},
    "sample_chunk": {"sample_id": "cd" * 32, "offset": 0, "total_size": 3, "meta": {"reason": "feedback"}},
    "sample_ack": {"sample_id": "cd" * 32, "offset": 3, "done": True},
}
GOOD_BUFFERS = {"infer_request": {"image": b"\x89PNG..."}, "chunk": {"data": b"abc"},
                "sample_chunk": {"data": b"abc"}}


def _good(msg_type):
    return P.Message(msg_type, dict(GOOD_BODIES[msg_type]), dict(GOOD_BUFFERS.get(msg_type, {})))


def _frames(header_patch=None, body=None, buffers=None, msg_type="fetch"):
    frames = _good(msg_type).encode()
    header = json.loads(frames[0])
    header.update(header_patch or {})
    frames[0] = json.dumps(header).encode()
    if body is not None:
        frames[1] = json.dumps(body).encode()
    if buffers is not None:
        frames[2:] = buffers
    return frames


def test_every_registered_type_round_trips():
    assert set(GOOD_BODIES) == set(P.MESSAGE_TYPES)
    for msg_type in P.MESSAGE_TYPES:
        msg = _good(msg_type)
        out = P.decode(msg.encode(), max_bytes=P.MAX_MESSAGE_BYTES)
        assert (out.msg_type, out.body, out.msg_id) == (msg_type, msg.body, msg.msg_id)
        assert out.buffers == msg.buffers


def test_header_carries_version_id_and_buffer_descriptors():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    msg = P.Message("infer_request", {"instruction": "x", "image_format": "array"},
                    {"image": image, "raw": b"xyz"}, reply_to="ab" * 16)
    frames = msg.encode()
    header = json.loads(frames[0])
    assert header["protocol_version"] == P.PROTOCOL_VERSION == 2
    assert header["msg_type"] == "infer_request" and re.fullmatch(r"[0-9a-f]{32}", header["msg_id"])
    assert header["reply_to"] == "ab" * 16 and isinstance(header["sent_at"], float)
    assert header["buffers"] == [
        {"name": "image", "dtype": "u1", "shape": [2, 3, 3], "nbytes": 18},
        {"name": "raw", "kind": "bytes", "nbytes": 3},
    ]
    assert frames[2] == image.tobytes() and frames[3] == b"xyz"
    for frame in frames:  # never pickle: pickle protocol 2+ starts with 0x80
        assert not frame.startswith(b"\x80")


@pytest.mark.parametrize("dtype", ["u1", "i1", "u2", "i2", "i4", "i8", "f2", "f4", "f8", "b1"])
def test_arrays_round_trip_bit_exact_in_every_allowed_dtype(dtype):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    msg = P.Message("chunk", dict(GOOD_BODIES["chunk"]), {"data": b"", "arr": arr})
    out = P.decode(msg.encode())
    assert out.buffers["arr"].dtype == np.dtype(dtype) and out.buffers["arr"].shape == (3, 4, 5)
    assert np.array_equal(out.buffers["arr"], arr)


def test_big_endian_and_non_contiguous_arrays_are_normalised():
    arr = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    out = P.decode(P.Message("chunk", dict(GOOD_BODIES["chunk"]), {"data": b"", "a": arr}).encode())
    assert out.buffers["a"].dtype == np.dtype("<f4") and np.array_equal(out.buffers["a"], arr)


def test_encode_refuses_objects_pickle_would_take():
    with pytest.raises(P.WireError, match="dtype object"):
        P.Message("chunk", dict(GOOD_BODIES["chunk"]),
                  {"data": b"", "o": np.array([{}], dtype=object)}).encode()
    with pytest.raises(P.WireError, match="must be bytes or a numpy array"):
        P.Message("chunk", dict(GOOD_BODIES["chunk"]), {"data": [1, 2]}).encode()
    with pytest.raises(P.WireError, match="not strict JSON"):
        P.Message("infer_reply", {"status": "ok", "x": object()}).encode()
    with pytest.raises(P.WireError, match="not strict JSON"):
        P.Message("infer_reply", {"status": "ok", "x": float("nan")}).encode()
    with pytest.raises(P.WireError, match="missing field 'credit'"):
        P.Message("fetch", {"name": "a", "sha256": "b", "offset": 0}).encode()
    with pytest.raises(P.WireError, match="needs buffer 'data'"):
        P.Message("chunk", dict(GOOD_BODIES["chunk"])).encode()


def _code(frames, **kw):
    with pytest.raises(P.WireError) as info:
        P.decode(frames, **kw)
    assert isinstance(info.value, ProtocolError)
    return info.value.code, str(info.value)


@pytest.mark.parametrize("frames, code, words", [
    ([b"{}"], "bad_frames", "at least 2 frames"),
    ([b"not json", b"{}"], "bad_frames", "frame 0 (header) is not JSON"),
    ([b"\xff\xfe", b"{}"], "bad_frames", "frame 0 (header) is not JSON"),
    ([b"[1, 2]", b"{}"], "bad_frames", "frame 0 (header) must be a JSON object"),
])
def test_decode_rejects_malformed_frames(frames, code, words):
    got, text = _code(frames)
    assert got == code and words in text


@pytest.mark.parametrize("patch, code, words", [
    ({"protocol_version": 1}, "version_mismatch", "protocol_version is 1"),
    ({"protocol_version": 2.0}, "version_mismatch", "protocol_version is 2.0"),
    ({"protocol_version": None}, "version_mismatch", "protocol_version is None"),
    ({"protocol_version": True}, "version_mismatch", "protocol_version is True"),
    ({"msg_type": "frobnicate"}, "unknown_type", "'frobnicate'"),
    ({"msg_type": {"a": 1}}, "unknown_type", "msg_type"),  # unhashable: found by the fuzz test
    ({"msg_type": None}, "unknown_type", "msg_type"),
    ({"msg_id": ""}, "bad_frames", "msg_id"),
    ({"msg_id": 7}, "bad_frames", "msg_id"),
    ({"msg_id": "not-a-uuid4-hex"}, "bad_frames", "uuid4 hex"),
    ({"reply_to": 3}, "bad_frames", "reply_to"),
    ({"reply_to": "x" * 32}, "bad_frames", "reply_to"),
    ({"sent_at": 10 ** 400}, "bad_frames", "out of range"),
    ({"sent_at": "noon"}, "bad_frames", "sent_at"),
    ({"buffers": {}}, "bad_frames", "buffers must be a list"),
])
def test_decode_rejects_bad_header_fields(patch, code, words):
    got, text = _code(_frames(patch))
    assert got == code and words in text


def test_missing_version_is_a_version_mismatch():
    frames = _frames()
    header = json.loads(frames[0])
    del header["protocol_version"]
    frames[0] = json.dumps(header).encode()
    assert _code(frames)[0] == "version_mismatch"


@pytest.mark.parametrize("body, words", [
    ({"name": "a", "sha256": "b", "offset": 0}, "missing field 'credit'"),
    ({"name": "a", "sha256": "b", "offset": -1, "credit": 1}, "'offset' must be int >= 0"),
    ({"name": "a", "sha256": "b", "offset": True, "credit": 1}, "'offset' must be int"),
    ({"name": 5, "sha256": "b", "offset": 0, "credit": 1}, "'name' must be str"),
])
def test_decode_checks_required_body_fields(body, words):
    got, text = _code(_frames(body=body))
    assert got == "bad_body" and words in text


def test_decode_checks_enums_and_list_items():
    bad_state = dict(GOOD_BODIES["report"], state="exploded")
    assert "'state' must be one of" in _code(_frames(body=bad_state, msg_type="report"))[1]
    bad_item = {"packs": [{"task_id": "t", "version": 1, "sha256": "0", "name": "n"}]}
    assert "packs[0].size" in _code(_frames(body=bad_item, msg_type="desired_state"))[1]
    bad_body = _frames(msg_type="fetch")
    bad_body[1] = b"[]"
    assert "frame 1 (body) must be a JSON object" in _code(bad_body)[1]


@pytest.mark.parametrize("descs, bufs, words", [
    ([], [b"x"], "describes 0 buffers but 1"),
    ([{"name": "data", "kind": "bytes", "nbytes": 2}], [b"x"], "nbytes 2 but the frame has 1"),
    ([{"name": "data", "dtype": "O", "shape": [1], "nbytes": 8}], [b"x" * 8], "dtype 'O'"),
    ([{"name": "data", "dtype": "f4", "shape": [3], "nbytes": 8}], [b"x" * 8], "needs 12 bytes"),
    ([{"name": "data", "dtype": "f4", "shape": [-2], "nbytes": 8}], [b"x" * 8], "shape must be"),
    ([{"name": "x", "kind": "bytes", "nbytes": 1}], [b"x"], "needs buffer 'data'"),
    ([{"kind": "bytes", "nbytes": 1}], [b"x"], "non-empty name"),
])
def test_decode_checks_buffers_against_the_header(descs, bufs, words):
    frames = _frames({"buffers": descs}, msg_type="chunk", buffers=bufs)
    got, text = _code(frames)
    assert got == "bad_buffer" and words in text


def test_size_limit_is_checked_before_parsing():
    frames = [b"garbage that is not json", b"{}", b"x" * 2000]
    got, text = _code(frames, max_bytes=1000)
    assert got == "too_large" and "over the limit of 1000" in text
    big = _good("fetch")
    big.buffers["pad"] = b"x" * 2000
    with pytest.raises(P.WireError) as info:
        P.decode(big.encode(), max_bytes=1000)
    assert info.value.code == "too_large" and info.value.msg_id == big.msg_id  # for reply_to
    msg = P.Message("chunk", dict(GOOD_BODIES["chunk"]), {"data": b"x" * P.CHUNK_SIZE})
    assert P.decode(msg.encode()).buffers["data"] == b"x" * P.CHUNK_SIZE
    assert P.MAX_MESSAGE_BYTES == 32 * 1024 * 1024 and P.CHUNK_SIZE == 256 * 1024


def test_allowed_types_and_msg_id_on_errors():
    frames = _good("hello").encode()
    with pytest.raises(P.WireError) as info:
        P.decode(frames, allowed_types={"infer_request"})
    assert info.value.code == "unsupported_type"
    assert info.value.msg_id == json.loads(frames[0])["msg_id"]


def test_replies_carry_reply_to_and_status():
    req = _good("infer_request")
    ok = P.ok_reply(req, {"answer": "yes"})
    assert (ok.msg_type, ok.reply_to, ok.status, ok.body["answer"]) == ("infer_reply", req.msg_id, "ok", "yes")
    assert P.ok_reply(_good("report"), {"acked_msg_id": "x"}).msg_type == "ack"
    with pytest.raises(ValueError, match="pass msg_type"):
        P.ok_reply(_good("heartbeat"))
    err = P.error_reply(req, "bad_input", "instruction is empty")
    assert err.msg_type == "error" and err.reply_to == req.msg_id
    assert err.body == {"status": "error", "error": "bad_input", "detail": "instruction is empty"}
    assert P.error_reply(None, "bad_frames", "x").reply_to is None
    assert P.decode(err.encode()).status == "error"


def test_split_envelope_handles_dealer_and_req_peers():
    payload = _good("status_request").encode()
    assert P.split_envelope([b"id", *payload]) == ([b"id"], payload)
    assert P.split_envelope([b"id", b"", *payload]) == ([b"id", b""], payload)


def test_send_and_recv_over_a_router_dealer_pair():
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind("inproc://protocol-test")
        dealer.connect("inproc://protocol-test")
        arr = np.ones((4, 4), np.float32)
        P.send_message(dealer, P.Message("chunk", dict(GOOD_BODIES["chunk"]), {"data": b"a", "w": arr}))
        assert router.poll(2000)
        envelope, msg = P.recv_message(router, router=True)
        assert np.array_equal(msg.buffers["w"], arr) and msg.buffers["data"] == b"a"
        P.send_message(router, P.ok_reply(msg, {"acked_msg_id": msg.msg_id}, msg_type="ack"), envelope)
        assert dealer.poll(2000)
        reply = P.recv_message(dealer)
        assert reply.reply_to == msg.msg_id and reply.msg_type == "ack"
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def test_protocol_md_matches_the_code():
    text = SPEC.read_text()
    first_heading = next(line for line in text.splitlines() if line.startswith("#"))
    assert first_heading == f"# Kaizen wire protocol, version {P.PROTOCOL_VERSION}"
    for msg_type, spec in P.MESSAGE_TYPES.items():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{msg_type}` |")]
        assert len(rows) == 1, f"PROTOCOL.md needs one table row for `{msg_type}`"
        for name in [*spec.fields, *spec.buffers]:
            assert name in rows[0], f"PROTOCOL.md row for {msg_type} does not name {name}"
    for code in P.ERROR_CODES:
        assert f"| `{code}` |" in text, f"PROTOCOL.md error table lacks `{code}`"
    for dtype in P.ALLOWED_DTYPES:
        assert f"`{dtype}`" in text
