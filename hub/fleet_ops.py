"""Fleet operations on the hub database: unpublish, fleet rollback, canary rollout, promote, hold.

    from kaizen.hub.fleet_ops import unpublish, rollback, start_rollout, promote, hold_on_report
    unpublish(db, "pick")              # take every version of task pick back: stations remove it
    unpublish(db, "pick", 3)           # take pick v3 back: stations go back to the newest one left
    rollback(db, "pick", 2)            # every station targeted by pick runs v2 (or `target="@line1"`)
    start_rollout(db, config, "pick-3.kpk", "line1/*", canary=1)  # or canary_group="qa"
    promote(db, "pick")                # release the canary/held rollout of pick to the rest
    hold_on_report(db, station_id, pack_name, state, reason)  # a canary rejected: hold (the hub calls it)

Every change bumps the database revision, so a running hub pushes desired_state at once; the
meaning of each operation for stations is in runtime/PROTOCOL.md ("Fleet operations") and the
operator's view in docs/DEPLOY.md. Errors are HubOpError with a message that says what to do.
No torch here.
"""

from __future__ import annotations

import json
import time

from kaizen.runtime.errors import KaizenError

from .config import HubConfig
from .db import HubDB, _matches

ROLLOUT_STATES = ("canary", "held", "promoted")


class HubOpError(KaizenError):
    """A fleet operation the hub refuses (unknown task or version, a held rollout, ...)."""


def parse_task_ref(ref: str) -> tuple[str, int | None]:
    """"pick" -> ("pick", None); "pick@3" -> ("pick", 3)."""
    task, sep, version = ref.partition("@")
    if not task or (sep and not version.isdigit()):
        raise HubOpError(f"{ref!r} is not TASK or TASK@VERSION (e.g. pick or pick@3)")
    return task, int(version) if sep else None


def _published_versions(db: HubDB, task_id: str) -> dict[int, list[tuple[str, str]]]:
    """{version: [(target, pack name)]} of the publications of a task."""
    out: dict[int, list[tuple[str, str]]] = {}
    for target, name in db.publications():
        rec = db.pack(name)
        if rec is not None and rec.task_id == task_id:
            out.setdefault(rec.version, []).append((target, name))
    return out


def unpublish(db: HubDB, task_id: str, version: int | None = None) -> list[str]:
    """Remove the publications of a task (one version, or all); returns the pack names taken back.

    Stations that run a taken-back version go back to the newest version still published to
    them (`rollback` in desired_state); with no version left the task is in `removed` and
    stations stop serving it."""
    published = _published_versions(db, task_id)
    versions = sorted(published) if version is None else [version]
    if not published or (version is not None and version not in published):
        have = ", ".join(f"v{v}" for v in sorted(published)) or "none"
        raise HubOpError(f"task {task_id!r}{'' if version is None else f' v{version}'} is not published "
                         f"(published versions: {have}); see `kaizen fleet status`")
    names = sorted({name for v in versions for _, name in published[v]})
    now = time.time()
    with db.conn:
        for name in names:
            db.conn.execute("DELETE FROM publications WHERE pack_name = ?", (name,))
            db.conn.execute("DELETE FROM rollouts WHERE pack_name = ?", (name,))
        for v in versions:
            db.conn.execute("INSERT OR REPLACE INTO retired (task_id, version, retired_at) VALUES (?, ?, ?)",
                            (task_id, v, now))
        if version is None:
            db.conn.execute("DELETE FROM pins WHERE task_id = ?", (task_id,))
        db._bump()
    return names


def rollback(db: HubDB, task_id: str, version: int, target: str = "*") -> str:
    """Pin `task_id` to `version` on the stations `target` names that are targeted by the task.

    The pack of that version must be in the catalogue (published once, or `kaizen hub publish`ed
    to nobody). Returns its name. Publishing a newer version of the task clears the pin."""
    rec = db.pack_of(task_id, version)
    if rec is None:
        known = sorted({p.version for p in db.packs() if p.task_id == task_id})
        raise HubOpError(f"no pack of task {task_id!r} v{version} in the hub's catalogue (catalogued versions: "
                         f"{', '.join(f'v{v}' for v in known) or 'none'}); publish its .kpk first")
    if not _published_versions(db, task_id):
        raise HubOpError(f"task {task_id!r} is not published to any station: nothing to roll back")
    with db.conn:
        db.conn.execute("INSERT OR REPLACE INTO pins (target, task_id, version, created_at) VALUES (?, ?, ?, ?)",
                        (target, task_id, int(version), time.time()))
        db._bump()
    return rec.name


