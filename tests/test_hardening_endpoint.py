"""Issue 11, endpoint half: hostile requests, error codes, the local admin channel and endpoints.

Each test reproduces one finding of the issue against a real InferenceServer / AdminServer on
ipc (a fake backend stands in for the station) and fails on the code before the fix.
"""

import io
import json
import os
import stat
import time
import uuid
from types import SimpleNamespace

import pytest
import zmq
from PIL import Image

from kaizen.runtime import cli
from kaizen.runtime.admin import AdminClient, AdminServer
from kaizen.runtime.config import StationConfig
from kaizen.runtime.endpoint import InferenceClient, InferenceServer, check_local_endpoint
from kaizen.runtime.errors import ConfigError, PackError
from kaizen.runtime.protocol import Message, decode

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


class Backend:
    """Like a station: it tokenizes the instruction (UTF-8) and decodes the image with PIL."""

    def __init__(self):
        self.installed = []
        self.rolled_back = []

    def infer(self, image, instruction, task=None):
        instruction.encode("utf-8")             # a tokenizer does this: a lone surrogate raises
        if instruction == "bomb":
            raise Image.DecompressionBombError("Image size (67108864 pixels) exceeds limit")
        if instruction == "repr":
            raise ValueError(f"cannot identify image file {io.BytesIO()!r}")
        return {"answer": "yes", "task_id": "holes", "scores": {"pick": 0.2, "holes": 0.9, "seal": 0.5}}

    def status(self):
        return {"packs": []}

    def rollback(self, task_id):
        if task_id != "holes":
            raise PackError(f"no previous version of {task_id}")
        self.rolled_back.append(task_id)
        return SimpleNamespace(task_id=task_id, version=1)

    def install(self, path):
        if not str(path).endswith(".kpk"):
            raise PackError(f"pack {path} refused: not a tar file")
        self.installed.append(path)
        return SimpleNamespace(task_id="holes", version=3)


@pytest.fixture
def served(tmp_path):
    with InferenceServer(Backend(), f"ipc://{tmp_path}/infer.sock", max_bytes=256 * 1024, poll_ms=20) as server:
        yield server


def exchange(endpoint, frames, timeout_ms=3000):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms):
            return None
        return decode(sock.recv_multipart())
    finally:
        sock.close(0)


def header(**patch):
    h = {"protocol_version": 2, "msg_type": "infer_request", "msg_id": uuid.uuid4().hex, "reply_to": None,
         "sent_at": time.time(), "buffers": [{"name": "image", "kind": "bytes", "nbytes": len(PNG)}]}
    h.update(patch)
    return json.dumps(h).encode()


BODY = json.dumps({"instruction": "ok?", "image_format": "encoded"}).encode()

HOSTILE = [
    ("no reply_to", [json.dumps({k: v for k, v in json.loads(header()).items() if k != "reply_to"}).encode(),
                     BODY, PNG], "bad_frames"),
    ("sent_at 10**400", [header().replace(b'"sent_at": ', b'"sent_at": 1' + b"0" * 400 + b", \"x\": "),
                         BODY, PNG], "bad_frames"),
    ("deep header", [b"[" * 30000, BODY, PNG], "bad_frames"),
    ("lone surrogate", [header(), b'{"instruction": "is it \\ud800 torn?", "image_format": "encoded"}', PNG],
     "bad_input"),
    ("NaN in the body", [header(), b'{"instruction": "ok?", "image_format": "encoded", "x": NaN}', PNG],
     "bad_frames"),
    ("Infinity in the body", [header(), b'{"instruction": "ok?", "image_format": "encoded", "x": 1e400}', PNG],
     "bad_frames"),
    ("msg_id not uuid4 hex", [header(msg_id="abc"), BODY, PNG], "bad_frames"),
    ("bad image_format", [header(), b'{"instruction": "ok?", "image_format": "gif"}', PNG], "bad_body"),
]


