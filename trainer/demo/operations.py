"""The demo's plant operations, after the packs are out: what an operator does with the tools.

1. canary rollout: version 2 of the last task goes to one station first (`kaizen hub publish
   --canary 1`), then to the rest (`kaizen hub promote`);
2. fleet rollback: `kaizen hub rollback TASK --to 1` and every station serves version 1 again;
3. offline install: version 2 of the first task is installed on station 0 from a file
   (`kaizen station install`, the admin channel of the running station); the hub shows it `local`;
4. the hub's status page (a headless-chromium screenshot) and a scrape of its /metrics.

Each step is timed and goes into the report (report.json "operations", report.md).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from kaizen.runtime.errors import KaizenError

CHROMIUM = "/usr/bin/chromium"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _wait(what: str, check, timeout: float = 120.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise KaizenError(f"demo operations: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.2)
    return round(time.monotonic() - start, 2)


def _served(fleet, i: int) -> dict[str, int]:
    with fleet.client(i, timeout_ms=10000) as c:
        return {p["task"]: p["version"] for p in c.status()["station"]["packs"]}


def _fleet_rows(fleet) -> list[dict]:
    from kaizen.hub.catalog import fleet_status
    from kaizen.hub.config import load_hub_config
    from kaizen.hub.db import HubDB

    db = HubDB(fleet.work / "hub" / "hub.sqlite")
    try:
        return fleet_status(db, load_hub_config(fleet.work / "hub.toml"))
    finally:
        db.close()


def canary_then_promote(fleet, pack: Path, task: str) -> dict:
    from kaizen.hub import cli as hub

    conf = str(fleet.work / "hub.toml")
    t0 = time.monotonic()
    assert hub.cli_publish([str(pack), "--to", "@demo", "--canary", "1", "--config", conf]) == 0
    name = pack.name
    canary = _wait("the canary activating v2", lambda: "activated" in fleet.states(name).values())
    others = [s for s, st in fleet.states(name).items() if st != "activated"]
    assert hub.cli_promote([task, "--config", conf]) == 0
    everywhere = _wait("v2 everywhere after promote", lambda: set(fleet.states(name).values()) == {"activated"})
    return {"task": task, "canary_s": canary, "waiting_before_promote": others, "promoted_s": everywhere,
            "total_s": round(time.monotonic() - t0, 2)}


def fleet_rollback(fleet, task: str) -> dict:
    from kaizen.hub import cli as hub

    assert hub.cli_rollback([task, "--to", "1", "--config", str(fleet.work / "hub.toml")]) == 0
    took = _wait(f"{task} back at v1 on every station",
                 lambda: all(_served(fleet, i).get(task) == 1 for i in range(fleet.n)))
    return {"task": task, "to_version": 1, "all_stations_s": took}


def offline_install(fleet, pack: Path, task: str) -> dict:
    from kaizen.runtime.station_cli import cli_install

    t0 = time.monotonic()
    assert cli_install([str(pack), "--config", str(fleet.work / "station-0.toml")]) == 0
    installed = round(time.monotonic() - t0, 2)

    def local_at_hub() -> bool:
        return any(p.get("state") == "local" for r in _fleet_rows(fleet) for p in r.get("packs", {}).values()
                   if isinstance(p, dict))

    seen = _wait("the hub seeing the offline install as local", local_at_hub, timeout=60.0)
    return {"task": task, "station": 0, "install_s": installed, "hub_shows_local_s": seen}


def status_page_and_metrics(fleet, report: Path) -> dict:
    out = {"status_url": fleet.status_url, "metrics_url": fleet.metrics_url}
    metrics = urllib.request.urlopen(fleet.metrics_url, timeout=10).read().decode()
    (report / "hub_metrics.txt").write_text(metrics)
    out["metrics_lines"] = sum(1 for line in metrics.splitlines() if line and not line.startswith("#"))
    if not Path(CHROMIUM).exists():
        out["screenshot"] = f"skipped: {CHROMIUM} is not installed (apt-get install chromium)"
        return out
    profile = fleet.work / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    cmd = [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", f"--screenshot={report / 'status.png'}",
           "--window-size=1280,900", fleet.status_url]
    subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    shot = report / "status.png"
    out["screenshot"] = "status.png" if shot.exists() and shot.stat().st_size > 5000 else "failed (see chromium)"
    return out


def plant_operations(fleet, delivery, run: Path, stream: list[str], report: Path, log) -> dict:
    """All four steps on the live demo fleet; the results are kept in WORK/operations.json and
    reused by a second demo run (its hub and stations already went through them)."""
    import json

    from kaizen.export.pack_export import export_pack

    from .. import checkpoint as ck

    done = delivery.work / "operations.json"
    report.mkdir(parents=True, exist_ok=True)
    if done.exists():
        log("reusing the plant operations of the first run")
        return json.loads(done.read_text())
    first, last = stream[0], stream[-1]
    packs = {}
    for t, task in ((0, first), (len(stream) - 1, last)):
        packs[task] = delivery.work / "packs" / f"{task}-2.kpk"
        export_pack(ck.task_dir(run, t, task), packs[task], bundle=delivery.bundle, signing_key=delivery.key,
                    version=2, engine=delivery.engine)
    out = {"canary": canary_then_promote(fleet, packs[last], last)}
    log(f"canary: {last} v2 on 1 station in {out['canary']['canary_s']} s, promoted to all in "
        f"{out['canary']['promoted_s']} s")
    out["fleet_rollback"] = fleet_rollback(fleet, last)
    log(f"fleet rollback: {last} back at v1 on every station in {out['fleet_rollback']['all_stations_s']} s")
    out["offline_install"] = offline_install(fleet, packs[first], first)
    log(f"offline install: {first} v2 on station 0 in {out['offline_install']['install_s']} s, "
        f"shown as local at the hub after {out['offline_install']['hub_shows_local_s']} s")
    out["status_page"] = status_page_and_metrics(fleet, report)
    log(f"status page: {out['status_page']['screenshot']}; hub /metrics: {out['status_page']['metrics_lines']} samples")
    done.write_text(json.dumps(out, indent=2))
    return out
