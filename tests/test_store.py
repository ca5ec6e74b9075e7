"""The station's pack store: install, idempotence, version rules, rollback, refusals, recovery,
and readers that never see a half-switched active set while installs and rollbacks run."""

import json
import threading
import time

import numpy as np
import pytest

from kaizen.runtime.errors import PackError
from kaizen.runtime.keys import TrustedKeys, generate_signing_key
from kaizen.runtime.store import PackStore
from kaizen.runtime.testpacks import write_test_pack

FP = "store-base"


@pytest.fixture(scope="module")
def sk():
    return generate_signing_key()


@pytest.fixture(scope="module")
def trusted(sk):
    return TrustedKeys([sk])


@pytest.fixture(scope="module")
def packs(tmp_path_factory, sk):
    """pick v1..v10 and bend v1, every array filled with the version number (a marker)."""
    folder = tmp_path_factory.mktemp("packs")
    out = {}
    for v in range(1, 11):
        out[("pick", v)] = folder / f"pick-{v}.kpk"
        write_test_pack(out[("pick", v)], "pick", v, sk, base_fingerprint=FP, marker=float(v))
    out[("bend", 1)] = folder / "bend-1.kpk"
    write_test_pack(out[("bend", 1)], "bend", 1, sk, base_fingerprint=FP, marker=1.0)
    return out


@pytest.fixture()
def store(tmp_path, trusted):
    with PackStore(tmp_path / "store", trusted, FP) as s:
        yield s


def versions(store):
    return {task: p.manifest.version for task, p in store.active().items()}


def disk_versions(store, task):
    return sorted(int(p.name) for p in (store.root / "packs" / task).iterdir())


def assert_consistent(snapshot):
    """Every array of every pack in the snapshot carries that pack's version (no mixing)."""
    for task, p in snapshot.items():
        v = p.manifest.version
        assert p.manifest.task_id == task
        assert (p.prompt == v).all() and (p.text_emb == v).all()
        assert all((a == v).all() for a in p.lora.values())
        assert int(np.argmax(p.key)) == v % p.key.shape[0]


class Unchanged:
    """Captures active.json bytes and the active() snapshot; check() asserts neither moved."""

    def __init__(self, store):
        self.store = store
        self.path = store.root / "active.json"
        self.bytes = self.path.read_bytes() if self.path.exists() else None
        self.snapshot = store.active()
        self.listing = store.list()

    def check(self):
        assert (self.path.read_bytes() if self.path.exists() else None) == self.bytes
        assert self.store.active() is self.snapshot
        assert self.store.list() == self.listing
        assert not list((self.store.root / "staging").iterdir())


def test_install_activates_and_lays_out_the_store(store, packs):
    m = store.install(packs[("pick", 1)])
    assert (m.task_id, m.version) == ("pick", 1)
    active = store.active()
    assert versions(store) == {"pick": 1}
    assert_consistent(active)
    loaded = active["pick"]
    assert loaded.path == store.root / "packs" / "pick" / "1"
    assert (loaded.path / "manifest.json").is_file() and (loaded.path / "golden" / "golden.json").is_file()
    assert loaded.answers == ("yes", "no") and len(loaded.golden) == 1
    with pytest.raises(ValueError):
        loaded.prompt[0, 0] = 5.0  # shared arrays are read-only
    assert json.loads((store.root / "active.json").read_text()) == {"pick": {"version": 1, "previous": None}}
    assert store.list() == [{"task": "pick", "version": 1, "previous": None, "sha": loaded.sha}]
    with pytest.raises(TypeError):
        store.active()["pick"] = loaded  # the snapshot is immutable


def test_reinstall_same_pack_is_a_no_op(store, packs):
    store.install(packs[("pick", 1)])
    before = Unchanged(store)
    report = store.install_report(packs[("pick", 1)])
    assert report.status == "unchanged" and report.manifest.version == 1
    before.check()
    assert store.install(packs[("pick", 1)]).version == 1


def test_same_version_other_content_and_older_version_are_refused(store, packs, sk, tmp_path):
    store.install(packs[("pick", 2)])
    before = Unchanged(store)
    other = tmp_path / "pick-2-other.kpk"
    write_test_pack(other, "pick", 2, sk, base_fingerprint=FP, marker=7.0)
    with pytest.raises(PackError, match=r"pick-2-other.kpk refused: version 2 of task pick is already active "
                                        "with different contents"):
        store.install(other)
    before.check()
    with pytest.raises(PackError, match=r"pick-1.kpk refused: version 1 of task pick is older than the "
                                        "active version 2"):
        store.install(packs[("pick", 1)])
    before.check()


