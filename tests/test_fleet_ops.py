"""Fleet operations on loopback: unpublish, fleet rollback (all / one group), canary rollout with
promote, automatic hold when a canary rejects, and packs installed offline shown as `local`.

A hub and three station daemons run as threads (hub/fleet_sim.py), driven through the
`kaizen hub ...` / `kaizen fleet status` command functions. Every wait is bounded. The last
test runs real Stations on the tiny base (golden probe, Station.rollback; ~30 s with the base
build, shared with the other tests of a session).
Stations: line1/s00 (group a), line2/s01 (group b), line1/s02 (group a).
"""

import json
import time

import pytest

from kaizen.hub import cli as hub_cli
from kaizen.hub.db import HubDB
from kaizen.hub.fleet_ops import HubOpError
from kaizen.hub.fleet_sim import Fleet, make_test_packs, wait_until, write_hub_toml
from kaizen.hub.fleet_view import FleetView
from kaizen.hub.status_page import render_html
from kaizen.runtime.keys import TrustedKeys, generate_signing_key
from kaizen.runtime.store import PackStore

FP = "test-base-fp"
WAIT = 20.0
S0, S1, S2 = "line1/s00", "line2/s01", "line1/s02"



@pytest.fixture(scope="module")
def packs(tmp_path_factory, signing_key):
    folder = tmp_path_factory.mktemp("packs")
    made = make_test_packs(folder, signing_key, [("pick", 1), ("pick", 2), ("pick", 3), ("count", 1)],
                           base_fingerprint=FP, layers=2)
    return dict(zip(["pick1", "pick2", "pick3", "count1"], made))


@pytest.fixture
def fleet(tmp_path, signing_key):
    f = Fleet(tmp_path / "fleet", 3, TrustedKeys([signing_key.public_key()]), FP, chunk_size=32 * 1024,
              groups={S0: ["a"], S1: ["b"], S2: ["a"]})
    yield f
    f.close()


@pytest.fixture
def conf(fleet, tmp_path):
    return str(write_hub_toml(fleet, tmp_path / "hub.toml"))


def run(fleet, n=3):
    fleet.start_hub()
    for i in range(n):
        fleet.start_station(i)


def states(fleet, station_id):
    row = next(r for r in fleet.status() if r["station_id"] == station_id)
    return {name: p["state"] for name, p in row["packs"].items()}


def versions(fleet, task):
    return [fleet.installed(i).get(task) for i in range(3)]


def status_all(conf, capsys):
    capsys.readouterr()
    assert hub_cli.cli_status(["--config", conf, "--json", "--all"]) == 0
    return json.loads(capsys.readouterr().out)


def test_unpublish_a_version_takes_stations_back_and_unpublish_a_task_withdraws_it(fleet, packs, conf, capsys):
    run(fleet)
    for key in ("pick1", "count1", "pick2"):
        assert hub_cli.cli_publish([str(packs[key]), "--to", "*", "--config", conf]) == 0
        task, version = key[:-1], int(key[-1])
        assert wait_until(lambda t=task, v=version: versions(fleet, t) == [v] * 3, WAIT), key

    assert hub_cli.cli_unpublish(["pick@2", "--config", conf]) == 0
    assert wait_until(lambda: versions(fleet, "pick") == [1, 1, 1], WAIT)   # each store's previous version
    assert wait_until(lambda: all(states(fleet, s).get("pick-2.kpk") == "rolled_back" for s in (S0, S1, S2)), WAIT)
    assert states(fleet, S0)["pick-1.kpk"] == "activated"
    assert wait_until(lambda: all(d.stats.hub_rollbacks == 1 for d in fleet.daemons.values()), WAIT)

    assert hub_cli.cli_unpublish(["count", "--config", conf]) == 0
    db = HubDB(fleet.hub_config.db_path)
    try:
        body = db.desired_state(S0, ["a"])
    finally:
        db.close()
    assert [p["name"] for p in body["packs"]] == ["pick-1.kpk"] and body["removed"] == ["count"]
    assert wait_until(lambda: all(d.removed == ["count"] for d in fleet.daemons.values()), WAIT)
    assert wait_until(lambda: states(fleet, S1).get("count-1.kpk") == "unpublished", WAIT)
    with pytest.raises(HubOpError, match="not published"):
        hub_cli.cli_unpublish(["count@1", "--config", conf])


