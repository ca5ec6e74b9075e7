"""Selection cost vs installed packs, for bench/packs.py (section 1 of its report): a real Station
over stores of 1..1000 signed packs on tiny-llama, and on a bigger base the per-part latency with
3 packs plus the numpy score + top-k timed over N keys. Run through bench/packs.py.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from common import build_bundle_pack, bundle_lora_shapes, ensure_base, log, median
from packs_station import INSTRUCTIONS, TASKS, query_images, station_with_tasks, timed


def select_numpy(q_img, q_txt, keys, alpha: float, k: int):
    """The station's numpy part of selection: scores over all keys + top-k."""
    from kaizen.runtime.selection import scores, top_k

    return top_k(scores(q_img, q_txt, keys, alpha), k)


# ---------------------------------------------------------------- 1. selection vs installed packs

def bench_selection(bundle: Path, counts: list[int], reps: int, work: Path, signer, trusted,
                    threads: int) -> list[dict]:
    from kaizen.runtime.bundle import Bundle
    from kaizen.runtime.engine import Engine
    from kaizen.runtime.preprocess import load_rgb
    from kaizen.runtime.selection import normalise
    from kaizen.runtime.station import Station
    from kaizen.runtime.store import PackStore

    meta, shapes = bundle_lora_shapes(bundle)
    engine = Engine(Bundle.open(bundle, threads=threads))
    images = query_images(engine.vision_pre.size)
    store_root, packs_dir = work / "sel-store", work / "sel-packs"
    shutil.rmtree(store_root, ignore_errors=True)
    shutil.rmtree(packs_dir, ignore_errors=True)
    packs_dir.mkdir(parents=True)
    installed = 0
    rows = []
    probe_install_ms, filler_build_ms, filler_install_ms = [], [], []
    for count in counts:
        if installed < min(count, len(TASKS)):  # the matching packs, through Station.install (golden probe)
            st = Station(bundle, store_root, trusted, threshold=0.3, top_k=3, threads=threads)
            for i in range(installed, min(count, len(TASKS))):
                p = packs_dir / f"{TASKS[i]}-1.kpk"
                build_bundle_pack(p, meta, shapes, signer, TASKS[i], 1, seed=i + 1, instruction=INSTRUCTIONS[i],
                                  engine=engine, image=load_rgb(images[i]), golden=1)
                t = time.perf_counter()
                st.install(p)
                probe_install_ms.append((time.perf_counter() - t) * 1e3)
                installed += 1
            st.close()
        if count > installed:  # fillers: build_pack + PackStore.install(probe=None)
            store = PackStore(store_root, trusted, meta["fingerprint"])
            for j in range(installed, count):
                p = packs_dir / f"fill{j:04d}-1.kpk"
                t = time.perf_counter()
                build_bundle_pack(p, meta, shapes, signer, f"fill{j:04d}", 1, seed=1000 + j,
                                  instruction=f"Filler question number {j}?")
                t1 = time.perf_counter()
                store.install(p, probe=None)
                filler_build_ms.append((t1 - t) * 1e3)
                filler_install_ms.append((time.perf_counter() - t1) * 1e3)
                p.unlink()
            store.close()
            installed = count
        t = time.perf_counter()
        st = Station(bundle, store_root, trusted, threshold=0.3, top_k=3, threads=threads)
        open_s = time.perf_counter() - t
        snap = st._snap
        assert len(snap.packs) == count, (len(snap.packs), count)
        q = [(images[i], INSTRUCTIONS[i]) for i in range(min(count, len(TASKS)))]
        for img, instr in q:
            st.infer(img, instr)  # warm-up
        wall, tm, answered = [], [], 0
        for r in range(reps):
            img, instr = q[r % len(q)]
            t = time.perf_counter()
            res = st.infer(img, instr)
            wall.append((time.perf_counter() - t) * 1e3)
            tm.append(res["timings_ms"])
            answered += res["outcome"] == "answered"
        rgb = [load_rgb(images[0])]
        clip_img = timed(reps, st.engine.clip_image, rgb)
        clip_txt = [timed(1, st.engine.clip_text, [f"An instruction no pack knows, number {k}?"])[0]
                    for k in range(reps)]
        cached_txt = timed(reps, st._text_queries, snap, [INSTRUCTIONS[0]])
        q_img = normalise(st.engine.clip_image(rgb))
        q_txt = st._text_queries(snap, [INSTRUCTIONS[0]])
        numpy_ms = timed(max(200, reps), select_numpy, q_img, q_txt, snap.keys, st.alpha, st.top_k)
        st.close()
        total = median([x["total_ms"] for x in tm])
        select = median([x["select_ms"] for x in tm])
        row = {"packs": count, "station_open_s": open_s, "reps": reps, "answered": answered,
               "per_part_wall_p50_ms": median(wall), "per_part_total_p50_ms": total,
               "preprocess_p50_ms": median([x["preprocess_ms"] for x in tm]),
               "select_p50_ms": select, "decode_p50_ms": median([x["decode_ms"] for x in tm]),
               "numpy_score_topk_p50_ms": median(numpy_ms), "clip_image_p50_ms": median(clip_img),
               "clip_text_uncached_p50_ms": median(clip_txt), "clip_text_cached_p50_ms": median(cached_txt),
               "select_share": select / total, "numpy_share": median(numpy_ms) / total}
        rows.append(row)
        log(f"selection {count} packs: {row}")
    return rows, {"station_install_with_probe_ms": probe_install_ms,
                  "filler_build_pack_p50_ms": median(filler_build_ms) if filler_build_ms else None,
                  "filler_packstore_install_p50_ms": median(filler_install_ms) if filler_install_ms else None,
                  "filler_packs": len(filler_install_ms)}


