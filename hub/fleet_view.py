"""A read-only, cached snapshot of the fleet for the hub's status page and its metrics.

    view = FleetView(config)          # opens the hub database read-only, per snapshot
    snap = view.snapshot()            # at most one database read per CACHE_S, whoever asks
    snap["stations"], snap["groups"], snap["packs"], snap["totals"]

Data comes from hub/catalog.py `fleet_status()` and hub/db.py's read functions on a
connection opened with SQLite's mode=ro (the view cannot write, and never creates the file).
A station counts as connected when its last hello/heartbeat is at most `connected_within_s` old.
Rollout progress of a pack = stations where it is activated / stations it is targeted at (the
newest published version of its task for that station); `rollout` is its staged-rollout state
(canary / held / promoted, None when published to its whole target at once). A pack installed
offline on a station shows in that station's packs as `TASK@VERSION` in state `local`. Bounded: at most MAX_PACKS packs (the
newest versions first) and reasons cut to MAX_REASON_CHARS. `snap["samples"]`: the captured parts
the hub holds (hub/samples.py's samples.sqlite, read-only): stored, labelled, bytes, and per task
(at most MAX_SAMPLE_TASKS, the most samples first).
"""

from __future__ import annotations

import collections
import sqlite3
import threading
import time

from .catalog import fleet_status
from .config import HubConfig
from .db import HubDB

CACHE_S = 1.0
CONNECTED_WITHIN_S = 30.0
MAX_PACKS = 200
MAX_REASON_CHARS = 300
MAX_SAMPLE_TASKS = 100
STATES = ("pending", "received", "verified", "activated", "rejected", "rolled_back")


class ReadOnlyHubDB(HubDB):
    """HubDB's read functions on a read-only connection (no schema script, no writes)."""

    def __init__(self, path):
        self.path = path
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row


def sample_counts(samples_dir) -> dict:
    """{"stored", "labelled", "bytes", "tasks": [{"task", "stored", "labelled"}], "tasks_truncated"}
    of the hub's sample store, read-only; all zero while nothing was uploaded (no database yet)."""
    empty = {"stored": 0, "labelled": 0, "bytes": 0, "tasks": [], "tasks_truncated": 0}
    path = None if samples_dir is None else samples_dir / "samples.sqlite"
    if path is None or not path.exists():
        return empty
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            rows = conn.execute("SELECT task, COUNT(*), COUNT(label), COALESCE(SUM(image_bytes), 0) FROM samples "
                                "GROUP BY task ORDER BY COUNT(*) DESC, task").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as err:   # shown on the page and in /status.json; the rest of the view still works
        return empty | {"error": _short(f"{path}: {err}; check the file (kaizen hub samples list)")}
    return {"stored": sum(r[1] for r in rows), "labelled": sum(r[2] for r in rows), "bytes": sum(r[3] for r in rows),
            "tasks": [{"task": _short(r[0]), "stored": r[1], "labelled": r[2]} for r in rows[:MAX_SAMPLE_TASKS]],
            "tasks_truncated": max(0, len(rows) - MAX_SAMPLE_TASKS)}


def _short(text: str) -> str:
    text = str(text or "")
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


class FleetView:
    """Snapshots of the fleet, cached CACHE_S so a busy page or scraper reads the DB rarely."""

    def __init__(self, config: HubConfig, *, connected_within_s: float = CONNECTED_WITHIN_S,
                 cache_s: float = CACHE_S):
        self.config = config
        self.connected_within_s, self.cache_s = connected_within_s, cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None
        self.reads = 0

    def snapshot(self) -> dict:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_s:
                self._cached = (now, self._read())
                self.reads += 1
            return self._cached[1]

    def _read(self) -> dict:
        config = self.config
        if not config.db_path.exists():   # the hub has not written anything yet: its allow-list, never seen
            rows = [{"station_id": s.id, "allowed": True, "last_seen": None, "seen_ago_s": None, "installed": [],
                     "packs": {}} for s in sorted(config.stations, key=lambda s: s.id)]
            return self._build(config, rows, [], {}, {}) | {"samples": sample_counts(config.samples_dir)}
        db = ReadOnlyHubDB(config.db_path)
        try:
            rows = fleet_status(db, config)
            packs = db.packs()
            groups = {s.id: list(s.groups) for s in config.stations}
            desired = {r["station_id"]: {p.name for p in db.desired_for(r["station_id"], groups.get(r["station_id"], []))}
                       for r in rows}
            rollouts = db.rollouts()
        finally:
            db.close()
        return self._build(config, rows, packs, desired, rollouts) | {"samples": sample_counts(config.samples_dir)}

    def _build(self, config: HubConfig, rows: list[dict], packs: list, desired: dict, rollouts: dict) -> dict:
        groups_of = {s.id: list(s.groups) for s in config.stations}
        stations = []
        for r in rows:
            ago = r["seen_ago_s"]
            stations.append({
                "station_id": r["station_id"], "allowed": r["allowed"], "groups": groups_of.get(r["station_id"], []),
                "last_seen": r["last_seen"], "seen_ago_s": ago,
                "connected": ago is not None and ago <= self.connected_within_s,
                "installed": r["installed"][:100],
                "packs": {name: {**p, "reason": _short(p["reason"])} for name, p in r["packs"].items()},
            })
        by_station = {s["station_id"]: s for s in stations}
        pack_rows = []
        for rec in sorted(packs, key=lambda p: (-p.version, p.task_id))[:MAX_PACKS]:
            states = collections.Counter()
            rejected = []
            for s in stations:
                p = s["packs"].get(rec.name)
                if p is not None:
                    states[p["state"]] += 1
                    if p["state"] == "rejected":
                        rejected.append({"station_id": s["station_id"], "reason": p["reason"]})
            targeted = sorted(sid for sid, names in desired.items() if rec.name in names)
            activated = sum(1 for sid in targeted if by_station[sid]["packs"].get(rec.name, {}).get("state") == "activated")
            pack_rows.append({"name": rec.name, "task_id": rec.task_id, "version": rec.version, "size": rec.size,
                              "targeted": len(targeted), "activated": activated, "states": dict(states),
                              "rejected": rejected[:50],
                              "rollout": rollouts[rec.name]["state"] if rec.name in rollouts else None,
                              "rollout_reason": _short(rollouts[rec.name]["reason"]) if rec.name in rollouts else ""})
        pack_rows.sort(key=lambda p: (p["task_id"], -p["version"]))
        group_rows = []
        for g in sorted({g for gs in groups_of.values() for g in gs}):
            members = [s for s in stations if g in s["groups"]]
            states = collections.Counter(p["state"] for s in members for n, p in s["packs"].items()
                                         if n in desired.get(s["station_id"], ()))
            group_rows.append({"group": g, "stations": len(members),
                               "connected": sum(1 for s in members if s["connected"]),
                               "targeted": sum(states.values()), "states": dict(states)})
        deliveries = collections.Counter(p["state"] for s in stations for p in s["packs"].values())
        return {
            "generated_at": time.time(),
            "connected_within_s": self.connected_within_s,
            "stations": stations, "groups": group_rows, "packs": pack_rows,
            "packs_truncated": max(0, len(packs) - MAX_PACKS),
            "totals": {"allowed": sum(1 for s in stations if s["allowed"]),
                       "seen": sum(1 for s in stations if s["last_seen"] is not None),
                       "connected": sum(1 for s in stations if s["connected"]),
                       "packs": len(packs), "deliveries": {st: deliveries.get(st, 0) for st in STATES}
                       | {k: v for k, v in deliveries.items() if k not in STATES}},
        }
