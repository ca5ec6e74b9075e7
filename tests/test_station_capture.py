"""Capture at the station (issue 14, part A) on the tiny-llama base: no-match and low-confidence
parts are queued with their record, confident ones are not; `feedback` by part_id and by image
over the real inference endpoint; bad feedback is an error reply; station.toml [capture]."""

import io

import numpy as np
import pytest
from PIL import Image

from kaizen.export.parity import fixed_images
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.capture import CaptureQueue
from kaizen.runtime.capture_image import sample_id_of
from kaizen.runtime.config import load_station_config
from kaizen.runtime.endpoint import InferenceClient, InferenceServer, _EchoBackend
from kaizen.runtime.engine import Engine
from kaizen.runtime.errors import ConfigError, InputError, ProtocolError
from kaizen.runtime.keys import TrustedKeys, generate_signing_key, save_signing_key
from kaizen.runtime.pack import build_pack
from kaizen.runtime.pack_arrays import GoldenSample
from kaizen.runtime.protocol import Message
from kaizen.runtime.station import Station
from kaizen.runtime.testpacks import tiny_png

ANSWERS = ["yes", "no", "three"]
TASKS = [("seal", "Is the seal torn?"), ("holes", "How many holes are there?")]


def png_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def packs(tiny_llama, tmp_path_factory):
    """Two signed packs whose keys point at their own (image, instruction), and those inputs."""
    engine = Engine(Bundle.open(tiny_llama[1]))
    signer, folder = generate_signing_key(), tmp_path_factory.mktemp("packs")
    imgs = fixed_images(64, n=2, seed=5)
    paths = []
    for i, (task, instr) in enumerate(TASKS):
        rng = np.random.default_rng(i + 1)
        key = engine.clip_image([imgs[i]])[0] + engine.clip_text([instr])[0]
        prompt = (rng.standard_normal((4, engine.embed.shape[1])) * 0.5).astype(np.float32)
        lora = {n: (rng.standard_normal((4, s[1]) if n.endswith(".A") else (s[0], 4)) * 0.3).astype(np.float32)
                for n, s in engine.lora_shapes.items()}
        golden = engine.score_answers([tiny_png(i)], [instr], ANSWERS, prompt, lora)[0].answer
        paths.append(folder / f"{task}-1.kpk")
        build_pack(paths[-1], task_id=task, version=1, method="kaizen", base_fingerprint=engine.bundle.fingerprint,
                   prompt=prompt, key=(key / np.linalg.norm(key)).astype(np.float32),
                   text_emb=engine.clip_text([instr]), lora=lora, instructions=[instr], answers=ANSWERS,
                   golden=[GoldenSample(tiny_png(i), instr, golden)], metrics={}, signing_key=signer, lora_rank=4)
    inputs = [(png_of(np.asarray(img)), instr, task) for img, (task, instr) in zip(imgs, TASKS)]
    return signer, paths, inputs


@pytest.fixture
def make_station(tiny_llama, packs, tmp_path):
    made = []

    def make(**kwargs):
        signer, paths, _ = packs
        st = Station(tiny_llama[1], tmp_path / f"store{len(made)}", TrustedKeys([signer.public_key()]),
                     threshold=0.5, top_k=1, **kwargs)
        for path in paths:
            st.install(path)
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()


def test_no_match_and_low_confidence_parts_are_captured_confident_ones_not(make_station, packs, tmp_path):
    _, _, inputs = packs
    probe = make_station()
    conf = {task: probe.infer(image, instr)["confidence"] for image, instr, task in inputs}
    queue = CaptureQueue(tmp_path / "capture", station_id="line1/s00")
    # seal: its answer is just below its level (captured); holes: just above (not captured)
    st = make_station(capture=queue, capture_confidence=0.0,
                      capture_task_confidence={"seal": conf["seal"] + 1e-4, "holes": conf["holes"] - 1e-4})
    (seal_png, seal_q, _), (holes_png, holes_q, _) = inputs
    answered = st.infer(seal_png, seal_q)
    assert answered["task_id"] == "seal" and len(answered["part_id"]) == 32
    assert st.infer(holes_png, holes_q)["outcome"] == "answered"
    st.threshold = 0.999
    unmatched = st.infer(holes_png, "Completely unrelated question about the weather?")
    assert unmatched["outcome"] == "no_match" and unmatched["part_id"] != answered["part_id"]
    assert queue.flush()
    pending = queue.pending()
    assert pending == [sample_id_of(seal_png, seal_q, None),
                       sample_id_of(holes_png, "Completely unrelated question about the weather?", None)]
    meta, image = queue.load(pending[0])
    assert image == seal_png   # the bytes the client sent, not a re-encoding
    assert (meta["reason"], meta["station_id"], meta["label"]) == ("low_confidence", "line1/s00", None)
    assert meta["result"]["task_id"] == "seal" and meta["result"]["pack_version"] == 1
    assert meta["result"]["confidence"] == answered["confidence"] and meta["result"]["answer"] == answered["answer"]
    meta, _ = queue.load(pending[1])
    assert meta["reason"] == "no_match" and meta["result"]["outcome"] == "no_match"
    assert st.status()["capture"]["pending"] == 2


