"""Property-based fuzzing of the wire protocol's decode (hypothesis, bounded and deterministic).

Whatever bytes a peer sends, `decode` either returns a Message whose body is strict JSON and
valid Unicode (so a server can store or echo it) or raises WireError with a code from the
spec's table; never another exception (which would be an `internal` reply or a dead loop).
derandomize=True: the same examples on every run, so CI is deterministic.
"""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaizen.runtime import protocol as P

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# JSON-ish values, including what strict JSON refuses once serialised by a careless peer:
# huge ints, lone surrogates, deep nesting (via recursion), odd floats (serialised as 1e400).
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                    st.sampled_from(["\ud800", "ok\udfff", "é", "a" * 40]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=20)


def _check_outcome(frames, **kw):
    try:
        msg = P.decode(frames, **kw)
    except P.WireError as err:
        assert err.code in P.ERROR_CODES, err.code
        assert err.msg_id is None or P.MSG_ID_RE.match(err.msg_id)
        return None
    text = json.dumps(msg.body, allow_nan=False)          # strict JSON...
    text.encode("utf-8")                                    # ...and valid Unicode
    assert P.MSG_ID_RE.match(msg.msg_id)
    return msg


def _header(msg_type, patch=None):
    h = {"protocol_version": P.PROTOCOL_VERSION, "msg_type": msg_type, "msg_id": "0123456789abcdef" * 2,
         "reply_to": None, "sent_at": 1700000000.25, "buffers": []}
    h.update(patch or {})
    return h


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_random_frames_only_ever_raise_wire_errors(frames):
    _check_outcome(frames)


@FUZZ
@given(st.sampled_from(sorted(P.MESSAGE_TYPES)), st.dictionaries(st.text(max_size=12), json_values, max_size=6),
       st.dictionaries(st.sampled_from(["protocol_version", "msg_type", "msg_id", "reply_to", "sent_at",
                                        "buffers"]), json_values, max_size=2))
def test_arbitrary_json_bodies_and_header_fields(msg_type, body, header_patch):
    header = _header(msg_type, header_patch)
    frames = [json.dumps(header).encode(), json.dumps(body).encode()]
    _check_outcome(frames)
    _check_outcome(frames, allowed_types={"infer_request", "status_request"})


@FUZZ
@given(st.sampled_from(["[", "{\"a\":"]), st.integers(min_value=20, max_value=60_000))
def test_deep_nesting_is_refused_cleanly(opener, depth):
    deep = (opener * depth).encode()
    for frames in ([deep, b"{}"], [json.dumps(_header("status_request")).encode(), deep]):
        assert _check_outcome(frames) is None


@FUZZ
@given(st.sampled_from(["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" + "0" * 400, '"\\ud800"',
                        '"\\udfff x"', "123456789012345678901234567890"]))
def test_strict_json_values_in_the_body(token):
    body = ('{"name": "a.kpk", "task_id": "t", "version": 1, "state": "received", "reason": null, '
            f'"x": {token}}}').encode()
    msg = _check_outcome([json.dumps(_header("report")).encode(), body])
    assert msg is None, token


_GOOD = {
    "fetch": ({"name": "t-1.kpk", "sha256": "00", "offset": 0, "credit": 1024}, {}),
    "infer_request": ({"instruction": "q", "image_format": "encoded"}, {"image": b"\x89PNG...."}),
    "chunk": ({"name": "t-1.kpk", "offset": 0, "sha256_chunk": "00", "total_size": 3, "last": True},
              {"data": b"abc"}),
    "hello": ({"station_id": "s1", "base_fingerprint": "fp", "runtime_version": "0.1",
               "installed": [{"task_id": "t", "version": 1}]}, {}),
}


