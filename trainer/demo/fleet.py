"""The demo's fleet on loopback: keys, configs, a hub and N stations as separate processes.

    with DemoFleet(work / "fleet", bundle_dir, n_stations=3) as fleet:   # starts, waits until ready
        fleet.publish(pack_path)                                         # `kaizen hub publish`
        fleet.wait_activated(pack_name, timeout=120)                     # polls the hub's SQLite
        fleet.client(0).infer(png_bytes, "Is the seal torn?")            # station 0's endpoint

Processes run `python -m kaizen.runtime.cli hub serve|station serve` in their own session and
are stopped (SIGTERM, then SIGKILL) on exit, on Ctrl-C and when the demo dies; a second demo run
reuses the keys, the hub database and the stations' stores in `work`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kaizen.hub.catalog import catalogue_pack
from kaizen.hub.db import HubDB
from kaizen.hub.fleet_sim import free_ports
from kaizen.runtime.endpoint import InferenceClient
from kaizen.runtime.errors import KaizenError
from kaizen.runtime.keys import generate_curve_keypair, generate_signing_key, save_signing_key

SIGNER = "demo-signer"




def _keys(keys: Path, n: int) -> None:
    """Hub + station CURVE key pairs and the pack signing key, made once."""
    keys.mkdir(parents=True, exist_ok=True)
    if not (keys / "hub.key").exists():
        generate_curve_keypair(keys, "hub")
    for i in range(n):
        if not (keys / f"station-{i}.key").exists():
            generate_curve_keypair(keys, f"station-{i}")
    if not (keys / "trusted" / f"{SIGNER}.ed25519.pub").exists():
        (keys / "trusted").mkdir(exist_ok=True)
        _priv, pub = save_signing_key(generate_signing_key(), keys, SIGNER)
        (keys / "trusted" / pub.name).write_bytes(pub.read_bytes())


def station_id(i: int) -> str:
    return f"line{1 + i % 2}/station-{i:02d}"


class DemoFleet:
    def __init__(self, work: Path, bundle_dir: Path, n_stations: int = 3, log=print):
        self.work, self.bundle, self.n, self.log = Path(work), Path(bundle_dir), n_stations, log
        self.procs: list[subprocess.Popen] = []
        self.hub_port, self.pub_port, self.status_port, self.metrics_port = free_ports(4)
        self.status_url = f"http://127.0.0.1:{self.status_port}/"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.signing_key = self.work / "keys" / f"{SIGNER}.ed25519.key"
        self.endpoints = [f"ipc://{self.work / f'station-{i}.ipc'}" for i in range(n_stations)]
        # the stations' private socket folders: short (a unix socket path has at most 107 bytes,
        # which a deep --work folder would exceed), 0700 from mkdtemp, removed at stop()
        self.run_root = Path(tempfile.mkdtemp(prefix="kaizen-demo-"))

    # --- files ----------------------------------------------------------------------------------
    def write_configs(self) -> None:
        w = self.work
        _keys(w / "keys", self.n)
        allow = "".join(f'\n[[stations]]\nid = "{station_id(i)}"\npublic_key_file = "keys/station-{i}.pub"\n'
                        f'groups = ["line{1 + i % 2}", "demo"]\n' for i in range(self.n))
        (w / "hub.toml").write_text(
            f'bind = "tcp://127.0.0.1:{self.hub_port}"\npub_bind = "tcp://127.0.0.1:{self.pub_port}"\n'
            'public_key_file = "keys/hub.pub"\nsecret_key_file = "keys/hub.key"\npacks_dir = "hub/packs"\n'
            f'db_path = "hub/hub.sqlite"\nstatus_listen = "127.0.0.1:{self.status_port}"\n'
            f'metrics_listen = "127.0.0.1:{self.metrics_port}"\n{allow}')
        for i in range(self.n):
            (w / f"station-{i}.toml").write_text(
                f'station_id = "{station_id(i)}"\nhub_endpoint = "tcp://127.0.0.1:{self.hub_port}"\n'
                f'hub_announce_endpoint = "tcp://127.0.0.1:{self.pub_port}"\n'
                f'hub_public_key_file = "keys/hub.pub"\npublic_key_file = "keys/station-{i}.pub"\n'
                f'secret_key_file = "keys/station-{i}.key"\nbundle_dir = "{self.bundle.resolve()}"\n'
                f'store_dir = "stations/{i}/store"\ntrusted_keys_dir = "keys/trusted"\n'
                f'state_dir = "stations/{i}/fleet"\ninference_endpoint = "{self.endpoints[i]}"\n'
                # every test part is one of the stream's: answered, so the stations can be compared
                # with the trainer part by part (no-match is measured by bench/selection.py)
                f'runtime_dir = "{self.run_root / f"s{i}"}"\n'
                'threshold = 0.0\ncalibrated_threshold = false\ntop_k = 0\nheartbeat_s = 1.0\nhub_timeout_s = 5.0\n')
        (w / "hub").mkdir(exist_ok=True)

    # --- processes ------------------------------------------------------------------------------
    def _spawn(self, args: list[str], name: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", KAIZEN_PROGRESS="0", OMP_NUM_THREADS="1")
        with open(self.work / f"{name}.log", "ab") as log:  # the child keeps its own copy of the fd
            proc = subprocess.Popen([sys.executable, "-m", "kaizen.runtime.cli", *args], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.work)
        self.procs.append(proc)

    def start(self) -> DemoFleet:
        self.write_configs()
        atexit.register(self.stop)
        self._spawn(["hub", "serve", "--config", "hub.toml"], "hub")
        for i in range(self.n):
            self._spawn(["station", "serve", "--config", f"station-{i}.toml"], f"station-{i}")
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for i, ep in enumerate(self.endpoints):
            while True:
                self.check_alive()
                try:
                    with InferenceClient(ep, timeout_ms=1000) as c:
                        c.status()
                    break
                except KaizenError:
                    if time.monotonic() > deadline:
                        raise KaizenError(f"station {i} did not start within {timeout:.0f}s; see "
                                          f"{self.work / f'station-{i}.log'}") from None
        self.log(f"fleet up: hub on 127.0.0.1:{self.hub_port}, {self.n} stations ({', '.join(map(station_id, range(self.n)))})")

    def check_alive(self) -> None:
        names = ["hub"] + [f"station-{i}" for i in range(self.n)]
        for name, p in zip(names, self.procs):
            if p.poll() is not None:
                raise KaizenError(f"{name} exited with code {p.returncode}; see {self.work / (name + '.log')}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        self.procs = []
        shutil.rmtree(self.run_root, ignore_errors=True)

    def __enter__(self) -> DemoFleet:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- operations -----------------------------------------------------------------------------
    def publish(self, pack: Path, target: str = "@demo") -> str:
        db = HubDB(self.work / "hub" / "hub.sqlite")
        try:
            rec = catalogue_pack(db, self.work / "hub" / "packs", pack)
            db.publish(target, rec.name)
        finally:
            db.close()
        return rec.name

    def states(self, pack_name: str) -> dict[str, str]:
        db = HubDB(self.work / "hub" / "hub.sqlite")
        try:
            return {station_id(i): (db.delivery(station_id(i), pack_name) or {}).get("state", "pending")
                    for i in range(self.n)}
        finally:
            db.close()

    def wait_activated(self, pack_name: str, timeout: float = 180.0) -> dict[str, float]:
        """Poll until every station reports `activated`; return seconds to activation per station."""
        start, done = time.monotonic(), {}
        while len(done) < self.n:
            self.check_alive()
            for sid, state in self.states(pack_name).items():
                if state == "activated" and sid not in done:
                    done[sid] = time.monotonic() - start
                elif state == "rejected":
                    raise KaizenError(f"{sid} rejected {pack_name}; see the station logs in {self.work}")
            if time.monotonic() - start > timeout:
                raise KaizenError(f"{pack_name} not activated everywhere within {timeout:.0f}s: {self.states(pack_name)}")
            time.sleep(0.1)
        return done

    def client(self, i: int, timeout_ms: int = 30000) -> InferenceClient:
        return InferenceClient(self.endpoints[i], timeout_ms=timeout_ms)