@pytest.mark.skipif(not hasattr(PackStore, "remove"), reason="the pack store cannot remove a task yet")
def test_unpublished_task_stops_being_served(fleet, packs, conf):
    run(fleet, 2)
    for key in ("pick1", "count1"):
        fleet.publish(packs[key], "*")
    assert wait_until(lambda: fleet.installed(0) == fleet.installed(1) == {"pick": 1, "count": 1}, WAIT)
    assert hub_cli.cli_unpublish(["count", "--config", conf]) == 0
    assert wait_until(lambda: fleet.installed(0) == fleet.installed(1) == {"pick": 1}, WAIT)
    assert wait_until(lambda: all(d.stats.hub_removals == 1 for d in fleet.daemons.values()), WAIT)
    assert wait_until(lambda: next(r for r in fleet.status() if r["station_id"] == S1)["packs"]["count-1.kpk"]
                      == {"task_id": "count", "version": 1, "state": "unpublished", "reason": "unpublished at the hub"},
                      WAIT)
    assert not (fleet.store(0).root / "packs" / "count").exists()   # its files are gone too
    fleet.publish(packs["count1"], "@b")                     # publishing again brings it back
    assert wait_until(lambda: fleet.installed(1) == {"pick": 1, "count": 1}, WAIT)
    assert fleet.installed(0) == {"pick": 1}


def test_fleet_rollback_to_a_version_then_a_newer_publish_moves_on(fleet, packs, conf, capsys):
    run(fleet)
    for key in ("pick1", "pick2"):
        fleet.publish(packs[key], "*")
        assert wait_until(lambda k=key: versions(fleet, "pick") == [int(k[-1])] * 3, WAIT)
    assert hub_cli.cli_rollback(["pick", "--to", "1", "--config", conf]) == 0
    assert wait_until(lambda: versions(fleet, "pick") == [1, 1, 1], WAIT)
    assert wait_until(lambda: all(states(fleet, s) == {"pick-1.kpk": "activated", "pick-2.kpk": "rolled_back"}
                                  for s in (S0, S1, S2)), WAIT)
    rows = {r["station_id"]: r for r in status_all(conf, capsys)["stations"]}
    assert rows[S1]["installed"] == [{"task_id": "pick", "version": 1}]

    fleet.publish(packs["pick3"], "*")                       # a newer version clears the rollback
    assert wait_until(lambda: versions(fleet, "pick") == [3, 3, 3], WAIT)
    with pytest.raises(HubOpError, match="v7"):
        hub_cli.cli_rollback(["pick", "--to", "7", "--config", conf])


def test_fleet_rollback_to_one_group_only(fleet, packs, conf):
    run(fleet)
    for key in ("pick1", "pick2"):
        fleet.publish(packs[key], "*")
        assert wait_until(lambda k=key: versions(fleet, "pick") == [int(k[-1])] * 3, WAIT)
    assert hub_cli.cli_rollback(["pick", "--to", "1", "--to-group", "b", "--config", conf]) == 0
    assert wait_until(lambda: versions(fleet, "pick")[1] == 1, WAIT)
    assert wait_until(lambda: states(fleet, S1).get("pick-2.kpk") == "rolled_back", WAIT)
    assert versions(fleet, "pick") == [2, 1, 2]
    assert states(fleet, S0) == {"pick-1.kpk": "activated", "pick-2.kpk": "activated"}


def test_rollback_further_than_the_previous_version_is_rejected_with_why(fleet, packs, conf):
    run(fleet, 1)
    for key in ("pick1", "pick2", "pick3"):
        fleet.publish(packs[key], "*")
        assert wait_until(lambda k=key: fleet.installed(0) == {"pick": int(k[-1])}, WAIT)
    hub_cli.cli_rollback(["pick", "--to", "1", "--config", conf])
    assert wait_until(lambda: states(fleet, S0).get("pick-1.kpk") == "rejected", WAIT)
    row = next(r for r in fleet.status() if r["station_id"] == S0)
    assert "keeps only v2 as the previous one" in row["packs"]["pick-1.kpk"]["reason"]
    assert fleet.installed(0) == {"pick": 3}                 # still serving what it had


def test_canary_publish_then_promote(fleet, packs, conf, capsys):
    run(fleet)
    fleet.publish(packs["pick1"], "*")
    assert wait_until(lambda: versions(fleet, "pick") == [1, 1, 1], WAIT)
    assert hub_cli.cli_publish([str(packs["pick2"]), "--to", "*", "--canary", "1", "--config", conf]) == 0
    assert "canary rollout: line1/s00 first" in capsys.readouterr().out
    assert wait_until(lambda: states(fleet, S0).get("pick-2.kpk") == "activated", WAIT)
    time.sleep(1.0)                                          # five more heartbeats for the others
    assert versions(fleet, "pick") == [2, 1, 1]
    summary = status_all(conf, capsys)
    (rollout,) = summary["rollouts"]
    assert rollout["state"] == "canary" and rollout["canary_states"] == {S0: "activated"}
    groups = {g["group"]: g for g in summary["groups"]}
    assert groups["a"]["stations"] == 2 and groups["b"]["states"] == {"activated": 1}
    assert hub_cli.cli_status(["--config", conf]) == 0
    assert "pick-2.kpk               canary" in capsys.readouterr().out

    snap = FleetView(fleet.hub_config, cache_s=0).snapshot()        # the status page's view
    assert next(p for p in snap["packs"] if p["name"] == "pick-2.kpk")["rollout"] == "canary"
    assert 'data-rollout="canary"' in render_html(snap)

    assert hub_cli.cli_promote(["pick", "--config", conf]) == 0
    assert wait_until(lambda: versions(fleet, "pick") == [2, 2, 2], WAIT)
    assert status_all(conf, capsys)["rollouts"][0]["state"] == "promoted"
    with pytest.raises(HubOpError, match="no canary rollout"):
        hub_cli.cli_promote(["pick", "--config", conf])


