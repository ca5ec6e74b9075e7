"""The station's capture queue (runtime/capture.py): cap with the oldest dropped and counted, dedup
by content hash, the capture record, crash leftovers at restart, counters that survive restarts,
a week offline with 1,000+ parts and none lost, and offer() that never waits for a stalled disk."""

import hashlib
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from kaizen.runtime.capture import CaptureQueue
from kaizen.runtime.capture_image import sample_id_of

RESULT = {"outcome": "answered", "answer": "no", "task_id": "seal", "pack_version": 3, "confidence": 0.41,
          "scores": {"seal": 0.7, "holes": 0.2}, "selected": ["seal"], "timings_ms": {"total_ms": 5.0}}


def png(i: int, side: int = 8) -> bytes:
    """A distinct small PNG per i."""
    arr = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def accounted(stats: dict) -> None:
    """Every part offered is persisted, dropped (counted) or a duplicate; every persisted one is
    pending, uploaded, refused, damaged or dropped by the cap: nothing goes missing uncounted."""
    assert stats["queued"] == 0
    assert stats["captured"] == stats["persisted"] + stats["dropped_queue"] + stats["duplicates"] + \
        stats["write_errors"]
    assert stats["persisted"] == stats["pending"] + stats["uploaded"] + stats["refused"] + stats["damaged"] + \
        stats["dropped_full"]


def test_record_matches_the_contract(tmp_path):
    clock = Clock()
    q = CaptureQueue(tmp_path / "cap", station_id="line1/s00", clock=clock)
    image = png(1)
    sid = q.offer(image, "Is the seal torn?", RESULT, "low_confidence")
    assert sid == hashlib.sha256(b"kaizen-sample-1\0" + image + b"\0Is the seal torn?\0").hexdigest()
    arr = np.random.default_rng(2).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    assert q.offer(arr, "How many holes?", None, "feedback", label="3", task_hint="holes", identify=False) is None
    assert q.flush()
    assert q.pending()[0] == sid and len(q.pending()) == 2
    meta, data = q.load(sid)
    assert data == image
    assert meta == {"schema": 1, "sample_id": sid, "station_id": "line1/s00", "captured_at": clock.t,
                    "reason": "low_confidence", "instruction": "Is the seal torn?", "image_format": "png",
                    "image_sha256": hashlib.sha256(image).hexdigest(), "image_bytes": len(image), "label": None,
                    "task_hint": None, "result": {k: RESULT[k] for k in ("outcome", "answer", "task_id", "pack_version",
                                                                        "confidence", "scores")}}
    meta2, data2 = q.load(q.pending()[1])   # the raw array was PNG-encoded by the writer thread
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data2))), arr)
    assert meta2["sample_id"] == sample_id_of(data2, "How many holes?", "3")
    assert (meta2["label"], meta2["task_hint"], meta2["result"], meta2["image_format"]) == ("3", "holes", None, "png")
    with pytest.raises(KeyError):
        q.load("0" * 64)
    q.close()


def test_cap_drops_the_oldest_first_and_counts(tmp_path):
    q = CaptureQueue(tmp_path / "cap", max_items=5, clock=Clock())
    sids = [q.offer(png(i), "q?", None, "no_match") for i in range(12)]
    assert q.flush()
    assert q.pending() == sids[-5:]
    stats = q.stats()
    assert stats["dropped_full"] == 7 and stats["pending"] == 5
    accounted(stats)
    q.close()
    size = stats["pending_bytes"] // 5   # one sample (image + meta): all the same size here
    q = CaptureQueue(tmp_path / "cap2", max_bytes=3 * size, clock=Clock())
    sids = [q.offer(png(i), "q?", None, "no_match") for i in range(10)]
    assert q.flush()
    assert q.pending() == sids[-3:] and q.stats()["pending_bytes"] == 3 * size
    assert q.stats()["dropped_full"] == 7
    accounted(q.stats())
    q.close()


