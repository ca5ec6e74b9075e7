"""Issue 11, station half: a full disk, a failing message or pack, and a revoked key never take
the station daemon (or the endpoint next to it) down.

- finding 4: ENOSPC from os.pwrite during a download (injected) -> the hub sees
  `rejected: disk full ...`, the daemon and the endpoint keep serving from the store, and the
  pack activates once space is back (retry with backoff, resumed from the persisted offset);
- loop isolation: a message handler or an install that raises anything is a dropped message or
  a rejected(reason) pack, reported once and not fetched again; the daemon thread lives on;
- finding 10: removing a signer's .pub deactivates exactly its packs (status says why), the
  store still opens, and the daemon applies key changes without a restart.
All on loopback, threads in this process (hub/fleet_sim.py), bounded waits.
"""

import errno
import hashlib
import os
import shutil

import pytest

from kaizen.hub.fleet_sim import Fleet, make_test_packs, wait_until
from kaizen.runtime import daemon as daemon_mod
from kaizen.runtime.endpoint import InferenceClient, InferenceServer
from kaizen.runtime.errors import PackError
from kaizen.runtime.keys import TrustedKeys, generate_signing_key, save_signing_key
from kaizen.runtime.pack import resign_pack
from kaizen.runtime.store import PackStore
from kaizen.runtime.testpacks import write_test_pack

FP = "station-hard-fp"
WAIT = 30.0
CHUNK = 32 * 1024


@pytest.fixture(scope="module")
def signing_key():
    return generate_signing_key()


@pytest.fixture(scope="module")
def packs(tmp_path_factory, signing_key):
    return make_test_packs(tmp_path_factory.mktemp("packs"), signing_key, [("pick", 1), ("count", 1)],
                           base_fingerprint=FP)


@pytest.fixture
def fleet(tmp_path, signing_key, monkeypatch):
    monkeypatch.setattr(daemon_mod, "RETRY_FIRST_S", 0.5, raising=False)  # seconds before a retry
    f = Fleet(tmp_path / "fleet", 1, TrustedKeys([signing_key.public_key()]), FP, chunk_size=CHUNK,
              credit=2, chunk_timeout_s=0.5)
    yield f
    f.close()


def hub_state(fleet, name):
    return fleet.status()[0]["packs"].get(name, {}).get("state"), fleet.status()[0]["packs"].get(name, {}).get("reason")


class StoreBackend:
    """An endpoint backend that answers from the station's store (what it serves right now)."""

    def __init__(self, store):
        self.store = store

    def infer(self, image, instruction, task=None):
        return {"outcome": "answered", "answer": ",".join(sorted(self.store.active())), "task_id": None,
                "pack_version": None, "selected": [], "scores": {}, "confidence": 1.0, "timings_ms": {}}

    def status(self):
        return {"packs": self.store.list()}


