"""The hub's sample store (hub/samples.py) and `kaizen hub samples list|export|import` (hub/cli.py,
hub/samples_io.py): limits, refusals, resumable partial uploads, quota, the labelling round trip.

    .venv/bin/python -m pytest -q tests/test_hub_samples.py -p no:cacheprovider
"""

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from kaizen.hub import cli as hub_cli
from kaizen.hub.config import load_hub_config
from kaizen.hub.samples import SampleLimits, SampleStore, sample_id_of
from kaizen.hub.samples_io import SampleImportError
from kaizen.runtime.errors import ConfigError
from kaizen.trainer.data.llava_json import read_llava_json

STATION = "line1/s00"


def png(seed: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def record(image: bytes, *, instruction="Is the seal intact?", reason="low_confidence", label=None, hint=None,
           task="seal", fmt="png") -> tuple[dict, bytes]:
    """A sample_chunk body for the whole image (as runtime/capture.py would write its meta)."""
    sid = sample_id_of(image, instruction, label)
    result = None if reason == "no_match" else {"outcome": "answered", "answer": "no", "task_id": task,
                                                "pack_version": 3, "confidence": 0.25, "scores": {task: 0.7}}
    meta = {"schema": 1, "sample_id": sid, "station_id": STATION, "captured_at": 1.7e9, "reason": reason,
            "instruction": instruction, "image_format": fmt, "image_sha256": hashlib.sha256(image).hexdigest(),
            "image_bytes": len(image), "label": label, "task_hint": hint, "result": result}
    return {"sample_id": sid, "offset": 0, "total_size": len(image), "meta": meta}, image


@pytest.fixture
def store(tmp_path):
    s = SampleStore(tmp_path / "samples")
    yield s
    s.close()


def test_whole_sample_is_stored_with_provenance_and_deduplicated(store):
    body, image = record(png(1), reason="feedback", label="yes", hint="seal2")
    ack = store.receive(STATION, body, image)
    assert ack == {"sample_id": body["sample_id"], "offset": len(image), "done": True}
    row = store.get(body["sample_id"])
    assert row["station_id"] == STATION and row["reason"] == "feedback" and row["label"] == "yes"
    assert row["label_source"] == "operator" and row["task"] == "seal2"        # the operator's task hint
    assert row["station_answer"] == "no" and row["station_task"] == "seal" and row["pack_version"] == 3
    assert row["confidence"] == pytest.approx(0.25) and row["captured_at"] == 1.7e9 and row["received_at"] > 1.7e9
    assert store.image_path(row).read_bytes() == image and store.image_path(row).suffix == ".png"
    assert store.receive("line2/s01", body, image)["done"] is True         # a resend or another station
    assert len(store.rows()) == 1 and store.get(body["sample_id"])["station_id"] == STATION
    nm, nm_image = record(png(2), reason="no_match")
    store.receive(STATION, nm, nm_image)
    assert store.get(nm["sample_id"])["task"] == "unmatched" and store.stored_bytes == len(image) + len(nm_image)


def test_chunks_resume_by_offset_across_a_hub_restart(tmp_path):
    body, image = record(png(3, 64))
    store = SampleStore(tmp_path / "s")
    ack = store.receive(STATION, {**body, "offset": 0}, image[:1000])
    assert ack == {"sample_id": body["sample_id"], "offset": 1000, "done": False}
    assert store.receive(STATION, {**body, "offset": 0}, image[:1000])["offset"] == 1000    # a replay: not written
    assert store.receive(STATION, {**body, "offset": 3000}, image[3000:4000])["offset"] == 1000  # a gap
    store.close()
    store = SampleStore(tmp_path / "s")                  # restart: the partial upload is still held
    assert store.receive(STATION, {**body, "offset": 0}, image[:1000])["offset"] == 1000
    assert store.receive("line2/s01", {**body, "offset": 1000}, image[1000:])["offset"] == 0   # per station
    ack = store.receive(STATION, {**body, "offset": 1000}, image[1000:])
    assert ack["done"] is True and "refused" not in ack
    assert store.image_path(store.get(body["sample_id"])).read_bytes() == image
    assert not list((tmp_path / "s" / "partial").rglob(f"{body['sample_id']}.part"))
    store.close()


def _refusal(store, body, image):
    ack = store.receive(STATION, body, image)
    assert ack["done"] is True and store.rows() == [] and not list(store.partial.rglob("*.part"))
    return ack["refused"]


@pytest.mark.parametrize("change, expected", [
    (lambda b, m: m.update(image_sha256="0" * 64), "image sha256 differs"),
    (lambda b, m: m.update(instruction="Another question?"), "sample_id differs from the hash"),
    (lambda b, m: m.update(label="no"), "sample_id differs from the hash"),
    (lambda b, m: m.update(reason="curious"), "meta.reason must be one of"),
    (lambda b, m: m.update(image_format="jpeg"), "image bytes are not jpeg"),
    (lambda b, m: m.update(reason="feedback"), "meta.label is required for reason feedback"),
    (lambda b, m: m.update(padding="x" * 17000), "over 16384"),
    (lambda b, m: m.update(schema=2), "meta.schema must be 1"),
    (lambda b, m: m.update(image_bytes=5), "meta.image_bytes must equal total_size"),
    (lambda b, m: m.update(captured_at="yesterday"), "meta.captured_at must be a unix time"),
    (lambda b, m: m["result"].update(confidence="high"), "meta.result.confidence"),
    (lambda b, m: m["result"].update(scores={str(i): 0.1 for i in range(9)}), "meta.result.scores"),
    (lambda b, m: m.update(sample_id="ab" * 32), "meta.sample_id differs from the message"),
    (lambda b, m: b.update(sample_id="XYZ"), "sample_id must be 64 lowercase hex"),
])
def test_bad_meta_or_image_is_refused_with_a_reason(store, change, expected):
    body, image = record(png(4))
    change(body, body["meta"])
    assert expected in _refusal(store, body, image)


def test_bad_sha_in_a_multi_chunk_upload_is_refused_after_one_fresh_try(store):
    body, image = record(png(5, 64))
    body["meta"]["image_sha256"] = hashlib.sha256(b"other").hexdigest()
    assert store.receive(STATION, body, image[:500])["offset"] == 500
    ack = store.receive(STATION, {**body, "offset": 500}, image[500:])
    assert ack == {"sample_id": body["sample_id"], "offset": 0, "done": False}   # maybe a torn write: once more
    store.receive(STATION, body, image[:500])
    assert "image sha256 differs" in _refusal(store, {**body, "offset": 500}, image[500:])


def test_size_limits_and_partial_uploads_per_station(tmp_path):
    store = SampleStore(tmp_path / "s", SampleLimits(max_sample_bytes=2000, max_partial_per_station=2))
    big, big_image = record(png(6, 64))
    assert "a sample is 1..2000 bytes" in _refusal(store, big, big_image)
    bodies = [record(png(10 + i, 14)) for i in range(3)]
    assert all(400 < len(img) <= 2000 for _, img in bodies)
    for b, img in bodies:
        assert store.receive(STATION, b, img[:100])["offset"] == 100
    held = sorted(p.stem for p in store.partial.rglob("*.part"))
    assert len(held) == 2 and bodies[0][0]["sample_id"] not in held         # the oldest made room
    b0, img0 = bodies[0]
    assert store.receive(STATION, {**b0, "offset": 100}, img0[100:])["offset"] == 0   # start over: nothing lost
    store.close()


def test_full_store_answers_retry_and_keeps_nothing_half_done(tmp_path):
    a, a_img = record(png(20))
    b, b_img = record(png(21))
    store = SampleStore(tmp_path / "s", SampleLimits(max_sample_bytes=len(a_img) + 10,
                                                     max_total_bytes=len(a_img) + 10))
    assert store.receive(STATION, a, a_img)["done"] is True
    ack = store.receive(STATION, b, b_img)
    assert ack["done"] is False and ack["offset"] == 0 and ack["retry_s"] > 0 and "refused" not in ack
    assert store.get(b["sample_id"]) is None and store.receive(STATION, a, a_img)["done"] is True  # dedup still works
    store.close()
    store = SampleStore(tmp_path / "s", SampleLimits(max_total_bytes=10 ** 6))   # the operator raised the quota
    assert store.receive(STATION, b, b_img)["done"] is True
    store.close()


# ---------------------------------------------------------------- hub.toml and the CLI


def hub_toml(tmp_path, extra: str = "") -> str:
    path = tmp_path / "hub.toml"
    path.write_text('bind = "tcp://127.0.0.1:5555"\npub_bind = "tcp://127.0.0.1:5556"\n'
                    'public_key_file = "keys/hub.pub"\nsecret_key_file = "keys/hub.key"\n'
                    'packs_dir = "packs"\ndb_path = "state/hub.sqlite"\n' + extra)
    return str(path)


def test_config_samples_dir_defaults_next_to_the_db_and_limits_are_checked(tmp_path):
    config = load_hub_config(hub_toml(tmp_path))
    assert config.samples_dir == (tmp_path / "state" / "samples").resolve()
    assert config.samples_max_total_bytes == 20 * 1024 ** 3 and config.samples_max_sample_bytes == 16 << 20
    config = load_hub_config(hub_toml(tmp_path, 'samples_dir = "caps"\nsamples_max_total_bytes = 100000000\n'))
    assert config.samples_dir == (tmp_path / "caps").resolve() and config.samples_max_total_bytes == 10 ** 8
    with pytest.raises(ConfigError, match="samples_max_partial_per_station"):
        load_hub_config(hub_toml(tmp_path, "samples_max_partial_per_station = 0\n"))
    with pytest.raises(ConfigError, match="samples_max_sample_bytes.*over samples_max_total_bytes"):
        load_hub_config(hub_toml(tmp_path, "samples_max_total_bytes = 1000\n"))


@pytest.fixture
def filled(tmp_path):
    """hub.toml and a samples_dir with 2 seal samples (one operator-labelled) and 3 unmatched ones."""
    conf = hub_toml(tmp_path, 'samples_dir = "samples"\n')
    store = SampleStore(tmp_path / "samples")
    ids = {"seal": [], "unmatched": []}
    for i, kw in enumerate([{}, {"reason": "feedback", "label": "yes"}] + [{"reason": "no_match"}] * 3):
        body, image = record(png(30 + i), **kw)
        assert store.receive(STATION, body, image)["done"] is True
        ids["unmatched" if kw.get("reason") == "no_match" else "seal"].append(body["sample_id"])
    store.close()
    return conf, ids


def test_list_shows_samples_per_task(filled, capsys):
    conf, ids = filled
    assert hub_cli.cli_samples(["list", "--config", conf]) == 0
    out = capsys.readouterr().out
    assert "seal: 1 labelled, 1 unlabelled" in out and "unmatched: 0 labelled, 3 unlabelled" in out
    assert hub_cli.cli_samples(["list", "--task", "seal", "--json", "--config", conf]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["sample_id"] for r in rows) == sorted(ids["seal"]) and {r["task"] for r in rows} == {"seal"}


def test_status_page_and_metrics_show_the_stored_samples(filled, tmp_path):
    """The hub's status page (/status.json and HTML) and /metrics count what stations uploaded."""
    from types import SimpleNamespace

    from kaizen.hub.fleet_view import FleetView
    from kaizen.hub.metrics import HubMetrics
    from kaizen.hub.server import HubStats
    from kaizen.hub.status_page import render_html

    conf, _ = filled
    view = FleetView(load_hub_config(conf), cache_s=0.0)
    got = view.snapshot()["samples"]
    assert (got["stored"], got["labelled"]) == (5, 1) and got["bytes"] > 0
    assert got["tasks"] == [{"task": "unmatched", "stored": 3, "labelled": 0}, {"task": "seal", "stored": 2, "labelled": 1}]
    page = render_html(view.snapshot())
    assert "5 stored at the hub (1 labelled" in page and '<tr data-sample-task="seal"><td>seal</td><td>2</td>' in page
    stats = HubStats(sample_chunks=7, samples_done=5, samples_refused=1)
    text = HubMetrics(SimpleNamespace(stats=stats, unservable=[]), view).render()[1].decode()
    for line in ('kaizen_hub_samples{state="labelled"} 1.0', 'kaizen_hub_samples{state="unlabelled"} 4.0',
                 "kaizen_hub_sample_chunks_total 7.0", "kaizen_hub_samples_received_total 5.0",
                 "kaizen_hub_samples_refused_total 1.0", "kaizen_hub_sample_store_errors_total 0.0"):
        assert line in text.splitlines(), line
    (tmp_path / "other").mkdir()
    empty = FleetView(load_hub_config(hub_toml(tmp_path / "other")), cache_s=0.0).snapshot()["samples"]
    assert empty["stored"] == 0 and empty["tasks"] == []   # nothing uploaded yet: no database, no error
    (tmp_path / "other" / "state" / "samples").mkdir(parents=True)
    (tmp_path / "other" / "state" / "samples" / "samples.sqlite").write_bytes(b"not a database" * 100)
    broken = FleetView(load_hub_config(hub_toml(tmp_path / "other")), cache_s=0.0).snapshot()
    assert broken["samples"]["stored"] == 0 and "samples.sqlite" in broken["samples"]["error"]
    assert "cannot read the sample store" in render_html(broken) and broken["totals"]["allowed"] == 0


def test_export_label_import_round_trip_reads_as_llava_json(filled, tmp_path, capsys):
    conf, ids = filled
    out = tmp_path / "unmatched"
    assert hub_cli.cli_samples(["export", "--unmatched", "--unlabelled-only", "--out", str(out), "--config", conf]) == 0
    records = json.loads((out / "data.json").read_text())
    assert sorted(r["id"] for r in records) == sorted(ids["unmatched"])
    for r in records:
        assert r["conversations"][0]["value"] == "<image>\nIs the seal intact?" and r["conversations"][1]["value"] == ""
        assert r["kaizen"]["task"] == "unmatched" and r["kaizen"]["reason"] == "no_match"
        assert (out / r["image"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the labeller fills in answers and files two of them under a new task; the third stays unlabelled
    for r, answer in zip(records, ["scratched", "dented", ""]):
        r["conversations"][1]["value"] = answer
        if answer:
            r["kaizen"]["task"] = "surface"
    labelled = tmp_path / "labelled.json"
    labelled.write_text(json.dumps(records))
    assert hub_cli.cli_samples(["import", str(labelled), "--config", conf]) == 0
    assert "2 labelled, 2 moved to another task, 1 unchanged" in capsys.readouterr().out

    new = tmp_path / "surface"
    assert hub_cli.cli_samples(["export", "--task", "surface", "--labelled-only", "--out", str(new),
                                "--config", conf]) == 0
    samples = read_llava_json(new / "data.json", task_id="surface")
    assert sorted(s.answer for s in samples) == ["dented", "scratched"]
    assert all(s.instruction == "Is the seal intact?" and s.image.is_file() for s in samples)
    exported = json.loads((new / "data.json").read_text())
    assert {r["kaizen"]["label_source"] for r in exported} == {"import"}

    seal = tmp_path / "seal"   # the operator's correction is labelled already: trainable as exported
    assert hub_cli.cli_samples(["export", "--task", "seal", "--labelled-only", "--out", str(seal), "--config", conf]) == 0
    [s] = read_llava_json(seal / "data.json", task_id="seal")
    assert s.answer == "yes" and json.loads((seal / "data.json").read_text())[0]["kaizen"]["label_source"] == "operator"
    assert hub_cli.cli_samples(["export", "--all", "--out", str(tmp_path / "all"), "--config", conf]) == 0
    assert len(json.loads((tmp_path / "all" / "data.json").read_text())) == 5


@pytest.mark.parametrize("records, expected", [
    ({"id": "x"}, "expected a JSON list"),
    (["oops"], "record #0: must be an object"),
    ([{"id": "f" * 64, "conversations": []}], "record #0: field 'id': no stored sample"),
    ([{"id": "GOOD", "conversations": "yes"}], "record #0 (id 'GOOD'): field 'conversations' must be a list"),
    ([{"id": "GOOD", "conversations": [{"from": "human", "value": "q"}]}], "field 'conversations' has no gpt turn"),
    ([{"id": "GOOD", "conversations": [{"from": "gpt", "value": 3}]}], "gpt 'value' must be a string"),
    ([{"id": "GOOD", "conversations": [{"from": "gpt", "value": "a"}], "kaizen": {"task": ""}}], "field 'kaizen.task'"),
    ([{"id": "GOOD", "conversations": [{"from": "gpt", "value": "a"}]},
      {"id": "GOOD", "conversations": [{"from": "gpt", "value": "b"}]}], "record #1: field 'id': sample GOOD appears twice"),
    ([{"id": "GOOD", "conversations": [{"from": "gpt", "value": "a"}]}, {"id": 7}], "record #1: field 'id' must be"),
])
def test_import_errors_name_file_record_and_field_and_change_nothing(filled, tmp_path, records, expected):
    conf, ids = filled
    good = ids["unmatched"][0]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records).replace("GOOD", good))
    with pytest.raises(SampleImportError) as err:
        hub_cli.cli_samples(["import", str(path), "--config", conf])
    assert str(path) in str(err.value) and expected.replace("GOOD", good) in str(err.value)
    store = SampleStore(tmp_path / "samples")
    try:
        assert store.get(good)["label"] is None and store.get(good)["task"] == "unmatched"   # all or nothing
    finally:
        store.close()


def test_every_kind_of_capture_queue_record_is_accepted(tmp_path, store):
    """What runtime/capture.py writes (PNG, JPEG, a raw array PNG-encoded by its writer thread,
    feedback with a label and task hint, a station result with scores) passes the hub's checks."""
    from kaizen.runtime.capture import CaptureQueue

    q = CaptureQueue(tmp_path / "q", station_id=STATION)
    try:
        jpeg = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(jpeg, "JPEG")
        result = {"outcome": "answered", "answer": "3", "task_id": "count", "pack_version": 2, "confidence": 0.31,
                  "scores": {f"t{i}": 0.5 - i / 10 for i in range(10)}, "selected": ["count"], "timings_ms": {}}
        q.offer(png(40), "How many holes?", result, "low_confidence")
        q.offer(jpeg.getvalue(), "How many holes?", result, "low_confidence")
        q.offer(np.zeros((12, 12, 3), np.uint8), "How many holes?", None, "no_match", identify=False)
        q.offer(png(41), "How many holes?", result, "feedback", label="4", task_hint="count")
        assert q.flush(10.0)
        for sid in q.pending():
            meta, image = q.load(sid)
            ack = store.receive(STATION, {"sample_id": sid, "offset": 0, "total_size": len(image), "meta": meta}, image)
            assert ack["done"] is True and "refused" not in ack, ack
        rows = store.rows()
        assert len(rows) == 4 and sorted(r["image_file"][-3:] for r in rows) == ["jpg", "png", "png", "png"]
        assert {r["task"] for r in rows} == {"count", "unmatched"}
        assert [r["label"] for r in rows if r["reason"] == "feedback"] == ["4"]
    finally:
        q.close()


def test_a_failed_write_at_the_last_byte_is_finished_by_the_next_chunk(store, monkeypatch):
    from kaizen.hub import samples as samples_mod

    body, image = record(png(50, 32))
    assert store.receive(STATION, body, image[:1000])["offset"] == 1000
    real = samples_mod.atomic_write_bytes

    def disk_full(path, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(samples_mod, "atomic_write_bytes", disk_full)
    with pytest.raises(OSError):          # the hub answers retry_s (hub/server.py); the partial is whole
        store.receive(STATION, {**body, "offset": 1000}, image[1000:])
    assert store.get(body["sample_id"]) is None
    monkeypatch.setattr(samples_mod, "atomic_write_bytes", real)
    assert store.receive(STATION, body, image[:1000])["offset"] == len(image)   # where the station resumes
    ack = store.receive(STATION, {**body, "offset": len(image)}, b"")
    assert ack == {"sample_id": body["sample_id"], "offset": len(image), "done": True}
    assert store.image_path(store.get(body["sample_id"])).read_bytes() == image
