"""The station's pack store: install, roll back and serve task packs with one atomic switch.

Install = read the .kpk safely, write its members into ROOT/staging/install-*/ (fsync'd), verify
that folder (signature, hashes, base, runtime, arrays), check the version moves forward, run the
caller's probe, rename the folder to ROOT/packs/<task>/<version>/, then replace active.json
(tmp + fsync + os.replace + fsync dir: the one durable switch) and swap the in-memory snapshot
(one reference assignment). A `kill -9` at any step leaves the old or the new active set; the
next open removes the leftovers. Layout and rules: runtime/TASKPACK.md, "Pack store".

    store = PackStore("/var/lib/kaizen", TrustedKeys.from_paths(["keys/"]), base_fingerprint=fp)
    store.install("pick-3.kpk", probe=station.probe)     # PackError if refused; old set stays
    packs = store.active()                               # immutable snapshot {task: LoadedPack}
    store.rollback("pick")
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from . import RUNTIME_VERSION
from .durable import fsync_dir, write_synced
from .errors import PackError
from .keys import TrustedKeys
from .manifest import Manifest
from .pack import MANIFEST, PackContents, read_pack_dir
from .pack_arrays import GoldenSample
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
from .tarsafe import DEFAULT_LIMITS, TarLimits, read_members

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
                   golden=tuple(contents.golden))


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
            packs = {task: self._load(task, entry["version"]) for task, entry in sorted(table.items())}
        except BaseException:
            self._file_lock.release()
            raise
        self._state = _State(_freeze(table), MappingProxyType(packs))

    # ---- reading (no lock: one reference read gives a consistent snapshot) -------------------

    def active(self) -> Mapping[str, LoadedPack]:
        """Immutable snapshot {task: LoadedPack}; later installs never change it."""
        return self._state.packs

    def list(self) -> list[dict]:
        state = self._state
        return [{"task": task, "version": entry["version"], "previous": entry["previous"],
                 "sha": state.packs[task].sha} for task, entry in sorted(state.table.items())]

    # ---- install / rollback ------------------------------------------------------------------

    def install(self, kpk_path: str | os.PathLike, probe: Probe | None = None) -> Manifest:
        """Verify and activate a .kpk (see install_report); PackError if refused."""
        return self.install_report(kpk_path, probe).manifest

    def install_report(self, kpk_path: str | os.PathLike, probe: Probe | None = None) -> InstallReport:
        """Install a pack; a refusal (PackError) or a failed probe leaves the active set unchanged.

        Same version with an identical manifest: no-op, status "unchanged". Same version with
        other contents, or an older version: refused.
        """
        with self._lock:
            fault("begin")
            staging = Path(tempfile.mkdtemp(prefix="install-", dir=self.root / "staging"))
            try:
                fault("staging_created")
                return self._install_staged(Path(kpk_path), staging, probe)
            except OSError as err:
                raise PackError(f"pack store {self.root}: cannot install {kpk_path} "
                                f"({err.strerror or err}); the active set is unchanged") from err
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    def _install_staged(self, kpk: Path, staging: Path, probe: Probe | None) -> InstallReport:
        self._stage(read_members(kpk, self.limits), staging)
        fault("staged")
        contents = read_pack_dir(staging, self.trusted_keys, base_fingerprint=self.base_fingerprint,
                                 runtime_version=self.runtime_version, limits=self.limits, label=kpk)
        fault("verified")
        manifest = contents.manifest
        task, version = manifest.task_id, manifest.version
        current = self._state.table.get(task)
        if current is not None:
            unchanged = self._check_forward(kpk, manifest, current["version"], staging)
            if unchanged:
                return InstallReport(self._state.packs[task].manifest, "unchanged", current["previous"])
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

    def _check_forward(self, kpk: Path, manifest: Manifest, active_version: int, staging: Path) -> bool:
        """True if this exact pack is already active; PackError if the version does not move forward."""
        task, version = manifest.task_id, manifest.version
        if version == active_version:
            if hashlib.sha256((staging / MANIFEST).read_bytes()).hexdigest() == self._state.packs[task].sha:
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
        self._state = _State(_freeze(table), MappingProxyType(packs))


def _freeze(table: Table) -> Mapping[str, Mapping[str, int | None]]:
    return MappingProxyType({t: MappingProxyType(dict(e)) for t, e in table.items()})


def _thaw(table: Mapping[str, Mapping[str, int | None]]) -> Table:
    return {t: dict(e) for t, e in table.items()}
