"""On-disk layout of the station's pack store: active.json, version folders, recovery, faults.

    ROOT/active.json            {task: {"version": v, "previous": p | null}}  (the ONE switch)
    ROOT/packs/<task>/<v>/      verified, extracted pack files (manifest.json, prompt.npy, ...)
    ROOT/staging/install-*/     installs in progress (removed on open)
    ROOT/.lock                  flock held while a PackStore is open

store.py holds the logic; this module reads/writes those files and cleans up after a crash.
Fault tests install a hook with set_fault_hook() that SIGKILLs the process at a named step.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .durable import TMP_SUFFIX, atomic_write_bytes, fsync_dir
from .errors import PackError
from .manifest import TASK_ID_RE

ACTIVE = "active.json"
Table = dict[str, dict[str, Any]]  # task -> {"version": int, "previous": int | None}


_fault_hook: Callable[[str], None] | None = None


def set_fault_hook(hook: Callable[[str], None] | None) -> None:
    """Install `hook(step)`, called at every named step of install and rollback (None = none).

    Only fault-injection tests install one (tests/test_store_faults.py kills the process at a
    chosen step); in production fault() does nothing.
    """
    global _fault_hook
    _fault_hook = hook


def fault(step: str) -> None:
    """Call the installed fault hook, if any, with the name of the step just reached."""
    if _fault_hook is not None:
        _fault_hook(step)


def fault_hook(step: str) -> Callable[[], None] | None:
    """A mid-write callback for `step`, or None when no fault hook is installed."""
    return (lambda: fault(step)) if _fault_hook is not None else None


class StoreLock:
    """An exclusive flock on ROOT/.lock: one open PackStore per root, across processes."""

    def __init__(self, root: Path):
        self.path = root / ".lock"
        self._file = open(self.path, "a+b")  # noqa: SIM115 - held open for the store's lifetime
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise PackError(f"pack store {root} is already open (lock {self.path} is held by another "
                            "process or PackStore): stop it or close it first") from None

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()


def read_table(root: Path) -> Table:
    """Parse and check ROOT/active.json ({} if there is none yet)."""
    path = root / ACTIVE
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise PackError(f"pack store {path}: unreadable ({err}); restore it from a backup "
                        "or remove it to start with no active packs") from None
    check_table(path, data)
    return data


def check_table(path: Path, data: Any) -> None:
    if not isinstance(data, dict):
        raise PackError(f"pack store {path}: must be a JSON object {{task: {{version, previous}}}}")
    for task, entry in data.items():
        ok = (TASK_ID_RE.match(task) and isinstance(entry, dict) and set(entry) == {"version", "previous"}
              and _is_version(entry["version"])
              and (entry["previous"] is None or (_is_version(entry["previous"])
                                                  and entry["previous"] < entry["version"])))
        if not ok:
            raise PackError(f"pack store {path}: bad entry for task {task!r}: {entry!r} "
                            "(expected {\"version\": int >= 1, \"previous\": smaller int or null})")


def _is_version(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def write_table(root: Path, table: Table, step_prefix: str) -> None:
    """The one atomic switch: active.json.tmp + fsync + os.replace + fsync of ROOT."""
    data = (json.dumps(table, sort_keys=True, indent=1) + "\n").encode()
    atomic_write_bytes(root / ACTIVE, data, mid_write=fault_hook(f"{step_prefix}mid_active_write"),
                       before_replace=fault_hook(f"{step_prefix}active_tmp_written"))


def version_dir(root: Path, task: str, version: int) -> Path:
    return root / "packs" / task / str(version)


def recover(root: Path, table: Table) -> list[str]:
    """Remove what a crash left behind; return what was removed (relative paths).

    Leftover staging folders, active.json.tmp, and version folders that active.json names
    neither as a task's version nor as its previous are removed.
    """
    removed: list[str] = []
    staging = root / "staging"
    for child in sorted(staging.iterdir()):
        _remove(child)
        removed.append(str(child.relative_to(root)))
    fsync_dir(staging)
    tmp = root / (ACTIVE + TMP_SUFFIX)
    if tmp.exists():
        tmp.unlink()
        removed.append(tmp.name)
        fsync_dir(root)
    packs = root / "packs"
    for task_dir in sorted(packs.iterdir()):
        removed += prune_task(root, task_dir.name, table)
    fsync_dir(packs)
    return removed


def prune_task(root: Path, task: str, table: Table) -> list[str]:
    """Remove version folders of `task` other than its active and previous versions."""
    task_dir = root / "packs" / task
    if not task_dir.is_dir() or task_dir.is_symlink():
        _remove(task_dir)
        return [str(task_dir.relative_to(root))]
    entry = table.get(task)
    keep = {str(entry["version"]), str(entry["previous"])} if entry else set()
    removed = []
    for child in sorted(task_dir.iterdir()):
        if child.name not in keep:
            _remove(child)
            removed.append(str(child.relative_to(root)))
    fsync_dir(task_dir)
    if entry is None:
        task_dir.rmdir()
        fsync_dir(task_dir.parent)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