def test_canary_rejection_holds_the_rollout_and_promote_is_refused(fleet, packs, conf, tmp_path, capsys):
    run(fleet)
    fleet.publish(packs["pick1"], "*")
    assert wait_until(lambda: versions(fleet, "pick") == [1, 1, 1], WAIT)
    rogue = make_test_packs(tmp_path / "rogue", generate_signing_key(), [("pick", 2)], base_fingerprint=FP,
                            layers=2)[0]                      # signed by a key the stations do not trust
    assert hub_cli.cli_publish([str(rogue), "--to", "*", "--canary-group", "b", "--config", conf]) == 0
    assert wait_until(lambda: status_all(conf, capsys)["rollouts"][0]["state"] == "held", WAIT)
    rollout = status_all(conf, capsys)["rollouts"][0]
    assert rollout["canary"] == [S1] and "canary line2/s01 rejected it" in rollout["reason"]
    with pytest.raises(HubOpError, match="held"):
        hub_cli.cli_promote(["pick", "--config", conf])
    assert "pick-2.kpk" not in states(fleet, S0) and "pick-2.kpk" not in states(fleet, S2)
    assert versions(fleet, "pick") == [1, 1, 1]
    assert hub_cli.cli_promote(["pick@2", "--force", "--config", conf]) == 0
    assert wait_until(lambda: states(fleet, S0).get("pick-2.kpk") == "rejected", WAIT)


def test_pack_installed_offline_shows_as_local(fleet, packs, conf, capsys):
    fleet.store(1).install(packs["count1"])                  # `kaizen station install` with the station stopped
    fleet.publish(packs["pick1"], "*")
    run(fleet)
    assert wait_until(lambda: states(fleet, S1) == {"count@1": "local", "pick-1.kpk": "activated"}, WAIT)
    assert wait_until(lambda: states(fleet, S0) == {"pick-1.kpk": "activated"}, WAIT)   # S0 reports on its own time
    rows = {r["station_id"]: r for r in status_all(conf, capsys)["stations"]}
    assert rows[S1]["packs"]["count@1"]["reason"] == "installed on the station, not delivered by this hub"
    assert hub_cli.cli_status(["--config", conf]) == 0
    assert "count@1: local" in capsys.readouterr().out
    snap = FleetView(fleet.hub_config, cache_s=0).snapshot()
    assert 'data-pack="count@1" data-state="local"' in render_html(snap)


def test_promote_waits_for_the_canaries_and_non_canaries_cannot_fetch_early(fleet, packs, conf, capsys):
    fleet.start_hub()
    fleet.start_station(1)                                   # the canary (line1/s00) is not running
    assert hub_cli.cli_publish([str(packs["pick1"]), "--to", "line1/*", "--canary", "1", "--config", conf]) == 0
    with pytest.raises(HubOpError, match=r"canaries not activated yet: line1/s00 \(pending\)"):
        hub_cli.cli_promote(["pick@1", "--config", conf])
    db = HubDB(fleet.hub_config.db_path)
    try:
        assert [r.name for r in db.desired_for(S0, ["a"])] == ["pick-1.kpk"]
        assert db.desired_for(S2, ["a"]) == [] and "pick-1.kpk" not in db.published_to(S2, ["a"])
    finally:
        db.close()
    fleet.start_station(0)
    assert wait_until(lambda: fleet.installed(0) == {"pick": 1}, WAIT)
    assert wait_until(lambda: states(fleet, S0).get("pick-1.kpk") == "activated", WAIT)
    assert hub_cli.cli_promote(["pick@1", "--config", conf]) == 0
    fleet.start_station(2)
    assert wait_until(lambda: fleet.installed(2) == {"pick": 1}, WAIT)
    assert fleet.installed(1) == {}                          # line2 was never in the target