def test_a_sample_already_queued_is_a_duplicate(tmp_path):
    q = CaptureQueue(tmp_path / "cap")
    a = q.offer(png(1), "q?", None, "no_match")
    assert q.offer(png(1), "q?", RESULT, "low_confidence") == a
    arr = np.zeros((4, 4, 3), np.uint8)
    q.offer(arr, "q?", None, "no_match", identify=False)
    q.offer(arr.copy(), "q?", None, "no_match", identify=False)
    labelled = q.offer(png(1), "q?", None, "feedback", label="yes")   # a label makes another sample
    assert q.flush()
    assert labelled != a and q.has(a) and q.has(labelled)
    assert len(q.pending()) == 3 and q.stats()["duplicates"] == 2
    accounted(q.stats())
    q.close()


def test_restart_after_a_crash_mid_write_keeps_every_committed_sample(tmp_path, caplog):
    folder = tmp_path / "cap"
    q = CaptureQueue(folder, station_id="s")
    sids = [q.offer(png(i), "q?", None, "no_match") for i in range(3)]
    q.close()
    before = q.stats()
    # a kill between the image and its commit file, a torn commit file, an unfinished atomic write
    (folder / f"{4:012d}-{'a' * 64}.img").write_bytes(png(4))
    (folder / f"{5:012d}-{'b' * 64}.img").write_bytes(png(5))
    (folder / f"{5:012d}-{'b' * 64}.json").write_bytes(b'{"schema": 1, "sample_id": "bb')
    (folder / f"{6:012d}-{'c' * 64}.json.tmp").write_bytes(b"{")
    q = CaptureQueue(folder, station_id="s")
    assert q.pending() == sids
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(
        [f"{i + 1:012d}-{s}.{ext}" for i, s in enumerate(sids) for ext in ("img", "json")] + ["counters.json"])
    assert sorted(p.name for p in (folder / "damaged").iterdir()) == [f"{5:012d}-{'b' * 64}.img",
                                                                      f"{5:012d}-{'b' * 64}.json"]
    assert "damaged" in caplog.text
    stats = q.stats()
    assert stats["captured"] == before["captured"] and (stats["pending"], stats["damaged"]) == (3, 1)
    new = q.offer(png(9), "q?", None, "no_match")
    assert q.flush() and q.pending()[-1] == new
    assert (folder / f"{6:012d}-{new}.json").exists()   # numbering continues after the leftovers
    for sid in q.pending():
        assert q.load(sid)[1]
    q.close()


def test_a_damaged_image_or_counters_file_is_set_aside(tmp_path):
    folder = tmp_path / "cap"
    q = CaptureQueue(folder)
    sid = q.offer(png(1), "q?", None, "no_match")
    keep = q.offer(png(2), "q?", None, "no_match")
    q.close()
    img = folder / f"{1:012d}-{sid}.img"
    img.write_bytes(b"X" * img.stat().st_size)   # same size, wrong bytes: caught by the sha256 at load()
    (folder / "counters.json").write_text("{not json")
    q = CaptureQueue(folder)
    assert q.stats()["captured"] == 0 and (folder / "counters.json.damaged").exists()
    with pytest.raises(KeyError):
        q.load(sid)
    assert q.pending() == [keep] and (folder / "damaged" / img.name).exists()
    q.close()


def test_uploaded_and_refused(tmp_path):
    folder = tmp_path / "cap"
    q = CaptureQueue(folder)
    a, b = (q.offer(png(i), "q?", None, "no_match") for i in range(2))
    assert q.flush()
    q.uploaded(a)
    q.uploaded(a)   # a repeated ack is ignored
    q.refused(b, "image too large for the hub")
    assert q.pending() == [] and not list(folder.glob("*.img"))
    kept = json.loads((folder / "refused" / f"{2:012d}-{b}.json").read_text())
    assert kept["refused"] == "image too large for the hub" and (folder / "refused" / f"{2:012d}-{b}.img").exists()
    stats = q.stats()
    assert (stats["uploaded"], stats["refused"]) == (1, 1)
    accounted(stats)
    q.close()


