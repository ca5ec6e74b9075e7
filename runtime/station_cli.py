"""Station commands: `kaizen infer`, `kaizen station status|rollback|install`.

    kaizen infer --bundle B --packs STORE --trust KEYS --image part.png --ask "Is the seal torn?"
    kaizen infer --endpoint ipc:///run/kaizen/station.ipc --image part.png --ask "..."
    kaizen station status --config station.toml     # asks the running station, else reads the store
    kaizen station rollback TASK --config station.toml
    kaizen station install PACK.kpk --config station.toml   # same checks as a delivered pack

A running station holds its store's lock, so status goes through its inference endpoint and
rollback / install through its local admin channel (runtime/admin.py: a private ipc socket,
the station's own user only); with no station running they open the store directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, ProtocolError


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
        return
    for key, value in obj.items():
        print(f"{key:>14}: {value if not isinstance(value, (dict, list)) else json.dumps(value, default=str)}")


def cli_infer(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kaizen infer", description="answer one image + instruction")
    ap.add_argument("--image", required=True, help="PNG/JPEG file of the part")
    ap.add_argument("--ask", required=True, help="the instruction, e.g. 'Is the seal torn?'")
    ap.add_argument("--task", help="skip selection and use this task's pack")
    ap.add_argument("--endpoint", help="a running station's inference endpoint (ipc:// or tcp://127.0.0.1)")
    ap.add_argument("--bundle", help="base bundle folder (local mode)")
    ap.add_argument("--packs", help="pack store folder (local mode)")
    ap.add_argument("--trust", action="append", default=[], help="trusted signing public key file or folder")
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    image = Path(a.image)
    if a.endpoint:
        from .endpoint import InferenceClient

        with InferenceClient(a.endpoint, timeout_ms=30000) as client:
            result = client.infer(image, a.ask, task=a.task)
    else:
        if not (a.bundle and a.packs and a.trust):
            raise ConfigError("local mode needs --bundle, --packs and --trust (or give --endpoint)")
        from .station import Station

        station = Station(a.bundle, a.packs, _trusted(a.trust), threshold=a.threshold)
        try:
            result = station.infer(image.read_bytes() if image.exists() else image, a.ask, task=a.task)
        finally:
            station.close()
    _print(result, a.json)
    return 0 if result.get("outcome", "answered") == "answered" else 3


def _trusted(paths):
    from .keys import TrustedKeys

    return TrustedKeys.from_paths([Path(p) for p in paths])


def _config(path: str):
    from .config import load_station_config

    return load_station_config(path)


def cli_status(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kaizen station status", description="a station's packs and health")
    ap.add_argument("--config", required=True, help="station.toml")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    cfg = _config(a.config)
    from .endpoint import InferenceClient

    try:
        with InferenceClient(cfg.inference_endpoint, timeout_ms=2000) as client:
            status = dict(client.status(), running=True)
    except ProtocolError:
        status = {"running": False, "packs": _offline_packs(cfg)}
    _print(status, a.json)
    return 0 if status["running"] else 3  # 3: not running (the store was read directly)


def _offline_packs(cfg) -> list[dict]:
    from . import RUNTIME_VERSION
    from .bundle import Bundle
    from .keys import TrustedKeys
    from .store import PackStore

    bundle = Bundle.open(cfg.bundle_dir, verify=False)
    with PackStore(cfg.store_dir, TrustedKeys.from_dir(cfg.trusted_keys_dir), bundle.fingerprint,
                   RUNTIME_VERSION) as store:
        return store.list()


def _admin_running(cfg) -> bool:
    """Whether the station answers on its admin channel within 2 s (no socket file: no)."""
    from .admin import AdminClient, check_admin_endpoint

    if not check_admin_endpoint(cfg.admin_endpoint).exists():
        return False
    try:
        with AdminClient(cfg.admin_endpoint, timeout_ms=2000) as client:
            client.status()
        return True
    except ProtocolError:
        return False


def _admin_or_store(cfg, what: str, remote, local) -> dict:
    """Run `remote(AdminClient)` on a running station, else `local(Station)` on its store."""
    if _admin_running(cfg):
        from .admin import AdminClient

        with AdminClient(cfg.admin_endpoint, timeout_ms=120000) as client:
            return remote(client)
    from .daemon_state import station_from_config

    print(f"station not running: {what} in its store directly", file=sys.stderr)
    station = station_from_config(cfg)
    try:
        m = local(station)
    finally:
        station.close()
    return {"task_id": m.task_id, "version": m.version}


def cli_rollback(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kaizen station rollback", description="return a task to its previous pack")
    ap.add_argument("task", help="task id")
    ap.add_argument("--config", required=True, help="station.toml")
    a = ap.parse_args(argv)
    result = _admin_or_store(_config(a.config), "rolling back", lambda c: c.rollback(a.task),
                             lambda st: st.rollback(a.task))
    print(f"{result['task_id']} is now at version {result['version']}")
    return 0


def cli_install(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kaizen station install",
                                 description="install a .kpk file on this station (signature, base, "
                                             "version and golden-probe checks of a delivered pack)")
    ap.add_argument("pack", type=Path, help="the .kpk file (on this machine)")
    ap.add_argument("--config", required=True, help="station.toml")
    a = ap.parse_args(argv)
    if not a.pack.is_file():
        raise ConfigError(f"{a.pack}: no such pack file")
    pack = a.pack.resolve()
    result = _admin_or_store(_config(a.config), "installing", lambda c: c.install(pack),
                             lambda st: st.install(pack))
    print(f"{result['task_id']} is now at version {result['version']}")
    return 0
