"""Benchmark: task packs on a station (issue 5): selection cost vs installed packs, pack bytes vs
base bytes, install-to-first-answer time, latency while packs install every second.

    .venv/bin/python bench/packs.py [--quick] [--counts 1,10,100,1000] [--hot-seconds 20]
    .venv/bin/python bench/packs.py --small-selection-only [--precision int8]   # `small` rows alone

Bases are random-init presets exported once into cache/bench/<preset>/ (tiny-llama for every
timing; `small` (realistic shape, random weights) only for the size ratio). How the stores are
built (so the figures can be read right):
- the matching packs (key = CLIP(image) + CLIP(instruction), one golden sample) go in through
  Station.install (verify + golden probe + atomic switch);
- the filler packs that bring a store to 10/100/1000 packs are real signed .kpk files of the same
  shape (rank-8 LoRA on every LoRA input, 10 prompt tokens, random unit keys) written with
  build_pack and installed through PackStore.install(probe=None) (no golden probe), then a
  Station is opened on that store, so selection runs over the real installed key matrix.
Prints Markdown tables and writes reports/bench/packs.json. Timings are measured in this run.
Section 1 (selection) lives in bench/packs_selection.py, the stations with the matching packs in
bench/packs_station.py.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from common import (
    ANSWERS,
    OUT,
    WORK,
    build_bundle_pack,
    bundle_lora_shapes,
    dir_bytes,
    ensure_base,
    load,
    log,
    median,
    pct,
    write_report,
)
from packs_selection import bench_selection, bench_selection_synthetic
from packs_station import INSTRUCTIONS, TASKS, png_bytes, query_images, station_with_tasks

THREADS = 1  # ONNX Runtime intra-op threads for every Station/Engine here (--threads)


# ---------------------------------------------------------------- 2. pack bytes vs base bytes

def bench_sizes(presets: list[str], work: Path, signer) -> list[dict]:
    from kaizen.runtime.pack_arrays import GoldenSample

    rows = []
    for preset in presets:
        t = time.perf_counter()
        _, bundle = ensure_base(preset)
        meta, shapes = bundle_lora_shapes(bundle)
        base_bytes = dir_bytes(bundle)
        out = work / "sizes"
        out.mkdir(parents=True, exist_ok=True)
        p = out / f"{preset}-pack-1.kpk"
        build_bundle_pack(p, meta, shapes, signer, "sizecheck", 1, seed=7)
        pack_bytes = p.stat().st_size
        lora_params = sum((8 * s[1]) if n.endswith(".A") else (s[0] * 8) for n, s in shapes.items())
        # the same pack with 2 golden samples (random-noise PNGs at the base's image size: worst case)
        from kaizen.runtime.pack import build_pack
        from kaizen.runtime.testpacks import tiny_png  # noqa: F401

        rng = np.random.default_rng(3)
        from common import pack_arrays
        size = json_vision_size(bundle)
        golden = [GoldenSample(png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
                               "Is the part damaged?", "yes") for _ in range(2)]
        pg = out / f"{preset}-pack-golden-1.kpk"
        build_pack(pg, task_id="sizecheck", version=1, method="kaizen", base_fingerprint=meta["fingerprint"],
                   instructions=["Is the part damaged?"], answers=ANSWERS, golden=golden,
                   signing_key=signer, lora_rank=8, **pack_arrays(meta, shapes, np.random.default_rng(7)))
        rows.append({"preset": preset, "base_bytes": base_bytes, "pack_bytes": pack_bytes,
                     "ratio": pack_bytes / base_bytes, "pack_with_2_golden_bytes": pg.stat().st_size,
                     "ratio_with_golden": pg.stat().st_size / base_bytes,
                     "lora_inputs": len(shapes), "lora_targets": meta["lora"]["targets"],
                     "bundle_lora_rank": meta["lora"]["rank"], "pack_lora_rank": 8, "prompt_tokens": 10,
                     "lora_params": lora_params, "d_model": meta["text"]["hidden_size"],
                     "d_clip": meta["clip"]["dim"], "golden_image_px": size,
                     "base_files": {f.name: f.stat().st_size for f in sorted(bundle.iterdir())},
                     "seconds": time.perf_counter() - t})
        log(f"sizes {preset}: {rows[-1]['pack_bytes']} / {base_bytes}")
    return rows


def json_vision_size(bundle: Path) -> int:
    import json

    return int(json.loads((bundle / "preprocess.json").read_text())["vision"]["size"])


# ---------------------------------------------------------------- 3. install -> first answer

def bench_install(bundle: Path, n: int, work: Path, signer, trusted) -> dict:
    from kaizen.runtime.bundle import Bundle
    from kaizen.runtime.engine import Engine
    from kaizen.runtime.preprocess import load_rgb
    from kaizen.runtime.station import Station

    meta, shapes = bundle_lora_shapes(bundle)
    engine = Engine(Bundle.open(bundle, threads=THREADS))
    img = query_images(engine.vision_pre.size)[0]
    folder, store_root = work / "install-packs", work / "install-store"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(store_root, ignore_errors=True)
    folder.mkdir(parents=True)
    paths = []
    for v in range(1, n + 1):
        p = folder / f"seal-{v}.kpk"
        build_bundle_pack(p, meta, shapes, signer, "seal", v, seed=50 + v, instruction=INSTRUCTIONS[0],
                          engine=engine, image=load_rgb(img), golden=1)
        paths.append(p)
    st = Station(bundle, store_root, trusted, threshold=0.3, top_k=3, threads=THREADS)
    st.infer(img, INSTRUCTIONS[0])  # warm the sessions (no packs: no_match)
    inst, first, total, ok = [], [], [], 0
    for v, p in enumerate(paths, start=1):
        t0 = time.perf_counter()
        st.install(p)
        t1 = time.perf_counter()
        r = st.infer(img, INSTRUCTIONS[0])
        t2 = time.perf_counter()
        ok += r["outcome"] == "answered" and r["pack_version"] == v
        inst.append((t1 - t0) * 1e3)
        first.append((t2 - t1) * 1e3)
        total.append((t2 - t0) * 1e3)
    st.close()
    res = {"n": n, "pack_bytes": paths[0].stat().st_size, "install_p50_ms": median(inst),
           "first_infer_p50_ms": median(first), "file_to_first_answer_p50_ms": median(total),
           "file_to_first_answer_max_ms": max(total), "answered_with_new_version": ok,
           "install_ms": inst, "first_infer_ms": first}
    log(f"install: {res}")
    return res


# ---------------------------------------------------------------- 4. latency while packs install


def bench_hot_swap(bundle: Path, seconds: float, work: Path, signer, trusted, fillers: int = 7) -> dict:
    from kaizen.runtime.preprocess import load_rgb

    st, images, meta, shapes, folder, engine = station_with_tasks(bundle, work, "hot", signer, trusted, THREADS)
    for j in range(fillers):
        p = folder / f"fill{j}-1.kpk"
        build_bundle_pack(p, meta, shapes, signer, f"fill{j}", 1, seed=500 + j, instruction=f"Filler {j}?")
        st.install(p)
    steps = int(seconds) + 2
    versions = []  # new versions of "seal" (task 0), all with a passing golden sample
    for v in range(2, 2 + steps):
        p = folder / f"seal-{v}.kpk"
        build_bundle_pack(p, meta, shapes, signer, "seal", v, seed=100 + v, instruction=INSTRUCTIONS[0],
                          engine=engine, image=load_rgb(images[0]), golden=1)
        versions.append(p)
    del engine

    def client(stop_at: float, lat: list, failures: list, seen: set) -> None:
        k = 0
        while time.perf_counter() < stop_at and k < 100000:
            img, instr, task = images[k % 3], INSTRUCTIONS[k % 3], TASKS[k % 3]
            k += 1
            t = time.perf_counter()
            try:
                r = st.infer(img, instr)
            except Exception as err:  # noqa: BLE001 - a failure is the finding
                failures.append(f"{type(err).__name__}: {err}")
                continue
            lat.append((time.perf_counter() - t) * 1e3)
            if r["outcome"] != "answered" or r["task_id"] != task or r["answer"] not in ANSWERS:
                failures.append(f"wrong result for {task}: {r['outcome']} {r['task_id']} {r['answer']}")
            else:
                seen.add((r["task_id"], r["pack_version"]))

    def phase(installing: bool) -> dict:
        lat, failures, seen, events, errors = [], [], set(), [], []
        stop_at = time.perf_counter() + seconds
        th = threading.Thread(target=client, args=(stop_at, lat, failures, seen))
        th.start()
        if installing:
            nxt = iter(versions)
            tick = time.perf_counter()
            i = 0
            while tick + 1.0 < stop_at:
                tick += 1.0
                time.sleep(max(0.0, tick - time.perf_counter()))
                i += 1
                t = time.perf_counter()
                try:
                    if i % 4 == 0:
                        m = st.rollback("seal")
                        events.append(("rollback", m.version, (time.perf_counter() - t) * 1e3))
                    else:
                        m = st.install(next(nxt))
                        events.append(("install", m.version, (time.perf_counter() - t) * 1e3))
                except Exception as err:  # noqa: BLE001
                    errors.append(f"{type(err).__name__}: {err}")
        th.join(timeout=seconds + 60)
        return {"requests": len(lat) + len(failures), "failures": len(failures), "failure_samples": failures[:5],
                "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99), "max_ms": max(lat),
                "versions_seen": sorted(v for t, v in seen if t == "seal"), "events": events,
                "manager_errors": errors}

    for k in range(6):
        st.infer(images[k % 3], INSTRUCTIONS[k % 3])
    quiet_a = phase(False)
    log(f"quiet A: p50 {quiet_a['p50_ms']:.2f} p99 {quiet_a['p99_ms']:.2f} n {quiet_a['requests']}")
    busy = phase(True)
    log(f"installs: p50 {busy['p50_ms']:.2f} p99 {busy['p99_ms']:.2f} n {busy['requests']} "
        f"events {len(busy['events'])} errors {busy['manager_errors']}")
    quiet_b = phase(False)
    log(f"quiet B: p50 {quiet_b['p50_ms']:.2f} p99 {quiet_b['p99_ms']:.2f} n {quiet_b['requests']}")
    st.close()
    return {"seconds_per_phase": seconds, "packs_installed": len(TASKS) + fillers, "quiet_before": quiet_a,
            "during_installs": busy, "quiet_after": quiet_b,
            "p99_ratio_vs_quiet_before": busy["p99_ms"] / quiet_a["p99_ms"],
            "p99_ratio_vs_quiet_after": busy["p99_ms"] / quiet_b["p99_ms"],
            "p50_ratio_vs_quiet_before": busy["p50_ms"] / quiet_a["p50_ms"]}


# ---------------------------------------------------------------- main

def fmt_bytes(n: int) -> str:
    for unit, div in (("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def print_selection(rows: list[dict], synthetic: list[dict]) -> None:
    print(f"\n### Selection vs installed packs (ORT threads {THREADS}, per part, p50)\n")
    print("| base: packs | per-part ms | selection ms (CLIP img + txt + numpy) | CLIP image ms | CLIP text ms "
          "(uncached / cached) | numpy score+top-k ms | selection share | numpy share | station open s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| tiny-llama: {r['packs']} | {r['per_part_total_p50_ms']:.2f} | {r['select_p50_ms']:.3f} | "
              f"{r['clip_image_p50_ms']:.3f} | {r['clip_text_uncached_p50_ms']:.3f} / "
              f"{r['clip_text_cached_p50_ms']:.4f} | {r['numpy_score_topk_p50_ms']:.4f} | "
              f"{100 * r['select_share']:.1f} % | {100 * r['numpy_share']:.2f} % | {r['station_open_s']:.2f} |")
    for r in synthetic:
        print(f"| {r['preset']} {r['precision']}: {r['packs']} (3 installed + random keys) | {r['per_part_p50_ms']:.2f} | "
              f"{r['select_est_ms']:.3f} | {r['clip_image_p50_ms']:.3f} | {r['clip_text_uncached_p50_ms']:.3f} / "
              f"{r['clip_text_cached_p50_ms']:.4f} | {r['numpy_score_topk_p50_ms']:.4f} | "
              f"{100 * r['select_share']:.1f} % | {100 * r['numpy_share']:.2f} % | - |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (counts 1,10; 3 s phases; no small)")
    ap.add_argument("--counts", default=None, help="installed pack counts (default 1,10,100,1000)")
    ap.add_argument("--reps", type=int, default=None, help="parts timed per pack count (default 40)")
    ap.add_argument("--hot-seconds", type=float, default=None, help="seconds per hot-swap phase (default 20)")
    ap.add_argument("--installs", type=int, default=None, help="install->first answer repetitions (default 8)")
    ap.add_argument("--presets", default=None, help="presets for the size ratio (default tiny-llama,small)")
    ap.add_argument("--threads", type=int, default=1,
                    help="ONNX Runtime intra-op threads (default 1; 0 = ORT's own default, all cores)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"],
                    help="bundle precision of the `small` selection rows (random weights: parity not enforced)")
    ap.add_argument("--small-selection-only", action="store_true",
                    help="only the `small` selection rows (printed; the report file is not written)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    global THREADS
    THREADS = a.threads
    q = a.quick
    counts = [int(c) for c in (a.counts or ("1,10" if q else "1,10,100,1000")).split(",")]
    reps = a.reps or (10 if q else 40)
    hot = a.hot_seconds or (3.0 if q else 20.0)
    installs = a.installs or (3 if q else 8)
    presets = (a.presets or ("tiny-llama" if q else "tiny-llama,small")).split(",")

    from kaizen.runtime.keys import TrustedKeys, generate_signing_key

    work = WORK / "packs"
    work.mkdir(parents=True, exist_ok=True)
    signer = generate_signing_key()
    trusted = TrustedKeys([signer.public_key()])
    if a.small_selection_only:
        rows = bench_selection_synthetic("small", counts, max(8, reps // 4), work, signer, trusted, THREADS,
                                         a.precision)
        print_selection([], rows)
        return
    _, bundle = ensure_base("tiny-llama")
    report = {"quick": q, "ort_threads": THREADS, "load_start": load()}
    t0 = time.perf_counter()
    report["sizes"] = bench_sizes(presets, work, signer)
    report["selection"], report["selection_setup"] = bench_selection(bundle, counts, reps, work, signer, trusted,
                                                                     THREADS)
    report["selection_synthetic"] = [] if q else bench_selection_synthetic("small", counts, max(8, reps // 4), work,
                                                                           signer, trusted, THREADS, a.precision)
    report["install"] = bench_install(bundle, installs, work, signer, trusted)
    report["hot_swap"] = bench_hot_swap(bundle, hot, work, signer, trusted)
    report["load_end"] = load()
    report["seconds"] = time.perf_counter() - t0

    print_selection(report["selection"], report["selection_synthetic"])
    s = report["selection_setup"]
    print(f"\nStores: {len(TASKS)} matching packs via Station.install (golden probe, p50 "
          f"{median(s['station_install_with_probe_ms']):.0f} ms each), {s['filler_packs']} filler packs via "
          f"build_pack + PackStore.install(probe=None) (p50 {s['filler_build_pack_p50_ms'] or 0:.1f} ms build, "
          f"{s['filler_packstore_install_p50_ms'] or 0:.1f} ms install each); a Station opened on each store. "
          "small rows: per-part latency measured with 3 installed packs, selection re-timed over N keys "
          "(3 real + random unit keys), per-part = measured total - measured selection + selection over N.")
    print("\n### Pack bytes vs base bytes\n")
    print("| base | base bundle | pack (.kpk) | pack / base | pack + 2 golden PNGs | (+golden) / base |")
    print("|---|---|---|---|---|---|")
    for r in report["sizes"]:
        print(f"| {r['preset']} | {fmt_bytes(r['base_bytes'])} | {fmt_bytes(r['pack_bytes'])} | "
              f"{100 * r['ratio']:.2f} % | {fmt_bytes(r['pack_with_2_golden_bytes'])} | "
              f"{100 * r['ratio_with_golden']:.2f} % |")
    i = report["install"]
    print("\n### Install: .kpk file -> first answer (tiny-llama, Station.install with golden probe)\n")
    print("| n | pack | install p50 ms | first infer p50 ms | file -> first answer p50 ms | max ms | "
          "answered by new version |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {i['n']} | {fmt_bytes(i['pack_bytes'])} | {i['install_p50_ms']:.1f} | {i['first_infer_p50_ms']:.1f} | "
          f"{i['file_to_first_answer_p50_ms']:.1f} | {i['file_to_first_answer_max_ms']:.1f} | "
          f"{i['answered_with_new_version']}/{i['n']} |")
    h = report["hot_swap"]
    print(f"\n### Latency while a pack installs every second (tiny-llama, {h['packs_installed']} packs, "
          f"1 client thread calling Station.infer, ORT threads {THREADS}, {h['seconds_per_phase']:.0f} s per phase)\n")
    print("| phase | requests | failures | p50 ms | p95 ms | p99 ms | max ms | installs / rollbacks |")
    print("|---|---|---|---|---|---|---|---|")
    for name, key in (("quiet (before)", "quiet_before"), ("installing every 1 s", "during_installs"),
                      ("quiet (after)", "quiet_after")):
        x = h[key]
        ev = x["events"]
        print(f"| {name} | {x['requests']} | {x['failures']} | {x['p50_ms']:.2f} | {x['p95_ms']:.2f} | "
              f"{x['p99_ms']:.2f} | {x['max_ms']:.1f} | {sum(e[0] == 'install' for e in ev)} / "
              f"{sum(e[0] == 'rollback' for e in ev)} |")
    print(f"\np99 during installs / quiet: {h['p99_ratio_vs_quiet_before']:.2f}x (before), "
          f"{h['p99_ratio_vs_quiet_after']:.2f}x (after); p50 {h['p50_ratio_vs_quiet_before']:.2f}x.")
    print(f"Load average at start {report['load_start']['loadavg_1m']}, at end {report['load_end']['loadavg_1m']} "
          f"({report['load_end']['cpus']} CPUs); {report['seconds']:.0f} s total.")
    path = write_report("packs", report, Path(a.out))
    print(f"Wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