def start_rollout(db: HubDB, config: HubConfig, pack_name: str, target: str, *, canary: int | None = None,
                  canary_group: str | None = None) -> list[str]:
    """Publish `pack_name` to `target` in canary state: only the canary stations get it until
    `promote`. Canaries: the first `canary` stations of the target (by id) or those of `canary_group`."""
    targets = config.resolve_targets(target)
    if canary_group is not None:
        canaries = [s for s in targets if _matches("@" + canary_group, s, _groups(config, s))]
        if not canaries:
            raise HubOpError(f"{config.source}: no station of --to {target!r} is in group {canary_group!r}")
    else:
        if canary is None or canary < 1:
            raise HubOpError("--canary must be at least 1 (the number of stations that get the pack first)")
        canaries = sorted(targets)[:canary]
    now = time.time()
    with db.conn:
        db.conn.execute("INSERT OR REPLACE INTO rollouts (pack_name, canary, state, reason, created_at, updated_at) "
                        "VALUES (?, ?, 'canary', '', ?, ?)", (pack_name, json.dumps(canaries), now, now))
    db.publish(target, pack_name)
    return canaries


def _groups(config: HubConfig, station_id: str) -> list[str]:
    return next((list(s.groups) for s in config.stations if s.id == station_id), [])


def rollout_progress(db: HubDB, pack_name: str) -> dict:
    """{state, reason, canary, canary_states: {station: delivery state or pending}}."""
    r = db.rollouts()[pack_name]
    states = {}
    for sid in r["canary"]:
        d = db.delivery(sid, pack_name)
        states[sid] = d["state"] if d else "pending"
    return {"state": r["state"], "reason": r["reason"], "canary": r["canary"], "canary_states": states}


def promote(db: HubDB, task_id: str, version: int | None = None, *, force: bool = False) -> str:
    """Release the canary (or held) rollout of a task to all its targets; returns the pack name.

    Refused (HubOpError) while held, or while some canary has not activated it, unless `force`."""
    rollouts = db.rollouts()
    candidates = []
    for name, r in rollouts.items():
        rec = db.pack(name)
        if rec and rec.task_id == task_id and r["state"] != "promoted" and version in (None, rec.version):
            candidates.append(rec)
    if not candidates:
        raise HubOpError(f"no canary rollout of {task_id}{'' if version is None else f' v{version}'} to promote "
                         "(publish with --canary N or --canary-group G first; see `kaizen fleet status`)")
    rec = max(candidates, key=lambda r: r.version)
    progress = rollout_progress(db, rec.name)
    if not force:
        if progress["state"] == "held":
            raise HubOpError(f"rollout of {rec.name} is held: {progress['reason']}; fix the pack and publish a "
                             "new version, or `kaizen hub promote ... --force` to release it anyway")
        waiting = sorted((s, st) for s, st in progress["canary_states"].items() if st != "activated")
        if waiting:
            listed = ", ".join(f"{s} ({st})" for s, st in waiting)
            raise HubOpError(f"rollout of {rec.name}: canaries not activated yet: {listed}; wait for them "
                             "(`kaizen fleet status`) or promote with --force")
    with db.conn:
        db.conn.execute("UPDATE rollouts SET state = 'promoted', updated_at = ? WHERE pack_name = ?",
                        (time.time(), rec.name))
        db._bump()
    return rec.name


def hold_on_report(db: HubDB, station_id: str, pack_name: str, state: str, reason: str) -> bool:
    """A canary rejected the pack (failed golden probe, untrusted key, ...) or its operator rolled
    it back locally: hold its rollout. Returns True when this report put the rollout on hold."""
    if state not in ("rejected", "rolled_back"):
        return False
    r = db.rollouts().get(pack_name)
    if r is None or r["state"] != "canary" or station_id not in r["canary"]:
        return False
    what = "rejected it" if state == "rejected" else "rolled it back"
    why = f"canary {station_id} {what}: {reason}"[:1000]
    with db.conn:
        db.conn.execute("UPDATE rollouts SET state = 'held', reason = ?, updated_at = ? WHERE pack_name = ?",
                        (why, time.time(), pack_name))
    return True
