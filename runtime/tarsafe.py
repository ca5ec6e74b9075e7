"""Read and write the plain ustar files that carry task packs, without trusting their contents.

Reading never uses `tarfile` (it follows GNU/PAX extension headers of any size, accepts
negative base-256 sizes and recurses into long names): `TarReader` parses the 512-byte ustar
headers itself and checks each one before any data is read: checksum, octal size within the
caps, regular file or directory only (links, devices, fifos and GNU/PAX extension headers are
refused), a plain relative name of at most MAX_NAME_DEPTH components, and every entry,
directories included, counted against `max_members`. Nothing is ever written to disk.

    members = read_members("pick-3.kpk", TarLimits())     # {name: bytes}; PackError on anything odd
    with open_tar("pick-3.kpk", limits) as tar:            # streaming: the signature-first reader
        entry = tar.next()                                 # TarEntry | None at the end marker
        data = tar.read(entry)
    write_tar_atomic("pick-3.kpk", members)                # manifest.json, manifest.sig first, rest sorted
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .durable import atomic_write_bytes
from .errors import PackError

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
FIRST_MEMBERS = ("manifest.json", "manifest.sig")  # written first: read and verified before the rest
MAX_NAME_BYTES = 255
MAX_NAME_DEPTH = 8
_LINK_KINDS = {b"2": "symbolic link", b"1": "hard link", b"3": "character device",
               b"4": "block device", b"6": "fifo"}
_EXTENSION_KINDS = {b"x": "PAX extended header", b"g": "PAX global header", b"L": "GNU long name",
                    b"K": "GNU long link name", b"S": "GNU sparse file", b"7": "contiguous file"}
_REGULAR, _DIRECTORY = (b"0", b"\0"), b"5"


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


@dataclass(frozen=True)
class TarEntry:
    """One checked header: a regular file (is_dir False) or a directory, and where its data lies."""

    name: str
    size: int
    offset_data: int
    is_dir: bool


class TarReader:
    """Walks the headers of an uncompressed ustar file; every problem is a PackError naming `source`."""

    def __init__(self, f: BinaryIO, source: str | os.PathLike, size: int, limits: TarLimits):
        self.f, self.source, self.size, self.limits = f, source, size, limits
        self.pos = 0            # offset of the next header
        self.entries = 0        # headers seen (directories included)
        self.total = 0          # data bytes of regular members
        self.ended = False

    def next(self) -> TarEntry | None:
        """The next entry, or None once a complete end-of-archive marker has been read."""
        while True:
            header = self._read_at(self.pos, BLOCK)
            if len(header) < BLOCK:
                raise refuse(self.source, "truncated tar (a member header is cut short: the copy is "
                                          "incomplete or corrupt)")
            if header == END_OF_ARCHIVE[:BLOCK]:
                if self._read_at(self.pos + BLOCK, BLOCK) != END_OF_ARCHIVE[:BLOCK]:
                    raise refuse(self.source, "truncated tar (no end-of-archive marker after the last "
                                              "member: the copy is incomplete or corrupt)")
                self.ended = True
                return None
            entry = self._parse(header)
            self.entries += 1
            if self.entries > self.limits.max_members:
                raise refuse(self.source, f"too many members (cap {self.limits.max_members}, "
                                          "directory entries included)")
            self.pos = entry.offset_data + -(-entry.size // BLOCK) * BLOCK
            if entry.is_dir:
                continue
            self.total += entry.size
            if self.total > self.limits.max_total_bytes:
                raise refuse(self.source, f"pack too large (members over {self.limits.max_total_bytes} bytes)")
            return entry

    def read(self, entry: TarEntry) -> bytes:
        """The data of `entry` (its size was checked against the caps when its header was read)."""
        data = self._read_at(entry.offset_data, entry.size)
        if len(data) != entry.size:
            raise refuse(self.source, f"truncated tar (member {entry.name} is cut short)")
        return data

    def _read_at(self, offset: int, n: int) -> bytes:
        self.f.seek(offset)
        return self.f.read(n)

    def _parse(self, header: bytes) -> TarEntry:
        at = self.pos
        if header[257:263] not in (b"ustar\x00", b"ustar "):
            if at == 0:
                raise refuse(self.source, "not a tar archive (a .kpk is an uncompressed tar; "
                                          "was it compressed or is it another file?)")
            raise refuse(self.source, f"truncated tar (no ustar header at offset {at}: the copy is "
                                      "incomplete or corrupt)")
        if not _checksum_ok(header):
            raise refuse(self.source, f"truncated tar (header checksum mismatch at offset {at}: the copy "
                                      "is incomplete or corrupt)")
        name = self._name(header)
        kind = header[156:157]
        if kind in _LINK_KINDS:
            raise refuse(self.source, f"unsafe member {name}: {_LINK_KINDS[kind]} (only regular files allowed)")
        if kind in _EXTENSION_KINDS:
            raise refuse(self.source, f"unsafe member {name}: {_EXTENSION_KINDS[kind]} (a .kpk is a plain "
                                      "ustar tar without GNU/PAX extensions)")
        if kind not in (*_REGULAR, _DIRECTORY):
            raise refuse(self.source, f"unsafe member {name}: unsupported tar entry type {kind!r}")
        check_name(self.source, name)
        size = _octal(header[124:136])
        if size is None:
            raise refuse(self.source, f"malformed tar header for member {name}: size field "
                                      f"{bytes(header[124:136])!r} is not an octal number "
                                      "(base-256 and negative sizes are refused)")
        if kind == _DIRECTORY and size != 0:
            raise refuse(self.source, f"malformed tar header for member {name}: a directory with {size} bytes")
        if size > self.limits.max_member_bytes:
            raise refuse(self.source, f"member {name} too large ({size} bytes, cap {self.limits.max_member_bytes})")
        offset_data = at + BLOCK
        if offset_data + size > self.size:
            raise refuse(self.source, f"truncated tar (member {name} is cut short)")
        return TarEntry(name.rstrip("/"), size, offset_data, kind == _DIRECTORY)

    def _name(self, header: bytes) -> str:
        raw = header[0:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\x00":
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                raw = prefix + b"/" + raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise refuse(self.source, f"unsafe member {raw!r}: name is not UTF-8") from None


def _octal(field: bytes) -> int | None:
    text = field.replace(b"\0", b" ").strip()
    if not text or any(c not in b"01234567" for c in text):
        return None
    return int(text, 8)


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored is not None and stored in (unsigned, signed)


@contextmanager
def open_tar(path: str | os.PathLike, limits: TarLimits = DEFAULT_LIMITS) -> Iterator[TarReader]:
    """Open `path` for streaming with TarReader after the whole-file size cap; PackError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limits.max_total_bytes + 2 * BLOCK * (limits.max_members + 16):  # data + headers
                raise refuse(path, f"pack too large ({size} bytes, cap {limits.max_total_bytes})")
            if size < BLOCK:
                raise refuse(path, "not a tar archive (a .kpk is an uncompressed tar; "
                                   "was it compressed or is it another file?)")
            yield TarReader(f, path, size, limits)
    except OSError as err:
        raise refuse(path, f"cannot read the file ({err.strerror or err})") from err


