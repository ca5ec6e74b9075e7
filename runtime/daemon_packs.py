"""What the station daemon does with one pack once it is decided: install a whole download and
report it, reject it for good, retry it after a disk error, roll a task back or remove it when
the hub says so. A mixin of StationDaemon (runtime/daemon.py), which owns the state used here:
installer, memory, stats, link, downloads, transfer, keep_downloads, _retry_at, _io_failures,
_next_heartbeat and _report().
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

from .daemon_state import previous_of
from .durable import fsync_dir
from .errors import KaizenError
from .fetcher import Transfer
from .store import InstallIOError

log = logging.getLogger("kaizen.daemon")

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
RETRY_FIRST_S, RETRY_MAX_S = 5.0, 300.0   # backoff of a pack whose download or install hit the disk
MAX_IO_FAILURES = 5                       # other I/O errors: then the pack is rejected for good


class PackOutcomes:
    """install_download, rejections, disk-error retries, hub rollbacks and removals."""

    def install_download(self, entry: dict, path: Path) -> str:
        """Install a whole, hash-checked download and report it; returns the state reported
        ("activated", or "rejected" with the reason in stats.rejected). Never raises for a bad pack."""
        self._report(entry, "received", None)
        verify = getattr(self.installer, "verify", None)
        state = "rejected"
        try:
            if callable(verify):
                verify(path)
                self._report(entry, "verified", None)
            self.installer.install(path)
        except InstallIOError as err:  # the disk failed, not the pack: retry later
            self._pack_failed(entry, err.__cause__ if isinstance(err.__cause__, OSError)
                              else OSError(err.errno, str(err)), None)
        except KaizenError as err:
            self._reject_for_good(entry, str(err))
        except Exception as err:  # noqa: BLE001 - a bug or an unexpected input: refuse the pack once
            self._pack_failed(entry, err, None)
        else:
            state = "activated"
            self._io_failures.pop(entry["sha256"], None)
            if not callable(verify):
                self._report(entry, "verified", None)
            self._report(entry, "activated", None)
            self.memory.mark_activated(entry["sha256"], entry["name"], entry["task_id"])
            self.stats.activated_at[entry["name"]] = time.time()
        if not self.keep_downloads:
            try:
                path.unlink(missing_ok=True)
                fsync_dir(self.downloads)
            except OSError as err:  # the pack's outcome is already reported; only log this
                log.warning("%s: cannot remove the download %s: %s", self.link.station_id, path, err)
        return state

    def _reject(self, t: Transfer, entry: dict, reason: str) -> None:
        t.discard()
        self.transfer = None
        self._reject_for_good(entry, reason)

    def _reject_for_good(self, entry: dict, reason: str) -> None:
        """Report rejected(reason) once and never fetch this pack (this sha256) again."""
        self.stats.rejected[entry["name"]] = reason
        self._report(entry, "rejected", reason)
        self.memory.mark_skip(entry["sha256"], reason)

    def _pack_failed(self, entry: dict, err: BaseException, t: Transfer | None) -> None:
        """One pack's download or install raised. A full disk or another I/O error: report it,
        keep the partial download and retry with backoff; anything else: reject the pack for good."""
        sha = entry["sha256"]
        if t is not None:
            t.close()  # the .part file and its offset stay: the retry resumes from there
            if self.transfer is t:
                self.transfer = None
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            n = self._io_failures[sha] = self._io_failures.get(sha, 0) + 1
            what = "disk full" if err.errno in DISK_FULL else "disk error"
            if what == "disk error" and n >= MAX_IO_FAILURES:
                self._reject_for_good(entry, f"{what} ({err.strerror or err}) {n} times in a row")
                return
            delay = min(RETRY_FIRST_S * 2 ** (n - 1), RETRY_MAX_S)
            self._retry_at[sha] = time.monotonic() + delay
            self.stats.disk_errors += 1
            reason = f"{what} ({err.strerror or err}); still serving from the store, retrying in {delay:.0f} s"
            self.stats.rejected[entry["name"]] = reason
            self._report(entry, "rejected", reason)
            return
        log.error("%s: pack %s failed: %s: %s", self.link.station_id, entry.get("name"),
                  type(err).__name__, err, exc_info=err)
        if t is not None:
            t.discard()
        self._reject_for_good(entry, f"internal error while handling the pack: {type(err).__name__}: {err}"[:500])

    def _hub_rollback(self, entry: dict, current: int) -> None:
        """The hub takes a task back to an older version (`rollback: true`): the store's own
        rollback when that version is the one it kept as previous, else rejected (once) with why."""
        task, version = entry["task_id"], entry["version"]
        previous = previous_of(self.installer, task)
        if previous != version or not callable(getattr(self.installer, "rollback", None)):
            kept = "no previous version" if previous is None else f"only v{previous} as the previous one"
            self._reject_for_good(entry, f"cannot roll {task} back from v{current} to v{version}: this station keeps "
                                         f"{kept}; publish a new version with the old contents instead")
            return
        try:
            self.installer.rollback(task)
        except KaizenError as err:
            self._reject_for_good(entry, f"rollback of {task} to v{version} failed: {err}")
            return
        self.stats.hub_rollbacks += 1
        self._report(entry, "activated", f"rolled back by the hub from v{current}")
        self.memory.mark_activated(entry["sha256"], entry["name"], entry["task_id"])
        self._next_heartbeat = time.monotonic()   # tell the hub what is installed now

    def _remove_unpublished(self, have: set) -> None:
        """Stop serving tasks the hub unpublished altogether (desired_state `removed`)."""
        tasks = {t for t, _ in have} & set(self.removed)
        if not tasks:
            return
        remove = getattr(self.installer, "remove", None)
        for task in sorted(tasks):
            if not callable(remove):
                if task not in self.stats.remove_unsupported:
                    self.stats.remove_unsupported.append(task)
                    log.error("%s: the hub unpublished task %s but this station's store cannot remove a task; "
                              "still serving it", self.link.station_id, task)
                continue
            try:
                remove(task)
            except KaizenError as err:
                log.error("%s: cannot remove unpublished task %s: %s", self.link.station_id, task, err)
                continue
            self.stats.hub_removals += 1
            self.memory.forget_task(task)   # published again later: fetched and installed again
            log.info("%s: task %s unpublished by the hub: removed", self.link.station_id, task)
            self._next_heartbeat = time.monotonic()
