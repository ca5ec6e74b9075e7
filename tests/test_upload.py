"""Upload of captured parts over the fleet link, on loopback: station daemon (capture queue +
runtime/uploader.py) -> hub (hub/samples.py). Every part captured arrives once, whatever happens
to the link, the hub or the station in between; a hub without samples support keeps everything
queued at the station.

    .venv/bin/python -m pytest -q tests/test_upload.py -p no:cacheprovider -s   # -s prints the 1000-part figures
"""

import hashlib
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from kaizen.hub import server as hub_server
from kaizen.hub.fleet_sim import Fleet, wait_until
from kaizen.hub.samples import SampleStore
from kaizen.runtime.capture import CaptureQueue
from kaizen.runtime.daemon import StationDaemon
from kaizen.runtime.keys import TrustedKeys

FP = "test-base-fp"
WAIT = 30.0
WEEK = 7 * 24 * 3600.0


def png(seed: int, size: int = 8) -> bytes:
    """A unique PNG (random pixels from `seed`); size 512 gives ~0.8 MB, many chunks."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def result_for(i: int) -> tuple[dict | None, str, str | None, str | None]:
    """(result, reason, label, task_hint): a mix of no-match, low confidence and operator feedback."""
    kind = i % 3
    if kind == 0:
        return ({"outcome": "no_match", "answer": None, "task_id": None, "pack_version": None, "confidence": 0.1,
                 "scores": {"seal": 0.1, "count": 0.05}}, "no_match", None, None)
    if kind == 1:
        return ({"outcome": "answered", "answer": "yes", "task_id": "seal", "pack_version": 1, "confidence": 0.3,
                 "scores": {"seal": 0.6}}, "low_confidence", None, None)
    return ({"outcome": "answered", "answer": "no", "task_id": "seal", "pack_version": 1, "confidence": 0.9,
             "scores": {"seal": 0.9}}, "feedback", "yes", "seal")


def capture(q: CaptureQueue, seeds, size: int = 8) -> dict[str, bytes]:
    """Offer one part per seed; returns {sample_id: image bytes} once they are persisted."""
    out = {}
    for k, s in enumerate(seeds):
        image = png(s, size)
        result, reason, label, hint = result_for(s)
        sid = q.offer(image, f"Is the seal of part {s % 7} intact?", result, reason, label=label, task_hint=hint)
        assert sid is not None
        out[sid] = image
        if k % 64 == 63:
            assert q.flush(30.0)   # a line's pace: the queue's memory bound (256) never drops one here
    assert q.flush(30.0)
    assert q.stats()["dropped_queue"] == 0 and q.stats()["dropped_full"] == 0
    return out


@pytest.fixture
def fleet(tmp_path, signing_key):
    f = Fleet(tmp_path / "fleet", 2, TrustedKeys([signing_key.public_key()]), FP, heartbeat_s=0.2,
              hub_timeout_s=1.0)
    queues: list[CaptureQueue] = []
    f.queues = queues
    yield f
    f.close()
    for q in queues:
        q.close()


def open_queue(fleet, i: int, **kw) -> CaptureQueue:
    q = CaptureQueue(fleet.root / f"station{i}" / "capture", station_id=fleet.station_ids[i], **kw)
    fleet.queues.append(q)
    return q


def start_station(fleet, i: int, q: CaptureQueue, **upload) -> StationDaemon:
    daemon = StationDaemon(fleet.link(i), fleet.store(i), keep_downloads=True, capture=q,
                           upload_kwargs=upload or None)
    fleet.daemons[fleet.station_ids[i]] = daemon.start()
    return daemon


def hub_rows(fleet) -> dict[str, dict]:
    store = SampleStore(fleet.hub_config.samples_dir)
    try:
        return {r["sample_id"]: r for r in store.rows()}
    finally:
        store.close()


def hub_image(fleet, row: dict) -> bytes:
    return (fleet.hub_config.samples_dir / "images" / row["image_file"]).read_bytes()


def partials(fleet) -> dict[str, int]:
    return {p.stem: p.stat().st_size for p in (fleet.hub_config.samples_dir / "partial").rglob("*.part")}


def pause_after_acks(daemon: StationDaemon, n: int) -> threading.Event:
    """After the uploader took `n` acks, it stops sending (paused_until = inf) and the event is set."""
    up, seen, hit = daemon.uploader, [0], threading.Event()
    orig = up.on_ack

    def hooked(body, reply_to=None):
        orig(body, reply_to)
        seen[0] += 1
        if seen[0] == n:
            up.paused_until = float("inf")
            hit.set()
    up.on_ack = hooked
    return hit


def test_captured_samples_arrive_once_with_provenance(fleet):
    q = open_queue(fleet, 0)
    sent = capture(q, range(12))
    big = capture(q, [100], size=128)   # ~50 KB: several 4 KiB chunks
    sent.update(big)
    fleet.start_hub()
    daemon = start_station(fleet, 0, q, chunk_bytes=4096)
    assert wait_until(lambda: q.stats()["pending"] == 0, WAIT)
    rows = hub_rows(fleet)
    assert set(rows) == set(sent)
    for sid, row in rows.items():
        assert hub_image(fleet, row) == sent[sid]
        assert row["station_id"] == fleet.station_ids[0]
    fb = [r for r in rows.values() if r["reason"] == "feedback"]
    assert fb and all(r["label"] == "yes" and r["label_source"] == "operator" and r["task"] == "seal" for r in fb)
    nm = [r for r in rows.values() if r["reason"] == "no_match"]
    assert nm and all(r["task"] == "unmatched" and r["label"] is None for r in nm)
    low = [r for r in rows.values() if r["reason"] == "low_confidence"]
    assert low and all(r["task"] == "seal" and r["station_answer"] == "yes" and r["pack_version"] == 1
                       and r["confidence"] == pytest.approx(0.3) for r in low)
    assert daemon.uploader.stats.uploaded == len(sent) and q.stats()["uploaded"] == len(sent)
    assert partials(fleet) == {}


def test_lost_acks_cause_resends_that_the_hub_deduplicates(fleet):
    q = open_queue(fleet, 0)
    sent = capture(q, range(10))
    fleet.start_hub()
    daemon = start_station(fleet, 0, q, resend_s=0.2)
    up, dropped = daemon.uploader, set()
    orig = up.on_ack

    def lossy(body, reply_to=None):   # the first ack of every sample is lost on the way back
        if body["sample_id"] not in dropped:
            dropped.add(body["sample_id"])
            return
        orig(body, reply_to)
    up.on_ack = lossy
    assert wait_until(lambda: q.stats()["pending"] == 0, WAIT)
    assert set(hub_rows(fleet)) == set(sent) and len(dropped) == len(sent)
    assert up.stats.resends >= len(sent)
    assert fleet.hub.stats.sample_chunks >= 2 * len(sent)   # every sample arrived twice, stored once


def test_identical_part_from_two_stations_is_stored_once(fleet):
    q0, q1 = open_queue(fleet, 0), open_queue(fleet, 1)
    a, b = capture(q0, [5]), capture(q1, [5])
    assert a.keys() == b.keys()
    fleet.start_hub()
    start_station(fleet, 0, q0)
    assert wait_until(lambda: q0.stats()["pending"] == 0, WAIT)
    start_station(fleet, 1, q1)
    assert wait_until(lambda: q1.stats()["pending"] == 0, WAIT)
    rows = hub_rows(fleet)
    assert list(rows) == list(a) and rows[next(iter(a))]["station_id"] == fleet.station_ids[0]
    assert q1.stats()["uploaded"] == 1 and q1.stats()["refused"] == 0


def _big_sample_paused_midway(fleet, q):
    sent = capture(q, [7], size=256)          # ~200 KB at 4 KiB chunks: ~50 chunks
    total = len(next(iter(sent.values())))
    fleet.start_hub()
    daemon = start_station(fleet, 0, q, chunk_bytes=4096)
    hit = pause_after_acks(daemon, 10)
    assert hit.wait(WAIT)
    held = partials(fleet)
    assert list(held) == list(sent) and 0 < held[next(iter(sent))] < total
    return sent, total, daemon, held[next(iter(sent))]


def test_resume_after_a_disconnect_mid_sample(fleet):
    q = open_queue(fleet, 0)
    sent, total, daemon, _ = _big_sample_paused_midway(fleet, q)
    daemon.disconnect()
    assert wait_until(lambda: daemon.stats.reconnects >= 1, WAIT)
    daemon.uploader.paused_until = 0.0
    assert wait_until(lambda: q.stats()["pending"] == 0, WAIT)
    [row] = hub_rows(fleet).values()
    assert hub_image(fleet, row) == next(iter(sent.values()))
    assert daemon.uploader.stats.bytes_sent < total + 8 * 4096   # resumed, not started over


def test_hub_restart_mid_sample_loses_nothing_and_resumes(fleet):
    q = open_queue(fleet, 0)
    sent, total, daemon, held = _big_sample_paused_midway(fleet, q)
    fleet.stop_hub()
    assert partials(fleet)[next(iter(sent))] == held   # the partial upload survives on disk
    fleet.start_hub()
    daemon.uploader.paused_until = 0.0
    assert wait_until(lambda: q.stats()["pending"] == 0, WAIT)
    [row] = hub_rows(fleet).values()
    assert hashlib.sha256(hub_image(fleet, row)).hexdigest() == hashlib.sha256(next(iter(sent.values()))).hexdigest()
    assert daemon.uploader.stats.bytes_sent < total + 8 * 4096


def test_station_restart_mid_sample_resumes_from_the_hubs_offset(fleet):
    q = open_queue(fleet, 0)
    sent, total, _, held = _big_sample_paused_midway(fleet, q)
    fleet.stop_station(0)
    q.close()
    q2 = open_queue(fleet, 0)                     # the queue reopened from disk, a new daemon
    assert q2.pending() == list(sent)
    d2 = start_station(fleet, 0, q2, chunk_bytes=4096)
    assert wait_until(lambda: q2.stats()["pending"] == 0, WAIT)
    [row] = hub_rows(fleet).values()
    assert hub_image(fleet, row) == next(iter(sent.values()))
    assert d2.uploader.stats.resumed >= 1                     # the hub told it where to go on
    assert d2.uploader.stats.bytes_sent <= total - held + 2 * 4096


def test_hub_without_samples_support_keeps_everything_queued(fleet, monkeypatch):
    monkeypatch.setattr(hub_server, "HUB_TYPES", frozenset({"hello", "heartbeat", "fetch", "report"}))
    q = open_queue(fleet, 0)
    sent = capture(q, range(6))
    fleet.start_hub()
    daemon = start_station(fleet, 0, q)
    assert wait_until(lambda: daemon.uploader.stats.old_hub >= 1, WAIT)
    time.sleep(0.5)
    up = daemon.uploader
    assert up.paused_until > time.monotonic() + 10 and up.in_flight == []   # backing off, nothing in memory
    assert q.pending(100) == list(sent) and q.stats()["uploaded"] == 0 and q.stats()["refused"] == 0
    assert fleet.hub.stats.errors["unsupported_type"] >= 1 and fleet.hub.stats.sample_chunks == 0
    assert up.stats.old_hub == 1          # paused: not hammering the hub
    assert daemon.stats.loop_errors == 0


def test_full_hub_store_leaves_samples_at_the_station(fleet):
    q = open_queue(fleet, 0)
    sent = capture(q, range(8))
    sizes = sorted(len(v) for v in sent.values())
    fleet.hub_config.samples_max_total_bytes = sum(sizes[:3])   # room for about three
    fleet.start_hub()
    daemon = start_station(fleet, 0, q)
    assert wait_until(lambda: daemon.uploader.stats.hub_full >= 1, WAIT)
    stored = hub_rows(fleet)
    assert 1 <= len(stored) <= 3
    assert q.stats()["pending"] == len(sent) - len(stored) and q.stats()["refused"] == 0
    assert daemon.uploader.paused_until > time.monotonic() + 60   # waits retry_s before trying again


def test_hub_store_disk_failure_leaves_samples_at_the_station(fleet):
    q = open_queue(fleet, 0)
    sent = capture(q, range(4))
    blocker = fleet.root / "not-a-folder"
    blocker.write_text("a file where the samples folder should be")
    fleet.hub_config.samples_dir = blocker
    fleet.start_hub()
    daemon = start_station(fleet, 0, q)
    assert wait_until(lambda: daemon.uploader.stats.hub_full >= 1, WAIT)
    assert fleet.hub.stats.sample_store_errors >= 1 and fleet.hub.stats.internal == 0
    assert q.pending(10) == list(sent) and q.stats()["refused"] == 0
    assert daemon.uploader.paused_until > time.monotonic() + 30


def test_a_week_offline_then_everything_uploads(fleet):
    now = [1.7e9]
    q = open_queue(fleet, 0, clock=lambda: now[0])
    daemon = start_station(fleet, 0, q)          # no hub: the station serves and captures alone
    sent = {}
    for day in range(7):
        sent.update(capture(q, range(day * 10, day * 10 + 10)))
        now[0] += 24 * 3600
    assert wait_until(lambda: daemon.stats.hub_timeouts >= 2, WAIT)
    assert q.stats()["pending"] == len(sent) == 70
    fleet.start_hub()
    assert wait_until(lambda: q.stats()["pending"] == 0, WAIT)
    rows = hub_rows(fleet)
    assert set(rows) == set(sent)
    times = sorted(r["captured_at"] for r in rows.values())
    assert times[-1] - times[0] == pytest.approx(WEEK - 24 * 3600)
    assert all(r["received_at"] > 1.7e9 + WEEK for r in rows.values())   # wall clock at the hub


def _many_parts_through_restarts(fleet, n: int) -> dict:
    """n parts captured, half while the hub is away; hub and station restarted mid-upload."""
    q = open_queue(fleet, 0)
    sent = capture(q, range(n // 2))
    fleet.start_hub()
    hit = pause_after_acks(start_station(fleet, 0, q, window=16), n // 8)
    assert hit.wait(WAIT)
    fleet.stop_hub()                               # hub down mid-upload
    assert 0 < len(hub_rows(fleet)) < n // 2 and q.stats()["pending"] == n // 2 - len(hub_rows(fleet))
    sent.update(capture(q, range(n // 2, n)))      # the station keeps capturing
    fleet.stop_station(0)                          # ...and restarts
    q.close()
    q2 = open_queue(fleet, 0)
    fleet.start_hub()
    t0 = time.monotonic()
    start_station(fleet, 0, q2, window=16)
    assert wait_until(lambda: q2.stats()["pending"] == 0, 120.0)
    seconds = time.monotonic() - t0
    rows = hub_rows(fleet)
    lost = set(sent) - set(rows)
    assert not lost, f"{len(lost)} of {n} captured parts never reached the hub"
    assert len(rows) == n and q2.stats()["uploaded"] == n and q2.stats()["refused"] == 0
    assert all(hub_image(fleet, rows[sid]) == image for sid, image in sent.items())
    return {"parts": n, "upload_s_after_restarts": round(seconds, 2)}


def test_1000_parts_through_hub_and_station_restarts_none_lost(fleet):
    print(_many_parts_through_restarts(fleet, 1000))   # about 5 s here


# ---------------------------------------------------------------- the uploader alone, on a simulated clock


def _ack(msg, offset, done=False, **extra):
    return {"sample_id": msg.body["sample_id"], "offset": offset, "done": done, **extra}, msg.msg_id


def test_uploader_window_resends_and_backoff_for_a_hub_without_samples(tmp_path):
    from kaizen.runtime.uploader import Uploader

    q = CaptureQueue(tmp_path / "q", station_id="line1/s00")
    try:
        sent_ids = capture(q, range(10))
        up = Uploader(q, window=4, resend_s=1.0, pause_first_s=30.0, pause_max_s=120.0)
        out = []
        up.pump(0.0, out.append)
        assert len(out) == 4 and [m.body["sample_id"] for m in out] == q.pending(4)   # oldest first, window 4
        assert all(m.body["meta"]["sample_id"] == m.body["sample_id"] for m in out)
        up.pump(0.5, out.append)
        assert len(out) == 4
        up.pump(1.0, out.append)
        assert len(out) == 8 and up.stats.resends == 4       # no ack in resend_s: sent again...
        up.pump(2.5, out.append)
        assert len(out) == 8                                  # ...and the next wait is twice as long
        up.pump(3.0, out.append)
        assert len(out) == 12
        body, reply_to = _ack(out[-1], out[-1].body["total_size"], done=True)
        up.on_ack(body, reply_to)
        assert q.stats()["uploaded"] == 1
        assert up.on_error("unsupported_type", out[-2].msg_id) is True
        assert up.on_error("unsupported_type", out[-3].msg_id) is True   # same window: one pause, not three
        assert up.on_error("bad_body", "f" * 32) is False                  # not one of ours: the daemon's
        assert up.paused_until == 33.0 and up.in_flight == [] and up.stats.old_hub == 1
        for t, pause in ((33.0, 60.0), (93.0, 120.0), (213.0, 120.0)):   # doubling, capped
            up.pump(t - 1, out.append)
            n = len(out)
            up.pump(t, out.append)
            assert len(out) == n + 4
            up.on_error("unknown_type", out[-1].msg_id)
            assert up.paused_until == t + pause
        assert q.stats()["pending"] == len(sent_ids) - 1 and q.stats()["refused"] == 0   # nothing dropped
    finally:
        q.close()


def test_uploader_acks_resume_refuse_and_halve_chunks(tmp_path):
    from kaizen.runtime.uploader import Uploader

    q = CaptureQueue(tmp_path / "q", station_id="line1/s00")
    try:
        big = capture(q, [1], size=256)
        small = capture(q, [2])
        [sid] = big
        up = Uploader(q, chunk_bytes=16384, window=2, resend_s=1.0)
        out = []
        up.pump(0.0, out.append)
        first = next(m for m in out if m.body["sample_id"] == sid)
        assert first.body["offset"] == 0 and len(first.buffers["data"]) == 16384
        up.on_ack(*_ack(first, 30000))                      # the hub holds more (an earlier upload): jump there
        up.pump(0.1, out.append)
        assert out[-1].body["offset"] == 30000 and up.stats.resumed == 1
        up.on_ack(*_ack(first, 0))                          # a stale ack of an older chunk: ignored
        up.on_ack(*_ack(out[-1], 46384))
        up.pump(0.2, out.append)
        assert out[-1].body["offset"] == 46384
        assert up.on_error("too_large", out[-1].msg_id) is True
        up.pump(0.3, out.append)
        assert up.chunk_bytes == 8192 and out[-1].body["offset"] == 46384 and len(out[-1].buffers["data"]) == 8192
        other = next(m for m in out if m.body["sample_id"] != sid)
        up.on_ack(*_ack(other, 0, done=True, refused="meta.reason must be one of ..."))
        assert q.stats()["refused"] == 1 and list((tmp_path / "q" / "refused").glob("*.json"))
        assert up.stats.refusals == {next(iter(small)): "meta.reason must be one of ..."}
        up.on_ack(*_ack(out[-1], 0, retry_s=300.0))         # the hub is full: everything waits
        assert up.paused_until == pytest.approx(300.3) and up.stats.hub_full == 1 and q.stats()["pending"] == 1
    finally:
        q.close()
