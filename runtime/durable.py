"""Crash-safe file writes: fsync'd files and directories, atomic replace.

Used by the pack writer and the pack store so that a `kill -9` or a power cut leaves either the
old or the new file, never a half-written one:

    atomic_write_bytes(path, data)      # tmp file in the same folder + fsync + os.replace + fsync dir
    write_synced(path, data)            # plain write + fsync (for files inside a staging folder)
    fsync_dir(folder)                   # make a rename / create / delete inside `folder` durable
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (bundle files, packs, downloads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a directory so entries created, renamed or removed in it survive a crash."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, data: bytes, *, mode: int = 0o644,
                 mid_write: Callable[[], None] | None = None) -> None:
    """Write `data` to a new file at `path` and fsync it (the folder is not fsync'd).

    `mid_write`, if given, is called after the first half of the bytes is written (fault tests).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        half = len(view) // 2
        _write_all(fd, view[:half])
        if mid_write is not None:
            os.fsync(fd)
            mid_write()
        _write_all(fd, view[half:])
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644,
                       mid_write: Callable[[], None] | None = None,
                       before_replace: Callable[[], None] | None = None) -> None:
    """Replace `path` with `data` atomically: readers see the old or the new bytes, never a mix.

    Writes `path + ".tmp"`, fsyncs it, os.replace()s it over `path`, then fsyncs the folder.
    The hooks are for fault-injection tests only.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    write_synced(tmp, data, mode=mode, mid_write=mid_write)
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]