def test_raw_array_parts_are_captured_as_png(make_station, packs, tmp_path):
    _, _, inputs = packs
    queue = CaptureQueue(tmp_path / "capture")
    st = make_station(capture=queue, capture_confidence=1.0)   # every answered part is "unsure"
    arr = np.asarray(Image.open(io.BytesIO(inputs[0][0])).convert("RGB"))
    st.infer_batch([arr, arr.copy()], [inputs[0][1]] * 2)
    assert queue.flush()
    [sid] = queue.pending()   # the same part twice is one sample
    meta, data = queue.load(sid)
    assert meta["image_format"] == "png" and np.array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)
    assert queue.stats()["duplicates"] == 1


def test_feedback_by_part_id_and_by_image_over_the_endpoint(make_station, packs, tmp_path):
    _, _, inputs = packs
    queue = CaptureQueue(tmp_path / "capture", station_id="s")
    st = make_station(capture=queue, capture_confidence=0.0)
    seal_png, seal_q, _ = inputs[0]
    with InferenceServer(st, "tcp://127.0.0.1:*") as server, InferenceClient(server.endpoint, 20000) as client:
        r = client.infer(seal_png, seal_q)
        assert len(r["part_id"]) == 32
        got = client.feedback(" torn ", part_id=r["part_id"], task="seal")
        assert got == {"sample_id": sample_id_of(seal_png, seal_q, "torn"), "captured": True}
        assert client.feedback("torn", part_id=r["part_id"])["captured"] is False   # already queued
        arr = np.asarray(Image.open(io.BytesIO(inputs[1][0])).convert("RGB"))
        by_image = client.feedback("3", image=arr, instruction=inputs[1][1], task="holes")
        assert by_image["captured"] is True
    assert queue.flush()
    assert queue.pending() == [got["sample_id"], by_image["sample_id"]]
    meta, data = queue.load(got["sample_id"])
    assert data == seal_png and (meta["reason"], meta["label"], meta["task_hint"]) == ("feedback", "torn", "seal")
    assert meta["result"]["answer"] == r["answer"] and meta["result"]["task_id"] == "seal"
    meta, data = queue.load(by_image["sample_id"])
    assert (meta["label"], meta["task_hint"], meta["result"], meta["instruction"]) == ("3", "holes", None, inputs[1][1])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)
    assert by_image["sample_id"] == sample_id_of(data, inputs[1][1], "3")


