"""Resumable download of one pack from the hub: staging file, verified chunks, persisted offset.

The station pulls a pack with `fetch(name, sha256, offset, credit)` and the hub answers with
`chunk` messages. A Transfer owns the staging file `<sha256>.part` and its offset record
`<sha256>.json` (the contiguous prefix that is written, fsync'd and hash-checked), so a
disconnect, a hub restart or a station restart resumes from there instead of from 0:

    t = Transfer(downloads_dir, {"name", "sha256", "size", "task_id", "version"}, window=4 * CHUNK)
    for offset, credit in t.requests(now): send fetch(...)        # keeps `window` bytes in flight
    t.on_chunk(offset, data, sha256_chunk, total_size)            # "ok" | "duplicate" | "corrupt" | "bad"
    if t.complete: path = t.finalize()                            # whole-file sha256, rename; None if bad

A chunk whose sha256 does not match is dropped and that range is fetched again; duplicates and
stale chunks are dropped; a silent hub (no chunk for `timeout` s) restarts the window from the
persisted offset. Nothing here talks to a socket (runtime/daemon.py does). A disk error (e.g.
ENOSPC) raises OSError out of on_chunk/finalize with the persisted offset still valid: the daemon
reports it and a later Transfer of the same pack resumes from that offset.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .durable import atomic_write_bytes, fsync_dir, sha256_file


class Transfer:
    """One pack being downloaded into `folder`."""

    def __init__(self, folder: Path, entry: dict, window: int, timeout: float = 3.0):
        assert window > 0 and timeout > 0
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entry = dict(entry)
        self.name: str = entry["name"]
        self.sha256: str = entry["sha256"]
        self.size: int = int(entry["size"])
        self.window = window
        self.timeout = timeout
        self.part = self.folder / f"{self.sha256}.part"
        self.meta = self.folder / f"{self.sha256}.json"
        self.offset = self._load_offset()
        self.resumed_from = self.offset          # where this Transfer object started (tests check it)
        self._ranges: dict[int, int] = {}        # verified chunks beyond `offset`: start -> length
        self._refetch: list[tuple[int, int]] = []
        self.requested = self.offset             # bytes asked for so far (the window's front)
        self._last_activity = time.monotonic()
        self.fetch_offsets: list[int] = []       # offsets of every fetch sent (tests, benchmark)
        self.counts = {"ok": 0, "duplicate": 0, "corrupt": 0, "bad": 0, "timeouts": 0}
        self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)

    def _load_offset(self) -> int:
        if not self.meta.exists() or not self.part.exists():
            return 0
        try:
            record = json.loads(self.meta.read_text())
        except ValueError:
            return 0  # unreadable record: start over (the whole-file hash guards the result)
        if record.get("sha256") != self.sha256 or record.get("size") != self.size:
            return 0
        offset = int(record.get("offset", 0))
        return offset if 0 <= offset <= min(self.size, self.part.stat().st_size) else 0

    def _persist(self) -> None:
        os.fsync(self._fd)  # the bytes first, then the offset that claims them
        record = {"name": self.name, "sha256": self.sha256, "size": self.size, "offset": self.offset}
        atomic_write_bytes(self.meta, json.dumps(record).encode())

    @property
    def complete(self) -> bool:
        return self.offset >= self.size

    def restart_window(self) -> None:
        """Forget what is in flight (after a reconnect): ask again from the persisted offset."""
        self._refetch.clear()
        self.requested = self.offset
        self._last_activity = time.monotonic()

    def requests(self, now: float | None = None) -> list[tuple[int, int]]:
        """(offset, credit) fetches to send now to keep `window` bytes in flight."""
        now = time.monotonic() if now is None else now
        if self.complete:
            return []
        if self.requested > self.offset and now - self._last_activity > self.timeout:
            self.counts["timeouts"] += 1
            self.restart_window()
        out, self._refetch = self._refetch, []
        in_flight = self.requested - self.offset
        if self.requested < self.size and in_flight < self.window:
            credit = min(self.window - in_flight, self.size - self.requested)
            out.append((self.requested, credit))
            self.requested += credit
        if out:
            self._last_activity = now
            self.fetch_offsets.extend(o for o, _ in out)
        return out

    def on_chunk(self, offset: int, data: bytes, sha256_chunk: str, total_size: int) -> str:
        """Take one chunk: write it if it is new and intact. Returns what happened."""
        self._last_activity = time.monotonic()
        if total_size != self.size or not data or offset + len(data) > self.size:
            self.counts["bad"] += 1
            return "bad"
        if offset + len(data) <= self.offset or self._ranges.get(offset) == len(data):
            self.counts["duplicate"] += 1
            return "duplicate"
        if hashlib.sha256(data).hexdigest() != sha256_chunk:
            self.counts["corrupt"] += 1
            self._refetch.append((offset, len(data)))
            return "corrupt"
        view, at = memoryview(data), offset
        while view:  # a short write (nearly full disk) continues; ENOSPC/EDQUOT raise to the daemon
            n = os.pwrite(self._fd, view, at)
            view, at = view[n:], at + n
        self._ranges[offset] = len(data)
        self.counts["ok"] += 1
        self._advance()
        return "ok"

    def _advance(self) -> None:
        start = self.offset
        moved = True
        while moved:
            moved = False
            for begin in [b for b in self._ranges if b <= self.offset]:
                self.offset = max(self.offset, begin + self._ranges.pop(begin))
                moved = True
        if self.offset != start:
            self.requested = max(self.requested, self.offset)
            self._persist()

    def finalize(self) -> Path | None:
        """Check the whole file's sha256; on success move it to `folder/<name>` and return that.

        On a mismatch the staging file is reset to offset 0 and None is returned.
        """
        assert self.complete
        os.ftruncate(self._fd, self.size)
        os.fsync(self._fd)
        if sha256_file(self.part) != self.sha256:
            self.offset = 0
            self._ranges.clear()
            self.restart_window()
            os.ftruncate(self._fd, 0)
            self._persist()
            return None
        self.close()
        final = self.folder / self.name
        os.replace(self.part, final)
        self.meta.unlink(missing_ok=True)
        fsync_dir(self.folder)
        return final

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Remove the staging file and its offset record."""
        self.close()
        self.part.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