@pytest.mark.parametrize("what, frames, code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_the_right_code_never_internal(served, what, frames, code):
    """Findings 1, 7, 11: each answered `internal` (or was accepted) before."""
    reply = exchange(served.endpoint, frames)
    assert reply is not None and reply.msg_type == "error" and reply.body["error"] == code, (what, reply.body)
    assert served.stats.snapshot()["errors_by_code"].get("internal", 0) == 0


def test_decompression_bomb_is_bad_input_and_details_carry_no_object_reprs(served):
    """Finding 7: DecompressionBombError answered `internal`; Finding 11: details leaked reprs."""
    with InferenceClient(served.endpoint, timeout_ms=3000) as client:
        with pytest.raises(Exception) as bomb:
            client.infer(PNG, "bomb")
        assert bomb.value.code == "bad_input" and "pixels" in bomb.value.detail
        with pytest.raises(Exception) as leak:
            client.infer(PNG, "repr")
        assert leak.value.code == "internal"
        assert " at 0x" not in leak.value.detail and "<object>" in leak.value.detail


def test_scores_are_a_list_best_first(served):
    """Finding 11: `scores` was a JSON object although the spec says "best first"."""
    with InferenceClient(served.endpoint, timeout_ms=3000) as client:
        out = client.infer(PNG, "ok?")
    assert out["scores"] == [{"task_id": "holes", "score": 0.9}, {"task_id": "seal", "score": 0.5},
                             {"task_id": "pick", "score": 0.2}]


def test_total_size_is_refused_and_a_frame_over_the_limit_is_never_buffered(served):
    """Finding 6: the cap was per frame at 4x the limit (6 x 100 MiB frames were read)."""
    frames = [header(buffers=[{"name": "image", "kind": "bytes", "nbytes": 100_000},
                              {"name": "b", "kind": "bytes", "nbytes": 100_000},
                              {"name": "c", "kind": "bytes", "nbytes": 100_000}]),
              BODY, b"\x89PNG" + b"x" * 99_996, b"y" * 100_000, b"z" * 100_000]
    reply = exchange(served.endpoint, frames)
    assert reply.body["error"] == "too_large"
    assert exchange(served.endpoint, [header(), BODY, b"x" * 300_000], timeout_ms=1000) is None  # dropped
    assert exchange(served.endpoint, [header(), BODY, PNG]).body["status"] == "ok"


def test_one_failing_message_never_ends_the_serving_thread(served, monkeypatch):
    """Every server loop isolates each message: an exception outside handle() was fatal."""
    real = served.handle
    calls = []

    def flaky(payload):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug while answering")
        return real(payload)

    monkeypatch.setattr(served, "handle", flaky)
    assert exchange(served.endpoint, [header(), BODY, PNG], timeout_ms=500) is None
    assert exchange(served.endpoint, [header(), BODY, PNG]).body["status"] == "ok"
    assert served.stats.snapshot()["dropped"] == 1


def test_rollback_is_not_served_on_the_inference_endpoint(served):
    """Finding 8: any local user rolled a task back over the (tcp) inference endpoint."""
    reply = exchange(served.endpoint, Message("rollback_request", {"task_id": "holes"}).encode())
    assert reply.body["error"] == "unsupported_type"


def test_abstract_and_shared_folder_endpoints_are_refused(tmp_path):
    """Finding 8: ipc://@name passed the local check; a socket in /tmp can be squatted."""
    with pytest.raises(ConfigError, match="abstract"):
        check_local_endpoint("ipc://@kaizen-station")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        InferenceServer(Backend(), f"ipc://{shared}/s.ipc").start()
    with pytest.raises(ConfigError, match="abstract"):
        StationConfig(**_station_fields(tmp_path), inference_endpoint="ipc://@kaizen")
    with pytest.raises(ConfigError, match="admin_endpoint"):
        StationConfig(**_station_fields(tmp_path), admin_endpoint="tcp://127.0.0.1:7000")


def _station_fields(tmp_path):
    return dict(station_id="line1/s01", hub_endpoint="tcp://127.0.0.1:1", hub_public_key_file=tmp_path / "h.pub",
                public_key_file=tmp_path / "s.pub", secret_key_file=tmp_path / "s.key", bundle_dir=tmp_path,
                store_dir=tmp_path / "store", trusted_keys_dir=tmp_path, state_dir=tmp_path / "state")


def test_default_endpoints_live_in_a_private_runtime_folder(tmp_path):
    """Finding 8: the code default was ipc:///tmp/kaizen-station.ipc."""
    cfg = StationConfig(**_station_fields(tmp_path))
    assert cfg.inference_endpoint == f"ipc://{tmp_path}/state/run/station.ipc"
    assert cfg.admin_endpoint == f"ipc://{tmp_path}/state/run/admin/admin.ipc"
    with InferenceServer(Backend(), cfg.inference_endpoint, poll_ms=20):
        assert stat.S_IMODE(os.stat(tmp_path / "state" / "run").st_mode) == 0o700


def test_admin_channel_is_private_and_serves_rollback_and_install(tmp_path):
    backend = Backend()
    endpoint = f"ipc://{tmp_path}/run/admin/admin.ipc"
    with pytest.raises(ConfigError, match="never tcp"):
        AdminServer(backend, "tcp://127.0.0.1:*")
    with AdminServer(backend, endpoint, poll_ms=20) as server, AdminClient(server.endpoint, 3000) as client:
        assert stat.S_IMODE(os.stat(tmp_path / "run" / "admin").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(tmp_path / "run" / "admin" / "admin.ipc").st_mode) == 0o600
        assert client.rollback("holes") == {"task_id": "holes", "version": 1}
        with pytest.raises(Exception, match="no previous version of seal"):
            client.rollback("seal")
        pack = tmp_path / "holes-3.kpk"
        pack.write_bytes(b"pack")
        assert client.install(pack) == {"task_id": "holes", "version": 3}
        assert backend.installed == [str(pack)]
        with pytest.raises(Exception) as missing:
            client.install(tmp_path / "gone.kpk")
        assert missing.value.code == "PackError"
        relative = exchange(server.endpoint, Message("install_request", {"path": "holes-3.kpk"}).encode())
        assert relative.body["error"] == "bad_body"
        infer = exchange(server.endpoint, Message("infer_request", {"instruction": "q", "image_format": "encoded"},
                                                  {"image": PNG}).encode())
        assert infer.body["error"] == "unsupported_type"
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(ConfigError, match="mode 0700"):
        AdminServer(backend, f"ipc://{loose}/admin.ipc").start()


def _station_toml(tmp_path, admin_endpoint):
    text = "\n".join(f'{k} = "{v}"' for k, v in _station_fields(tmp_path).items())
    path = tmp_path / "station.toml"
    path.write_text(text + f'\nadmin_endpoint = "{admin_endpoint}"\n')
    return path


def test_station_install_and_rollback_commands_use_the_admin_channel(tmp_path, capsys):
    backend = Backend()
    endpoint = f"ipc://{tmp_path}/run/admin/admin.ipc"
    config = _station_toml(tmp_path, endpoint)
    pack = tmp_path / "holes-3.kpk"
    pack.write_bytes(b"pack")
    with AdminServer(backend, endpoint, poll_ms=20):
        assert cli.main(["station", "install", str(pack), "--config", str(config)]) == 0
        assert cli.main(["station", "rollback", "holes", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "holes is now at version 3" in out and "holes is now at version 1" in out
    assert backend.installed == [str(pack)] and backend.rolled_back == ["holes"]


def test_station_install_without_a_running_station_uses_the_store(tmp_path, monkeypatch, capsys):
    """Not running: the same checks through the store (a pack signed by an untrusted key is refused)."""
    from kaizen.runtime import daemon_state
    from kaizen.runtime.keys import TrustedKeys, generate_signing_key
    from kaizen.runtime.store import PackStore
    from kaizen.runtime.testpacks import write_test_pack

    key = generate_signing_key()
    write_test_pack(tmp_path / "holes-1.kpk", "holes", 1, key, base_fingerprint="fp")
    write_test_pack(tmp_path / "rogue-1.kpk", "rogue", 1, generate_signing_key(), base_fingerprint="fp")
    monkeypatch.setattr(daemon_state, "station_from_config",
                        lambda cfg: PackStore(cfg.store_dir, TrustedKeys([key.public_key()]), "fp"))
    config = _station_toml(tmp_path, f"ipc://{tmp_path}/run/admin/admin.ipc")
    assert cli.main(["station", "install", str(tmp_path / "holes-1.kpk"), "--config", str(config)]) == 0
    assert "holes is now at version 1" in capsys.readouterr().out
    assert cli.main(["station", "install", str(tmp_path / "rogue-1.kpk"), "--config", str(config)]) == 1
    assert "rogue-1.kpk" in capsys.readouterr().err
    with PackStore(tmp_path / "store", TrustedKeys([key.public_key()]), "fp") as store:
        assert [p["task"] for p in store.list()] == ["holes"]


def test_input_error_still_bad_input(served):
    with InferenceClient(served.endpoint, timeout_ms=3000) as client, pytest.raises(Exception) as err:
        client.infer(PNG, "   ")
    assert err.value.code == "bad_input"
