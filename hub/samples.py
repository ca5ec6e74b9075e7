"""The hub's store of captured parts (the improvement loop): SQLite index + image files.

    store = SampleStore("hub/samples", SampleLimits(max_total_bytes=20 << 30))
    ack = store.receive("line1/s00", sample_chunk.body, sample_chunk.buffers["data"])   # -> sample_ack body
    store.rows(task="seal") / store.rows(unmatched=True) / store.get(sample_id)
    store.set_labels([(sample_id, "yes", None)], source="import")   # label, task (None: keep)

Layout under `samples_dir`: `samples.sqlite` (table `samples`, one row per stored sample, WAL,
synchronous=FULL: a `done` ack is sent only after the row is durable), `images/<sample_id>.png|jpg`
and `partial/<hex of station id>/<sample_id>.part` (a multi-chunk upload in progress; its size is the
offset the hub holds, so it survives a hub restart). A chunk at another offset than the one held
is answered with the held offset and not written.

On the last byte the image is checked: sha256 == meta.image_sha256, the sample_id recomputed by
the capture formula (runtime/capture.py: sha256 of b"kaizen-sample-1\\0" + image + b"\\0" +
instruction + b"\\0" + label) equals the announced one, and the bytes are the announced format.
A sample_id already stored is answered done (dedup). Bad meta, a mismatch or an oversize sample
is answered done + refused(reason); a full store (max_total_bytes) is answered done=false with
`retry_s`, so the station keeps the sample and tries later. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from kaizen.runtime.durable import atomic_write_bytes, fsync_dir

log = logging.getLogger("kaizen.hub.samples")

SAMPLE_ID_RE = re.compile(r"^[0-9a-f]{64}$")
REASONS = frozenset({"no_match", "low_confidence", "feedback"})
FORMATS = {"png": ("png", b"\x89PNG\r\n\x1a\n"), "jpeg": ("jpg", b"\xff\xd8\xff")}
MAX_META_BYTES = 16 * 1024
MAX_INSTRUCTION_CHARS, MAX_LABEL_CHARS, MAX_NAME_CHARS = 8192, 1000, 200   # meta <= 16 KiB bounds them too
MAX_SCORES = 8
FULL_RETRY_S = 300.0        # a full store asks the station to wait this long before sending again
UNMATCHED = "unmatched"

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    sample_id TEXT PRIMARY KEY, station_id TEXT NOT NULL, captured_at REAL NOT NULL, received_at REAL NOT NULL,
    reason TEXT NOT NULL, instruction TEXT NOT NULL, image_format TEXT NOT NULL, image_bytes INTEGER NOT NULL,
    image_file TEXT NOT NULL, outcome TEXT, station_answer TEXT, station_task TEXT, pack_version INTEGER,
    confidence REAL, task_hint TEXT, label TEXT, label_source TEXT, task TEXT NOT NULL, meta TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS samples_task ON samples(task);
"""
COLUMNS = ("sample_id", "station_id", "captured_at", "received_at", "reason", "instruction", "image_format",
           "image_bytes", "image_file", "outcome", "station_answer", "station_task", "pack_version",
           "confidence", "task_hint", "label", "label_source", "task")


def sample_id_of(image: bytes, instruction: str, label: str | None) -> str:
    """The capture record's content hash (issue 14's formula; runtime/capture.py computes the same)."""
    return hashlib.sha256(b"kaizen-sample-1\0" + image + b"\0" + instruction.encode() + b"\0"
                          + (label or "").encode()).hexdigest()


@dataclass(frozen=True)
class SampleLimits:
    """Bounds of the store (hub.toml samples_* fields)."""

    max_sample_bytes: int = 16 * 1024 * 1024
    max_total_bytes: int = 20 * 1024 ** 3
    max_partial_per_station: int = 16


def _opt(value, kind, limit: int | None = None) -> bool:
    if value is None:
        return True
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, str) and (limit is None or len(value) <= limit)


