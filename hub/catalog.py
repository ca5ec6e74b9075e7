"""The hub's pack catalogue and its fleet status table (shared by `kaizen hub *` and `kaizen fleet status`).

    rec = catalogue_pack(db, packs_dir, "pick-3.kpk", trusted)   # verify, copy into packs_dir, add to DB
    skipped = {}
    scan_packs(db, packs_dir, skipped=skipped, trusted=trusted)  # (re)register every servable *.kpk
    rows = fleet_status(db, config)                     # one row per station (allow-listed or seen)
    print(format_status(rows))

Pack metadata (task_id, version) comes from the pack's manifest through kaizen.runtime
(tar read with kaizen.runtime.tarsafe, parsed by kaizen.runtime.manifest). With trusted keys
(hub.toml `trusted_keys_dir`) the hub verifies each pack's signature and hashes at publish and
when it (re)scans its folder, and does not serve a file that fails (scan_packs says why);
stations verify again against their own trusted keys and report what they refused.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from kaizen.runtime.durable import fsync_dir, sha256_file
from kaizen.runtime.errors import KaizenError, PackError
from kaizen.runtime.jsonsafe import loads
from kaizen.runtime.keys import TrustedKeys
from kaizen.runtime.manifest import Manifest
from kaizen.runtime.pack import verify_pack
from kaizen.runtime.tarsafe import TarLimits, read_members

from .config import HubConfig
from .db import HubDB, PackRecord


def read_pack_manifest(path: Path) -> Manifest:
    """The manifest of a .kpk file; PackError naming the file if it is not a readable pack."""
    members = read_members(path, TarLimits())
    if "manifest.json" not in members:
        raise PackError(f"{path}: not a task pack (no manifest.json in the tar)")
    try:
        loads("manifest.json", members["manifest.json"])  # depth-bounded first: no RecursionError
        return Manifest.from_json(members["manifest.json"])
    except ValueError as err:
        raise PackError(f"{path}: manifest.json: {err}") from None


def pack_record(path: Path) -> PackRecord:
    manifest = read_pack_manifest(path)
    return PackRecord(name=path.name, sha256=sha256_file(path), size=path.stat().st_size,
                      task_id=manifest.task_id, version=manifest.version, path=str(path))


def check_pack(path: Path, trusted: TrustedKeys | None) -> Manifest:
    """The manifest of a pack the hub may serve: readable, and signed by a trusted key if any."""
    if trusted is None:
        return read_pack_manifest(path)
    return verify_pack(path, trusted)


def catalogue_pack(db: HubDB, packs_dir: Path, source: Path, trusted: TrustedKeys | None = None) -> PackRecord:
    """Copy `source` into packs_dir (if it is not there yet) and register it in the DB.

    With `trusted`, a pack whose signature or hashes do not verify is refused (PackError)."""
    source = Path(source)
    if not source.is_file():
        raise PackError(f"{source}: no such pack file")
    check_pack(source, trusted)  # refuse a non-pack or an unsigned one before copying anything
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


def scan_packs(db: HubDB, packs_dir: Path, *, skipped: dict | None = None,
               trusted: TrustedKeys | None = None, checked: dict | None = None) -> list[PackRecord]:
    """Register every *.kpk in packs_dir whose size or presence the DB does not match.

    Returns the servable records. A file that cannot be read or (with `trusted`) verified, or a
    catalogued pack whose file is gone, is put in `skipped` {name: reason} instead of raising.
    `checked` {(name, size, mtime): reason or None} caches verdicts between scans.
    """
    skipped = {} if skipped is None else skipped
    checked = {} if checked is None else checked
    packs_dir.mkdir(parents=True, exist_ok=True)
    out = []
    seen = set()
    for path in sorted(packs_dir.glob("*.kpk")):
        seen.add(path.name)
        key = (path.name, -1, -1)
        try:
            st = path.stat()
            key = (path.name, st.st_size, st.st_mtime_ns)
            fresh = key not in checked
            if fresh:
                checked[key] = None
                check_pack(path, trusted)
            elif checked[key] is not None:
                raise PackError(checked[key])
            rec = db.pack(path.name)
            if rec is None or fresh or rec.size != st.st_size or rec.path != str(path):
                new = pack_record(path)
                if new != rec:
                    db.add_pack(new)
                rec = new
        except (KaizenError, OSError, ValueError, RecursionError) as err:
            reason = checked.get(key) or f"{type(err).__name__}: {err}"
            checked[key] = reason
            skipped[path.name] = reason
            continue
        skipped.pop(path.name, None)
        out.append(rec)
    for rec in db.packs():
        if rec.name not in seen:
            skipped[rec.name] = f"{rec.path}: the file is gone from the packs folder"
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