def test_full_disk_during_download_is_reported_and_retried(fleet, packs, monkeypatch, tmp_path):
    """Old: ENOSPC from os.pwrite (fetcher.py) escaped the daemon loop: daemon and endpoint died."""
    store = fleet.store(0)
    store.install(packs[1])  # already serving "count"
    downloads = fleet.root / "station0" / "fleet" / "downloads"
    real_pwrite, full = os.pwrite, {"on": True, "hits": 0}

    def pwrite(fd, data, offset):
        if full["on"] and os.readlink(f"/proc/self/fd/{fd}").startswith(str(downloads)):
            full["hits"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    server = InferenceServer(StoreBackend(store), f"ipc://{tmp_path}/infer.ipc").start()
    try:
        fleet.start_hub()
        name = fleet.publish(packs[0], "*")
        daemon = fleet.start_station(0)
        assert wait_until(lambda: (hub_state(fleet, name)[0] == "rejected"), WAIT), fleet.status()
        _, reason = hub_state(fleet, name)
        assert reason.startswith("disk full (No space left on device); still serving from the store")
        assert daemon._thread.is_alive() and daemon.stats.disk_errors >= 1
        assert set(store.active()) == {"count"}               # the store keeps serving
        with InferenceClient(server.endpoint, timeout_ms=5000) as client:
            assert client.infer(b"\x89PNG", "which packs?")["answer"] == "count"  # endpoint unaffected
        hits = full["hits"]
        assert wait_until(lambda: full["hits"] > hits, WAIT)  # retried (after the backoff)
        full["on"] = False                                     # space is back
        assert wait_until(lambda: set(store.active()) == {"pick", "count"}, WAIT)
        assert wait_until(lambda: hub_state(fleet, name)[0] == "activated", WAIT)
        assert daemon._thread.is_alive()
    finally:
        server.stop()


def test_a_pack_whose_install_raises_is_rejected_once_and_not_fetched_again(fleet, packs):
    """Old: daemon.py caught only KaizenError: a RecursionError in install killed the thread, the
    restarted daemon fetched the pack again and died again; the hub showed `received` forever."""
    store = fleet.store(0)
    calls = []

    def install(path, probe=None):
        calls.append(path)
        raise RecursionError("maximum recursion depth exceeded")

    store.install = install
    fleet.start_hub()
    name = fleet.publish(packs[0], "*")
    daemon = fleet.start_station(0)
    assert wait_until(lambda: hub_state(fleet, name)[0] == "rejected", WAIT), fleet.status()
    assert "internal error while handling the pack: RecursionError" in hub_state(fleet, name)[1]
    sha = hashlib.sha256(packs[0].read_bytes()).hexdigest()
    assert sha in daemon.memory.skip
    fetched = fleet.hub.stats.fetch_count
    daemon._next_heartbeat = 0  # ask for desired_state again: the pack must not be fetched again
    wait_until(lambda: False, 1.5)
    assert fleet.hub.stats.fetch_count == fetched and len(calls) == 1
    assert daemon._thread.is_alive()


def test_a_message_whose_handling_raises_is_dropped_and_counted(fleet, packs, monkeypatch):
    real = daemon_mod.StationDaemon._on_message
    failures = {"left": 3}

    def flaky(self, msg):
        if msg.msg_type == "desired_state" and failures["left"]:
            failures["left"] -= 1
            raise KeyError("reply_to")
        return real(self, msg)

    monkeypatch.setattr(daemon_mod.StationDaemon, "_on_message", flaky)
    fleet.start_hub()
    fleet.publish(packs[0], "*")
    daemon = fleet.start_station(0)
    assert wait_until(lambda: fleet.installed(0) == {"pick": 1}, WAIT)  # later messages still handled
    assert daemon.stats.dropped >= 3 and daemon._thread.is_alive()


def test_an_exception_in_a_loop_turn_is_counted_and_the_loop_goes_on(fleet, packs, monkeypatch):
    turns = {"n": 0}
    real = daemon_mod.StationDaemon._heartbeat

    def broken_heartbeat(self, now):
        turns["n"] += 1
        if turns["n"] <= 2:
            raise OverflowError("int too large to convert")
        return real(self, now)

    monkeypatch.setattr(daemon_mod.StationDaemon, "_heartbeat", broken_heartbeat)
    fleet.start_hub()
    fleet.publish(packs[0], "*")
    daemon = fleet.start_station(0)
    assert wait_until(lambda: fleet.installed(0) == {"pick": 1} and turns["n"] > 2, WAIT)
    assert daemon.stats.loop_errors == 2 and daemon._thread.is_alive()


# ---- finding 10: revoking a signer ------------------------------------------------------------

def two_signer_store(tmp_path):
    keys = tmp_path / "trusted"
    old, new = generate_signing_key(), generate_signing_key()
    save_signing_key(old, keys, "old")
    save_signing_key(new, keys, "new")
    for task, key in (("pick", old), ("bend", old), ("count", new)):
        write_test_pack(tmp_path / f"{task}-1.kpk", task, 1, key, base_fingerprint=FP)
    root = tmp_path / "store"
    with PackStore(root, TrustedKeys.from_dir(keys), FP) as store:
        for task in ("pick", "bend", "count"):
            store.install(tmp_path / f"{task}-1.kpk")
    return root, keys, old, new


def test_revoked_key_deactivates_exactly_its_packs_and_the_store_still_opens(tmp_path):
    """Old: removing a trusted key made PackStore refuse to open at all (station would not start)."""
    root, keys, old, new = two_signer_store(tmp_path)
    (keys / "old.ed25519.pub").unlink()
    with PackStore(root, TrustedKeys.from_dir(keys), FP) as store:
        assert set(store.active()) == {"count"}
        assert set(store.inactive()) == {"pick", "bend"}
        assert "no longer trusted" in store.inactive()["pick"]
        assert [e["task"] for e in store.list()] == ["count"]
        with pytest.raises(PackError, match="signed by unknown key"):
            store.install(tmp_path / "pick-1.kpk")  # the revoked key's pack itself
        resign_pack(tmp_path / "pick-1.kpk", tmp_path / "pick-1-new.kpk", new, TrustedKeys([old]))
        with pytest.raises(PackError, match="version 1 of task pick is installed but inactive"):
            store.install(tmp_path / "pick-1-new.kpk")  # the same version again: bump it instead
        write_test_pack(tmp_path / "pick-2.kpk", "pick", 2, new, base_fingerprint=FP)
        store.install(tmp_path / "pick-2.kpk")      # a newer version signed by a trusted key
        assert set(store.active()) == {"count", "pick"} and set(store.inactive()) == {"bend"}


def test_reload_keys_without_reopening(tmp_path):
    root, keys, old, new = two_signer_store(tmp_path)
    with PackStore(root, TrustedKeys.from_dir(keys), FP) as store:
        before = store.active()
        moved = store.reload_keys(TrustedKeys([new]))
        assert moved == {"deactivated": ["bend", "pick"], "reactivated": []}
        assert set(store.active()) == {"count"} and set(before) == {"pick", "bend", "count"}
        assert store.reload_keys(TrustedKeys([old, new]))["reactivated"] == ["bend", "pick"]
        assert set(store.active()) == {"pick", "bend", "count"} and not store.inactive()


def test_daemon_applies_trusted_key_changes_without_a_restart(tmp_path, signing_key, packs, monkeypatch):
    monkeypatch.setattr(daemon_mod, "KEYS_CHECK_S", 0.1)
    keys = tmp_path / "trusted"
    save_signing_key(signing_key, keys, "trainer")
    other = generate_signing_key()
    save_signing_key(other, keys, "spare")
    f = Fleet(tmp_path / "fleet", 1, TrustedKeys.from_dir(keys), FP, chunk_size=CHUNK)
    try:
        f.store(0).install(packs[0])
        f.start_hub()
        daemon = f.start_station(0, trusted_keys_dir=keys)
        aside = tmp_path / "trainer.ed25519.pub"
        shutil.move(keys / "trainer.ed25519.pub", aside)        # revoke: pick's signer
        assert wait_until(lambda: f.installed(0) == {}, WAIT)
        assert "pick" in f.store(0).inactive() and daemon.stats.keys_reloads == 1
        shutil.move(aside, keys / "trainer.ed25519.pub")         # trust it again
        assert wait_until(lambda: f.installed(0) == {"pick": 1}, WAIT)
        for pub in keys.iterdir():                                # no key left: refused, keys kept
            pub.unlink()
        wait_until(lambda: False, 0.5)
        assert f.installed(0) == {"pick": 1} and daemon._thread.is_alive()
    finally:
        f.close()


def test_a_pack_activated_once_is_never_fetched_again(fleet, packs):
    """A hub entry whose task/version differ from the pack's own manifest (a confused or hostile
    hub): the pack activates once; before, the daemon fetched and installed it again forever."""
    from kaizen.hub.db import HubDB, PackRecord

    hub = fleet.start_hub()
    hub._refresh = lambda db: None  # keep the hub from re-reading the catalogue from the file
    folder = fleet.hub_config.packs_dir
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(packs[0], folder / "mislabelled.kpk")
    data = packs[0].read_bytes()
    db = HubDB(fleet.hub_config.db_path)
    try:
        db.add_pack(PackRecord("mislabelled.kpk", hashlib.sha256(data).hexdigest(), len(data), "other", 7,
                               str(folder / "mislabelled.kpk")))
        db.publish("*", "mislabelled.kpk")
    finally:
        db.close()
    daemon = fleet.start_station(0)
    assert wait_until(lambda: fleet.installed(0) == {"pick": 1}, WAIT)
    wait_until(lambda: False, 1.0)
    fetched = fleet.hub.stats.fetch_count
    wait_until(lambda: False, 1.5)  # several heartbeats and desired_states later
    assert fleet.hub.stats.fetch_count == fetched and daemon._thread.is_alive()


def test_full_disk_while_installing_is_retried_not_refused(fleet, packs, monkeypatch):
    """ENOSPC while the store writes its staging folder: `rejected: disk full`, retried, then activated
    (before: the store's PackError made the daemon skip the pack for good)."""
    from kaizen.runtime import store as store_mod

    real, full = store_mod.write_synced, {"on": True}

    def write_synced(path, data, **kw):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **kw)

    monkeypatch.setattr(store_mod, "write_synced", write_synced)
    fleet.start_hub()
    name = fleet.publish(packs[0], "*")
    daemon = fleet.start_station(0)
    assert wait_until(lambda: hub_state(fleet, name)[0] == "rejected", WAIT), fleet.status()
    assert hub_state(fleet, name)[1].startswith("disk full (No space left on device)")
    assert fleet.installed(0) == {} and not list((fleet.store(0).root / "staging").iterdir())
    full["on"] = False
    assert wait_until(lambda: fleet.installed(0) == {"pick": 1}, WAIT)
    assert wait_until(lambda: hub_state(fleet, name)[0] == "activated", WAIT) and daemon._thread.is_alive()


