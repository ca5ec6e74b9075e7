"""Benchmark: pack delivery to N stations on loopback (issue 6), and the inference endpoint's
round-trip overhead over a direct Station.infer call.

    .venv/bin/python bench/delivery.py [--quick] [--stations 1,10,50] [--packs 8]

Delivery: hub/fleet_sim.run_fleet (one hub + N station daemons as threads in this process,
CURVE-encrypted ZeroMQ, per-chunk sha256, whole-file sha256, verify + install into each
station's PackStore) publishes `--packs` signed packs shaped for the tiny-llama bundle (rank-8
LoRA on every LoRA input, 10 prompt tokens, 1 golden sample: ~105 KB each) and runs until every
station activated all of them. Baseline, same run, same bytes: a plain TCP copy (one sender
thread per receiver, sendall of the same pack files, N receiver threads on 127.0.0.1, bytes
kept in memory: no hashing, no disk, no install). Then the same fleet with 5 % corrupted chunks
and random disconnects. Rate = pack bytes x stations / seconds from publish to all activated.
"Install-only floor": the same packs PackStore.install'ed into N fresh stores by N threads at
once, no network (verify + fsync'd staging + atomic switch), to show where the time goes.

Endpoint: the tiny-llama Station behind InferenceServer (tcp and ipc, loopback) vs station.infer
directly, interleaved request by request, same image (PNG bytes) and instruction; with ORT
intra-op threads 1, 0 (ORT default: all cores, spin-waiting workers) and 0 with spinning turned
off by a bench-side patch of onnxruntime.SessionOptions (no product change).
Prints Markdown tables and writes reports/bench/delivery.json.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

from common import (
    OUT,
    WORK,
    build_bundle_pack,
    bundle_lora_shapes,
    ensure_base,
    load,
    log,
    median,
    pct,
    write_report,
)

# ---------------------------------------------------------------- raw TCP baseline


def raw_tcp_copy(n_receivers: int, files: list[Path], timeout: float = 120.0) -> dict:
    """Copy the bytes of `files` to each of n receivers over plain TCP on 127.0.0.1."""
    blobs = [Path(f).read_bytes() for f in files]
    per_receiver = sum(len(b) for b in blobs)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(max(128, n_receivers))
    port = server.getsockname()[1]
    received = [0] * n_receivers
    errors = []
    go = threading.Event()

    def send_one(conn: socket.socket) -> None:
        try:
            with conn:
                for f in files:  # read from disk per connection, as the hub does per fetch
                    conn.sendall(Path(f).read_bytes())
        except OSError as err:
            errors.append(repr(err))

    def sender() -> None:
        threads = []
        for _ in range(n_receivers):
            conn, _ = server.accept()
            th = threading.Thread(target=send_one, args=(conn,))
            threads.append(th)
            th.start()
        for th in threads:
            th.join(timeout)

    def receiver(i: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
                go.wait(timeout)
                buf = bytearray(per_receiver)
                view = memoryview(buf)
                got = 0
                while got < per_receiver:
                    n = s.recv_into(view[got:], per_receiver - got)
                    if n == 0:
                        break
                    got += n
                received[i] = got
        except OSError as err:
            errors.append(repr(err))

    t_send = threading.Thread(target=sender)
    t_send.start()
    recvs = [threading.Thread(target=receiver, args=(i,)) for i in range(n_receivers)]
    t0 = time.perf_counter()
    for th in recvs:
        th.start()
    go.set()
    for th in recvs:
        th.join(timeout)
    seconds = time.perf_counter() - t0
    t_send.join(timeout)
    server.close()
    total = n_receivers * per_receiver
    return {"receivers": n_receivers, "bytes": total, "seconds": seconds, "bytes_per_s": total / seconds,
            "complete": sum(received) == total and not errors, "errors": errors[:3]}


def local_install_floor(files: list[Path], trusted, fingerprint: str, folder: Path, n: int) -> dict:
    """Time to PackStore.install the same packs into n fresh stores, no network: one thread per
    store, all at once (the fleet's stations are threads in one process too)."""
    from kaizen.runtime.store import PackStore

    shutil.rmtree(folder, ignore_errors=True)
    errors = []

    def one(i: int) -> None:
        try:
            with PackStore(folder / f"s{i}", trusted, fingerprint) as store:
                for f in files:
                    store.install(f)
        except Exception as err:  # noqa: BLE001 - reported
            errors.append(repr(err))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    seconds = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    return {"stores": n, "seconds": seconds, "per_pack_ms": seconds * 1e3 / (n * len(files)), "errors": errors[:3]}


# ---------------------------------------------------------------- fleet


def fleet_run(n: int, files: list[Path], trusted, fingerprint: str, faults, deadline: float, root: Path,
              chunk_size: int) -> dict:
    from kaizen.hub.fleet_sim import run_fleet

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    r = run_fleet(n, files, trusted, base_fingerprint=fingerprint, faults=faults, deadline=deadline, root=root,
                  chunk_size=chunk_size)
    names = {f.name for f in files}
    lost = []
    for row in r.status:
        states = {name: p["state"] for name, p in row["packs"].items() if name in names}
        missing = [name for name in names if states.get(name) != "activated"]
        if missing:
            lost.append((row["station_id"], missing[:3]))
    last = [max(acts.values()) for acts in r.activation_s.values() if acts]
    shutil.rmtree(root, ignore_errors=True)
    return {"stations": n, "all_activated": r.all_activated, "seconds": r.seconds,
            "bytes_payload": r.bytes_payload, "bytes_sent": r.bytes_sent,
            "bytes_per_s": r.bytes_payload / r.seconds, "resent_share": r.bytes_sent / r.bytes_payload - 1,
            "first_station_done_s": min(last) if last else None, "last_station_done_s": max(last) if last else None,
            "chunks_corrupted": r.chunks_corrupted, "corrupt_detected": r.corrupt_detected,
            "disconnects": r.disconnects, "stations_not_activated_per_hub": lost}


# ---------------------------------------------------------------- endpoint


class _NoSpin:
    """Bench-side experiment (no product change): while active, every new ORT session gets
    session.intra_op.allow_spinning=0 (ORT worker threads sleep instead of spin-waiting)."""

    def __enter__(self):
        import onnxruntime as ort

        self.ort, self.orig = ort, ort.SessionOptions
        orig = self.orig

        class SessionOptions(orig):
            def __init__(self):
                super().__init__()
                self.add_session_config_entry("session.intra_op.allow_spinning", "0")

        ort.SessionOptions = SessionOptions
        return self

    def __exit__(self, *exc):
        self.ort.SessionOptions = self.orig


def endpoint_overhead(bundle: Path, work: Path, signer, trusted, reps: int, variant: str) -> dict:
    """variant: "1", "0" (ORT intra-op threads; 0 = ORT default) or "0-nospin" (0 with spinning off)."""
    import contextlib

    threads, nospin = int(variant.split("-")[0]), variant.endswith("nospin")
    with _NoSpin() if nospin else contextlib.nullcontext():
        return _endpoint_overhead(bundle, work, signer, trusted, reps, threads) | {"variant": variant}


def _endpoint_overhead(bundle: Path, work: Path, signer, trusted, reps: int, threads: int) -> dict:
    import numpy as np
    from packs import INSTRUCTIONS, station_with_tasks

    from kaizen.runtime.endpoint import InferenceClient, InferenceServer

    st, images, *_ = station_with_tasks(bundle, work, "ep", signer, trusted, threads)
    img, instr = images[0], INSTRUCTIONS[0]
    out = {"reps": reps, "image_bytes": len(img), "ort_threads": threads}
    ipc = work / "ep.sock"
    for name, ep in (("tcp", "tcp://127.0.0.1:*"), ("ipc", f"ipc://{ipc}")):
        with InferenceServer(st, ep) as server, InferenceClient(server.endpoint, timeout_ms=10000) as client:
            for _ in range(5):
                st.infer(img, instr)
                client.infer(img, instr)
            direct, remote, same = [], [], 0
            for _ in range(reps):  # interleaved: same load for both
                t = time.perf_counter()
                a = st.infer(img, instr)
                direct.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                b = client.infer(img, instr)
                remote.append((time.perf_counter() - t) * 1e3)
                same += a["answer"] == b["answer"] and a["task_id"] == b["task_id"]
        d50, r50 = median(direct), median(remote)
        out[name] = {"direct_p50_ms": d50, "endpoint_p50_ms": r50, "overhead_p50_ms": r50 - d50,
                     "overhead_share": (r50 - d50) / d50, "direct_p99_ms": pct(direct, 99),
                     "endpoint_p99_ms": pct(remote, 99), "same_answers": same}
        log(f"endpoint {name} threads {threads}: {out[name]}")
    st.close()
    ipc.unlink(missing_ok=True)
    del np
    return out


# ---------------------------------------------------------------- main


def fmt_rate(bps: float) -> str:
    return f"{bps / 1e6:.1f} MB/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 and 3 stations, 3 packs")
    ap.add_argument("--stations", default=None, help="station counts (default 1,10,50)")
    ap.add_argument("--packs", type=int, default=None, help="packs published (default 8)")
    ap.add_argument("--chunk-kib", type=int, default=256, help="hub chunk size (product default 256)")
    ap.add_argument("--corrupt", type=float, default=0.05, help="share of corrupted chunks in the faulty run")
    ap.add_argument("--disconnect", type=float, default=0.05,
                    help="per station per 0.1 s tick probability of a disconnect in the faulty run")
    ap.add_argument("--deadline", type=float, default=240.0)
    ap.add_argument("--large-packs", type=int, default=None,
                    help="also deliver this many packs shaped for the `small` preset (~2.5 MB; default 4, quick 0)")
    ap.add_argument("--large-stations", default="1,10", help="station counts for the large packs")
    ap.add_argument("--reps", type=int, default=None, help="endpoint requests (default 200)")
    ap.add_argument("--threads", default="1,0,0-nospin",
                    help="ORT intra-op threads for the endpoint test (0 = ORT default, all cores; "
                         "0-nospin = the same with ORT thread spinning off, patched in the bench only)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    a.threads = a.threads.split(",")
    q = a.quick
    counts = [int(c) for c in (a.stations or ("1,3" if q else "1,10,50")).split(",")]
    n_packs = a.packs or (3 if q else 8)
    reps = a.reps or (40 if q else 200)
    if a.large_packs is None:
        a.large_packs = 0 if q else 4

    from kaizen.hub.fleet_sim import FleetFaults
    from kaizen.runtime.keys import TrustedKeys, generate_signing_key

    work = WORK / "delivery"
    work.mkdir(parents=True, exist_ok=True)
    signer = generate_signing_key()
    trusted = TrustedKeys([signer.public_key()])
    _, bundle = ensure_base("tiny-llama")
    meta, shapes = bundle_lora_shapes(bundle)

    from packs import query_images

    from kaizen.runtime.bundle import Bundle
    from kaizen.runtime.engine import Engine
    from kaizen.runtime.preprocess import load_rgb

    engine = Engine(Bundle.open(bundle, threads=1))
    img = load_rgb(query_images(engine.vision_pre.size)[0])
    pack_dir = work / "packs"
    shutil.rmtree(pack_dir, ignore_errors=True)
    pack_dir.mkdir(parents=True)
    files = []
    for i in range(n_packs):
        p = pack_dir / f"task{i:02d}-1.kpk"
        build_bundle_pack(p, meta, shapes, signer, f"task{i:02d}", 1, seed=10 + i,
                          instruction=f"Question {i} about the part?", engine=engine, image=img, golden=1)
        files.append(p)
    del engine
    sets = [("tiny-llama", meta["fingerprint"], files, counts)]
    if a.large_packs:  # packs shaped for the `small` preset (~2.5 MB): bytes dominate, not per-pack costs
        _, small = ensure_base("small")
        smeta, sshapes = bundle_lora_shapes(small)
        big = []
        for i in range(a.large_packs):
            p = pack_dir / f"big{i:02d}-1.kpk"
            build_bundle_pack(p, smeta, sshapes, signer, f"big{i:02d}", 1, seed=30 + i,
                              instruction=f"Question {i} about the part?")
            big.append(p)
        sets.append(("small", smeta["fingerprint"], big, [int(c) for c in a.large_stations.split(",")]))
    report = {"quick": q, "load_start": load(), "chunk_size": a.chunk_kib * 1024,
              "faults": {"corrupt_fraction": a.corrupt, "disconnect_prob": a.disconnect}, "rows": []}
    t_all = time.perf_counter()
    for shape, fp, pack_files, station_counts in sets:
        per_station = sum(f.stat().st_size for f in pack_files)
        for n in station_counts:
            raw = raw_tcp_copy(n, pack_files)
            clean = fleet_run(n, pack_files, trusted, fp, None, a.deadline, work / "fleet", a.chunk_kib * 1024)
            faulty = fleet_run(n, pack_files, trusted, fp,
                               FleetFaults(corrupt_fraction=a.corrupt, disconnect_prob=a.disconnect, seed=n),
                               a.deadline, work / "fleet", a.chunk_kib * 1024)
            floor = local_install_floor(pack_files, trusted, fp, work / "floor", n)
            floor_s = floor["seconds"]
            row = {"pack_shape": shape, "packs": len(pack_files), "pack_bytes": [f.stat().st_size for f in pack_files],
                   "bytes_per_station": per_station, "stations": n, "raw_tcp": raw, "fleet": clean,
                   "fleet_faults": faulty, "local_install": floor, "install_floor_s": floor_s,
                   "fleet_vs_raw": clean["bytes_per_s"] / raw["bytes_per_s"],
                   "fleet_vs_raw_plus_install": (raw["seconds"] + floor_s) / clean["seconds"],
                   "faults_slowdown": faulty["seconds"] / clean["seconds"], "load": load()}
            report["rows"].append(row)
            log(f"{shape} x{len(pack_files)}, {n} stations: raw {fmt_rate(raw['bytes_per_s'])} "
                f"fleet {fmt_rate(clean['bytes_per_s'])} ({clean['seconds']:.2f} s) faults {faulty['seconds']:.2f} s "
                f"all={faulty['all_activated']}")
    from kaizen.runtime.endpoint import bench_roundtrip

    report["endpoint"] = [endpoint_overhead(bundle, work, signer, trusted, reps, t) for t in a.threads]
    report["echo_roundtrip_tcp"] = bench_roundtrip(max(200, reps), image_shape=(64, 64, 3))
    report["load_end"] = load()
    report["seconds"] = time.perf_counter() - t_all

    print(f"\n### Delivery on loopback (signed packs shaped for the named base, chunk {a.chunk_kib} KiB, "
          f"faults: {100 * a.corrupt:.0f} % corrupt chunks + disconnect p={a.disconnect} per station per 0.1 s)\n")
    print("| packs per station | stations | raw TCP copy | fleet rate | fleet / raw | fleet all activated s "
          "(first / last station) | install-only floor s | fleet / (raw + install floor) | faults: all activated s "
          "| faults / clean | faults: nothing lost | corrupt chunks sent / detected | disconnects | resent bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        c, f, raw = r["fleet"], r["fleet_faults"], r["raw_tcp"]
        lost_ok = f["all_activated"] and not f["stations_not_activated_per_hub"]
        print(f"| {r['packs']} x {r['bytes_per_station'] / r['packs'] / 1e3:.0f} KB ({r['pack_shape']}) | "
              f"{r['stations']} | {fmt_rate(raw['bytes_per_s'])} ({raw['seconds'] * 1e3:.0f} ms) | "
              f"{fmt_rate(c['bytes_per_s'])} | {100 * r['fleet_vs_raw']:.2f} % | {c['seconds']:.2f} "
              f"({c['first_station_done_s']:.2f} / {c['last_station_done_s']:.2f}) | {r['install_floor_s']:.2f} | "
              f"{100 * r['fleet_vs_raw_plus_install']:.0f} % | {f['seconds']:.2f} | "
              f"{r['faults_slowdown']:.2f}x | {'yes' if lost_ok else 'NO'} | "
              f"{f['chunks_corrupted']} / {f['corrupt_detected']} | {f['disconnects']} | "
              f"{100 * f['resent_share']:.1f} % |")
    print("\n### Inference endpoint round trip vs direct Station.infer (tiny-llama, 3 packs, interleaved, "
          f"{reps} each)\n")
    print("| ORT threads | transport | direct p50 ms | endpoint p50 ms | overhead p50 ms | overhead share "
          "| direct p99 ms | endpoint p99 ms | same answers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for e in report["endpoint"]:
        for name in ("tcp", "ipc"):
            x = e[name]
            th = {"0": "0 (ORT default)", "0-nospin": "0, allow_spinning=0 (bench patch)"}.get(e["variant"],
                                                                                             e["variant"])
            print(f"| {th} | {name} | {x['direct_p50_ms']:.2f} | {x['endpoint_p50_ms']:.2f} | "
                  f"{x['overhead_p50_ms']:.3f} | {100 * x['overhead_share']:.1f} % | {x['direct_p99_ms']:.2f} | "
                  f"{x['endpoint_p99_ms']:.2f} | {x['same_answers']}/{e['reps']} |")
    echo = report["echo_roundtrip_tcp"]
    print(f"\nEcho backend (no work, 64x64x3 array, tcp): p50 {echo['p50_ms']:.3f} ms, p99 {echo['p99_ms']:.3f} ms "
          f"over {echo['n']} requests.")
    print(f"Load average at start {report['load_start']['loadavg_1m']}, at end {report['load_end']['loadavg_1m']} "
          f"({report['load_end']['cpus']} CPUs); {report['seconds']:.0f} s total.")
    path = write_report("delivery", report, Path(a.out))
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
