"""Read and write the plain tar files that carry task packs, without trusting their contents.

Reading never calls `tarfile.extractall`: every member header is checked (regular file only, no
links or devices, no absolute path or `..`, size under a cap, no duplicate names) and the data
is read into memory, so nothing is written to disk before the pack is verified.

    members = read_members("pick-3.kpk", TarLimits())     # {name: bytes}; PackError on anything odd
    write_tar_atomic("pick-3.kpk", members)               # deterministic tar, tmp + fsync + replace
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .durable import atomic_write_bytes
from .errors import PackError

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
_LINK_KINDS = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link",
               tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
               tarfile.FIFOTYPE: "fifo"}


@dataclass(frozen=True)
class TarLimits:
    """Caps applied before any member is read (defaults fit a 7B base's rank-64 LoRA)."""

    max_member_bytes: int = 512 * 2**20
    max_total_bytes: int = 1024 * 2**20
    max_members: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_member_bytes", "max_total_bytes", "max_members"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TarLimits.{name} must be a positive int, got {getattr(self, name)!r}")


DEFAULT_LIMITS = TarLimits()


def refuse(source: str | os.PathLike, reason: str) -> PackError:
    """The one shape of a refusal message: "pack FILE refused: REASON"."""
    return PackError(f"pack {source} refused: {reason}")


def read_members(path: str | os.PathLike, limits: TarLimits = DEFAULT_LIMITS) -> dict[str, bytes]:
    """Return {member name: bytes} of the tar at `path`; raise PackError naming the first problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(BLOCK)
            if size > limits.max_total_bytes + 2 * BLOCK * (limits.max_members + 16):  # data + headers
                raise refuse(path, f"pack too large ({size} bytes, cap {limits.max_total_bytes})")
            if not _looks_like_tar(head):
                raise refuse(path, "not a tar archive (a .kpk is an uncompressed tar; "
                                   "was it compressed or is it another file?)")
            f.seek(0)
            return _read_all(path, f, size, limits)
    except OSError as err:
        raise refuse(path, f"cannot read the file ({err.strerror or err})") from err


def _looks_like_tar(head: bytes) -> bool:
    return len(head) == BLOCK and head[257:262] == b"ustar"


def _read_all(path: Path, f, size: int, limits: TarLimits) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    total = 0
    end = 0
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            while (info := tf.next()) is not None:
                check_member(path, info, limits)
                if len(members) >= limits.max_members:
                    raise refuse(path, f"too many members (cap {limits.max_members})")
                end = info.offset_data + -(-info.size // BLOCK) * BLOCK
                if info.isdir():
                    continue
                if info.name in members:
                    raise refuse(path, f"duplicate member {info.name}")
                total += info.size
                if total > limits.max_total_bytes:
                    raise refuse(path, f"pack too large (members over {limits.max_total_bytes} bytes)")
                data = tf.extractfile(info).read()
                if len(data) != info.size:
                    raise refuse(path, f"truncated tar (member {info.name} is cut short)")
                members[info.name] = data
    except tarfile.ReadError as err:
        raise refuse(path, f"truncated tar ({err})") from err
    if size < end + len(END_OF_ARCHIVE) or _read_at(f, end, len(END_OF_ARCHIVE)) != END_OF_ARCHIVE:
        raise refuse(path, "truncated tar (no end-of-archive marker after the last member: "
                           "the copy is incomplete or corrupt)")
    return members


def _read_at(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def check_member(path: Path, info: tarfile.TarInfo, limits: TarLimits) -> None:
    """Refuse links, devices, unsafe names and oversized members before reading any data."""
    name = info.name
    if info.type in _LINK_KINDS:
        raise refuse(path, f"unsafe member {name}: {_LINK_KINDS[info.type]} (only regular files allowed)")
    if not (info.isdir() or info.type in (tarfile.REGTYPE, tarfile.AREGTYPE)):
        raise refuse(path, f"unsafe member {name}: unsupported tar entry type {info.type!r}")
    check_name(path, name)
    if info.size > limits.max_member_bytes:
        raise refuse(path, f"member {name} too large ({info.size} bytes, cap {limits.max_member_bytes})")


def check_name(source: str | os.PathLike, name: str) -> None:
    """A member name must be a relative path of plain components (no '..', '.', '\\', NUL)."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise refuse(source, f"unsafe member {name}: absolute path")
    parts = name.rstrip("/").split("/")
    if ".." in parts:
        raise refuse(source, f"unsafe member {name}: path traversal ('..')")
    if any(p in ("", ".") for p in parts) or "\\" in name or "\0" in name:
        raise refuse(source, f"unsafe member {name!r}: not a plain relative name")


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A deterministic ustar archive of `members` (sorted, mtime 0, root-owned, mode 0644)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            info.mode = 0o644
            info.mtime = 0
            tf.addfile(info, io.BytesIO(members[name]))
    return buf.getvalue()


def write_tar_atomic(path: str | os.PathLike, members: dict[str, bytes],
                     mid_write: Callable[[], None] | None = None) -> None:
    """Write `members` as a tar at `path` via tmp file + fsync + os.replace (+ fsync of the folder)."""
    atomic_write_bytes(path, tar_bytes(members), mid_write=mid_write)
