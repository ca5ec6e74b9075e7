"""Benchmark: what capture costs per part at the station (issue 14 target: < 1 % of latency).

    .venv/bin/python bench/capture.py [--rounds 30] [--parts 20] [--side 64] [--pace 2.0] [--out DIR]

One Station on the tiny-llama bundle (bench/common.py ensure_base) with three packs, ORT on one
thread, called in-process (no socket: the smallest per-part latency, so the largest share).
The same parts are answered with capture off (no queue) and on (a CaptureQueue on disk and
capture_confidence = 1.0, so EVERY answered part is captured: the worst case). Every part is a
distinct image, so nothing is deduplicated away: each one is hashed and written (two fsync'd
files) by the queue's writer thread. Inputs: `png` (encoded bytes, as clients send them) and
`array` (raw uint8 arrays, PNG-encoded by the writer). Regimes: `paced` (a part every --pace x
the median part time, as on a line: the station is half busy) and `saturated` (back to back:
the writer competes with inference all the time). Each round runs every (regime, input) block
off and on, the order alternating, the writer drained between blocks (its backlog at a block's
end is reported); the overhead is the median over rounds of (on's block median / off's block
median - 1), also for means: paired, so load drift on the shared machine hits both alike.
Also: the inference thread's own CPU per part (time.thread_time, blind to other processes),
offer() alone and the writer's time per sample. Prints a table, writes reports/bench/capture.json.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_bundle_pack, bundle_lora_shapes, ensure_base, load, log, write_report

TASKS = [("seal", "Is the seal torn?"), ("holes", "How many holes are there?"), ("cable", "What colour is it?")]
KINDS = ("png", "array")
REGIMES = ("paced", "saturated")


def parts_of(rng: np.random.Generator, n: int, side: int, kind: str) -> list:
    """n distinct images (noise over a base colour) as PNG bytes or uint8 arrays."""
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        if kind == "png":
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "PNG")
            out.append(buf.getvalue())
        else:
            out.append(arr)
    return out


def run(station, parts: list, period_ms: float = 0.0, every: int = 1) -> tuple[list[float], float]:
    """Per-part wall ms (a part starts every `period_ms`, or back to back with 0), and the
    inference thread's own CPU ms per part. With a queue on the station, every `every`-th part is
    captured (its policy's level 1.0) and the others not (level 0.0): the queue is there for all."""
    from kaizen.runtime.capture_policy import CapturePolicy

    times = []
    c0, begin = time.thread_time(), time.perf_counter()
    for i, image in enumerate(parts):
        station.capture_policy = CapturePolicy(1.0 if i % every == 0 else 0.0)
        time.sleep(max(0.0, begin + i * period_ms / 1e3 - time.perf_counter()))
        t0 = time.perf_counter()
        station.infer(image, TASKS[i % 3][1])
        times.append((time.perf_counter() - t0) * 1e3)
    return times, (time.thread_time() - c0) * 1e3 / len(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--parts", type=int, default=20, help="parts per block (mode x kind x regime) per round")
    ap.add_argument("--side", type=int, default=64, help="image side in pixels")
    ap.add_argument("--pace", type=float, default=2.0,
                    help="paced regime: a part every pace x the median part time (2.0: the station is half busy)")
    ap.add_argument("--idle-ms", type=float, default=2.0, help="the queue's idle_s, in ms")
    ap.add_argument("--every", type=int, default=1,
                    help="capture every N-th part (1: all, the worst case; 10: a line where 1 part in 10 is unsure)")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="a base bundle to run (default: the tiny-llama one, the shortest parts: the largest share)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from kaizen.runtime.capture import CaptureQueue
    from kaizen.runtime.keys import TrustedKeys, generate_signing_key
    from kaizen.runtime.station import Station

    bundle = args.bundle or ensure_base("tiny-llama")[1]
    meta, shapes = bundle_lora_shapes(bundle)
    work = Path(tempfile.mkdtemp(prefix="kaizen-capture-cost-"))
    signer = generate_signing_key()
    station = Station(bundle, work / "store", TrustedKeys([signer.public_key()]), threshold=0.0, threads=1,
                      capture_confidence=1.0)
    images = [np.random.default_rng(10 + i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(3)]
    for i, (task, instr) in enumerate(TASKS):
        build_bundle_pack(work / f"{task}-1.kpk", meta, shapes, signer, task, 1, seed=i + 1,
                          instruction=instr, engine=station.engine, image=images[i])
        station.install(work / f"{task}-1.kpk")
    queue = CaptureQueue(work / "capture", station_id="bench/s01", max_items=100_000, max_bytes=4 << 30,
                         idle_s=args.idle_ms / 1e3)
    rng = np.random.default_rng(0)
    period_ms = args.pace * statistics.median(run(station, parts_of(rng, 40, args.side, "png"))[0])   # warm up
    combos = [(regime, kind) for regime in REGIMES for kind in KINDS]
    lat = {(c, m): [] for c in combos for m in ("off", "on")}
    cpu = {(c, m): [] for c in combos for m in ("off", "on")}
    ratio = {c: {"median": [], "mean": []} for c in combos}
    backlog = dict.fromkeys(combos, 0)   # most parts waiting for the writer at the end of an "on" block
    for r in range(args.rounds):
        for combo in combos:
            parts = parts_of(rng, args.parts, args.side, combo[1])   # new, distinct parts every block
            got = {}
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                station.capture = queue if mode == "on" else None
                got[mode], thread_cpu = run(station, parts, period_ms if combo[0] == "paced" else 0.0, args.every)
                station.capture = None
                backlog[combo] = max(backlog[combo], queue.stats()["queued"])
                queue.flush(600)   # the next block starts with an idle writer
                lat[(combo, mode)] += got[mode]
                cpu[(combo, mode)].append(thread_cpu)
            ratio[combo]["median"].append(statistics.median(got["on"]) / statistics.median(got["off"]) - 1)
            ratio[combo]["mean"].append(statistics.mean(got["on"]) / statistics.mean(got["off"]) - 1)
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{c[0]} {c[1]} {ratio[c]['median'][-1] * 100:+.1f} %"
                                                        for c in combos))
    t0 = time.perf_counter()
    flushed = queue.flush(600)
    drain_s = time.perf_counter() - t0
    stats = queue.stats()

    # what capture adds on the inference thread per part, alone (part_id + recent parts for
    # feedback + the policy + inference() + offer(), as Station._remember does), and then the
    # writer's time per sample when it drains them
    from kaizen.runtime.capture_policy import CapturePolicy, RecentParts, kept_image

    result = {"outcome": "answered", "answer": "yes", "task_id": "seal", "pack_version": 1, "confidence": 0.5,
              "scores": {"seal": 0.9}}
    policy, instr = CapturePolicy(1.0), "Is the seal torn?"
    hot_us, writer_ms = {}, {}
    for kind in KINDS:
        samples = parts_of(rng, 2000, args.side, kind)
        alone = CaptureQueue(work / f"alone-{kind}", memory_items=10_000, memory_bytes=1 << 30)
        recent = RecentParts(256)
        t0 = time.perf_counter()
        for image in samples:
            with alone.inference():
                r = dict(result, part_id=uuid.uuid4().hex)
                kept = kept_image(image, None)
                recent.put(r["part_id"], kept, instr, r)
                if reason := policy.reason(r):
                    alone.offer(kept, instr, r, reason, identify=False)
        hot_us[kind] = (time.perf_counter() - t0) / len(samples) * 1e6
        t0 = time.perf_counter()
        alone.flush(600)
        writer_ms[kind] = (time.perf_counter() - t0) / len(samples) * 1e3
        alone.close()
    queue.close()
    station.close()

    res = {"bundle": str(bundle), "rounds": args.rounds, "parts_per_block": args.parts, "side": args.side, "period_ms": period_ms, "idle_ms": args.idle_ms, "every": args.every,
           "load": load(), "captured": stats, "flushed": flushed, "drain_after_runs_s": round(drain_s, 3),
           "hot_path_us": hot_us, "writer_ms_per_sample": writer_ms, "runs": []}
    print(f"{'regime':9} {'input':6} {'off p50':>8} {'on p50':>8} {'off mean':>9} {'on mean':>8} "
          f"{'overhead p50':>13} {'overhead mean':>14} {'cpu off/on ms':>14} {'backlog':>8}")
    off_p50 = {}
    for combo in combos:
        off, on = lat[(combo, "off")], lat[(combo, "on")]
        row = {"regime": combo[0], "input": combo[1], "parts": len(on),
               "off_p50_ms": float(np.percentile(off, 50)), "on_p50_ms": float(np.percentile(on, 50)),
               "off_mean_ms": float(np.mean(off)), "on_mean_ms": float(np.mean(on)),
               "overhead_p50_pct": statistics.median(ratio[combo]["median"]) * 100,
               "overhead_mean_pct": statistics.median(ratio[combo]["mean"]) * 100,
               "thread_cpu_off_ms": statistics.median(cpu[(combo, "off")]),
               "thread_cpu_on_ms": statistics.median(cpu[(combo, "on")]), "max_backlog": backlog[combo],
               "round_overheads_pct": [round(x * 100, 2) for x in ratio[combo]["median"]]}
        res["runs"].append(row)
        off_p50[combo] = row["off_p50_ms"]
        print(f"{combo[0]:9} {combo[1]:6} {row['off_p50_ms']:8.2f} {row['on_p50_ms']:8.2f} {row['off_mean_ms']:9.2f} "
              f"{row['on_mean_ms']:8.2f} {row['overhead_p50_pct']:+12.2f}% {row['overhead_mean_pct']:+13.2f}% "
              f"{row['thread_cpu_off_ms']:7.3f}/{row['thread_cpu_on_ms']:.3f} {backlog[combo]:8d}")
    print(f"paced: a part every {period_ms:.2f} ms. captured {stats['captured']} parts, persisted {stats['persisted']}, "
          f"dropped in memory {stats['dropped_queue']}, duplicates {stats['duplicates']}.\nOn the inference thread, "
          f"capture adds {hot_us['png']:.1f} us per part (png), {hot_us['array']:.1f} us (array): "
          f"{hot_us['png'] / 10 / off_p50['paced', 'png']:.3f} % / "
          f"{hot_us['array'] / 10 / off_p50['paced', 'array']:.3f} % of a part; the writer takes "
          f"{writer_ms['png']:.2f} ms per sample (png), {writer_ms['array']:.2f} ms (array, PNG-encoded), between parts")
    path = write_report("capture", res, **({"out": args.out} if args.out else {}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