def read_members(path: str | os.PathLike, limits: TarLimits = DEFAULT_LIMITS) -> dict[str, bytes]:
    """Return {member name: bytes} of the tar at `path` (any order); PackError naming the first problem.

    This reads every member before anything is verified: stations use the signature-first reader
    (runtime/pack_read.py); this one serves the hub's catalogue, `kaizen pack` and re-signing.
    """
    members: dict[str, bytes] = {}
    with open_tar(path, limits) as tar:
        while (entry := tar.next()) is not None:
            if entry.name in members:
                raise refuse(path, f"duplicate member {entry.name}")
            members[entry.name] = tar.read(entry)
    return members


def check_name(source: str | os.PathLike, name: str) -> None:
    """A member name must be a short relative path of plain components (no '..', '.', '\\', NUL)."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise refuse(source, f"unsafe member {name}: absolute path")
    parts = name.rstrip("/").split("/")
    if ".." in parts:
        raise refuse(source, f"unsafe member {name[:300]}: path traversal ('..')")
    if any(p in ("", ".") for p in parts) or "\\" in name or "\0" in name:
        raise refuse(source, f"unsafe member {name[:300]!r}: not a plain relative name")
    if len(parts) > MAX_NAME_DEPTH or len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES:
        raise refuse(source, f"unsafe member {name[:80]!r}...: path too deep or too long "
                             f"(at most {MAX_NAME_DEPTH} components and {MAX_NAME_BYTES} bytes)")


def member_order(names) -> list[str]:
    """manifest.json and manifest.sig first (the signature-first reader needs them there), then sorted."""
    names = set(names)
    return [n for n in FIRST_MEMBERS if n in names] + sorted(names - set(FIRST_MEMBERS))


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A deterministic ustar archive of `members` (member_order, mtime 0, root-owned, mode 0644)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in member_order(members):
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
