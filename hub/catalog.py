"""The hub's pack catalogue and its fleet status table (shared by `kaizen hub *` and `kaizen fleet status`).

    rec = catalogue_pack(db, packs_dir, "pick-3.kpk")   # copy into packs_dir, read manifest, add to DB
    scan_packs(db, packs_dir)                           # (re)register every *.kpk in packs_dir
    rows = fleet_status(db, config)                     # one row per station (allow-listed or seen)
    print(format_status(rows))

Pack metadata (task_id, version) comes from the pack's manifest through kaizen.runtime
(tar read with kaizen.runtime.tarsafe, parsed by kaizen.runtime.manifest). The hub does not
verify signatures: stations do, against their own trusted keys, and report what they refused.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .config import HubConfig
from kaizen.runtime.durable import fsync_dir, sha256_file
from kaizen.runtime.errors import PackError
from kaizen.runtime.manifest import Manifest
from kaizen.runtime.tarsafe import TarLimits, read_members

from .db import HubDB, PackRecord


def read_pack_manifest(path: Path) -> Manifest:
    """The manifest of a .kpk file; PackError naming the file if it is not a readable pack."""
    members = read_members(path, TarLimits())
    if "manifest.json" not in members:
        raise PackError(f"{path}: not a task pack (no manifest.json in the tar)")
    try:
        return Manifest.from_json(members["manifest.json"])
    except ValueError as err:
        raise PackError(f"{path}: manifest.json: {err}") from None


def pack_record(path: Path) -> PackRecord:
    manifest = read_pack_manifest(path)
    return PackRecord(name=path.name, sha256=sha256_file(path), size=path.stat().st_size,
                      task_id=manifest.task_id, version=manifest.version, path=str(path))


def catalogue_pack(db: HubDB, packs_dir: Path, source: Path) -> PackRecord:
    """Copy `source` into packs_dir (if it is not there yet) and register it in the DB."""
    source = Path(source)
    if not source.is_file():
        raise PackError(f"{source}: no such pack file")
    read_pack_manifest(source)  # refuse a non-pack before copying anything
    packs_dir.mkdir(parents=True, exist_ok=True)
    dest = packs_dir / source.name
    if dest.resolve() != source.resolve():
        existing = db.pack(source.name)
        if dest.exists() and sha256_file(dest) != sha256_file(source):
            raise PackError(f"{source}: a different pack named {source.name} is already in {packs_dir}; "
                            "packs are immutable, export a new version instead")
        if existing is None or not dest.exists():
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            fsync_dir(packs_dir)
    rec = pack_record(dest)
    db.add_pack(rec)
    return rec


def scan_packs(db: HubDB, packs_dir: Path) -> list[PackRecord]:
    """Register every *.kpk in packs_dir whose size or presence the DB does not match."""
    packs_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for path in sorted(packs_dir.glob("*.kpk")):
        rec = db.pack(path.name)
        if rec is None or rec.size != path.stat().st_size or rec.path != str(path):
            rec = pack_record(path)
            db.add_pack(rec)
        out.append(rec)
    return out


def fleet_status(db: HubDB, config: HubConfig, now: float | None = None) -> list[dict]:
    """Per station: last seen, installed packs and the state of every desired or reported pack."""
    now = time.time() if now is None else now
    groups = {s.id: s.groups for s in config.stations}
    ids = sorted(set(groups) | set(db.stations()))
    rows = []
    for sid in ids:
        seen = db.station(sid)
        packs = {d["pack_name"]: {"task_id": d["task_id"], "version": d["version"], "state": d["state"],
                                  "reason": d["reason"]} for d in db.deliveries(sid)}
        for rec in db.desired_for(sid, groups.get(sid, [])):
            packs.setdefault(rec.name, {"task_id": rec.task_id, "version": rec.version,
                                        "state": "pending", "reason": ""})
        rows.append({
            "station_id": sid,
            "allowed": sid in groups,
            "last_seen": seen["last_seen"] if seen else None,
            "seen_ago_s": round(now - seen["last_seen"], 1) if seen else None,
            "installed": seen["installed"] if seen else [],
            "packs": dict(sorted(packs.items())),
        })
    return rows


def format_status(rows: list[dict]) -> str:
    """A plain-text table: station, last seen, then one `name: state` cell per pack."""
    lines = [f"{'station':<24} {'last seen':<12} packs", "-" * 72]
    for row in rows:
        seen = "never" if row["seen_ago_s"] is None else f"{row['seen_ago_s']:.0f}s ago"
        cells = []
        for name, p in row["packs"].items():
            cell = f"{name}: {p['state']}"
            if p["reason"]:
                cell += f" ({p['reason']})"
            cells.append(cell)
        lines.append(f"{row['station_id']:<24} {seen:<12} {'; '.join(cells) or '-'}")
    return "\n".join(lines)