@FUZZ
@given(st.sampled_from(sorted(_GOOD)), st.data())
def test_mutated_valid_messages(msg_type, data):
    body, buffers = _GOOD[msg_type]
    frames = P.Message(msg_type, dict(body), dict(buffers)).encode()
    header = json.loads(frames[0])
    header.update(msg_id="0123456789abcdef" * 2, sent_at=1700000000.25)   # same length every run
    frames[0] = json.dumps(header).encode()
    i = data.draw(st.integers(min_value=0, max_value=len(frames) - 1))
    frame = bytearray(frames[i])
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(min_value=0, max_value=max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[pos] ^= data.draw(st.integers(min_value=1, max_value=255))
        elif op == "cut":
            del frame[pos:]
        else:
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    frames[i] = bytes(frame)
    if data.draw(st.booleans()):
        frames = frames + [data.draw(st.binary(max_size=16))]
    msg = _check_outcome(frames, max_bytes=4096)
    if msg is not None:   # whatever is accepted can be answered
        P.error_reply(msg, "bad_input", "x").encode()


@FUZZ
@given(st.sampled_from(sorted(P.MESSAGE_TYPES)))
def test_valid_messages_round_trip(msg_type):
    bodies = {
        "infer_request": {"instruction": "is it torn?", "image_format": "encoded"},
        "infer_reply": {"status": "ok", "scores": [{"task_id": "t", "score": 0.5}]},
        "status_request": {}, "status_reply": {"status": "ok", "station": {}, "endpoint": {}},
        "rollback_request": {"task_id": "t"}, "rollback_reply": {"status": "ok", "task_id": "t", "version": 1},
        "install_request": {"path": "/x/t-1.kpk"}, "install_reply": {"status": "ok", "task_id": "t", "version": 1},
        "error": {"status": "error", "error": "bad_input", "detail": "d"},
        "hello": _GOOD["hello"][0], "heartbeat": {"station_id": "s", "installed": [], "serving": True},
        "desired_state": {"packs": []}, "fetch": _GOOD["fetch"][0], "chunk": _GOOD["chunk"][0],
        "report": {"name": "t-1.kpk", "task_id": "t", "version": 1, "state": "received", "reason": None},
        "ack": {"acked_msg_id": "ab" * 16}, "announce": {"packs": []},
        "feedback": {"answer": "yes", "part_id": "ab" * 16},
        "feedback_reply": {"status": "ok", "sample_id": "cd" * 32, "captured": True},
        "sample_chunk": {"sample_id": "cd" * 32, "offset": 0, "total_size": 3, "meta": {}},
        "sample_ack": {"sample_id": "cd" * 32, "offset": 3, "done": True},
    }
    buffers = {"sample_chunk": {"data": b"abc"}}.get(msg_type) or _GOOD.get(msg_type, ({}, {}))[1]
    msg = P.Message(msg_type, bodies[msg_type], dict(buffers))
    out = P.decode(msg.encode())
    assert (out.msg_type, out.body, out.buffers, out.msg_id) == (msg_type, msg.body, msg.buffers, msg.msg_id)


class _Backend:
    """Acts like a station where hostile input matters: UTF-8 tokenizing, shape checks."""

    def infer(self, image, instruction, task=None):
        instruction.encode("utf-8")
        return {"answer": "yes", "scores": {"a": 0.5}}

    def status(self):
        return {}


@FUZZ
@given(st.sampled_from(["infer_request", "status_request", "rollback_request", "hello"]),
       st.dictionaries(st.sampled_from(["instruction", "image_format", "task", "x"]), json_values, max_size=4),
       st.lists(st.binary(max_size=32), max_size=3))
def test_endpoint_handle_never_answers_internal(msg_type, body, buffers):
    """Whatever a client sends, the endpoint answers with a reply or a typed error, never `internal`."""
    from kaizen.runtime.endpoint import InferenceServer

    server = InferenceServer(_Backend(), "inproc://fuzz-handle")
    descriptors = [{"name": "image" if i == 0 else f"b{i}", "kind": "bytes", "nbytes": len(b)}
                   for i, b in enumerate(buffers)]
    frames = [json.dumps(_header(msg_type, {"buffers": descriptors})).encode(), json.dumps(body).encode(), *buffers]
    reply = P.decode(server.handle(frames))
    assert reply.body["status"] in ("ok", "error")
    assert reply.body.get("error") != "internal", reply.body
    server.stop()


_HUB = {}


def _hub():
    """One Hub (not serving: its handlers are called directly) over a temporary DB and key files."""
    if not _HUB:
        import tempfile
        from pathlib import Path

        from kaizen.hub.config import AllowedStation, HubConfig
        from kaizen.hub.db import HubDB
        from kaizen.hub.server import Hub
        from kaizen.runtime.keys import generate_curve_keypair

        root = Path(tempfile.mkdtemp(prefix="kzfuzzhub"))
        generate_curve_keypair(root, "hub")
        generate_curve_keypair(root, "s")
        config = HubConfig(bind="tcp://127.0.0.1:1", pub_bind="tcp://127.0.0.1:2", public_key_file=root / "hub.pub",
                           secret_key_file=root / "hub.key", packs_dir=root / "packs", db_path=root / "hub.sqlite",
                           stations=[AllowedStation("line1/s00", root / "s.pub", ["line1"])])
        _HUB.update(hub=Hub(config), db=HubDB(config.db_path))
    return _HUB["hub"], _HUB["db"]


field_values = st.one_of(st.text(max_size=30), st.sampled_from(["line1/s00", "pick-1.kpk", "0" * 64, "\x00"]),
                         st.integers(min_value=0, max_value=P.MAX_INT), st.booleans(), st.none(),
                         st.lists(st.fixed_dictionaries({"task_id": st.text(max_size=10),
                                                         "version": st.integers(min_value=0, max_value=P.MAX_INT)}),
                                  max_size=3))


# capture-record metas (sample_chunk): every field present, each a typical or an odd value
sample_metas = st.fixed_dictionaries({
    "schema": st.sampled_from([1, 1, 1, 2, "1", True]), "sample_id": st.sampled_from(["ab" * 32, "ab" * 32, "x"]),
    "station_id": st.sampled_from(["line1/s00", "", "é" * 300]), "captured_at": st.sampled_from([1.7e9, -1, "now"]),
    "reason": st.sampled_from(["no_match", "low_confidence", "low_confidence", "feedback", "other"]),
    "instruction": st.text(max_size=30), "image_format": st.sampled_from(["png", "jpeg", "gif"]),
    "image_sha256": st.sampled_from(["cd" * 32, "cd" * 32, "CD" * 32, ""]), "image_bytes": st.integers(0, 20),
    "label": st.one_of(st.none(), st.text(max_size=10)), "task_hint": st.one_of(st.none(), st.text(max_size=10)),
    "result": st.one_of(st.none(), json_values, st.fixed_dictionaries(
        {"outcome": st.sampled_from(["answered", "no_match"]), "answer": st.one_of(st.none(), st.text(max_size=5)),
         "task_id": st.one_of(st.none(), st.text(max_size=5)), "pack_version": st.one_of(st.none(), st.integers(-1, 3)),
         "confidence": st.one_of(st.none(), st.floats(allow_nan=False)), "scores": json_values}))},
    optional={"extra": json_values})


@FUZZ
@given(st.sampled_from(["hello", "heartbeat", "fetch", "report", "sample_chunk"]), st.data())
def test_hub_handlers_never_fail_on_a_decodable_message(msg_type, data):
    """Every required field present, each drawn from odd values: decodable ones never hit a hub bug."""
    hub, db = _hub()
    typed = {str: st.one_of(st.text(max_size=30), st.sampled_from(["line1/s00", "pick-1.kpk", "0" * 64, "\x00"])),
             int: st.integers(min_value=0, max_value=P.MAX_INT), bool: st.booleans(),
             list: st.lists(st.fixed_dictionaries({"task_id": st.text(max_size=10),
                                                   "version": st.integers(min_value=0, max_value=P.MAX_INT)},
                                                  optional={"extra": json_values}), max_size=5),
             dict: st.one_of(sample_metas, st.dictionaries(st.text(max_size=8), json_values, max_size=4))}
    body = {}
    for name, spec in P.MESSAGE_TYPES[msg_type].fields.items():
        kind = spec[0] if isinstance(spec, tuple) else spec
        strategy = typed.get(kind, field_values) if data.draw(st.integers(0, 9), label="odd") else field_values
        body[name] = data.draw(strategy, label=name)
    if msg_type == "report":
        body["state"] = data.draw(st.sampled_from(sorted(P.REPORT_STATES)))
    buffers = {}
    if msg_type == "sample_chunk":
        if data.draw(st.booleans(), label="real id"):
            body["sample_id"] = "ab" * 32
        buffers["data"] = data.draw(st.one_of(st.binary(max_size=70), st.sampled_from([b"\x89PNG\r\n\x1a\n" + b"x" * 8])))
    try:
        msg = P.decode(P.Message(msg_type, body, buffers).encode())
    except P.WireError:
        return
    sent = []
    hub._dispatch(db, "line1/s00", b"peer", msg, sent.append)
    assert all(m.body.get("error") != "internal" for m in sent)
    if not (msg_type == "fetch" and body["credit"] == 0):
        assert sent
    for m in sent:
        m.encode()


ODD_META_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 30), st.text(max_size=12), json_values,
                            st.sampled_from(["png", "jpeg", "feedback", "no_match", "ab" * 32, "é" * 5000]))


