"""`kaizen station serve`: the station process: inference endpoint, admin channel, metrics and
the fleet link (runtime/daemon.py), with SIGTERM to stop and SIGHUP to reload the trusted keys.

    kaizen station serve --config station.toml [--no-hub]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from .daemon import StationDaemon
from .daemon_state import FleetLink, base_fingerprint_of, keys_folder_state
from .errors import KaizenError
from .keys import TrustedKeys

log = logging.getLogger("kaizen.daemon")


def cli_serve(argv: list[str]) -> int:
    """`kaizen station serve --config station.toml`: inference endpoint + fleet link."""
    from .config import load_station_config
    from .daemon_state import station_from_config
    from .endpoint import InferenceServer

    parser = argparse.ArgumentParser(prog="kaizen station serve", description=cli_serve.__doc__)
    parser.add_argument("--config", required=True, type=Path, help="station.toml")
    parser.add_argument("--no-hub", action="store_true", help="serve from the local store only")
    args = parser.parse_args(argv)
    cfg = load_station_config(args.config)
    from .logs import setup_logging
    from .station_metrics import serve_station_metrics

    setup_logging(cfg.log_format)   # plain, or one JSON object per line
    station = station_from_config(cfg)
    capture = getattr(station, "capture", None)   # the CaptureQueue of [capture] (None: off)
    server = InferenceServer(station, cfg.inference_endpoint)
    metrics = serve_station_metrics(cfg, station, server)   # Prometheus on metrics_listen; None when off
    server.start()
    from .admin import AdminServer  # rollback / install for this user only (never tcp)

    admin = AdminServer(station, cfg.admin_endpoint).start()
    print(f"station {cfg.station_id}: inference on {server.endpoint}; admin on {admin.endpoint}; "
          f"hub {cfg.hub_endpoint}", flush=True)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    reload = threading.Event()   # SIGHUP: reload the trusted keys now (file changes are also seen)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda *_: reload.set())
    try:
        if args.no_hub:
            state = keys_folder_state(cfg.trusted_keys_dir)
            while not stop.wait(1.0):
                if reload.is_set() or keys_folder_state(cfg.trusted_keys_dir) != state:
                    reload.clear()
                    state = keys_folder_state(cfg.trusted_keys_dir)
                    try:
                        log.info("trusted keys reloaded: %s", station.reload_keys(TrustedKeys.from_dir(cfg.trusted_keys_dir)))
                    except KaizenError as err:
                        log.error("trusted keys not reloaded, still using the previous ones: %s", err)
        else:
            link = FleetLink.from_config(cfg, base_fingerprint_of(station))
            daemon = StationDaemon(link, station, serving=lambda: True, capture=capture)   # uploads it
            if metrics is not None:
                metrics.watch_link(daemon)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGHUP, lambda *_: daemon.reload_keys())
            daemon.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        admin.stop()
        if capture is not None:
            capture.close()   # what is still queued in memory is written before the process exits
        if metrics is not None:
            metrics.stop()
    print(json.dumps({"station": cfg.station_id, "stopped": True}))
    return 0