def check_meta(meta: dict, sample_id: str, total_size: int) -> str | None:
    """Why `meta` is not a valid capture record for this sample, or None if it is."""
    try:
        size = len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError, UnicodeEncodeError) as err:
        return f"meta is not JSON: {err}"
    if size > MAX_META_BYTES:
        return f"meta is {size} bytes, over {MAX_META_BYTES}"
    if meta.get("schema") != 1 or isinstance(meta.get("schema"), bool):
        return f"meta.schema must be 1, got {repr(meta.get('schema'))[:20]}"
    if meta.get("sample_id") != sample_id:
        return "meta.sample_id differs from the message's sample_id"
    checks = [("station_id", str, MAX_NAME_CHARS), ("instruction", str, MAX_INSTRUCTION_CHARS),
              ("image_sha256", str, 64)]
    for name, kind, limit in checks:
        if not isinstance(meta.get(name), kind) or not meta[name] or not _opt(meta[name], kind, limit):
            return f"meta.{name} must be a non-empty string of at most {limit} characters"
    if not SAMPLE_ID_RE.match(meta["image_sha256"]):
        return "meta.image_sha256 must be 64 lowercase hex digits"
    if meta.get("captured_at") is None or not _opt(meta.get("captured_at"), float) or meta["captured_at"] < 0:
        return "meta.captured_at must be a unix time (seconds, >= 0)"
    if not isinstance(meta.get("reason"), str) or meta["reason"] not in REASONS:
        return f"meta.reason must be one of {', '.join(sorted(REASONS))}"
    if not isinstance(meta.get("image_format"), str) or meta["image_format"] not in FORMATS:
        return f"meta.image_format must be one of {', '.join(sorted(FORMATS))}"
    if meta.get("image_bytes") != total_size or isinstance(meta.get("image_bytes"), bool):
        return f"meta.image_bytes must equal total_size ({total_size})"
    if not _opt(meta.get("label"), str, MAX_LABEL_CHARS) or meta.get("label") == "":
        return f"meta.label must be null or a non-empty string of at most {MAX_LABEL_CHARS} characters"
    if meta["reason"] == "feedback" and meta.get("label") is None:
        return "meta.label is required for reason feedback (the operator's answer)"
    if not _opt(meta.get("task_hint"), str, MAX_NAME_CHARS):
        return f"meta.task_hint must be null or a string of at most {MAX_NAME_CHARS} characters"
    return _check_result(meta.get("result"))


def _check_result(result) -> str | None:
    if result is None:
        return None
    if not isinstance(result, dict):
        return "meta.result must be an object or null"
    for name, kind, limit in (("outcome", str, 64), ("answer", str, MAX_LABEL_CHARS),
                              ("task_id", str, MAX_NAME_CHARS), ("pack_version", int, None),
                              ("confidence", float, None)):
        if not _opt(result.get(name), kind, limit):
            what = {str: f"a string of at most {limit} characters", int: "an integer >= 0",
                    float: "a finite number"}[kind]
            return f"meta.result.{name} must be null or {what}"
    scores = result.get("scores")
    if scores is not None and not (isinstance(scores, dict) and len(scores) <= MAX_SCORES
                                   and all(_opt(v, float) and v is not None for v in scores.values())):
        return f"meta.result.scores must be an object of at most {MAX_SCORES} task: number entries"
    return None


def task_of(meta: dict) -> str:
    """The task a sample is filed under: the feedback's task_hint, else the station's selected task,
    else "unmatched"."""
    result = meta.get("result") or {}
    for task in (meta.get("task_hint"), result.get("task_id") if result.get("outcome") != "no_match" else None):
        if isinstance(task, str) and task.strip():
            return task.strip()
    return UNMATCHED


