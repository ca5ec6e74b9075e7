"""Stations with task packs for the pack benchmarks (bench/packs.py, bench/packs_selection.py):
the query parts and the three matching packs (keys = the bundle's own queries of those parts).

    st, images, meta, shapes, folder, engine = station_with_tasks(bundle, work, "hot", signer, trusted, threads=1)
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
from common import build_bundle_pack, bundle_lora_shapes

INSTRUCTIONS = ["Is the seal torn?", "How many holes are there?", "What colour is the cable?"]
TASKS = ["seal", "holes", "cable"]


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def query_images(size: int, n: int = 3, seed: int = 5) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def timed(reps: int, fn, *args) -> list[float]:
    """Milliseconds of each of `reps` calls fn(*args)."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def station_with_tasks(bundle: Path, work: Path, name: str, signer, trusted, threads: int):
    """A fresh Station in work/<name>-store with the TASKS packs (keys matching query_images) installed.
    Returns (station, images, meta, shapes, pack folder, engine)."""
    from kaizen.runtime.bundle import Bundle
    from kaizen.runtime.engine import Engine
    from kaizen.runtime.preprocess import load_rgb
    from kaizen.runtime.station import Station

    meta, shapes = bundle_lora_shapes(bundle)
    engine = Engine(Bundle.open(bundle, threads=threads))
    images = query_images(engine.vision_pre.size)
    folder, store_root = work / f"{name}-packs", work / f"{name}-store"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(store_root, ignore_errors=True)
    folder.mkdir(parents=True)
    st = Station(bundle, store_root, trusted, threshold=0.3, top_k=3, threads=threads)
    for i, task in enumerate(TASKS):
        p = folder / f"{task}-1.kpk"
        build_bundle_pack(p, meta, shapes, signer, task, 1, seed=i + 1, instruction=INSTRUCTIONS[i],
                          engine=engine, image=load_rgb(images[i]), golden=1)
        st.install(p)
    return st, images, meta, shapes, folder, engine