def test_bad_feedback_is_an_error_reply_and_the_station_keeps_serving(make_station, packs):
    _, _, inputs = packs
    st = make_station(recent_parts=2)   # capture off: feedback is still checked and answered
    seal_png, seal_q, _ = inputs[0]
    with InferenceServer(st, "tcp://127.0.0.1:*") as server, InferenceClient(server.endpoint, 20000) as client:
        first = client.infer(seal_png, seal_q)["part_id"]
        client.infer(seal_png, seal_q)
        client.infer(seal_png, seal_q)   # the station keeps 2 parts: the first one expired
        cases = [
            (dict(answer="yes", part_id=first), "bad_input", "unknown or expired"),
            (dict(answer="yes", part_id="f" * 32), "bad_input", "unknown or expired"),
            (dict(answer="yes"), "bad_input", "part_id"),
            (dict(answer="  ", part_id=first, image=seal_png, instruction=seal_q), "bad_input", "empty"),
            (dict(answer="x" * 201, image=seal_png, instruction=seal_q), "bad_input", "over the limit"),
            (dict(answer="yes", image=seal_png), "bad_input", "instruction"),
            (dict(answer="yes", image=b"not an image", instruction=seal_q), "bad_input", ""),
        ]
        for kwargs, code, words in cases:
            with pytest.raises(ProtocolError) as err:
                client.feedback(**kwargs)
            assert err.value.code == code and words in err.value.detail, (kwargs, err.value.detail)
        for body, buffers in (({"answer": "yes", "part_id": 3}, {}),
                              ({"answer": "yes", "instruction": seal_q}, {"image": seal_png})):   # no image_format
            with pytest.raises(ProtocolError) as err:
                client.request(Message("feedback", body, buffers))
            assert err.value.code == "bad_body"
        still = client.feedback("yes", image=seal_png, instruction=seal_q)
        assert still == {"sample_id": sample_id_of(seal_png, seal_q, "yes"), "captured": False}
        assert client.infer(seal_png, seal_q)["outcome"] == "answered"
        assert client.status()["endpoint"]["errors"] == len(cases) + 2
    with pytest.raises(InputError, match="unknown or expired"):
        st.feedback("yes", part_id=first)


def test_a_backend_without_feedback_answers_unsupported_type():
    with InferenceServer(_EchoBackend(), "tcp://127.0.0.1:*") as server, \
            InferenceClient(server.endpoint, 5000) as client:
        with pytest.raises(ProtocolError) as err:
            client.feedback("yes", part_id="a" * 32)
        assert err.value.code == "unsupported_type"
        assert client.infer(tiny_png(1), "q?")["answer"] == "ok"


STATION = """station_id = "line1/s01"
hub_endpoint = "tcp://127.0.0.1:7700"
hub_public_key_file = "hub.pub"
public_key_file = "s.pub"
secret_key_file = "s.key"
bundle_dir = "{bundle}"
store_dir = "store"
trusted_keys_dir = "trusted"
state_dir = "state"
"""


def test_station_toml_capture_table(tiny_llama, tmp_path):
    from kaizen.runtime.daemon_state import station_from_config

    save_signing_key(generate_signing_key(), tmp_path / "trusted", "trainer")
    path = tmp_path / "station.toml"
    path.write_text(STATION.format(bundle=tiny_llama[1]))
    assert load_station_config(path).capture.enabled is True   # on by default
    path.write_text(STATION.format(bundle=tiny_llama[1]) + "[capture]\nmax_items = 50\nmax_mb = 2\nconfidence = 0.7\n"
                    "[capture.task_confidence]\nseal = 0.9\n")
    cfg = load_station_config(path)
    assert (cfg.capture.max_items, cfg.capture.max_bytes, cfg.capture.task_confidence) == (50, 2 << 20, {"seal": 0.9})
    st = station_from_config(cfg)
    try:
        assert st.capture.folder == tmp_path / "state" / "capture" and st.capture.station_id == "line1/s01"
        assert (st.capture.max_items, st.capture.max_bytes) == (50, 2 << 20)
        assert (st.capture_policy.level("seal"), st.capture_policy.level("holes")) == (0.9, 0.7)
    finally:
        st.close()
    path.write_text("[station]\n" + STATION.format(bundle=tiny_llama[1]) + "[capture]\nenabled = false\n")
    assert load_station_config(path).capture.enabled is False


@pytest.mark.parametrize("table, field", [
    ("max_items = 0", "capture.max_items"),
    ("max_mb = -1", "capture.max_mb"),
    ("confidence = 1.5", "capture.confidence"),
    ('enabled = "yes"', "capture.enabled"),
    ("colour = 1", "colour"),
    ("task_confidence = 3", "capture.task_confidence"),
    ('[capture.task_confidence]\nseal = "high"', "capture.task_confidence.seal"),
])
def test_station_toml_capture_errors_name_file_and_field(tmp_path, table, field):
    path = tmp_path / "station.toml"
    path.write_text(STATION.format(bundle="b") + "[capture]\n" + table + "\n")
    with pytest.raises(ConfigError) as err:
        load_station_config(path)
    assert str(path) in str(err.value) and field in str(err.value)