class SampleStore:
    """Captured parts at the hub. One instance per thread (it holds a SQLite connection)."""

    def __init__(self, samples_dir: str | Path, limits: SampleLimits | None = None, *, clock=time.time):
        self.root = Path(samples_dir)
        self.limits = limits or SampleLimits()
        self.clock = clock
        self.images = self.root / "images"
        self.partial = self.root / "partial"
        self.images.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.root / "samples.sqlite"), timeout=30.0)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        with self.conn:
            self.conn.executescript(SCHEMA)
        self._stored_bytes = self.conn.execute("SELECT COALESCE(SUM(image_bytes), 0) FROM samples").fetchone()[0]
        self._reassembly_failures: dict[str, int] = {}

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------ upload

    def receive(self, station_id: str, body: dict, data: bytes) -> dict:
        """Take one sample_chunk (body fields already type-checked by the protocol); the sample_ack body."""
        sample_id, offset, total, meta = body["sample_id"], body["offset"], body["total_size"], body["meta"]
        if not SAMPLE_ID_RE.match(sample_id):
            return _refused(sample_id[:64], "sample_id must be 64 lowercase hex digits")
        if self.has(sample_id):
            self._drop_partial(station_id, sample_id)
            return {"sample_id": sample_id, "offset": total, "done": True}
        if not 0 < total <= self.limits.max_sample_bytes:
            return self._refuse(station_id, sample_id, f"image of {total} bytes: a sample is 1.."
                                f"{self.limits.max_sample_bytes} bytes at this hub")
        problem = check_meta(meta, sample_id, total)
        if problem is not None:
            return self._refuse(station_id, sample_id, problem)
        part = self._part_path(station_id, sample_id)
        held = part.stat().st_size if part.exists() else 0
        if held > total:
            self._drop_partial(station_id, sample_id)
            held = 0
        if offset != held:
            return {"sample_id": sample_id, "offset": held, "done": False}
        if offset + len(data) > total:
            return self._refuse(station_id, sample_id, f"chunk at {offset} of {len(data)} bytes runs past "
                                f"total_size {total}")
        if held == 0 and self._stored_bytes + total > self.limits.max_total_bytes:
            log.warning("hub: sample store %s full (%d of %d bytes): %s keeps its samples", self.root,
                        self._stored_bytes, self.limits.max_total_bytes, station_id)
            return {"sample_id": sample_id, "offset": 0, "done": False, "retry_s": FULL_RETRY_S}
        if held == 0 and len(data) == total:
            return self._finalize(station_id, sample_id, meta, bytes(data), reassembled=False)
        if data:
            if held == 0:
                self._make_room(station_id)
            part.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if held == 0:
                fsync_dir(part.parent)
            held += len(data)
        if held < total:   # (a whole partial left by a failed finalize is finished by the next chunk)
            return {"sample_id": sample_id, "offset": held, "done": False}
        return self._finalize(station_id, sample_id, meta, part.read_bytes(), reassembled=True)

    def _finalize(self, station_id: str, sample_id: str, meta: dict, image: bytes, *, reassembled: bool) -> dict:
        problem = None
        if hashlib.sha256(image).hexdigest() != meta["image_sha256"]:
            problem = "image sha256 differs from meta.image_sha256"
        elif sample_id_of(image, meta["instruction"], meta.get("label")) != sample_id:
            problem = "sample_id differs from the hash of image + instruction + label"
        elif not image.startswith(FORMATS[meta["image_format"]][1]):
            problem = f"image bytes are not {meta['image_format']}"
        if problem is not None and reassembled and self._reassembly_failures.get(sample_id, 0) < 1:
            # a torn append (hub crash) could cause this: start the upload over once before refusing
            if len(self._reassembly_failures) >= 10000:   # bounded: abandoned uploads forget their one retry
                self._reassembly_failures.clear()
            self._reassembly_failures[sample_id] = 1
            self._drop_partial(station_id, sample_id)
            return {"sample_id": sample_id, "offset": 0, "done": False}
        if problem is not None:
            self._reassembly_failures.pop(sample_id, None)
            return self._refuse(station_id, sample_id, problem)
        ext = FORMATS[meta["image_format"]][0]
        atomic_write_bytes(self.images / f"{sample_id}.{ext}", image)
        result = meta.get("result") or {}
        row = {"sample_id": sample_id, "station_id": station_id, "captured_at": float(meta["captured_at"]),
               "received_at": self.clock(), "reason": meta["reason"], "instruction": meta["instruction"],
               "image_format": meta["image_format"], "image_bytes": len(image), "image_file": f"{sample_id}.{ext}",
               "outcome": result.get("outcome"), "station_answer": result.get("answer"),
               "station_task": result.get("task_id"), "pack_version": result.get("pack_version"),
               "confidence": result.get("confidence"), "task_hint": meta.get("task_hint"),
               "label": meta.get("label"), "label_source": "operator" if meta.get("label") is not None else None,
               "task": task_of(meta), "meta": json.dumps(meta, separators=(",", ":"))}
        with self.conn:
            self.conn.execute(f"INSERT OR IGNORE INTO samples ({', '.join(row)}) VALUES "
                              f"({', '.join(':' + k for k in row)})", row)
        self._stored_bytes += len(image)
        self._reassembly_failures.pop(sample_id, None)
        self._drop_partial(station_id, sample_id)
        return {"sample_id": sample_id, "offset": len(image), "done": True}

    def _refuse(self, station_id: str, sample_id: str, reason: str) -> dict:
        self._drop_partial(station_id, sample_id)
        log.warning("hub: sample %s from %s refused: %s", sample_id[:12], station_id, reason)
        return _refused(sample_id, reason)

    def _station_dir(self, station_id: str) -> Path:
        return self.partial / station_id.encode().hex()   # any id, no path tricks (".." is a valid id)

    def _part_path(self, station_id: str, sample_id: str) -> Path:
        return self._station_dir(station_id) / f"{sample_id}.part"

    def _drop_partial(self, station_id: str, sample_id: str) -> None:
        self._part_path(station_id, sample_id).unlink(missing_ok=True)

    def _make_room(self, station_id: str) -> None:
        """At most max_partial_per_station uploads in progress per station: the oldest goes (the
        station still has it and starts it over when it gets offset 0)."""
        folder = self._station_dir(station_id)
        if not folder.is_dir():
            return
        parts = sorted(folder.glob("*.part"), key=lambda p: p.stat().st_mtime)
        for old in parts[:max(len(parts) - self.limits.max_partial_per_station + 1, 0)]:
            log.info("hub: dropped the partial upload %s (over %d per station)", old.name,
                     self.limits.max_partial_per_station)
            old.unlink(missing_ok=True)

    # ------------------------------------------------------------ reading and labels

    def has(self, sample_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM samples WHERE sample_id = ?", (sample_id,)).fetchone() is not None

    @property
    def stored_bytes(self) -> int:
        return self._stored_bytes

    def get(self, sample_id: str) -> dict | None:
        row = self.conn.execute(f"SELECT {', '.join(COLUMNS)} FROM samples WHERE sample_id = ?",
                                (sample_id,)).fetchone()
        return dict(row) if row else None

    def rows(self, *, task: str | None = None, labelled: bool | None = None) -> list[dict]:
        """Stored samples, oldest capture first; filtered by task and by having a label."""
        where, args = [], []
        if task is not None:
            where.append("task = ?")
            args.append(task)
        if labelled is not None:
            where.append("label IS NOT NULL" if labelled else "label IS NULL")
        sql = f"SELECT {', '.join(COLUMNS)} FROM samples"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY captured_at, sample_id", args)]

    def image_path(self, row: dict) -> Path:
        return self.images / row["image_file"]

    def set_labels(self, changes: list[tuple[str, str | None, str | None]], *, source: str = "import") -> None:
        """[(sample_id, label or None = keep, task or None = keep)] in one transaction."""
        with self.conn:
            for sample_id, label, task in changes:
                if label is not None:
                    self.conn.execute("UPDATE samples SET label = ?, label_source = ? WHERE sample_id = ?",
                                      (label, source, sample_id))
                if task is not None:
                    self.conn.execute("UPDATE samples SET task = ? WHERE sample_id = ?", (task, sample_id))


def _refused(sample_id: str, reason: str) -> dict:
    return {"sample_id": sample_id, "offset": 0, "done": True, "refused": reason[:500]}
