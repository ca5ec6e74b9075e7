"""The hub's commands: `kaizen hub serve|publish|unpublish|rollback|promote`, `kaizen fleet status`.

    kaizen hub serve --config hub.toml                    # run the hub (Ctrl-C to stop; SIGHUP
                                                          # or editing hub.toml reloads the allow-list)
    kaizen hub publish pick-3.kpk --to 'line1/*' --config hub.toml   # or --to @group; works live
    kaizen hub publish pick-3.kpk --to 'line1/*' --canary 1 --config hub.toml  # or --canary-group G
    kaizen hub promote pick --config hub.toml             # canaries activated it: release to the rest
    kaizen hub rollback pick --to 2 [--to-group line1] --config hub.toml
    kaizen hub unpublish pick[@3] --config hub.toml
    kaizen fleet status --config hub.toml [--json [--all]]
    kaizen hub samples list [--task T] [--json] --config hub.toml          # captured parts at the hub
    kaizen hub samples export --task T|--unmatched|--all --out DIR [--labelled-only|--unlabelled-only] --config hub.toml
    kaizen hub samples import labelled.json --config hub.toml              # labels (and tasks) by sample id

A refused operation (HubOpError, ConfigError) exits 1 with a message saying what to do.
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

from .catalog import catalogue_pack, fleet_status, fleet_summary, format_status
from .config import load_hub_config
from .db import HubDB
from .fleet_ops import parse_task_ref, promote, rollback, rollout_progress, start_rollout, unpublish
from .samples import SampleLimits, SampleStore
from .samples_io import export_samples, import_labels
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
    canary = parser.add_mutually_exclusive_group()
    canary.add_argument("--canary", type=int, metavar="N", help="staged: the first N stations of the target "
                        "(by id) get it first; `kaizen hub promote TASK` releases it to the rest")
    canary.add_argument("--canary-group", metavar="G", help="staged: the target's stations in group G get it first")
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
        if args.canary is None and args.canary_group is None:
            db.publish(args.to, rec.name)
            canaries = None
        else:
            canaries = start_rollout(db, config, rec.name, args.to, canary=args.canary, canary_group=args.canary_group)
    finally:
        db.close()
    print(f"published {rec.name} (task {rec.task_id} v{rec.version}, {rec.size} bytes) "
          f"to {len(targets)} station(s): {', '.join(targets)}")
    if canaries is not None:
        print(f"canary rollout: {', '.join(canaries)} first; the rest after `kaizen hub promote {rec.task_id}` "
              "(held automatically if a canary rejects it)")
    return 0


def _open(args):
    config = load_hub_config(args.config)
    return config, HubDB(config.db_path)


def cli_unpublish(argv: list[str]) -> int:
    """`kaizen hub unpublish TASK[@VERSION] --config hub.toml`: take a task (or one version) back."""
    parser = argparse.ArgumentParser(prog="kaizen hub unpublish", description=cli_unpublish.__doc__ +
                                     " Stations running that version go back to the newest one still published;"
                                     " with no version left they stop serving the task.")
    parser.add_argument("task", help="TASK (every version) or TASK@VERSION")
    _config_arg(parser)
    args = parser.parse_args(argv)
    task, version = parse_task_ref(args.task)
    _, db = _open(args)
    try:
        names = unpublish(db, task, version)
    finally:
        db.close()
    print(f"unpublished {', '.join(names)}; stations follow at their next heartbeat")
    return 0


def cli_rollback(argv: list[str]) -> int:
    """`kaizen hub rollback TASK --to VERSION [--to-group G] --config hub.toml`: fleet rollback."""
    parser = argparse.ArgumentParser(prog="kaizen hub rollback", description=cli_rollback.__doc__ +
                                     " Stations targeted by TASK go back to VERSION (their store's previous"
                                     " version); publishing a newer version moves them on again.")
    parser.add_argument("task")
    parser.add_argument("--to", required=True, type=int, metavar="VERSION", help="the version to go back to")
    parser.add_argument("--to-group", metavar="G", help="only the stations of group G")
    _config_arg(parser)
    args = parser.parse_args(argv)
    config, db = _open(args)
    if args.to_group is not None and not config.resolve_targets("@" + args.to_group):
        db.close()
        raise ConfigError(f"{config.source}: group {args.to_group!r} has no station")
    try:
        name = rollback(db, args.task, args.to, "*" if args.to_group is None else "@" + args.to_group)
    finally:
        db.close()
    print(f"rolling {args.task} back to v{args.to} ({name}) on "
          f"{'every station it is published to' if args.to_group is None else 'group ' + args.to_group}")
    return 0


def cli_promote(argv: list[str]) -> int:
    """`kaizen hub promote TASK[@VERSION] [--force] --config hub.toml`: release a canary rollout."""
    parser = argparse.ArgumentParser(prog="kaizen hub promote", description=cli_promote.__doc__ +
                                     " Refused while the rollout is held (a canary rejected it) or a canary has"
                                     " not activated it yet, unless --force.")
    parser.add_argument("task", help="TASK or TASK@VERSION")
    parser.add_argument("--force", action="store_true", help="promote even if held or canaries are not done")
    _config_arg(parser)
    args = parser.parse_args(argv)
    task, version = parse_task_ref(args.task)
    _, db = _open(args)
    try:
        name = promote(db, task, version, force=args.force)
        progress = rollout_progress(db, name)
    finally:
        db.close()
    print(f"promoted {name} (canaries: {', '.join(f'{s} {st}' for s, st in progress['canary_states'].items())}); "
          "the rest of its target gets it now")
    return 0


def cli_status(argv: list[str]) -> int:
    """`kaizen fleet status --config hub.toml [--json]`: per-station delivery state."""
    parser = argparse.ArgumentParser(prog="kaizen fleet status", description=cli_status.__doc__)
    _config_arg(parser)
    parser.add_argument("--json", action="store_true", help="print JSON (the per-station list) instead of a table")
    parser.add_argument("--all", action="store_true", help="with --json: {stations, groups, rollouts}")
    args = parser.parse_args(argv)
    config = load_hub_config(args.config)
    db = HubDB(config.db_path)
    try:
        rows = fleet_status(db, config)
        summary = fleet_summary(db, config, rows)
    finally:
        db.close()
    if args.json:
        print(json.dumps({"stations": rows, **summary} if args.all else rows, indent=2))
    else:
        print(format_status(rows, summary))
    return 0


def _samples_store(config) -> SampleStore:
    return SampleStore(config.samples_dir, SampleLimits(config.samples_max_sample_bytes,
                                                        config.samples_max_total_bytes,
                                                        config.samples_max_partial_per_station))


def _format_samples(rows: list[dict]) -> str:
    import time

    by_task: dict[str, list[int]] = {}
    lines = [f"{'sample':<14}{'task':<16}{'reason':<16}{'station':<14}{'captured (UTC)':<21}label"]
    for r in rows:
        counts = by_task.setdefault(r["task"], [0, 0])
        counts[r["label"] is None] += 1
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["captured_at"]))
        label = "-" if r["label"] is None else f"{r['label'][:30]} ({r['label_source']})"
        lines.append(f"{r['sample_id'][:12]:<14}{r['task'][:15]:<16}{r['reason']:<16}{r['station_id'][:13]:<14}"
                     f"{when:<21}{label}")
    lines.append("")
    lines += [f"{task}: {n} labelled, {u} unlabelled" for task, (n, u) in sorted(by_task.items())] or ["no samples"]
    return "\n".join(lines)


def cli_samples(argv: list[str]) -> int:
    """`kaizen hub samples list|export|import ... --config hub.toml`: captured parts at the hub."""
    parser = argparse.ArgumentParser(prog="kaizen hub samples", description=cli_samples.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list stored samples (per task counts at the end)")
    ls.add_argument("--task", help="only this task (\"unmatched\": parts no task matched)")
    ls.add_argument("--json", action="store_true", help="print the rows as JSON")
    ex = sub.add_parser("export", help="write DIR/data.json (LLaVA JSON) and DIR/images/ for labelling")
    which = ex.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="the samples of this task")
    which.add_argument("--unmatched", action="store_true", help="the samples no task matched")
    which.add_argument("--all", action="store_true", help="every sample")
    ex.add_argument("--out", required=True, type=Path, help="output folder")
    lab = ex.add_mutually_exclusive_group()
    lab.add_argument("--labelled-only", action="store_true", help="only samples with a label")
    lab.add_argument("--unlabelled-only", action="store_true", help="only samples without a label")
    im = sub.add_parser("import", help="set labels (gpt turn) and tasks (kaizen.task) by sample id")
    im.add_argument("file", type=Path, help="a labelled copy of an exported data.json")
    for p in (ls, ex, im):
        _config_arg(p)
    args = parser.parse_args(argv)
    store = _samples_store(load_hub_config(args.config))
    try:
        if args.command == "list":
            rows = store.rows(task=args.task)
            print(json.dumps(rows, indent=2) if args.json else _format_samples(rows))
        elif args.command == "export":
            labelled = True if args.labelled_only else (False if args.unlabelled_only else None)
            n = export_samples(store, args.out, task=args.task, unmatched=args.unmatched, labelled=labelled)
            print(f"exported {n} sample(s) to {args.out / 'data.json'} (images in {args.out / 'images'})")
        else:
            summary = import_labels(store, args.file)
            print(f"imported {args.file}: {summary['labelled']} labelled, {summary['moved']} moved to another "
                  f"task, {summary['unchanged']} unchanged")
    finally:
        store.close()
    return 0