def test_a_week_offline_and_restarts_lose_nothing_over_1000_parts(tmp_path):
    """1,100 parts over a simulated week with no hub and two restarts: every one is uploaded later."""
    folder, clock = tmp_path / "cap", Clock()
    offered = []
    for _restart in range(2):
        q = CaptureQueue(folder, station_id="s", clock=clock, memory_items=2000)
        for i in range(len(offered), len(offered) + 550):
            clock.t += 7 * 86400 / 1100
            offered.append((q.offer(png(i, side=4), "q?", None, "no_match"), clock.t))
        q.close()
    q = CaptureQueue(folder, station_id="s", clock=clock)   # the hub is back
    uploaded = {}
    while batch := q.pending(100):
        for sid in batch:
            meta, data = q.load(sid)
            assert hashlib.sha256(data).hexdigest() == meta["image_sha256"]
            uploaded[sid] = meta["captured_at"]
            q.uploaded(sid)
    assert uploaded == dict(offered) and len(uploaded) == 1100
    stats = q.stats()
    assert (stats["captured"], stats["persisted"], stats["uploaded"], stats["pending"]) == (1100, 1100, 1100, 0)
    assert clock.t - offered[0][1] >= 7 * 86400 - 1000
    accounted(stats)
    q.close()


def test_offer_never_waits_for_a_stalled_disk(tmp_path):
    """The writer thread is stuck (a dead disk): offers stay microseconds, memory stays bounded,
    the oldest non-feedback parts are dropped and counted, and everything resumes afterwards."""
    q = CaptureQueue(tmp_path / "cap", memory_items=50)
    gate, real = threading.Event(), q._persist

    def stalled(item):
        gate.wait(30)
        real(item)

    q._persist = stalled
    feedback = q.offer(png(0), "q?", None, "feedback", label="yes")
    images = [png(i) for i in range(1, 1001)]
    worst = 0.0
    for image in images:
        t0 = time.perf_counter()
        q.offer(image, "q?", RESULT, "low_confidence", identify=False)
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.05, f"an offer took {worst * 1000:.1f} ms while the disk was stalled"
    stats = q.stats()
    assert stats["queued"] <= 50 and stats["dropped_queue"] >= 1000 - 50
    gate.set()
    assert q.flush(30)
    assert feedback in q.pending()   # an operator's correction outlives the flood
    accounted(q.stats())
    assert q.stats()["persisted"] <= 51
    q.close()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_items"):
        CaptureQueue(tmp_path / "cap", max_items=0)
    q = CaptureQueue(tmp_path / "cap")
    with pytest.raises(ValueError, match="reason"):
        q.offer(png(1), "q?", None, "bored")
    q.close()
    assert q.offer(png(1), "q?", None, "no_match") is None   # closed: nothing taken


def test_the_writer_waits_while_a_part_is_answered(tmp_path):
    """Disk work stays off the inference path: nothing is written inside inference() until half
    the memory queue is full; everything is written once the part is answered."""
    q = CaptureQueue(tmp_path / "cap", memory_items=8)
    with q.inference():
        for i in range(3):
            q.offer(png(i), "q?", None, "no_match", identify=False)
        time.sleep(0.3)
        assert q.stats()["persisted"] == 0 and q.stats()["queued"] == 3
    deadline = time.monotonic() + 10
    while q.stats()["persisted"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert q.stats()["persisted"] == 3
    with q.inference():   # a long burst: from half full on, the writer goes ahead (down to half)
        for i in range(3, 9):
            q.offer(png(i), "q?", None, "no_match", identify=False)
        deadline = time.monotonic() + 10
        while q.stats()["persisted"] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        # below half (3 queued, 1 paused mid-write) it waits again
        assert (q.stats()["queued"], q.stats()["persisted"]) == (3, 5)
        assert q.flush()   # flush does not wait for the part to end
    accounted(q.stats())
    q.close()


def test_a_part_larger_than_the_memory_queue_is_dropped_and_counted(tmp_path):
    q = CaptureQueue(tmp_path / "cap", memory_bytes=1000)
    kept = q.offer(png(1), "q?", None, "no_match")
    assert q.offer(png(2, side=64), "q?", None, "no_match") is None   # ~12 KB > 1000 bytes
    assert q.flush() and q.pending() == [kept]
    assert q.stats()["dropped_queue"] == 1
    accounted(q.stats())
    q.close()
