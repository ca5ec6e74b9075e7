"""A whole fleet on loopback in one process: a hub and N station daemons (threads), with faults.

Used by tests/test_fleet*.py and by the delivery benchmark (bench/). No torch:

    from kaizen.hub.fleet_sim import FleetFaults, run_fleet
    result = run_fleet(10, pack_paths, trusted_keys, base_fingerprint="fp",
                       faults=FleetFaults(corrupt_fraction=0.05, disconnect_prob=0.02), deadline=60)
    result.all_activated, result.bytes_sent, result.seconds, result.activation_s

Lower level, `Fleet(root, n_stations, ...)` builds the keys, configs and folders, and lets a test
start/stop the hub (same DB, same port) and stations one by one.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kaizen.runtime.daemon import FleetLink, StationDaemon
from kaizen.runtime.keys import TrustedKeys, generate_curve_keypair, load_curve_keypair, load_curve_public
from kaizen.runtime.store import PackStore

from .catalog import catalogue_pack, fleet_status
from .config import AllowedStation, HubConfig
from .db import HubDB
from .server import Hub, HubFaults


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: every socket stays bound until all are picked (two calls of a
    one-port helper can return the same port once the first socket is closed: seen in CI)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@dataclass
class FleetFaults:
    corrupt_fraction: float = 0.0   # hub flips a byte in this share of chunks
    disconnect_prob: float = 0.0    # per station, per 0.1 s tick: close and reopen its DEALER
    seed: int = 0


class Fleet:
    """Keys, configs and folders for one hub and `n_stations` stations under `root`."""

    def __init__(self, root: Path, n_stations: int, trusted: TrustedKeys, base_fingerprint: str, *,
                 heartbeat_s: float = 0.2, hub_timeout_s: float = 2.0, credit: int = 4,
                 chunk_timeout_s: float = 1.0, chunk_size: int = 256 * 1024, groups=None):
        self.root = Path(root)
        self.trusted = trusted
        self.base_fingerprint = base_fingerprint
        keys = self.root / "keys"
        generate_curve_keypair(keys, "hub")
        self.station_ids = [f"line{1 + i % 2}/s{i:02d}" for i in range(n_stations)]
        allowed = []
        for i, sid in enumerate(self.station_ids):
            generate_curve_keypair(keys, f"station{i}")
            allowed.append(AllowedStation(sid, keys / f"station{i}.pub", list((groups or {}).get(sid, []))))
        port, pub_port = free_ports(2)
        self.hub_config = HubConfig(
            bind=f"tcp://127.0.0.1:{port}", pub_bind=f"tcp://127.0.0.1:{pub_port}",
            public_key_file=keys / "hub.pub", secret_key_file=keys / "hub.key",
            packs_dir=self.root / "hub" / "packs", db_path=self.root / "hub" / "hub.sqlite",
            stations=allowed, chunk_size=chunk_size)
        self.link_kwargs = {"heartbeat_s": heartbeat_s, "hub_timeout_s": hub_timeout_s, "credit": credit,
                            "chunk_timeout_s": chunk_timeout_s, "chunk_bytes": chunk_size}
        self.hub: Hub | None = None
        self.daemons: dict[str, StationDaemon] = {}
        self.stores: dict[str, PackStore] = {}

    # ------------------------------------------------------------ hub

    def start_hub(self, faults: HubFaults | None = None) -> Hub:
        assert self.hub is None, "hub already running"
        self.hub = Hub(self.hub_config, faults)
        self.hub.start()
        return self.hub

    def stop_hub(self) -> None:
        if self.hub is not None:
            self.hub.stop()
            self.hub = None

    def publish(self, pack_path: Path, target: str = "*") -> str:
        db = HubDB(self.hub_config.db_path)
        try:
            rec = catalogue_pack(db, self.hub_config.packs_dir, pack_path)
            db.publish(target, rec.name)
        finally:
            db.close()
        return rec.name

    def status(self) -> list[dict]:
        db = HubDB(self.hub_config.db_path)
        try:
            return fleet_status(db, self.hub_config)
        finally:
            db.close()

    # ------------------------------------------------------------ stations

    def link(self, index: int, **overrides) -> FleetLink:
        keys = self.root / "keys"
        public, secret = load_curve_keypair(keys / f"station{index}.key")
        kwargs = dict(station_id=self.station_ids[index], hub_endpoint=self.hub_config.bind,
                      hub_public_key=load_curve_public(keys / "hub.pub"), public_key=public, secret_key=secret,
                      state_dir=self.root / f"station{index}" / "fleet", base_fingerprint=self.base_fingerprint,
                      announce_endpoint=self.hub_config.pub_bind, **self.link_kwargs)
        kwargs.update(overrides)
        return FleetLink(**kwargs)

    def store(self, index: int) -> PackStore:
        sid = self.station_ids[index]
        if sid not in self.stores:
            self.stores[sid] = PackStore(self.root / f"station{index}" / "store", self.trusted, self.base_fingerprint)
        return self.stores[sid]

    def start_station(self, index: int, **link_overrides) -> StationDaemon:
        sid = self.station_ids[index]
        assert sid not in self.daemons, f"{sid} already running"
        daemon = StationDaemon(self.link(index, **link_overrides), self.store(index), keep_downloads=True)
        self.daemons[sid] = daemon.start()
        return daemon

    def stop_station(self, index: int) -> StationDaemon:
        daemon = self.daemons.pop(self.station_ids[index])
        daemon.stop()
        return daemon

    def installed(self, index: int) -> dict[str, int]:
        return {t: p.manifest.version for t, p in self.store(index).active().items()}

    def close(self) -> None:
        for sid in list(self.daemons):
            self.daemons.pop(sid).stop()
        self.stop_hub()
        for store in self.stores.values():
            store.close()
        self.stores.clear()


@dataclass
class FleetResult:
    all_activated: bool
    seconds: float
    bytes_sent: int                  # by the hub (retransmissions included)
    bytes_payload: int               # pack bytes x stations (what had to arrive)
    activation_s: dict = field(default_factory=dict)   # station -> {pack name: seconds after publish}
    chunks_corrupted: int = 0
    corrupt_detected: int = 0
    disconnects: int = 0
    status: list = field(default_factory=list)


def run_fleet(n_stations: int, packs: list[Path], trusted: TrustedKeys, *, base_fingerprint: str,
              faults: FleetFaults | None = None, deadline: float = 60.0, root: Path | None = None,
              **fleet_kwargs) -> FleetResult:
    """Publish `packs` to all of `n_stations` stations and run until every one activated them all
    (or `deadline` seconds passed). Returns timings, bytes and the hub's final status table."""
    import tempfile

    faults = faults or FleetFaults()
    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="kaizen-fleet-")
        root = Path(tmp.name)
    fleet = Fleet(root, n_stations, trusted, base_fingerprint, **fleet_kwargs)
    rng = random.Random(faults.seed)
    names = []
    try:
        fleet.start_hub(HubFaults(corrupt_fraction=faults.corrupt_fraction, seed=faults.seed))
        for i in range(n_stations):
            fleet.start_station(i)
        t0 = time.time()
        names = [fleet.publish(p, "*") for p in packs]
        disconnects = 0

        def done() -> bool:
            return all(set(names) <= set(d.stats.activated_at) for d in fleet.daemons.values())

        end = time.monotonic() + deadline
        while time.monotonic() < end and not done():
            for daemon in fleet.daemons.values():
                if rng.random() < faults.disconnect_prob:
                    daemon.disconnect()
                    disconnects += 1
            time.sleep(0.1)
        seconds = time.time() - t0
        # let the last reports reach the hub before reading its table
        wait_until(lambda: all(len(d.outbox) == 0 for d in fleet.daemons.values()), min(10.0, deadline))
        hub = fleet.hub
        assert hub is not None
        result = FleetResult(
            all_activated=done(), seconds=seconds, bytes_sent=hub.stats.bytes_sent,
            bytes_payload=n_stations * sum(Path(p).stat().st_size for p in packs),
            activation_s={sid: {n: round(t - t0, 3) for n, t in d.stats.activated_at.items()}
                          for sid, d in fleet.daemons.items()},
            chunks_corrupted=hub.stats.chunks_corrupted,
            corrupt_detected=sum(d.stats.chunks["corrupt"] for d in fleet.daemons.values()),
            disconnects=disconnects)
        fleet.close()
        result.status = fleet.status()
        return result
    finally:
        fleet.close()
        if tmp is not None:
            tmp.cleanup()