def test_upgrades_keep_one_previous_and_prune_older(store, packs):
    for v in (1, 2, 3):
        report = store.install_report(packs[("pick", v)])
        assert report.status == "installed" and report.previous == (v - 1 or None)
    assert versions(store) == {"pick": 3}
    assert store.list()[0]["previous"] == 2
    assert disk_versions(store, "pick") == [2, 3]


def test_rollback_and_its_limits(tmp_path, store, packs, trusted):
    store.install(packs[("pick", 1)])
    store.install(packs[("pick", 2)])
    assert store.rollback("pick").version == 1
    assert versions(store) == {"pick": 1}
    assert_consistent(store.active())
    assert json.loads((store.root / "active.json").read_text()) == {"pick": {"version": 1, "previous": None}}
    assert disk_versions(store, "pick") == [1]
    with pytest.raises(PackError, match="task pick v1 has no previous version"):
        store.rollback("pick")
    with pytest.raises(PackError, match="task 'nope' has no active pack"):
        store.rollback("nope")
    store.install(packs[("pick", 3)])  # forward again after a rollback
    assert store.list()[0]["previous"] == 1
    store.close()
    with PackStore(store.root, trusted, FP) as again:  # rollback state survives a restart
        assert versions(again) == {"pick": 3}
        assert again.install_report(packs[("pick", 3)]).status == "unchanged"


def test_remove_a_task_the_hub_unpublished(store, packs, trusted):
    store.install(packs[("pick", 1)])
    store.install(packs[("pick", 2)])
    store.install(packs[("bend", 1)])
    assert store.remove("pick").version == 2
    assert versions(store) == {"bend": 1}
    assert not (store.root / "packs" / "pick").exists()
    with pytest.raises(PackError, match="task 'pick' is not installed"):
        store.remove("pick")
    store.close()
    with PackStore(store.root, trusted, FP) as again:  # the removal survives a restart
        assert versions(again) == {"bend": 1}
        assert again.install_report(packs[("pick", 3)]).status == "installed"  # published again later


def test_failed_probe_leaves_the_active_set_unchanged(store, packs):
    store.install(packs[("pick", 1)])
    before = Unchanged(store)
    seen = []

    def refusing_probe(contents):
        seen.append(contents.manifest.version)
        assert (contents.prompt == 2).all()
        raise PackError("golden probe: answered 'no', expected 'yes'")

    with pytest.raises(PackError, match="golden probe"):
        store.install(packs[("pick", 2)], probe=refusing_probe)
    assert seen == [2]
    before.check()
    assert disk_versions(store, "pick") == [1]

    def buggy_probe(contents):
        raise RuntimeError("probe crashed")

    with pytest.raises(RuntimeError, match="probe crashed"):
        store.install(packs[("pick", 2)], probe=buggy_probe)
    before.check()
    assert store.install(packs[("pick", 2)], probe=lambda c: None).version == 2