@FUZZ
@given(st.integers(0, 3), st.integers(1, 24), st.booleans(), st.data())
def test_hub_sample_store_never_fails_on_a_decodable_sample_chunk(part, total, feedback, data):
    """Valid capture records with 0-2 fields made odd, sent whole or as a part at a drawn offset
    (partial files, held offsets, sha and id checks): always a sample_ack, never a hub bug."""
    import hashlib

    from kaizen.hub.samples import sample_id_of

    hub, db = _hub()
    image = b"\x89PNG\r\n\x1a\n" + data.draw(st.binary(min_size=total, max_size=total), label="image")
    label = "yes" if feedback else None
    sid = sample_id_of(image, "Is it ok?", label)
    meta = {"schema": 1, "sample_id": sid, "station_id": "line1/s00", "captured_at": 1.7e9,
            "reason": "feedback" if feedback else "low_confidence", "instruction": "Is it ok?",
            "image_format": "png", "image_sha256": hashlib.sha256(image).hexdigest(), "image_bytes": len(image),
            "label": label, "task_hint": None,
            "result": {"outcome": "answered", "answer": "no", "task_id": "seal", "pack_version": 1,
                       "confidence": 0.2, "scores": {"seal": 0.2}}}
    for _ in range(data.draw(st.integers(0, 2), label="odd fields")):
        key = data.draw(st.sampled_from(sorted(meta) + ["result.confidence", "result.scores"]), label="field")
        value = data.draw(ODD_META_VALUES, label="value")
        if key.startswith("result."):
            meta["result"][key[7:]] = value
        else:
            meta[key] = value
    offset = data.draw(st.sampled_from([0, 0, part * 4, len(image)]), label="offset")
    chunk = image[offset:offset + data.draw(st.sampled_from([len(image), 4, 0]), label="size")]
    body = {"sample_id": sid, "offset": offset, "total_size": len(image), "meta": meta}
    try:
        msg = P.decode(P.Message("sample_chunk", body, {"data": chunk}).encode())
    except P.WireError:
        return
    sent = []
    hub._dispatch(db, "line1/s00", b"peer", msg, sent.append)
    [reply] = sent
    assert reply.msg_type == "sample_ack", reply.body
    assert reply.body["sample_id"] == sid and 0 <= reply.body["offset"] <= len(image)
    reply.encode()
