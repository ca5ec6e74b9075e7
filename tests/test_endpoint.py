"""The station's inference endpoint (kaizen.runtime.endpoint) with a fake backend, on loopback."""

import collections
import json
import logging
import math
import random
import threading
import time

import numpy as np
import pytest
import zmq

from kaizen.runtime import protocol as P
from kaizen.runtime.endpoint import InferenceClient, InferenceServer, bench_roundtrip
from kaizen.runtime.errors import ConfigError, InputError, PackError, ProtocolError

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # the fake backend only checks the magic


class FakeBackend:
    """Answers with what it was given; special instructions make it fail in given ways."""

    def __init__(self, delay_s=0.0):
        self.delay_s = delay_s
        self.calls = 0

    def infer(self, image, instruction, task=None):
        self.calls += 1
        time.sleep(self.delay_s)
        if isinstance(image, bytes) and not image.startswith(b"\x89PNG"):
            raise InputError("image bytes are not a PNG or JPEG file")
        if instruction == "pack error":
            raise PackError("pack holes-3.kpk: bad signature")
        if instruction == "crash":
            raise RuntimeError("kaboom in the decoder")
        if instruction == "not a dict":
            return ["yes"]
        if instruction == "nan":
            return {"answer": "yes", "confidence": math.nan}
        kind = "encoded" if isinstance(image, bytes) else f"array{list(image.shape)}"
        return {"answer": f"{instruction}|{kind}", "task_id": task, "pack_version": 1,
                "scores": {"holes": 0.9}, "confidence": 0.8, "timings_ms": {"total": 1.0}}

    def status(self):
        return {"packs": [{"task_id": "holes", "version": 1}], "serving": True}


@pytest.fixture(params=["ipc", "tcp"])
def served(request, tmp_path):
    endpoint = f"ipc://{tmp_path}/infer.sock" if request.param == "ipc" else "tcp://127.0.0.1:*"
    backend = FakeBackend()
    with InferenceServer(backend, endpoint, max_bytes=256 * 1024, poll_ms=20) as server, \
            InferenceClient(server.endpoint, timeout_ms=3000) as client:
        yield server, client, backend


