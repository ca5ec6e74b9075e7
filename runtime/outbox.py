"""A disk outbox for the station's delivery reports: kept until the hub acks them.

One small JSON file per report in a folder (`NNNNNNNNNNNN-<msg_id>.json`, written atomically),
so a report survives a station restart or a hub outage and is resent until acked:

    box = Outbox(state_dir / "outbox")
    msg_id = box.add({"name": ..., "task_id": ..., "version": 3, "state": "activated", "reason": None})
    for msg_id, body in box.due(now, resend_s=2.0): send report(msg_id, body)
    box.ack(msg_id)     # on the hub's ack: the file is removed

Resending the same msg_id is safe: the hub's state is an idempotent, never-backwards upsert.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from .durable import atomic_write_bytes, fsync_dir
from .protocol import new_msg_id

LOG = logging.getLogger("kaizen.outbox")

_NAME_RE = re.compile(r"^(\d{12})-([0-9a-f]{32})\.json$")


class Outbox:
    """Reports not yet acked, in the order they were made."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Path] = {}
        self._bodies: dict[str, dict] = {}
        self._last_sent: dict[str, float] = {}
        self._seq = 0
        self._load()

    def _load(self) -> None:
        for path in sorted(self.folder.iterdir()):
            match = _NAME_RE.match(path.name)
            if not match:
                continue  # a leftover .tmp from a crash mid-write: the report was never made
            try:
                record = json.loads(path.read_text())
                body = record["body"]
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
                # a damaged report must not stop the daemon from starting: keep it aside, go on
                os.replace(path, path.with_suffix(".damaged"))
                LOG.warning("outbox: %s is unreadable (%s); moved to %s", path, type(err).__name__,
                            path.with_suffix(".damaged"))
                continue
            msg_id = match.group(2)
            self._files[msg_id] = path
            self._bodies[msg_id] = body
            self._seq = max(self._seq, int(match.group(1)))

    def add(self, body: dict) -> str:
        """Persist a report body (fsync'd) and return the msg_id it will be sent with."""
        self._seq += 1
        msg_id = new_msg_id()
        path = self.folder / f"{self._seq:012d}-{msg_id}.json"
        atomic_write_bytes(path, json.dumps({"msg_id": msg_id, "body": body}).encode())
        self._files[msg_id] = path
        self._bodies[msg_id] = body
        return msg_id

    def ack(self, msg_id: str) -> bool:
        """Drop an acked report; False if it was not pending (a duplicate or stale ack)."""
        path = self._files.pop(msg_id, None)
        if path is None:
            return False
        self._bodies.pop(msg_id, None)
        self._last_sent.pop(msg_id, None)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        fsync_dir(self.folder)
        return True

    def due(self, now: float | None = None, resend_s: float = 2.0) -> list[tuple[str, dict]]:
        """Pending reports not sent within the last `resend_s` seconds (marks them as sent now)."""
        now = time.monotonic() if now is None else now
        out = []
        for msg_id in sorted(self._files, key=lambda m: self._files[m].name):
            last = self._last_sent.get(msg_id)
            if last is None or now - last >= resend_s:
                self._last_sent[msg_id] = now
                out.append((msg_id, self._bodies[msg_id]))
        return out

    def mark_sent(self, msg_id: str, now: float | None = None) -> None:
        """Record that `msg_id` was just sent (so due() waits `resend_s` before resending it)."""
        if msg_id in self._files:
            self._last_sent[msg_id] = time.monotonic() if now is None else now

    def reset_timers(self) -> None:
        """Make every pending report due now (after a reconnect)."""
        self._last_sent.clear()

    def pending(self) -> list[tuple[str, dict]]:
        return [(m, self._bodies[m]) for m in sorted(self._files, key=lambda m: self._files[m].name)]

    def __len__(self) -> int:
        return len(self._files)