def test_a_pack_announced_larger_than_any_pack_can_be_is_not_fetched(fleet, packs):
    from kaizen.hub.db import HubDB, PackRecord

    hub = fleet.start_hub()
    hub._refresh = lambda db: None
    folder = fleet.hub_config.packs_dir
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(packs[0], folder / "huge.kpk")
    db = HubDB(fleet.hub_config.db_path)
    try:
        db.add_pack(PackRecord("huge.kpk", "ab" * 32, 5 << 30, "pick", 1, str(folder / "huge.kpk")))
        db.publish("*", "huge.kpk")
    finally:
        db.close()
    daemon = fleet.start_station(0)
    assert wait_until(lambda: hub_state(fleet, "huge.kpk")[0] == "rejected", WAIT)
    assert hub_state(fleet, "huge.kpk")[1].startswith("pack huge.kpk refused: too large (5368709120 bytes announced")
    assert fleet.hub.stats.fetch_count == 0 and daemon._thread.is_alive()


def test_daemon_memory_survives_a_corrupt_file_and_stays_bounded(tmp_path, monkeypatch):
    """Before: json.loads of a damaged fleet_state.json raised at every daemon start (crash loop)."""
    from kaizen.runtime import daemon_state

    path = tmp_path / "fleet_state.json"
    path.write_bytes(b"[" * 100_000)
    memory = daemon_state.DaemonMemory(path)
    assert memory.skip == {} and memory.activated == {}
    assert (tmp_path / "fleet_state.json.unreadable").exists()  # kept aside for a human
    monkeypatch.setattr(daemon_state, "MAX_MEMORY_ENTRIES", 5)
    for i in range(12):
        memory.mark_skip(f"{i:064x}", "refused")
    assert list(memory.skip) == [f"{i:064x}" for i in range(7, 12)]
    assert daemon_state.DaemonMemory(path).skip == memory.skip


def test_damaged_outbox_report_is_moved_aside_not_fatal(tmp_path):
    """A report file damaged on disk (power loss, bad sector) must not stop the daemon starting."""
    from kaizen.runtime.outbox import Outbox

    box = Outbox(tmp_path / "outbox")
    box.add({"state": "activated", "name": "pick-1.kpk"})
    good = min((tmp_path / "outbox").glob("*.json"))
    (tmp_path / "outbox" / ("000000000099-" + "0" * 32 + ".json")).write_text("{not json")
    again = Outbox(tmp_path / "outbox")
    assert len(again) == 1 and good.exists()
    assert len(list((tmp_path / "outbox").glob("*.damaged"))) == 1
