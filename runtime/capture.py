"""The station's capture queue: parts it was unsure of, and operators' corrections, kept on disk
until the fleet link has uploaded them to the hub (the improvement loop; runtime/PROTOCOL.md).

    q = CaptureQueue(state_dir / "capture", station_id="line1/s00", max_items=10000, max_bytes=512 << 20)
    q.offer(png_bytes, "Is the seal torn?", result, "low_confidence")   # never blocks inference
    q.flush()                                   # wait until the writer thread has persisted it
    for sid in q.pending(): meta, image = q.load(sid)   # ... upload ...; q.uploaded(sid)
    q.refused(sid, "too large")                 # refused by the hub for good: kept in refused/
    q.stats(); q.close()

offer() only appends to a bounded in-memory deque (full: the oldest non-feedback item is dropped
and counted); one writer thread PNG-encodes raw images, hashes, and commits each sample as
`<seq:012d>-<sample_id>.img` then `.json` (the commit point; fsync'd, runtime/durable.py). At
start an .img without its .json (a crash mid-write) is removed and a damaged pair is moved to
damaged/. The disk queue is capped (max_items, max_bytes): the oldest samples go first, counted.
Counters live in counters.json and survive restarts (written at most once a second and at
close: a crash can lose the last second's counts, never a committed sample). The writer waits
while a part is being answered (`with q.inference():`, used by the Station) and idle_s after it,
unless half its memory queue is full, so its disk work runs between parts. sample_id is a content hash (runtime/capture_image.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .capture_image import _size_of, encoded_image, sample_id_of
from .durable import atomic_write_bytes, fsync_dir, write_synced

LOG = logging.getLogger("kaizen.capture")
SCHEMA = 1
MAX_META_BYTES = 16 << 10
REASONS = frozenset({"no_match", "low_confidence", "feedback"})
COUNTERS = ("captured", "persisted", "dropped_full", "dropped_queue", "duplicates", "uploaded", "refused",
            "write_errors", "damaged")
COUNTERS_EVERY_S = 1.0   # counters.json is rewritten at most this often (and at close)
_NAME_RE = re.compile(r"^(\d{12})-([0-9a-f]{64})\.(img|json)$")


@dataclass
class _Item:
    image: object           # bytes, uint8 array or PIL image (encoded by the writer)
    instruction: str
    result: dict | None
    reason: str
    label: str | None
    task_hint: str | None
    captured_at: float
    nbytes: int
    encoded: tuple | None = None   # (bytes, kind, sample_id) when the caller wanted the id now


class CaptureQueue:
    """A bounded, crash-safe on-disk queue of captured parts (see the module docstring)."""

    def __init__(self, folder, station_id: str = "", max_items: int = 10_000, max_bytes: int = 512 << 20, *,
                 clock=time.time, memory_items: int = 256, memory_bytes: int = 64 << 20, max_refused: int = 1000,
                 idle_s: float = 0.002):
        for name, value in (("max_items", max_items), ("max_bytes", max_bytes), ("memory_items", memory_items),
                            ("memory_bytes", memory_bytes), ("max_refused", max_refused)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CaptureQueue {name} must be a positive integer, got {value!r}")
        self.folder = Path(folder)
        self.station_id, self.clock = station_id, clock
        self.max_items, self.max_bytes, self.max_refused = max_items, max_bytes, max_refused
        self.memory_items, self.memory_bytes = memory_items, memory_bytes
        self.idle_s = float(idle_s)   # the writer starts a sample only after this long without a part
        for sub in ("", "refused", "damaged"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self._counters_file = self.folder / "counters.json"
        self._save_lock = threading.Lock()
        self._saved, self._saved_at = b"", 0.0   # counters.json as last written, and when (monotonic)
        self._cond = threading.Condition()   # guards everything below; never held during disk I/O
        self._mem: deque[_Item] = deque()
        self._mem_bytes = 0
        self._busy: _Item | None = None   # the item the writer is persisting
        self._closed = False
        self._active = 0     # parts being answered now (see inference())
        self._idle_since = 0.0   # when the last one ended (monotonic)
        self._flushing = 0   # callers waiting in flush()
        self._index: OrderedDict[str, tuple[int, int]] = OrderedDict()   # sample_id -> (seq, bytes), oldest first
        self._pending_bytes = 0
        self._seq = 0
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._read_counters()
        self._load()
        self._thread = threading.Thread(target=self._run, name="kaizen-capture", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ hot path
    def offer(self, image, instruction: str, result: dict | None, reason: str, label: str | None = None,
              task_hint: str | None = None, *, identify: bool = True) -> str | None:
        """Queue one part for the writer thread; never blocks on disk, never raises for a full queue.

        Returns its sample_id, or None when the queue is closed or `identify` is False (the hot
        path: then even hashing and PNG encoding happen on the writer thread)."""
        if reason not in REASONS:
            raise ValueError(f"capture reason {reason!r} is not one of {sorted(REASONS)}")
        encoded = None
        if identify:
            data, kind = encoded_image(image)
            encoded = (data, kind, sample_id_of(data, instruction, label))
            image = data
        item = _Item(image, instruction, result, reason, label, task_hint, float(self.clock()), _size_of(image), encoded)
        with self._cond:
            if self._closed:
                return None
            self.counters["captured"] += 1
            if item.nbytes > self.memory_bytes:   # larger than the whole memory queue: not taken
                self.counters["dropped_queue"] += 1
                return None
            while self._mem and (len(self._mem) >= self.memory_items or self._mem_bytes + item.nbytes > self.memory_bytes):
                victim = next((i for i in self._mem if i.reason != "feedback"), self._mem[0])
                self._mem.remove(victim)
                self._mem_bytes -= victim.nbytes
                self.counters["dropped_queue"] += 1
            self._mem.append(item)
            self._mem_bytes += item.nbytes
            if not self._active or self._may_write(time.monotonic()):   # else woken when inference() ends
                self._cond.notify_all()
        return encoded[2] if encoded else None

    def has(self, sample_id: str) -> bool:
        """True if the sample is on disk or (identified) waiting in memory."""
        with self._cond:
            items = [*self._mem, self._busy] if self._busy else self._mem
            return sample_id in self._index or any(i.encoded and i.encoded[2] == sample_id for i in items)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything offered so far is persisted (or dropped); False on timeout."""
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._mem and not self._busy, timeout)
            finally:
                self._flushing -= 1

    @contextmanager
    def inference(self):
        """Mark a part being answered: the writer waits for such moments to pass (unless half of
        its memory queue is full, or on flush/close), so disk work does not run beside inference."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._idle_since = time.monotonic()
                    self._cond.notify_all()   # a paused writer goes on

    def _pressed(self) -> bool:
        """A flush or close waits, or half the memory queue is full (a long burst): write anyway."""
        return (self._closed or self._flushing > 0 or 2 * len(self._mem) >= self.memory_items
                or 2 * self._mem_bytes >= self.memory_bytes)

    def _may_write(self, now: float) -> bool:
        """The writer may take an item now: the station has been idle for idle_s, or it is pressed."""
        return bool(self._mem) and (self._pressed() or (not self._active and now - self._idle_since >= self.idle_s))

    def _pause(self) -> None:
        """Between the writer's steps: wait while a part is being answered (unless pressed), so its
        Python work (which needs the GIL) does not run beside inference; its fsyncs may."""
        with self._cond:
            self._cond.wait_for(lambda: not self._active or self._pressed())

    def _next_item(self) -> _Item | None:
        """The next item the writer may persist, waiting up to COUNTERS_EVERY_S; None if none."""
        with self._cond:
            deadline = time.monotonic() + COUNTERS_EVERY_S
            while not (self._closed and not self._mem):
                now = time.monotonic()
                if self._may_write(now):
                    item = self._mem.popleft()
                    self._mem_bytes -= item.nbytes
                    self._busy = item
                    return item
                if now >= deadline:
                    return None
                wait = deadline - now
                if self._mem and not self._active:   # idle, but not for idle_s yet
                    wait = min(wait, self._idle_since + self.idle_s - now)
                self._cond.wait(max(wait, 1e-4))
            return None

    # ------------------------------------------------------------------ uploader side
    def pending(self, limit: int = 64) -> list[str]:
        with self._cond:
            return [sid for sid, _ in zip(self._index, range(limit))]

    def load(self, sample_id: str) -> tuple[dict, bytes]:
        """(meta, image bytes) of a pending sample; KeyError if it is gone (uploaded, dropped, damaged)."""
        with self._cond:
            seq = self._index[sample_id][0]
        stem = self.folder / f"{seq:012d}-{sample_id}"
        try:
            meta = json.loads(stem.with_suffix(".json").read_bytes())
            data = stem.with_suffix(".img").read_bytes()
        except FileNotFoundError:
            raise KeyError(sample_id) from None   # dropped by the cap or uploaded meanwhile
        except (OSError, ValueError) as err:
            self._set_aside(sample_id, seq, f"unreadable: {err}")
            raise KeyError(sample_id) from None
        if hashlib.sha256(data).hexdigest() != meta.get("image_sha256"):
            self._set_aside(sample_id, seq, "image bytes do not match image_sha256")
            raise KeyError(sample_id)
        return meta, data

    def uploaded(self, sample_id: str) -> None:
        """The hub stored the sample: delete it here (a repeated call is ignored)."""
        entry = self._forget(sample_id, "uploaded")
        if entry is not None:
            self._unlink(entry[0], sample_id, sync=False)   # a file back after a crash is re-sent: the hub dedups

    def refused(self, sample_id: str, reason: str) -> None:
        """The hub refused the sample for good: move it to refused/ (the newest max_refused are kept)."""
        entry = self._forget(sample_id, "refused")
        if entry is None:
            return
        name = f"{entry[0]:012d}-{sample_id}"
        src, dst = self.folder / name, self.folder / "refused" / name
        try:
            meta = json.loads(src.with_suffix(".json").read_bytes())
            os.replace(src.with_suffix(".img"), dst.with_suffix(".img"))
            atomic_write_bytes(dst.with_suffix(".json"), json.dumps({**meta, "refused": str(reason)[:1000]}).encode())
        except (OSError, ValueError) as err:
            LOG.warning("capture: refused sample %s could not be kept in refused/ (%s)", sample_id, err)
        self._unlink(entry[0], sample_id)
        kept = sorted(p for p in (self.folder / "refused").iterdir() if p.suffix == ".json")
        for old in kept[:max(0, len(kept) - self.max_refused)]:
            old.unlink(missing_ok=True)
            old.with_suffix(".img").unlink(missing_ok=True)

    def stats(self) -> dict:
        with self._cond:
            return {**self.counters, "pending": len(self._index), "pending_bytes": self._pending_bytes,
                    "queued": len(self._mem)}

    def close(self, timeout: float = 10.0) -> None:
        """Persist what is queued (up to `timeout` seconds), stop the writer, save the counters."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._save_counters()

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            item = self._next_item()
            if item is None and self._closed:
                return
            if item is not None:
                try:
                    self._persist(item)
                except Exception:   # the writer must outlive any one bad sample (disk full, odd image): logged
                    LOG.exception("capture: a %s sample could not be written", item.reason)
                    with self._cond:
                        self.counters["write_errors"] += 1
                finally:
                    with self._cond:
                        self._busy = None
                        self._cond.notify_all()
            if time.monotonic() - self._saved_at >= COUNTERS_EVERY_S:
                self._save_counters()

    def _persist(self, item: _Item) -> None:
        data, kind, sid = item.encoded or (*encoded_image(item.image), None)
        sid = sid or sample_id_of(data, item.instruction, item.label)
        meta = self._meta(item, sid, data, kind)
        size = len(data) + len(meta)
        self._pause()
        with self._cond:
            if sid in self._index:
                self.counters["duplicates"] += 1
                return
            if size > self.max_bytes:
                self.counters["dropped_full"] += 1
                LOG.warning("capture: a %d-byte sample is over the queue's max_bytes %d: dropped", size, self.max_bytes)
                return
            victims = []
            while self._index and (len(self._index) >= self.max_items or self._pending_bytes + size > self.max_bytes):
                old, (seq, nbytes) = self._index.popitem(last=False)
                self._pending_bytes -= nbytes
                victims.append((seq, old))
            self.counters["dropped_full"] += len(victims)
        for seq, old in victims:
            self._unlink(seq, old, sync=False)
        self._seq += 1
        stem = self.folder / f"{self._seq:012d}-{sid}"
        self._pause()
        write_synced(stem.with_suffix(".img"), data)
        self._pause()
        atomic_write_bytes(stem.with_suffix(".json"), meta, before_replace=self._pause)   # the commit point
        with self._cond:
            self._index[sid] = (self._seq, size)
            self._pending_bytes += size
            self.counters["persisted"] += 1

    def _meta(self, item: _Item, sid: str, data: bytes, kind: str) -> bytes:
        result = None
        if item.result is not None:
            keys = ("outcome", "answer", "task_id", "pack_version", "confidence")
            scores = dict(list((item.result.get("scores") or {}).items())[:8])
            result = {**{k: item.result.get(k) for k in keys}, "scores": scores}
        meta = {"schema": SCHEMA, "sample_id": sid, "station_id": self.station_id, "captured_at": item.captured_at,
                "reason": item.reason, "instruction": item.instruction, "image_format": kind,
                "image_sha256": hashlib.sha256(data).hexdigest(), "image_bytes": len(data),
                "label": item.label, "task_hint": item.task_hint, "result": result}
        out = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()   # as on the wire
        if len(out) > MAX_META_BYTES:
            raise ValueError(f"capture meta is {len(out)} bytes, over {MAX_META_BYTES} (instruction too long?)")
        return out

    # ------------------------------------------------------------------ disk helpers
    def _forget(self, sample_id: str, counter: str) -> tuple[int, int] | None:
        with self._cond:
            entry = self._index.pop(sample_id, None)
            if entry is not None:
                self._pending_bytes -= entry[1]
                self.counters[counter] += 1
            return entry

    def _unlink(self, seq: int, sample_id: str, sync: bool = True) -> None:
        stem = self.folder / f"{seq:012d}-{sample_id}"
        stem.with_suffix(".json").unlink(missing_ok=True)   # un-commit first, then the image
        stem.with_suffix(".img").unlink(missing_ok=True)
        if sync:
            fsync_dir(self.folder)

    def _set_aside(self, sample_id: str, seq: int, why: str) -> None:
        if self._forget(sample_id, "damaged") is None:
            return
        LOG.error("capture: sample %s is damaged (%s): moved to %s", sample_id, why, self.folder / "damaged")
        for suffix in (".json", ".img"):
            name = f"{seq:012d}-{sample_id}{suffix}"
            if (self.folder / name).exists():
                os.replace(self.folder / name, self.folder / "damaged" / name)

    def _read_counters(self) -> None:
        try:
            saved = json.loads(self._counters_file.read_bytes())
            if not isinstance(saved, dict):
                raise TypeError("not a JSON object")
            self.counters.update({k: int(saved.get(k, 0)) for k in COUNTERS})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as err:
            aside = self._counters_file.with_name("counters.json.damaged")
            LOG.error("capture: %s is unreadable (%s): moved to %s, counters start at 0", self._counters_file, err, aside)
            os.replace(self._counters_file, aside)

    def _save_counters(self) -> None:
        """Write counters.json if it changed (the writer thread does so at most once a second)."""
        with self._save_lock:
            self._saved_at = time.monotonic()
            with self._cond:
                data = json.dumps(self.counters, sort_keys=True).encode()
            if data == self._saved:
                return
            try:
                atomic_write_bytes(self._counters_file, data)
                self._saved = data
            except OSError as err:
                LOG.warning("capture: counters not saved (%s); kept in memory", err.strerror or err)

    def _load(self) -> None:
        """Index the committed samples; remove crash leftovers; move damaged pairs to damaged/."""
        found: dict[tuple[int, str], set[str]] = {}
        for path in self.folder.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink()   # an atomic write that never completed
            elif m := _NAME_RE.match(path.name):
                found.setdefault((int(m.group(1)), m.group(2)), set()).add(m.group(3))
        for (seq, sid), kinds in sorted(found.items()):
            stem = self.folder / f"{seq:012d}-{sid}"
            self._seq = max(self._seq, seq)
            if kinds == {"img"}:
                LOG.info("capture: removing %s.img: its write never committed (no .json)", stem.name)
                stem.with_suffix(".img").unlink()
                continue
            try:
                meta = json.loads(stem.with_suffix(".json").read_bytes())
                size = stem.with_suffix(".img").stat().st_size
                if not isinstance(meta, dict) or meta.get("sample_id") != sid or meta.get("image_bytes") != size:
                    raise ValueError("meta does not match the file name or the image size")
            except (OSError, ValueError) as err:
                self._index[sid] = (seq, 0)
                self._set_aside(sid, seq, f"{type(err).__name__}: {err}")
                continue
            self._index[sid] = (seq, size + stem.with_suffix(".json").stat().st_size)
            self._pending_bytes += self._index[sid][1]
        lost = self.counters["persisted"] - (len(self._index) + self.counters["dropped_full"] + self.counters["uploaded"]
                                             + self.counters["refused"] + self.counters["damaged"])
        if lost < 0:   # committed after the last counters save (a crash): count them now
            self.counters["persisted"] -= lost
        fsync_dir(self.folder)