def bench_selection_synthetic(preset: str, counts: list[int], reps: int, work: Path, signer, trusted,
                              threads: int, precision: str = "fp32") -> list[dict]:
    """Selection on a bigger base without installing 1000 packs: a real Station with the 3 matching
    packs (Station.install, golden probe) gives the per-part latency and the CLIP query times; the
    numpy score + top-k runs over N keys (the 3 real ones + N-3 random unit keys)."""
    from kaizen.runtime.preprocess import load_rgb
    from kaizen.runtime.selection import normalise

    _, bundle = ensure_base(preset, precision=precision)
    st, images, *_ = station_with_tasks(bundle, work, f"syn-{preset}", signer, trusted, threads)
    for i in range(3):
        st.infer(images[i], INSTRUCTIONS[i])
    tm = []
    for r in range(reps):
        tm.append(st.infer(images[r % 3], INSTRUCTIONS[r % 3])["timings_ms"])
    rgb = [load_rgb(images[0])]
    clip_img = median(timed(reps, st.engine.clip_image, rgb))
    clip_txt = median([timed(1, st.engine.clip_text, [f"An instruction no pack knows, number {k}?"])[0]
                       for k in range(reps)])
    snap = st._snap
    cached = median(timed(reps, st._text_queries, snap, [INSTRUCTIONS[0]]))
    q_img, q_txt = normalise(st.engine.clip_image(rgb)), st._text_queries(snap, [INSTRUCTIONS[0]])
    total3 = median([x["total_ms"] for x in tm])
    select3 = median([x["select_ms"] for x in tm])
    st.close()
    rng = np.random.default_rng(0)
    rows = []
    for n in counts:
        extra = rng.standard_normal((max(0, n - 3), snap.keys.shape[1])).astype(np.float32)
        keys = np.concatenate([snap.keys, normalise(extra)])[:n]
        numpy_ms = median(timed(max(200, reps), select_numpy, q_img, q_txt, keys, 0.5, 3))
        select = clip_img + cached + numpy_ms
        per_part = total3 - select3 + select
        rows.append({"preset": preset, "precision": precision, "packs": n, "keys": "3 real + random unit keys", "reps": reps,
                     "per_part_p50_ms": per_part, "measured_total_3_packs_p50_ms": total3,
                     "measured_select_3_packs_p50_ms": select3, "select_est_ms": select, "clip_image_p50_ms": clip_img,
                     "clip_text_uncached_p50_ms": clip_txt, "clip_text_cached_p50_ms": cached,
                     "numpy_score_topk_p50_ms": numpy_ms, "select_share": select / per_part,
                     "numpy_share": numpy_ms / per_part})
        log(f"synthetic selection {preset} {n}: {rows[-1]}")
    return rows
