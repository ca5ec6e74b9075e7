"""The hub's durable state in SQLite (WAL): catalogue, publications, stations and deliveries.

Everything the hub knows lives here, so a hub restart loses nothing, and `kaizen hub publish`
works while the hub runs (it writes to the same database; the hub notices the new revision).

    db = HubDB("hub.sqlite")
    db.add_pack(PackRecord(name, sha256, size, task_id, version, path))
    db.publish("line1/*", name)                    # glob over station ids, or "@group"
    db.desired_for("line1/s01", groups=["line1"])  # -> [PackRecord], newest version per task
    db.record_report("line1/s01", name, task_id, version, "activated", "")
    db.status_rows()                               # what `kaizen fleet status` prints

Tables: packs, publications, stations, deliveries, meta(revision); for fleet operations
(hub/fleet_ops.py) rollouts (canary / held / promoted per pack), pins (`kaizen hub rollback`:
task -> version for a target) and retired (versions taken back by `kaizen hub unpublish`). Growth is bounded by the
allow-list and the catalogue: one stations row per allow-listed id, one deliveries row per
(station, catalogued pack), reasons cut to MAX_REASON_CHARS, installed lists to MAX_INSTALLED.
No torch here.
"""

from __future__ import annotations

import fnmatch
import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Delivery states, in the order a healthy delivery goes through them. A report never moves a
# pack backwards (a late or replayed "received" after "activated" is ignored).
STATE_RANK = {"received": 1, "verified": 2, "activated": 3, "rejected": 3, "rolled_back": 4}
MAX_REASON_CHARS = 1000   # a report's reason is stored cut to this
MAX_INSTALLED = 1000      # entries of a station's installed list stored

SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (
    name TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    task_id TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS publications (
    target TEXT NOT NULL, pack_name TEXT NOT NULL REFERENCES packs(name), created_at REAL NOT NULL,
    PRIMARY KEY (target, pack_name));
CREATE TABLE IF NOT EXISTS stations (
    station_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    last_hello REAL, base_fingerprint TEXT, runtime_version TEXT,
    installed TEXT NOT NULL DEFAULT '[]', serving TEXT NOT NULL DEFAULT 'null');
CREATE TABLE IF NOT EXISTS deliveries (
    station_id TEXT NOT NULL, pack_name TEXT NOT NULL, task_id TEXT NOT NULL, version INTEGER NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL,
    PRIMARY KEY (station_id, pack_name));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    pack_name TEXT PRIMARY KEY REFERENCES packs(name), canary TEXT NOT NULL, state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pins (
    target TEXT NOT NULL, task_id TEXT NOT NULL, version INTEGER NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (target, task_id));
CREATE TABLE IF NOT EXISTS retired (
    task_id TEXT NOT NULL, version INTEGER NOT NULL, retired_at REAL NOT NULL, PRIMARY KEY (task_id, version));
INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0);
"""


@dataclass(frozen=True)
class PackRecord:
    """One pack of the catalogue (a .kpk file in the hub's packs folder)."""

    name: str
    sha256: str
    size: int
    task_id: str
    version: int
    path: str

    def wire(self) -> dict:
        """The entry of a desired_state message."""
        return {"task_id": self.task_id, "version": self.version, "sha256": self.sha256,
                "size": self.size, "name": self.name}


class HubDB:
    """A connection to the hub database; one per thread (SQLite connections are not shared)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=30.0)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        with self.conn:
            self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------ catalogue and publications

    def add_pack(self, rec: PackRecord) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT INTO packs (name, sha256, size, task_id, version, path, added_at) "
                "VALUES (:name, :sha256, :size, :task_id, :version, :path, :t) "
                "ON CONFLICT(name) DO UPDATE SET sha256=excluded.sha256, size=excluded.size, "
                "task_id=excluded.task_id, version=excluded.version, path=excluded.path",
                {**asdict(rec), "t": time.time()})
            self._bump()

    def pack(self, name: str) -> PackRecord | None:
        row = self.conn.execute("SELECT name, sha256, size, task_id, version, path FROM packs "
                                "WHERE name = ?", (name,)).fetchone()
        return PackRecord(**dict(row)) if row else None

    def packs(self) -> list[PackRecord]:
        rows = self.conn.execute("SELECT name, sha256, size, task_id, version, path FROM packs "
                                 "ORDER BY task_id, version").fetchall()
        return [PackRecord(**dict(r)) for r in rows]

    def publish(self, target: str, pack_name: str) -> None:
        """Desire `pack_name` on every station `target` names (glob over ids, or "@group").

        A new publication of a task moves it on: its rollback pins and the retired mark of this
        version are cleared."""
        rec = self.pack(pack_name)
        assert rec is not None, f"publish of unknown pack {pack_name}"
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO publications (target, pack_name, created_at) "
                              "VALUES (?, ?, ?)", (target, pack_name, time.time()))
            self.conn.execute("DELETE FROM pins WHERE task_id = ?", (rec.task_id,))
            self.conn.execute("DELETE FROM retired WHERE task_id = ? AND version = ?", (rec.task_id, rec.version))
            self._bump()

    def publications(self) -> list[tuple[str, str]]:
        return [(r["target"], r["pack_name"]) for r in
                self.conn.execute("SELECT target, pack_name FROM publications ORDER BY created_at")]

    def rollouts(self) -> dict[str, dict]:
        """{pack name: {canary: [station ids], state, reason, created_at, updated_at}}."""
        try:
            rows = self.conn.execute("SELECT * FROM rollouts ORDER BY created_at").fetchall()
        except sqlite3.OperationalError:   # a read-only view of a database made before rollouts existed
            return {}
        return {r["pack_name"]: {**dict(r), "canary": json.loads(r["canary"])} for r in rows}

    def pins(self) -> list[dict]:
        """Rollback pins, oldest first: {target, task_id, version}."""
        try:
            rows = self.conn.execute("SELECT target, task_id, version FROM pins ORDER BY created_at").fetchall()
        except sqlite3.OperationalError:
            return []
        return [dict(r) for r in rows]

    def retired(self) -> dict[str, set[int]]:
        """{task_id: versions taken back by `kaizen hub unpublish`}."""
        try:
            rows = self.conn.execute("SELECT task_id, version FROM retired").fetchall()
        except sqlite3.OperationalError:
            return {}
        out: dict[str, set[int]] = {}
        for r in rows:
            out.setdefault(r["task_id"], set()).add(int(r["version"]))
        return out

    def published_to(self, station_id: str, groups: list[str]) -> set[str]:
        """Names of every pack published to this station (by glob over ids or one of its groups),
        except packs in a canary or held rollout this station is not a canary of, plus the pack a
        rollback pin names for a task the station is targeted by."""
        rollouts = self.rollouts()
        names = {name for target, name in self.publications() if _matches(target, station_id, groups)
                 and (name not in rollouts or rollouts[name]["state"] == "promoted"
                      or station_id in rollouts[name]["canary"])}
        return names | {rec.name for rec in self._pinned(station_id, groups, names).values()}

    def _pinned(self, station_id: str, groups: list[str], names: set[str]) -> dict[str, PackRecord]:
        """{task: pinned pack} for the tasks among `names` a rollback pin applies to here (newest pin wins)."""
        tasks = {rec.task_id for rec in map(self.pack, names) if rec}
        out = {}
        for pin in self.pins():
            if pin["task_id"] in tasks and _matches(pin["target"], station_id, groups):
                rec = self.pack_of(pin["task_id"], pin["version"])
                if rec is not None:
                    out[pin["task_id"]] = rec
        return out

    def pack_of(self, task_id: str, version: int) -> PackRecord | None:
        """The catalogued pack of a task version (the newest catalogued file if there are several)."""
        row = self.conn.execute("SELECT name, sha256, size, task_id, version, path FROM packs WHERE task_id = ? "
                                "AND version = ? ORDER BY added_at DESC", (task_id, int(version))).fetchone()
        return PackRecord(**dict(row)) if row else None

    def desired_for(self, station_id: str, groups: list[str], exclude=frozenset()) -> list[PackRecord]:
        """Packs desired on a station: the newest published version of each task it is targeted by,
        or the version a rollback pin names (packs named in `exclude`, e.g. files the hub cannot
        serve, are left out)."""
        names = self.published_to(station_id, groups) - set(exclude)
        pinned = self._pinned(station_id, groups, names)
        best: dict[str, PackRecord] = {}
        for name in sorted(names):
            rec = self.pack(name)
            if rec and (rec.task_id not in best or rec.version > best[rec.task_id].version):
                best[rec.task_id] = rec
        best.update({t: rec for t, rec in pinned.items() if rec.name not in exclude})
        return sorted(best.values(), key=lambda r: r.task_id)

    def desired_state(self, station_id: str, groups: list[str], exclude=frozenset()) -> dict:
        """The body of a desired_state message for this station.

        `packs` entries carry `rollback: true` when the hub takes the task back to this version
        (a rollback pin, or a newer version was unpublished); `removed` lists tasks unpublished
        altogether that this station had been delivered."""
        desired = self.desired_for(station_id, groups, exclude)
        pinned = {t for t in self._pinned(station_id, groups, self.published_to(station_id, groups))}
        retired = self.retired()
        packs = []
        for rec in desired:
            entry = rec.wire()
            if rec.task_id in pinned or any(v > rec.version for v in retired.get(rec.task_id, ())):
                entry["rollback"] = True
            packs.append(entry)
        have = {rec.task_id for rec in desired}
        delivered = {d["task_id"] for d in self.deliveries(station_id)}
        removed = sorted(t for t in retired if t not in have and t in delivered)
        return {"packs": packs, "removed": removed}

    def revision(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])

    def _bump(self) -> None:
        self.conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")

    # ------------------------------------------------------------ stations and deliveries

    def record_seen(self, station_id: str, *, hello: bool, installed: list, serving=None,
                    base_fingerprint: str | None = None, runtime_version: str | None = None) -> None:
        """Store a hello or heartbeat: last seen time and what the station says it runs."""
        now = time.time()
        with self.conn:
            self.conn.execute(
                "INSERT INTO stations (station_id, first_seen, last_seen, installed) VALUES (?, ?, ?, '[]') "
                "ON CONFLICT(station_id) DO NOTHING", (station_id, now, now))
            self.conn.execute("UPDATE stations SET last_seen = ?, installed = ?, serving = ? "
                              "WHERE station_id = ?",
                              (now, json.dumps(installed[:MAX_INSTALLED]), json.dumps(serving), station_id))
            if hello:
                self.conn.execute("UPDATE stations SET last_hello = ?, base_fingerprint = ?, "
                                  "runtime_version = ? WHERE station_id = ?",
                                  (now, base_fingerprint, runtime_version, station_id))

    def record_report(self, station_id: str, pack_name: str, task_id: str, version: int,
                      state: str, reason: str) -> bool:
        """Store a delivery report; returns False when it was stale (would move the state back).

        The reason is cut to MAX_REASON_CHARS; invalid Unicode is replaced, not stored."""
        assert state in STATE_RANK, state
        reason = reason.encode("utf-8", "replace").decode("utf-8")
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS] + "..."
        with self.conn:
            row = self.conn.execute("SELECT state FROM deliveries WHERE station_id = ? AND pack_name = ?",
                                    (station_id, pack_name)).fetchone()
            if row is not None and STATE_RANK[row["state"]] > STATE_RANK[state]:
                return False
            self.conn.execute(
                "INSERT INTO deliveries (station_id, pack_name, task_id, version, state, reason, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(station_id, pack_name) DO UPDATE SET "
                "state=excluded.state, reason=excluded.reason, updated_at=excluded.updated_at",
                (station_id, pack_name, task_id, int(version), state, reason, time.time()))
            if state == "activated":   # an older version active again (a fleet rollback): newer ones are gone
                self.conn.execute(
                    "UPDATE deliveries SET state = 'rolled_back', reason = ?, updated_at = ? WHERE station_id = ? "
                    "AND task_id = ? AND version > ? AND state IN ('received', 'verified', 'activated')",
                    (f"rolled back to v{int(version)}", time.time(), station_id, task_id, int(version)))
        return True

    def station(self, station_id: str) -> dict | None:
        row = self.conn.execute("SELECT * FROM stations WHERE station_id = ?", (station_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["installed"] = json.loads(out["installed"])
        out["serving"] = json.loads(out["serving"])
        return out

    def stations(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT station_id FROM stations ORDER BY station_id")]

    def deliveries(self, station_id: str | None = None) -> list[dict]:
        sql = "SELECT * FROM deliveries"
        args: tuple = ()
        if station_id is not None:
            sql, args = sql + " WHERE station_id = ?", (station_id,)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY station_id, task_id, version", args)]

    def delivery(self, station_id: str, pack_name: str) -> dict | None:
        row = self.conn.execute("SELECT * FROM deliveries WHERE station_id = ? AND pack_name = ?",
                                (station_id, pack_name)).fetchone()
        return dict(row) if row else None


def _matches(target: str, station_id: str, groups: list[str]) -> bool:
    """Whether a publication target (glob over ids, or "@group") names this station."""
    return (target[1:] in groups) if target.startswith("@") else fnmatch.fnmatchcase(station_id, target)
