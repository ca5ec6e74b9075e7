"""Small helpers of the station daemon (runtime/daemon.py): its durable memory and its installer.

    memory = DaemonMemory(state_dir / "fleet_state.json")
    memory.mark_activated(sha256, name)      # reported activated once: never again
    memory.mark_skip(sha256, reason)         # rejected or rolled back here: do not fetch it again
    memory.forget_task(task)                 # the hub unpublished it: its packs may come again
    installed_of(store_or_station)           # -> [{"task_id", "version"}]
    previous_of(store_or_station, task)      # -> the version its store keeps as previous (or None)
    base_fingerprint_of(store_or_station)    # -> the base it serves (for hello)
    station_from_config(cfg)                 # the Station `kaizen station serve` runs
    FleetLink.from_config(cfg, fingerprint)  # the daemon's link settings; DaemonStats: its counters
    keys_folder_state(folder)                # what the trusted keys folder holds now (reload check)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .durable import atomic_write_bytes
from .keys import load_curve_keypair, load_curve_public
from .protocol import CHUNK_SIZE

log = logging.getLogger("kaizen.daemon")
MAX_MEMORY_BYTES = 16 << 20
MAX_MEMORY_ENTRIES = 10_000  # per list: the oldest entries are forgotten first


class DaemonMemory:
    """Which packs this station already reported activated, and which it must not fetch again.

    Keyed by the pack file's sha256; written atomically, so it survives restarts. A pack that
    was refused (bad signature, wrong base) or rolled back locally is not fetched again until
    the hub publishes a different pack for that task.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        data = self._read()
        self.skip: dict[str, str] = {str(k): str(v) for k, v in dict(data.get("skip", {})).items()}
        self.activated: dict[str, str] = {str(k): str(v) for k, v in dict(data.get("activated", {})).items()}
        self.tasks: dict[str, str] = {str(k): str(v) for k, v in dict(data.get("tasks", {})).items()}  # sha -> task

    def _read(self) -> dict:
        """The saved memory; an unreadable file is moved aside (a fresh start re-fetches, never crashes)."""
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read(MAX_MEMORY_BYTES + 1))
            if not isinstance(data, dict) or not all(isinstance(data.get(k, {}), dict) for k in ("skip", "activated", "tasks")):
                raise ValueError("not {skip: {...}, activated: {...}, tasks: {...}}")
            return data
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as err:
            aside = self.path.with_name(self.path.name + ".unreadable")
            log.error("daemon memory %s is unreadable (%s): moved to %s, starting afresh", self.path, err, aside)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            return {}

    def mark_skip(self, sha256: str, reason: str) -> None:
        self.skip[sha256] = reason[:1000]
        _trim(self.skip)
        self._save()

    def mark_activated(self, sha256: str, name: str, task_id: str | None = None) -> None:
        self.activated[sha256] = name
        _trim(self.activated)
        if task_id is not None:
            self.tasks[sha256] = task_id
            _trim(self.tasks)
        self._save()

    def forget_task(self, task_id: str) -> None:
        """The task left the station (the hub unpublished it): its packs may be fetched again."""
        for sha in [sha for sha, task in self.tasks.items() if task == task_id]:
            self.activated.pop(sha, None)
            del self.tasks[sha]
        self._save()

    def _save(self) -> None:
        """Persist; on a full disk the memory stays in RAM and the next mark_* saves it again."""
        try:
            atomic_write_bytes(self.path, json.dumps({"skip": self.skip, "activated": self.activated, "tasks": self.tasks},
                                                     indent=1, sort_keys=True).encode())
        except OSError as err:
            log.warning("daemon memory %s not saved (%s); kept in memory", self.path, err.strerror or err)


def _trim(entries: dict) -> None:
    """Bound a memory list: forget the oldest entries beyond MAX_MEMORY_ENTRIES."""
    for key in list(entries)[:max(0, len(entries) - MAX_MEMORY_ENTRIES)]:
        del entries[key]


def installed_of(installer) -> list[dict]:
    """[{task_id, version}] of the active packs of a Station (`installed()`) or a PackStore (`active()`)."""
    if hasattr(installer, "installed"):
        items = installer.installed()
        return [{"task_id": str(i["task_id"]), "version": int(i["version"])} for i in items]
    active = installer.active()
    return [{"task_id": task, "version": int(p.manifest.version)} for task, p in sorted(active.items())]


def previous_of(installer, task_id: str) -> int | None:
    """The version a Station's or PackStore's store keeps as previous for `task_id` (None: none)."""
    store = getattr(installer, "store", installer)
    listing = getattr(store, "list", None)
    if not callable(listing):
        return None
    return next((e["previous"] for e in listing() if e["task"] == task_id), None)