def make_test_packs(folder: Path, signing_key, tasks: list[tuple[str, int]], *, base_fingerprint: str,
                    layers: int = 8) -> list[Path]:
    """Signed packs of random arrays, about 35 KB x `layers` each (several chunks at 32 KiB)."""
    from kaizen.runtime.testpacks import write_test_pack

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (task, version) in enumerate(tasks):
        path = folder / f"{task}-{version}.kpk"
        write_test_pack(path, task, version, signing_key, base_fingerprint=base_fingerprint, seed=100 + i,
                        array_kwargs={"d_model": 256, "rank": 8, "layers": layers})
        out.append(path)
    return out


def write_hub_toml(fleet: Fleet, path: Path) -> Path:
    """The fleet's hub config as a hub.toml (for the CLI commands)."""
    c = fleet.hub_config
    lines = [f'bind = "{c.bind}"', f'pub_bind = "{c.pub_bind}"', f'public_key_file = "{c.public_key_file}"',
             f'secret_key_file = "{c.secret_key_file}"', f'packs_dir = "{c.packs_dir}"', f'db_path = "{c.db_path}"',
             f"chunk_size = {c.chunk_size}"]
    for st in c.stations:
        lines += ["", "[[stations]]", f'id = "{st.id}"', f'public_key_file = "{st.public_key_file}"',
                  f"groups = {list(st.groups)!r}".replace("'", '"')]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
