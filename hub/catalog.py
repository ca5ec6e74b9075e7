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
    """Per station: last seen, installed packs and the state of every desired or reported pack.

    A pack the station runs that this hub did not deliver (an offline `kaizen station install`,
    learnt from its hello/heartbeat) is listed as `TASK@VERSION` in state `local`; a delivered
    version unpublished since (`kaizen hub unpublish`) shows as `unpublished`."""
    now = time.time() if now is None else now
    groups = {s.id: s.groups for s in config.stations}
    ids = sorted(set(groups) | set(db.stations()))
    retired = db.retired()
    rows = []
    for sid in ids:
        seen = db.station(sid)
        installed = seen["installed"] if seen else []
        running = {(i.get("task_id"), i.get("version")) for i in installed if isinstance(i, dict)}
        packs = {}
        for d in db.deliveries(sid):
            state, reason = d["state"], d["reason"]
            if d["version"] in retired.get(d["task_id"], ()) and state in ("received", "verified", "activated"):
                state = "unpublished"
                reason = ("unpublished at the hub; still installed on the station"
                          if (d["task_id"], d["version"]) in running else "unpublished at the hub")
            packs[d["pack_name"]] = {"task_id": d["task_id"], "version": d["version"], "state": state,
                                     "reason": reason}
        for rec in db.desired_for(sid, groups.get(sid, [])):
            packs.setdefault(rec.name, {"task_id": rec.task_id, "version": rec.version,
                                        "state": "pending", "reason": ""})
        known = {(p["task_id"], p["version"]) for p in packs.values()}
        for task, version in sorted(running - known, key=str):
            packs[f"{task}@{version}"] = {"task_id": task, "version": version, "state": "local",
                                          "reason": "installed on the station, not delivered by this hub"}
        rows.append({
            "station_id": sid,
            "allowed": sid in groups,
            "groups": list(groups.get(sid, [])),
            "last_seen": seen["last_seen"] if seen else None,
            "seen_ago_s": round(now - seen["last_seen"], 1) if seen else None,
            "installed": installed,
            "packs": dict(sorted(packs.items())),
        })
    return rows


def fleet_summary(db: HubDB, config: HubConfig, rows: list[dict]) -> dict:
    """Per-group delivery counts and the state of every staged rollout (canary / held / promoted)."""
    groups = []
    for g in sorted({g for s in config.stations for g in s.groups}):
        members = [r for r in rows if g in r["groups"]]
        states: dict[str, int] = {}
        for r in members:
            for p in r["packs"].values():
                states[p["state"]] = states.get(p["state"], 0) + 1
        groups.append({"group": g, "stations": len(members),
                       "seen": sum(1 for r in members if r["last_seen"] is not None), "states": dict(sorted(states.items()))})
    rollouts = []
    for name, r in db.rollouts().items():
        rec = db.pack(name)
        targeted = [row for row in rows if name in row["packs"] or row["station_id"] in r["canary"]]
        rollouts.append({
            "pack": name, "task_id": rec.task_id if rec else None, "version": rec.version if rec else None,
            "state": r["state"], "reason": r["reason"], "canary": r["canary"],
            "canary_states": {sid: next((row["packs"].get(name, {}).get("state", "pending") for row in rows
                                         if row["station_id"] == sid), "pending") for sid in r["canary"]},
            "activated": sum(1 for row in targeted if row["packs"].get(name, {}).get("state") == "activated"),
        })
    return {"groups": groups, "rollouts": rollouts}


def format_status(rows: list[dict], summary: dict | None = None) -> str:
    """A plain-text table: station, last seen, then one `name: state` cell per pack; then groups
    and rollouts when `summary` (fleet_summary) is given."""
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
    if summary and summary["groups"]:
        lines += ["", f"{'group':<24} {'stations':<12} packs by state", "-" * 72]
        for g in summary["groups"]:
            states = ", ".join(f"{k}: {v}" for k, v in g["states"].items()) or "-"
            lines.append(f"{g['group']:<24} {g['seen']}/{g['stations']} seen{'':<3} {states}")
    if summary and summary["rollouts"]:
        lines += ["", f"{'rollout':<24} {'state':<12} canaries", "-" * 72]
        for r in summary["rollouts"]:
            canaries = ", ".join(f"{s}: {st}" for s, st in r["canary_states"].items())
            lines.append(f"{r['pack']:<24} {r['state']:<12} {canaries}" + (f" ({r['reason']})" if r["reason"] else ""))
    return "\n".join(lines)