def test_refused_packs_leave_the_active_set_unchanged(tmp_path, store, packs, sk):
    store.install(packs[("pick", 1)])
    before = Unchanged(store)
    good = packs[("pick", 2)].read_bytes()
    tampered = tmp_path / "tampered.kpk"
    tampered.write_bytes(good.replace(b"\x00\x00\x00@", b"\x00\x00\x80@", 1))  # a 2.0 -> 4.0 in an array
    assert tampered.read_bytes() != good
    truncated = tmp_path / "truncated.kpk"
    truncated.write_bytes(good[: len(good) // 2])
    stranger = tmp_path / "stranger.kpk"
    write_test_pack(stranger, "pick", 2, generate_signing_key(), base_fingerprint=FP)
    wrong_base = tmp_path / "wrong-base.kpk"
    write_test_pack(wrong_base, "pick", 2, sk, base_fingerprint="another-base")
    future = tmp_path / "future.kpk"
    write_test_pack(future, "pick", 2, sk, base_fingerprint=FP, min_runtime_version="99.0.0")
    cases = [(tampered, "tampered"), (truncated, "truncated tar"), (stranger, "signed by unknown key"),
             (wrong_base, "wrong base"), (future, "runtime too old"), (tmp_path / "absent.kpk", "cannot read")]
    for path, reason in cases:
        with pytest.raises(PackError, match=reason) as info:
            store.install(path)
        assert str(path) in str(info.value)
        before.check()
        assert disk_versions(store, "pick") == [1]


def test_several_tasks_and_snapshots_do_not_move(store, packs):
    store.install(packs[("pick", 1)])
    old = store.active()
    store.install(packs[("bend", 1)])
    assert set(old) == {"pick"}  # a reader's snapshot stays what it was
    assert versions(store) == {"pick": 1, "bend": 1}
    store.install(packs[("pick", 2)])
    assert old["pick"].manifest.version == 1 and (old["pick"].prompt == 1).all()
    assert [e["task"] for e in store.list()] == ["bend", "pick"]


def test_recovery_removes_leftovers_on_reopen(tmp_path, trusted, packs):
    root = tmp_path / "store"
    with PackStore(root, trusted, FP) as s:
        s.install(packs[("pick", 1)])
        s.install(packs[("pick", 2)])
        active_bytes = (root / "active.json").read_bytes()
    (root / "staging" / "install-dead").mkdir()
    (root / "staging" / "install-dead" / "prompt.npy").write_bytes(b"half")
    (root / "active.json.tmp").write_bytes(b'{"pick": {"vers')
    orphan = root / "packs" / "pick" / "7"
    orphan.mkdir()
    (orphan / "manifest.json").write_bytes(b"{}")
    (root / "packs" / "ghost" / "1").mkdir(parents=True)
    with PackStore(root, trusted, FP) as s:
        assert sorted(s.recovered) == ["active.json.tmp", "packs/ghost/1", "packs/pick/7", "staging/install-dead"]
        assert versions(s) == {"pick": 2} and s.list()[0]["previous"] == 1
        assert_consistent(s.active())
    assert (root / "active.json").read_bytes() == active_bytes
    assert not (root / "packs" / "ghost").exists() and not orphan.exists()
    assert not list((root / "staging").iterdir()) and not (root / "active.json.tmp").exists()


def test_open_refuses_a_damaged_store(tmp_path, trusted, packs):
    root = tmp_path / "store"
    with PackStore(root, trusted, FP) as s:
        s.install(packs[("pick", 1)])
    prompt = root / "packs" / "pick" / "1" / "prompt.npy"
    prompt.write_bytes(prompt.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(PackError, match=r"packs/pick/1 refused: tampered: member prompt.npy"):
        PackStore(root, trusted, FP)
    (root / "active.json").write_text("{broken")
    with pytest.raises(PackError, match=r"active.json: unreadable"):
        PackStore(root, trusted, FP)
    (root / "active.json").write_text('{"pick": {"version": 0, "previous": null}}')
    with pytest.raises(PackError, match=r"bad entry for task 'pick'"):
        PackStore(root, trusted, FP)


def test_one_open_store_per_root(tmp_path, trusted):
    first = PackStore(tmp_path / "s", trusted, FP)
    with pytest.raises(PackError, match="is already open"):
        PackStore(tmp_path / "s", trusted, FP)
    first.close()
    PackStore(tmp_path / "s", trusted, FP).close()


def test_store_checks_base_on_install(tmp_path, trusted, packs):
    with PackStore(tmp_path / "s", trusted, "a-different-base") as s:
        with pytest.raises(PackError, match="wrong base"):
            s.install(packs[("pick", 1)])
        assert s.active() == {}


def test_concurrent_readers_see_whole_snapshots_during_installs_and_rollbacks(store, packs):
    store.install(packs[("pick", 1)])
    store.install(packs[("bend", 1)])
    done = threading.Event()
    errors: list[BaseException] = []
    reads = [0] * 4
    seen_versions: set[int] = set()

    def reader(i):
        try:
            while not done.is_set():
                snapshot = store.active()
                pick = snapshot["pick"]
                assert set(snapshot) == {"pick", "bend"}
                assert_consistent(snapshot)
                # a request in flight keeps computing on its snapshot while installs happen
                total = sum(float(a.sum()) for a in pick.lora.values())
                assert total == pick.manifest.version * sum(a.size for a in pick.lora.values())
                assert snapshot["pick"] is pick  # the snapshot did not move under the request
                seen_versions.add(pick.manifest.version)
                reads[i] += 1
                time.sleep(0)  # let the writer run; the readers still overlap every switch
        except BaseException as err:  # noqa: BLE001 - reported to the main thread below
            errors.append(err)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for v in range(2, 11):
            store.install(packs[("pick", v)])
            if v in (4, 7):
                assert store.rollback("pick").version == v - 1
            time.sleep(0.002)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    assert all(n > 0 for n in reads)
    assert versions(store) == {"pick": 10, "bend": 1}
    assert len(seen_versions) >= 2  # the readers really ran across switches
