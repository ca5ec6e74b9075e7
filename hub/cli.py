"""The hub's commands: `kaizen hub serve`, `kaizen hub publish`, `kaizen fleet status`.

    kaizen hub serve --config hub.toml                    # run the hub (Ctrl-C to stop; SIGHUP
                                                          # or editing hub.toml reloads the allow-list)
    kaizen hub publish pick-3.kpk --to 'line1/*' --config hub.toml   # or --to @group; works live
    kaizen fleet status --config hub.toml [--json]
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from kaizen.runtime.errors import ConfigError
from kaizen.runtime.keys import TrustedKeys
from kaizen.runtime.logs import setup_logging

from .catalog import catalogue_pack, fleet_status, format_status
from .config import load_hub_config
from .db import HubDB
from .server import Hub
from .status_page import start_observers



def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="hub.toml")


def cli_serve(argv: list[str]) -> int:
    """`kaizen hub serve --config hub.toml`: run the hub until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(prog="kaizen hub serve", description=cli_serve.__doc__)
    _config_arg(parser)
    args = parser.parse_args(argv)
    config = load_hub_config(args.config)
    setup_logging(config.log_format)   # plain, or one JSON object per line
    hub = Hub(config)
    observers = start_observers(hub)   # Prometheus on metrics_listen, status page on status_listen
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: hub.request_reload())
    print(f"hub serving on {hub.config.bind} (announce {hub.config.pub_bind}), "
          f"{len(hub.config.stations)} allow-listed stations", flush=True)
    try:
        hub.serve(stop)
    except KeyboardInterrupt:
        stop.set()
    finally:
        for server in observers:
            server.stop()
    return 0


def cli_publish(argv: list[str]) -> int:
    """`kaizen hub publish PACK.kpk --to TARGET --config hub.toml` (TARGET: glob over ids, or @group)."""
    parser = argparse.ArgumentParser(prog="kaizen hub publish", description=cli_publish.__doc__)
    parser.add_argument("pack", type=Path, help="the .kpk file to publish")
    parser.add_argument("--to", required=True, help="station id glob such as 'line1/*', or @group")
    _config_arg(parser)
    args = parser.parse_args(argv)
    config = load_hub_config(args.config)
    targets = config.resolve_targets(args.to)
    if not targets:
        raise ConfigError(f"{config.source}: --to {args.to!r} matches no allow-listed station "
                          f"(known: {', '.join(config.station_ids()) or 'none'})")
    trusted = TrustedKeys.from_dir(config.trusted_keys_dir) if config.trusted_keys_dir else None
    db = HubDB(config.db_path)
    try:
        rec = catalogue_pack(db, config.packs_dir, args.pack, trusted)
        db.publish(args.to, rec.name)
    finally:
        db.close()
    print(f"published {rec.name} (task {rec.task_id} v{rec.version}, {rec.size} bytes) "
          f"to {len(targets)} station(s): {', '.join(targets)}")
    return 0


def cli_status(argv: list[str]) -> int:
    """`kaizen fleet status --config hub.toml [--json]`: per-station delivery state."""
    parser = argparse.ArgumentParser(prog="kaizen fleet status", description=cli_status.__doc__)
    _config_arg(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    config = load_hub_config(args.config)
    db = HubDB(config.db_path)
    try:
        rows = fleet_status(db, config)
    finally:
        db.close()
    print(json.dumps(rows, indent=2) if args.json else format_status(rows))
    return 0
