"""The station's pack store: install, roll back and serve task packs with one atomic switch.

Install = read the .kpk signature first (runtime/pack_read.py: manifest.json + manifest.sig are
verified before any other member is read, every member is checked against its signed sha256) and
verify it in memory (base, runtime, arrays), check the version moves forward; only then write
its members into ROOT/staging/install-*/ (fsync'd), re-verify that folder, run the caller's probe,
rename the folder to ROOT/packs/<task>/<version>/, replace active.json (tmp + fsync + os.replace
+ fsync dir: the one durable switch) and swap the in-memory snapshot (one reference assignment).
A `kill -9` at any step leaves the old or the new active set; the next open removes leftovers.
A pack whose signing key is no longer trusted is inactive (not served; `inactive()` says why)
while the store still opens; `reload_keys()` applies a new trusted-key list without a restart.
Layout and rules: runtime/TASKPACK.md, "Pack store".

    store = PackStore("/var/lib/kaizen", TrustedKeys.from_paths(["keys/"]), base_fingerprint=fp)
    store.install("pick-3.kpk", probe=station.probe)     # PackError if refused; old set stays
    packs = store.active()                               # immutable snapshot {task: LoadedPack}
    store.rollback("pick")
    store.reload_keys(TrustedKeys.from_dir("keys/"))     # after a key was revoked or added
    store.inactive()                                     # {task: why it is not served}
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from . import RUNTIME_VERSION
from .durable import fsync_dir, write_synced
from .errors import PackError
from .jsonsafe import loads as json_loads
from .keys import TrustedKeys
from .manifest import Manifest
from .pack import MANIFEST, PackContents, read_pack_dir, verify_members
from .pack_arrays import GoldenSample
from .pack_read import MAX_MANIFEST_BYTES, read_signed_members
from .store_disk import (
    StoreLock,
    Table,
    fault,
    fault_hook,
    prune_task,
    read_table,
    recover,
    version_dir,
    write_table,
)
from .tarsafe import DEFAULT_LIMITS, TarLimits

Probe = Callable[[PackContents], None]


@dataclass(frozen=True)
class LoadedPack:
    """An active pack, verified and loaded once; its arrays are read-only."""

    manifest: Manifest
    path: Path
    sha: str  # sha256 of manifest.json, which commits to every file
    prompt: np.ndarray
    key: np.ndarray
    text_emb: np.ndarray
    lora: Mapping[str, np.ndarray]
    answers: tuple[str, ...] | None
    golden: tuple[GoldenSample, ...]
    prompt_net: Mapping[str, np.ndarray] | None = None  # image-conditioned prompt (runtime/prompt_net.py)

    @classmethod
    def from_contents(cls, contents: PackContents, path: Path) -> LoadedPack:
        """Wrap verified contents whose files lie in `path` (sha = sha256 of path/manifest.json)."""
        def frozen(a: np.ndarray) -> np.ndarray:
            a = np.array(a, copy=True)
            a.flags.writeable = False
            return a

        return cls(manifest=contents.manifest, path=path,
                   sha=hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest(),
                   prompt=frozen(contents.prompt), key=frozen(contents.key), text_emb=frozen(contents.text_emb),
                   lora=MappingProxyType({k: frozen(v) for k, v in contents.lora.items()}),
                   answers=None if contents.answers is None else tuple(contents.answers),
                   golden=tuple(contents.golden),
                   prompt_net=None if contents.prompt_net is None else
                   MappingProxyType({k: frozen(v) for k, v in contents.prompt_net.items()}))


@dataclass(frozen=True)
class InstallReport:
    """What install did: "installed" (now active) or "unchanged" (this exact pack was active)."""

    manifest: Manifest
    status: str
    previous: int | None


@dataclass(frozen=True)
class _State:
    table: Mapping[str, Mapping[str, int | None]]
    packs: Mapping[str, LoadedPack]
    inactive: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # task -> why not served


class InstallIOError(PackError):
    """The disk failed during an install (ENOSPC, EDQUOT, EIO...): a retry may succeed.

    `errno` is the OSError's errno; the active set is unchanged.
    """

    def __init__(self, message: str, errno: int | None):
        super().__init__(message)
        self.errno = errno


class PackStore:
    """Packs on the station's disk. Thread-safe; one open store per root (a lock file)."""

    def __init__(self, root: str | os.PathLike, trusted_keys: TrustedKeys, base_fingerprint: str,
                 runtime_version: str = RUNTIME_VERSION, *, limits: TarLimits = DEFAULT_LIMITS):
        self.root = Path(root)
        self.trusted_keys = trusted_keys
        self.base_fingerprint = base_fingerprint
        self.runtime_version = runtime_version
        self.limits = limits
        self._lock = threading.Lock()
        try:
            for sub in ("packs", "staging"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PackError(f"pack store {self.root}: cannot create it ({err.strerror or err})") from None
        self._file_lock = StoreLock(self.root)
        try:
            table = read_table(self.root)
            self.recovered = recover(self.root, table)
            packs, inactive = self._load_all(table)
        except BaseException:
            self._file_lock.release()
            raise
        self._state = _State(_freeze(table), MappingProxyType(packs), MappingProxyType(inactive))

    # ---- reading (no lock: one reference read gives a consistent snapshot) -------------------

    def active(self) -> Mapping[str, LoadedPack]:
        """Immutable snapshot {task: LoadedPack}; later installs never change it."""
        return self._state.packs

    def list(self) -> list[dict]:
        """The active (served) packs: task, version, previous, sha."""
        state = self._state
        return [{"task": task, "version": entry["version"], "previous": entry["previous"],
                 "sha": state.packs[task].sha} for task, entry in sorted(state.table.items())
                if task in state.packs]

    def inactive(self) -> Mapping[str, str]:
        """{task: reason} of packs active.json names that are not served (their key was revoked)."""
        return self._state.inactive

    def reload_keys(self, trusted_keys: TrustedKeys) -> dict[str, list[str]]:
        """Use a new trusted-key list now: packs signed by a key no longer in it stop being served,
        inactive packs whose key is trusted again are re-verified and served. Returns what moved."""
        if not isinstance(trusted_keys, TrustedKeys):
            raise TypeError("trusted_keys must be a TrustedKeys")
        with self._lock:
            self.trusted_keys = trusted_keys
            table = _thaw(self._state.table)
            packs, inactive = dict(self._state.packs), dict(self._state.inactive)
            moved: dict[str, list[str]] = {"deactivated": [], "reactivated": []}
            for task in sorted(table):
                if task in packs:
                    reason = self._untrusted(packs[task].path)
                    if reason is not None:
                        del packs[task]
                        inactive[task] = reason
                        moved["deactivated"].append(task)
                elif self._untrusted(version_dir(self.root, task, table[task]["version"])) is None:
                    try:
                        packs[task] = self._load(task, table[task]["version"])
                    except PackError as err:
                        inactive[task] = str(err)
                        continue
                    del inactive[task]
                    moved["reactivated"].append(task)
            self._state = _State(_freeze(table), MappingProxyType(packs), MappingProxyType(inactive))
            return moved

    # ---- install / rollback ------------------------------------------------------------------

    def install(self, kpk_path: str | os.PathLike, probe: Probe | None = None) -> Manifest:
        """Verify and activate a .kpk (see install_report); PackError if refused."""
        return self.install_report(kpk_path, probe).manifest

    def install_report(self, kpk_path: str | os.PathLike, probe: Probe | None = None) -> InstallReport:
        """Install a pack; a refusal (PackError) or a failed probe leaves the active set unchanged.

        Same version with an identical manifest: no-op, status "unchanged". Same version with
        other contents, or an older version: refused.
        """
        kpk = Path(kpk_path)
        with self._lock:
            fault("begin")
            # Signature first, then every content check, all in memory: nothing is written for a
            # pack that is not signed by a trusted key, intact, for this base and moving forward.
            members = read_signed_members(kpk, self.trusted_keys, self.limits)
            manifest = verify_members(kpk, members, self.trusted_keys, base_fingerprint=self.base_fingerprint,
                                      runtime_version=self.runtime_version, limits=self.limits).manifest
            current = self._state.table.get(manifest.task_id)
            if current is not None and self._check_forward(kpk, manifest, current["version"], members[MANIFEST]):
                return InstallReport(self._state.packs[manifest.task_id].manifest, "unchanged", current["previous"])
            staging = None
            try:
                staging = Path(tempfile.mkdtemp(prefix="install-", dir=self.root / "staging"))
                fault("staging_created")
                return self._install_staged(kpk, members, staging, probe)
            except OSError as err:
                raise InstallIOError(f"pack store {self.root}: cannot install {kpk} "
                                     f"({err.strerror or err}); the active set is unchanged", err.errno) from err
            finally:
                if staging is not None and staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    def _install_staged(self, kpk: Path, members: dict[str, bytes], staging: Path,
                        probe: Probe | None) -> InstallReport:
        self._stage(members, staging)
        fault("staged")
        contents = read_pack_dir(staging, self.trusted_keys, base_fingerprint=self.base_fingerprint,
                                 runtime_version=self.runtime_version, limits=self.limits, label=kpk)
        fault("verified")
        manifest = contents.manifest
        task, version = manifest.task_id, manifest.version
        current = self._state.table.get(task)
        if probe is not None:
            probe(contents)
        fault("probed")
        final = version_dir(self.root, task, version)
        self._move_into_place(staging, final)
        fault("renamed")
        previous = None if current is None else current["version"]
        table = _thaw(self._state.table)
        table[task] = {"version": version, "previous": previous}
        try:
            write_table(self.root, table, "")
        except OSError:
            shutil.rmtree(final, ignore_errors=True)
            raise
        fault("active_replaced")
        self._swap(table, task, LoadedPack.from_contents(contents, final))
        fault("swapped")
        prune_task(self.root, task, table)
        fault("pruned")
        return InstallReport(manifest, "installed", previous)

    def _check_forward(self, kpk: Path, manifest: Manifest, active_version: int, manifest_bytes: bytes) -> bool:
        """True if this exact pack is already active; PackError if the version does not move forward."""
        task, version = manifest.task_id, manifest.version
        if version == active_version and task in self._state.inactive:
            raise PackError(f"pack {kpk} refused: version {version} of task {task} is installed but inactive "
                            f"({self._state.inactive[task]}); trust its key again or publish a newer version")
        if version == active_version:
            if hashlib.sha256(manifest_bytes).hexdigest() == self._state.packs[task].sha:
                return True
            raise PackError(f"pack {kpk} refused: version {version} of task {task} is already active "
                            "with different contents (bump the version to publish a change)")
        if version < active_version:
            raise PackError(f"pack {kpk} refused: version {version} of task {task} is older than the "
                            f"active version {active_version} (packs only move forward; "
                            f"use `kaizen station rollback {task}` to go back)")
        return False

    def rollback(self, task: str) -> Manifest:
        """Make the previous version of `task` active again; the rolled-back version is removed."""
        with self._lock:
            entry = self._state.table.get(task)
            if entry is None:
                raise PackError(f"pack store {self.root}: task {task!r} has no active pack to roll back")
            previous = entry["previous"]
            if previous is None:
                raise PackError(f"pack store {self.root}: task {task} v{entry['version']} has no previous "
                                "version to roll back to")
            loaded = self._load(task, previous)
            table = _thaw(self._state.table)
            table[task] = {"version": previous, "previous": None}
            try:
                write_table(self.root, table, "rollback_")
                fault("rollback_active_replaced")
                self._swap(table, task, loaded)
                prune_task(self.root, task, table)
            except OSError as err:
                raise PackError(f"pack store {self.root}: rollback of {task} failed ({err.strerror or err})") from err
            fault("rollback_pruned")
            return loaded.manifest

    def remove(self, task: str) -> Manifest | None:
        """Stop serving `task` (the hub unpublished it): drop it from active.json (the one atomic
        switch), then delete its version folders. Returns the manifest that was active."""
        with self._lock:
            if task not in self._state.table:
                raise PackError(f"pack store {self.root}: task {task!r} is not installed")
            table = _thaw(self._state.table)
            del table[task]
            removed = self._state.packs.get(task)
            try:
                write_table(self.root, table, "remove_")
                packs = {t: p for t, p in self._state.packs.items() if t != task}
                inactive = {t: r for t, r in self._state.inactive.items() if t != task}
                self._state = _State(_freeze(table), MappingProxyType(packs), MappingProxyType(inactive))
                prune_task(self.root, task, table)
            except OSError as err:
                raise PackError(f"pack store {self.root}: removing {task} failed ({err.strerror or err})") from err
            return removed.manifest if removed is not None else None

    def close(self) -> None:
        """Release the store's lock file (the in-memory snapshot stays readable)."""
        self._file_lock.release()

    def __enter__(self) -> PackStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers -----------------------------------------------------------------------------

    def _stage(self, members: dict[str, bytes], staging: Path) -> None:
        """Write the (already structurally checked) members into the staging folder, fsync'd."""
        folders = {staging}
        for name, data in sorted(members.items()):
            target = staging / name
            if target.parent not in folders:
                target.parent.mkdir(parents=True)
                folders.add(target.parent)
            write_synced(target, data, mid_write=fault_hook("mid_member_write"))
        for folder in sorted(folders, reverse=True):
            fsync_dir(folder)

    def _move_into_place(self, staging: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # not referenced by active.json (version > active), a leftover
            shutil.rmtree(final)
        fsync_dir(final.parent.parent)
        os.rename(staging, final)
        fsync_dir(final.parent)
        fsync_dir(staging.parent)

    def _load_all(self, table: Table) -> tuple[dict[str, LoadedPack], dict[str, str]]:
        """Load every pack active.json names; one whose key is not trusted is inactive, not an error."""
        packs, inactive = {}, {}
        for task, entry in sorted(table.items()):
            reason = self._untrusted(version_dir(self.root, task, entry["version"]))
            if reason is None:
                packs[task] = self._load(task, entry["version"])
            else:
                inactive[task] = reason
        return packs, inactive

    def _untrusted(self, folder: Path) -> str | None:
        """Why the pack in `folder` is not served if its signing key is not trusted; else None.

        Anything else wrong with the folder is left to read_pack_dir (a damaged store stops the open).
        """
        try:
            with open(folder / MANIFEST, "rb") as f:
                kid = json_loads(MANIFEST, f.read(MAX_MANIFEST_BYTES + 1)).get("signing_key_id")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(kid, str) and kid not in self.trusted_keys:
            return (f"signed by key {kid}, which is no longer trusted (its .ed25519.pub is not in the "
                    "trusted keys); not served until the key is trusted again or a newer version arrives")
        return None

    def _load(self, task: str, version: int) -> LoadedPack:
        folder = version_dir(self.root, task, version)
        if not folder.is_dir():
            raise PackError(f"pack store {self.root}: active.json names {task} v{version} but {folder} "
                            "is missing; reinstall the pack or edit active.json")
        contents = read_pack_dir(folder, self.trusted_keys, base_fingerprint=self.base_fingerprint,
                                 runtime_version=self.runtime_version, limits=self.limits)
        if (contents.manifest.task_id, contents.manifest.version) != (task, version):
            raise PackError(f"pack store {folder}: holds {contents.manifest.task_id} "
                            f"v{contents.manifest.version}, expected {task} v{version}")
        return LoadedPack.from_contents(contents, folder)

    def _swap(self, table: Table, task: str, loaded: LoadedPack) -> None:
        packs = dict(self._state.packs)
        packs[task] = loaded
        inactive = {t: r for t, r in self._state.inactive.items() if t != task}
        self._state = _State(_freeze(table), MappingProxyType(packs), MappingProxyType(inactive))


def _freeze(table: Table) -> Mapping[str, Mapping[str, int | None]]:
    return MappingProxyType({t: MappingProxyType(dict(e)) for t, e in table.items()})


def _thaw(table: Mapping[str, Mapping[str, int | None]]) -> Table:
    return {t: dict(e) for t, e in table.items()}