def base_fingerprint_of(installer) -> str:
    """The base fingerprint a Station (bundle.fingerprint) or a PackStore (base_fingerprint) serves."""
    bundle = getattr(installer, "bundle", None)
    return str(getattr(bundle, "fingerprint", "") or getattr(installer, "base_fingerprint", "") or "")


def station_from_config(cfg):
    """The Station a station.toml describes (base bundle + pack store + selection settings), with
    its capture queue in state_dir/capture when [capture] is enabled (closed by Station.close)."""
    from .capture import CaptureQueue
    from .keys import TrustedKeys
    from .station import Station

    trusted = TrustedKeys.from_dir(cfg.trusted_keys_dir)
    cap = cfg.capture
    queue = (CaptureQueue(Path(cfg.state_dir) / "capture", station_id=cfg.station_id, max_items=cap.max_items,
                          max_bytes=cap.max_bytes) if cap.enabled else None)
    try:
        return Station(cfg.bundle_dir, cfg.store_dir, trusted_keys=trusted, threshold=cfg.threshold,
                       calibrated=cfg.calibrated_threshold,
                       top_k=cfg.top_k, providers=cfg.providers or None, threads=cfg.threads,
                       max_image_pixels=cfg.max_image_pixels, max_instruction_tokens=cfg.max_instruction_tokens,
                       capture=queue, capture_confidence=cap.confidence,
                       capture_task_confidence=cap.task_confidence)
    except BaseException:
        if queue is not None:
            queue.close()
        raise


@dataclass
class FleetLink:
    """What the daemon needs to reach the hub (build it from a StationConfig with from_config)."""

    station_id: str
    hub_endpoint: str
    hub_public_key: bytes          # z85
    public_key: bytes              # z85, this station's
    secret_key: bytes              # z85, this station's
    state_dir: Path
    base_fingerprint: str = ""
    announce_endpoint: str = ""    # the hub's PUB (hints only); "" = none
    heartbeat_s: float = 5.0
    hub_timeout_s: float = 15.0
    credit: int = 4                # chunks in flight
    chunk_timeout_s: float = 3.0
    chunk_bytes: int = CHUNK_SIZE  # the hub's chunk size: credit x chunk_bytes = bytes in flight
    resend_s: float = 2.0
    trusted_keys_dir: Path | None = None  # watched: keys added or removed apply without a restart

    @classmethod
    def from_config(cls, cfg, base_fingerprint: str) -> FleetLink:
        public, secret = load_curve_keypair(cfg.secret_key_file)
        return cls(station_id=cfg.station_id, hub_endpoint=cfg.hub_endpoint,
                   hub_public_key=load_curve_public(cfg.hub_public_key_file), public_key=public,
                   secret_key=secret, state_dir=cfg.state_dir, base_fingerprint=base_fingerprint,
                   announce_endpoint=cfg.hub_announce_endpoint, heartbeat_s=cfg.heartbeat_s,
                   hub_timeout_s=cfg.hub_timeout_s, credit=cfg.credit, trusted_keys_dir=cfg.trusted_keys_dir)


@dataclass
class DaemonStats:
    reconnects: int = 0
    hub_timeouts: int = 0
    chunks: dict = field(default_factory=lambda: {"ok": 0, "duplicate": 0, "corrupt": 0, "bad": 0})
    bytes_received: int = 0
    resumed_from: list = field(default_factory=list)   # (name, offset) each time a transfer (re)starts
    activated_at: dict = field(default_factory=dict)   # name -> time.time() of activation
    rejected: dict = field(default_factory=dict)       # name -> reason
    dropped: int = 0             # messages from the hub that were malformed or failed to handle
    loop_errors: int = 0         # loop turns that raised (logged; the loop went on)
    disk_errors: int = 0         # downloads/installs that hit a full disk or an I/O error (retried)
    keys_reloads: int = 0        # trusted-key reloads applied
    hub_rollbacks: int = 0       # tasks taken back to their previous version by the hub
    hub_removals: int = 0        # tasks removed because the hub unpublished them
    remove_unsupported: list = field(default_factory=list)  # unpublished tasks the installer cannot remove


def keys_folder_state(folder: Path) -> tuple:
    """(name, size, mtime_ns) of every *.ed25519.pub in `folder`: changes when a key is added,
    removed or replaced. An unreadable folder is () (no keys)."""
    from .keys import SIGNING_PUB_SUFFIX

    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)
                            if e.name.endswith(SIGNING_PUB_SUFFIX)))
    except OSError:
        return ()