def test_a_local_rollback_on_a_canary_holds_the_rollout(fleet, packs, conf, capsys):
    run(fleet, 2)
    fleet.publish(packs["pick1"], "*")
    assert wait_until(lambda: fleet.installed(0) == fleet.installed(1) == {"pick": 1}, WAIT)
    assert hub_cli.cli_publish([str(packs["pick2"]), "--to", "*", "--canary", "1", "--config", conf]) == 0
    assert wait_until(lambda: states(fleet, S0).get("pick-2.kpk") == "activated", WAIT)
    fleet.store(0).rollback("pick")                          # what `kaizen station rollback pick` does
    assert wait_until(lambda: status_all(conf, capsys)["rollouts"][0]["state"] == "held", WAIT)
    assert "canary line1/s00 rolled it back" in status_all(conf, capsys)["rollouts"][0]["reason"]
    with pytest.raises(HubOpError, match="held"):
        hub_cli.cli_promote(["pick", "--config", conf])
    assert fleet.installed(1) == {"pick": 1}


# ---------------------------------------------------------------- real stations (tiny base)


def _station_pack(path, engine, signer, task, version, seed, golden_answer=None):
    """A pack that fits the tiny-llama bundle; with golden_answer, one golden sample expecting it."""
    import numpy as np

    from kaizen.runtime.pack import build_pack
    from kaizen.runtime.pack_arrays import GoldenSample
    from kaizen.runtime.testpacks import tiny_png

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    instruction = "Is the seal torn?"
    key = engine.clip_image([image])[0] + engine.clip_text([instruction])[0]
    lora = {n: (rng.standard_normal((2, s[1]) if n.endswith(".A") else (s[0], 2)) * 0.3).astype(np.float32)
            for n, s in engine.lora_shapes.items()}
    golden = [] if golden_answer is None else [GoldenSample(tiny_png(seed, 16), instruction, golden_answer)]
    build_pack(path, task_id=task, version=version, method="kaizen", base_fingerprint=engine.bundle.fingerprint,
               prompt=(rng.standard_normal((4, engine.embed.shape[1])) * 0.5).astype(np.float32),
               key=(key / np.linalg.norm(key)).astype(np.float32), text_emb=engine.clip_text([instruction]),
               lora=lora, instructions=[instruction], answers=["yes", "no"], golden=golden, signing_key=signer,
               lora_rank=2)
    return path


def test_real_stations_roll_back_from_the_hub_and_a_failed_golden_probe_holds_the_canary(tiny_llama, tmp_path,
                                                                                        capsys):
    from kaizen.runtime.daemon import StationDaemon
    from kaizen.runtime.station import Station

    signer = generate_signing_key()
    trusted = TrustedKeys([signer.public_key()])
    stations = [Station(tiny_llama[1], tmp_path / f"store{i}", trusted) for i in range(2)]
    fp = stations[0].bundle.fingerprint
    fleet = Fleet(tmp_path / "fleet", 2, trusted, fp, chunk_size=64 * 1024, groups={S0: ["a"], S1: ["b"]})
    conf = str(write_hub_toml(fleet, tmp_path / "hub.toml"))
    e = stations[0].engine
    seal = {v: _station_pack(tmp_path / f"seal-{v}.kpk", e, signer, "seal", v, v) for v in (1, 2)}
    broken = _station_pack(tmp_path / "seal-3.kpk", e, signer, "seal", 3, 3, golden_answer="definitely-not")

    def running():
        return [{i["task_id"]: i["version"] for i in s.installed()} for s in stations]

    try:
        fleet.start_hub()
        for i, station in enumerate(stations):
            fleet.daemons[fleet.station_ids[i]] = StationDaemon(fleet.link(i), station).start()
        for v in (1, 2):
            fleet.publish(seal[v], "*")
            assert wait_until(lambda v=v: running() == [{"seal": v}] * 2, 60.0), running()
        assert hub_cli.cli_rollback(["seal", "--to", "1", "--config", conf]) == 0
        assert wait_until(lambda: running() == [{"seal": 1}] * 2, WAIT)
        for i in range(2):                                   # remembered like `kaizen station rollback`
            assert json.loads((tmp_path / f"store{i}" / "rolled_back.json").read_text()) == {"seal": [2]}
        assert wait_until(lambda: states(fleet, S1) == {"seal-1.kpk": "activated", "seal-2.kpk": "rolled_back"},
                          WAIT)

        assert hub_cli.cli_publish([str(broken), "--to", "*", "--canary-group", "a", "--config", conf]) == 0
        assert wait_until(lambda: status_all(conf, capsys)["rollouts"][0]["state"] == "held", 60.0)
        reason = status_all(conf, capsys)["rollouts"][0]["reason"]
        assert "canary line1/s00 rejected it" in reason and "golden probe failed" in reason
        with pytest.raises(HubOpError, match="held"):
            hub_cli.cli_promote(["seal", "--config", conf])
        assert running() == [{"seal": 1}] * 2 and "seal-3.kpk" not in states(fleet, S1)
    finally:
        fleet.close()
        for station in stations:
            station.close()
