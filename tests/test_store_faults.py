"""kill -9 during install and rollback: the reopened store holds exactly the old or the new set.

Two ways to kill the child process that runs the store:
- a step hook (store_disk.set_fault_hook, installed by the child): it SIGKILLs itself at that exact step, so
  every point of install and rollback is covered deterministically and the expected outcome
  (old before the active.json replace, new from it on) is asserted exactly;
- random delays: the child installs v2..v6 in a row and the parent SIGKILLs it at a random time;
  the reopened store must hold one whole state of that sequence.
After every kill the store is reopened (recovery), every active pack must load and carry its
own version in every array, no leftovers may remain, and a further install must work.
"""

import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kaizen.runtime.keys import TrustedKeys, generate_signing_key, save_signing_key
from kaizen.runtime.store import PackStore
from kaizen.runtime.testpacks import write_test_pack

FP = "fault-base"
INSTALL_STEPS_OLD = ["begin", "staging_created", "mid_member_write", "staged", "verified", "probed",
                     "renamed", "mid_active_write", "active_tmp_written"]
INSTALL_STEPS_NEW = ["active_replaced", "swapped", "pruned"]
ROLLBACK_STEPS_OLD = ["rollback_mid_active_write", "rollback_active_tmp_written"]
ROLLBACK_STEPS_NEW = ["rollback_active_replaced", "rollback_pruned"]

CHILD = f"""
import os, signal, sys
from kaizen.runtime import store_disk
from kaizen.runtime.keys import TrustedKeys
from kaizen.runtime.store import PackStore
root, trust, fault, action, *args = sys.argv[1:]
if fault:  # the test-only hook: SIGKILL this process when the store reaches that step
    store_disk.set_fault_hook(lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == fault else None)
store = PackStore(root, TrustedKeys.from_paths([trust]), {FP!r})
print("ready", flush=True)
if action == "install":
    for path in args:
        store.install(path)
else:
    store.rollback(args[0])
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-packs")
    sk = generate_signing_key()
    _, pub = save_signing_key(sk, folder / "keys", "trainer")
    packs = {}
    for v in range(1, 8):
        packs[v] = folder / f"pick-{v}.kpk"
        write_test_pack(packs[v], "pick", v, sk, base_fingerprint=FP, marker=float(v), golden=2)
    bend = folder / "bend-1.kpk"
    write_test_pack(bend, "bend", 1, sk, base_fingerprint=FP, marker=1.0)
    return {"trusted": TrustedKeys([sk]), "pub": pub, "packs": packs, "bend": bend}


def fresh_store(root, env, pick_versions):
    with PackStore(root, env["trusted"], FP) as store:
        store.install(env["bend"])
        for v in pick_versions:
            store.install(env["packs"][v])


def spawn(root, env, action, args, fault=None):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(env["pub"]), fault or "", action,
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def reopen_and_check(root, env):
    """Recover the store; return {task: (version, previous)} after checking it is whole and usable."""
    with PackStore(root, env["trusted"], FP) as store:
        active = store.active()
        for task, p in active.items():
            v = p.manifest.version
            assert (p.prompt == v).all() and (p.text_emb == v).all()
            assert all((a == v).all() for a in p.lora.values())
            assert int(np.argmax(p.key)) == v % p.key.shape[0]
            assert len(p.golden) == (2 if task == "pick" else 1)
        state = {e["task"]: (e["version"], e["previous"]) for e in store.list()}
        assert not list((root / "staging").iterdir())
        assert not (root / "active.json.tmp").exists()
        for task, (v, prev) in state.items():
            on_disk = sorted(int(p.name) for p in (root / "packs" / task).iterdir())
            assert on_disk == sorted(x for x in (v, prev) if x is not None)
        assert sorted(p.name for p in (root / "packs").iterdir()) == sorted(state)
    return state


def assert_still_installs(root, env):
    with PackStore(root, env["trusted"], FP) as store:
        store.install(env["packs"][7])
        assert store.active()["pick"].manifest.version == 7


@pytest.mark.parametrize("step", INSTALL_STEPS_OLD + INSTALL_STEPS_NEW)
def test_kill_at_each_install_step(tmp_path, env, step):
    root = tmp_path / "store"
    fresh_store(root, env, [1])
    child = spawn(root, env, "install", [env["packs"][2]], fault=step)
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, (out, err)
    assert "done" not in out
    expected = (1, None) if step in INSTALL_STEPS_OLD else (2, 1)
    assert reopen_and_check(root, env) == {"pick": expected, "bend": (1, None)}
    assert_still_installs(root, env)


@pytest.mark.parametrize("step", ROLLBACK_STEPS_OLD + ROLLBACK_STEPS_NEW)
def test_kill_at_each_rollback_step(tmp_path, env, step):
    root = tmp_path / "store"
    fresh_store(root, env, [1, 2])
    child = spawn(root, env, "rollback", ["pick"], fault=step)
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, (out, err)
    expected = (2, 1) if step in ROLLBACK_STEPS_OLD else (1, None)
    assert reopen_and_check(root, env) == {"pick": expected, "bend": (1, None)}
    assert_still_installs(root, env)


def test_a_step_hook_that_is_not_set_kills_nothing(tmp_path, env):
    root = tmp_path / "store"
    fresh_store(root, env, [1])
    child = spawn(root, env, "install", [env["packs"][2]])
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0 and "done" in out, err
    assert reopen_and_check(root, env)["pick"] == (2, 1)


def kill_at_random(root, env, rng, max_delay):
    """One round: child installs v2..v6; SIGKILL after a random delay once it is ready."""
    fresh_store(root, env, [1])
    child = spawn(root, env, "install", [env["packs"][v] for v in range(2, 7)])
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, max_delay))
        child.send_signal(signal.SIGKILL)
    finally:
        child.communicate(timeout=60)
    state = reopen_and_check(root, env)
    version, previous = state["pick"]
    assert 1 <= version <= 6 and previous == (version - 1 if version > 1 else None)
    assert state["bend"] == (1, None)
    return version


def _install_time(tmp_path, env):
    """Seconds one install takes here, to spread the random kills over the install window."""
    with PackStore(tmp_path / "timing", env["trusted"], FP) as store:
        start = time.perf_counter()
        for v in range(1, 4):
            store.install(env["packs"][v])
        return (time.perf_counter() - start) / 3


def test_kill_at_random_times(tmp_path, env):
    rng = random.Random(1234)
    window = 5 * _install_time(tmp_path, env)
    seen = [kill_at_random(tmp_path / f"s{i}", env, rng, window) for i in range(10)]
    assert all(1 <= v <= 6 for v in seen)


@pytest.mark.slow
def test_kill_at_random_times_many_rounds(tmp_path, env):
    rng = random.Random(99)
    window = 5 * _install_time(tmp_path, env)
    seen = []
    for i in range(200):
        root = tmp_path / f"s{i}"
        seen.append(kill_at_random(root, env, rng, window))
        if i % 10 == 0:
            assert_still_installs(root, env)
    assert len(set(seen)) >= 3, seen  # the kills landed at different points of the sequence