def _raw_exchange(endpoint, frames, timeout_ms=3000):
    """Send raw frames from a fresh DEALER and return the decoded reply."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), f"no reply to {frames!r:.120}"
        return _decode_reply(frames, sock.recv_multipart())
    finally:
        sock.close(0)


def _decode_reply(sent, reply):
    if sent[0] == b"":  # sent like a REQ peer: the reply keeps the empty delimiter
        assert reply[0] == b""
        reply = reply[1:]
    return P.decode(reply)


def _request_frames(body=None, buffers=None, msg_type="infer_request", header=None):
    body = {"instruction": "ok?", "image_format": "encoded"} if body is None else body
    frames = P.Message(msg_type, body, {"image": PNG} if buffers is None else buffers).encode()
    if header:
        h = json.loads(frames[0])
        h.update(header)
        frames[0] = json.dumps(h).encode()
    return frames


def test_round_trips_encoded_path_and_array(served, tmp_path):
    server, client, _ = served
    assert server.endpoint.startswith(("ipc://", "tcp://127.0.0.1:"))
    assert not server.endpoint.endswith("*")
    out = client.infer(PNG, "is it scratched?", task="holes")
    assert out["answer"] == "is it scratched?|encoded" and out["task_id"] == "holes"
    assert out["scores"] == [{"task_id": "holes", "score": 0.9}] and "status" not in out
    path = tmp_path / "part.png"
    path.write_bytes(PNG)
    assert client.infer(path, "from a file")["answer"] == "from a file|encoded"
    assert client.infer(str(path), "from a str path")["task_id"] is None
    arr = np.zeros((48, 64, 3), np.uint8)
    assert client.infer(arr, "array")["answer"] == "array|array[48, 64, 3]"


def test_status_has_backend_health_counters_and_percentiles(served):
    _, client, _ = served
    for _ in range(5):
        client.infer(PNG, "q")
    with pytest.raises(ProtocolError):
        client.infer(PNG, " ")
    st = client.status()
    assert st["station"] == FakeBackend().status()
    ep = st["endpoint"]
    assert ep["requests"] == 6 and ep["errors"] == 1 and ep["errors_by_code"] == {"bad_input": 1}
    lat = ep["latency_ms"]
    assert lat["n"] == 5 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"] < 1000


BAD_ARRAYS = [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
              np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)]


@pytest.mark.parametrize("call, code, words", [
    (lambda c: c.infer(PNG, ""), "bad_input", "instruction is empty"),
    (lambda c: c.infer(PNG, "  \n"), "bad_input", "instruction is empty"),
    (lambda c: c.infer(b"GIF89a", "q"), "bad_input", "not a PNG"),
    (lambda c: c.infer(BAD_ARRAYS[0], "q"), "bad_input", "uint8 [H, W, 3]"),
    (lambda c: c.infer(BAD_ARRAYS[1], "q"), "bad_input", "[8, 8, 4]"),
    (lambda c: c.infer(BAD_ARRAYS[2], "q"), "bad_input", "float32"),
    (lambda c: c.infer(BAD_ARRAYS[3], "q"), "bad_input", "[0, 8, 3]"),
    (lambda c: c.infer(PNG, "pack error"), "PackError", "bad signature"),
    (lambda c: c.infer(PNG, "crash"), "internal", "RuntimeError: kaboom in the decoder"),
    (lambda c: c.infer(PNG, "not a dict"), "internal", "not a dict"),
    (lambda c: c.infer(PNG, "nan"), "internal", "not strict JSON"),
    (lambda c: c.request(P.Message("infer_request", {"instruction": "q", "image_format": "encoded",
                                                      "task": 3}, {"image": PNG})), "bad_body", "task"),
    (lambda c: c.request(P.Message("infer_request", {"instruction": "q", "image_format": "array"},
                                   {"image": PNG})), "bad_input", "got bytes"),
])
def test_bad_requests_get_an_error_and_serving_goes_on(served, call, code, words, caplog):
    _, client, _ = served
    with caplog.at_level(logging.ERROR, logger="kaizen.runtime.endpoint"), \
            pytest.raises(P.WireError) as info:
        call(client)
    assert info.value.code == code and words in str(info.value)
    assert server_endpoint_named(info.value, client)
    if code == "internal":
        assert any("unexpected error" in r.message for r in caplog.records)
    assert client.infer(PNG, "still there?")["answer"] == "still there?|encoded"


def server_endpoint_named(err, client):
    return client.endpoint in str(err)


@pytest.mark.parametrize("frames, code", [
    ([b"garbage"], "bad_frames"),
    ([b"", b"{}"], "bad_frames"),
    ([b"{not json", b"{}"], "bad_frames"),
    (_request_frames(header={"protocol_version": 1}), "version_mismatch"),
    (_request_frames(msg_type="hello", body={"station_id": "s", "base_fingerprint": "f",
                                             "runtime_version": "1", "installed": []},
                     buffers={}), "unsupported_type"),
    (_request_frames(header={"msg_type": "frobnicate"}), "unknown_type"),
    # every frame is under the 256 KiB limit, their sum is not
    (_request_frames(buffers={"image": b"\x89PNG" + b"x" * 150_000, "extra": b"y" * 150_000}),
     "too_large"),
    (_request_frames()[:2], "bad_buffer"),
])
def test_raw_bad_frames_get_an_error_reply(served, frames, code):
    server, client, _ = served
    reply = _raw_exchange(server.endpoint, frames)
    assert reply.msg_type == "error" and reply.body["error"] == code, reply.body
    header = json.loads(frames[0]) if frames[0].startswith(b"{\"") else {}
    assert reply.reply_to == (header.get("msg_id") if code not in ("bad_frames",) else None)
    assert client.infer(PNG, "after")["answer"] == "after|encoded"


def test_req_sockets_work_too(served):
    server, _, _ = served
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(server.endpoint)
        request = P.Message("status_request", {})
        P.send_message(sock, request)
        assert sock.poll(3000)
        reply = P.recv_message(sock)
        assert reply.reply_to == request.msg_id and reply.body["station"]["serving"] is True
    finally:
        sock.close(0)


def test_fuzzed_frames_never_kill_the_server(tmp_path):
    rng = random.Random(1234)
    good = _request_frames()
    with InferenceServer(FakeBackend(), f"ipc://{tmp_path}/f.sock", max_bytes=64 * 1024,
                         poll_ms=20) as server:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        try:
            codes = collections.Counter()
            for i in range(300):
                frames = _fuzz(rng, good)
                sock.send_multipart(frames)
                assert sock.poll(3000), f"no reply to fuzz case {i}: {frames!r:.200}"
                reply = _decode_reply(frames, sock.recv_multipart())
                assert reply.msg_type in ("error", "infer_reply"), reply
                codes[reply.body.get("error", "ok")] += 1
            assert "internal" not in codes, codes  # every malformed input is classified
            assert len(codes) >= 5, codes
        finally:
            sock.close(0)
        with InferenceClient(server.endpoint, timeout_ms=3000) as client:
            assert client.infer(PNG, "alive")["answer"] == "alive|encoded"
            assert client.status()["endpoint"]["requests"] == 301


def _fuzz(rng, good):
    kind = rng.randrange(5)
    if kind == 0:  # random frames
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 5))]
    frames = list(good)
    if kind == 1:  # flip bytes in the header or body
        i = rng.randrange(2)
        data = bytearray(frames[i])
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        frames[i] = bytes(data)
    elif kind == 2:  # drop or duplicate frames
        frames = frames[: rng.randrange(1, len(frames))] if rng.random() < 0.5 else frames + frames[-1:]
    elif kind == 3:  # valid JSON, wrong shapes of values
        h = json.loads(frames[0])
        key = rng.choice(sorted(h))
        h[key] = rng.choice([None, -1, "x", [], {}, 2.5, True])
        frames[0] = json.dumps(h).encode()
    else:  # random body / buffer descriptors
        frames[1] = json.dumps({"instruction": rng.choice(["", "q", 7, None]),
                                "image_format": rng.choice(["encoded", "array", "?"])}).encode()
        if rng.random() < 0.5:
            frames[2] = rng.randbytes(rng.randrange(0, 100))
    return frames


def test_frames_far_over_the_limit_drop_the_peer_not_the_server(served):
    server, client, _ = served  # max_bytes = 256 KiB: MAXMSGSIZE cuts frames over 1 MiB
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(server.endpoint)
        sock.send_multipart(_request_frames(buffers={"image": b"\x89PNG" + bytes(1_200_000)}))
        assert not sock.poll(300)
    finally:
        sock.close(0)
    assert client.infer(PNG, "after a flood")["answer"] == "after a flood|encoded"


def test_concurrent_clients_each_get_their_own_answers(tmp_path):
    errors = []
    with InferenceServer(FakeBackend(), "tcp://127.0.0.1:*", poll_ms=20) as server:
        def worker(k):
            try:
                with InferenceClient(server.endpoint, timeout_ms=5000) as client:
                    for j in range(20):
                        arr = np.zeros((4 + k, 5, 3), np.uint8)
                        out = client.infer(arr if j % 2 else PNG, f"c{k}-{j}")
                        kind = f"array[{4 + k}, 5, 3]" if j % 2 else "encoded"
                        assert out["answer"] == f"c{k}-{j}|{kind}"
            except Exception as err:  # noqa: BLE001 - collected and asserted below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        assert server.stats.snapshot()["requests"] == 120


def test_timeout_names_the_endpoint_and_late_replies_are_dropped(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    with InferenceClient(endpoint, timeout_ms=150) as client:
        with pytest.raises(P.WireError, match="nobody.sock") as info:
            client.status()
        assert info.value.code == "timeout"
    backend = FakeBackend(delay_s=0.4)
    with InferenceServer(backend, "tcp://127.0.0.1:*", poll_ms=20) as server, \
            InferenceClient(server.endpoint, timeout_ms=200) as client:
        with pytest.raises(P.WireError, match="timeout"):
            client.infer(PNG, "slow one")
        client.timeout_ms = 3000
        assert client.infer(PNG, "next one")["answer"] == "next one|encoded"


def test_endpoint_must_be_local_unless_allowed():
    for bad in ("tcp://0.0.0.0:5555", "tcp://10.0.0.7:5555", "http://127.0.0.1:80", "ipc://"):
        with pytest.raises(ConfigError, match="endpoint"):
            InferenceServer(FakeBackend(), bad)
    InferenceServer(FakeBackend(), "tcp://0.0.0.0:5555", allow_remote=True).stop()  # not bound


def test_bind_conflict_is_a_config_error_and_stop_is_clean():
    ctx = zmq.Context()
    try:
        with InferenceServer(FakeBackend(), "tcp://127.0.0.1:*", context=ctx, poll_ms=20) as first:
            second = InferenceServer(FakeBackend(), first.endpoint, context=ctx)
            with pytest.raises(ConfigError, match="cannot bind"):
                second.start()
            with pytest.raises(RuntimeError, match="twice"):
                first.start()
        assert first._thread is None and not ctx.closed  # a shared context is left open
    finally:
        ctx.term()


def test_missing_image_file_is_an_input_error(served, tmp_path):
    _, client, _ = served
    with pytest.raises(InputError, match="nope.png"):
        client.infer(tmp_path / "nope.png", "q")


def test_bench_roundtrip_reports_percentiles():
    out = bench_roundtrip(30, image_shape=(64, 64, 3))
    assert out["n"] == 30 and out["image_bytes"] == 64 * 64 * 3
    assert 0 < out["p50_ms"] <= out["p95_ms"] <= out["p99_ms"] < 1000


def test_rollback_request_is_not_served_on_the_inference_endpoint(served):
    """Admin commands go through the local admin channel (runtime/admin.py), never here."""
    server, client, _ = served
    reply = _raw_exchange(server.endpoint, P.Message("rollback_request", {"task_id": "holes"}).encode())
    assert reply.body["error"] == "unsupported_type"
    assert client.infer(PNG, "after")["answer"] == "after|encoded"
