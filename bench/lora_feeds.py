"""Benchmark: four ways to give the decoder a pack's LoRA, per part.

    .venv/bin/python bench/lora_feeds.py [--presets tiny-llama,small] [--parts 30] [--threads 2]
        [--providers CPUExecutionProvider] [--work cache/bench]   # bundles as bench/engine.py makes them

  numpy    the pack's arrays, validated and fed on every decoder run (the engine before issue 12)
  device   a DeviceLora (runtime/lora_device.py), what the Station feeds: validated once; OrtValues
           made once on a CUDA session's device, the padded numpy arrays on the CPU
  ortvalue a DeviceLora with OrtValues forced (what a CUDA session gets), here on the session's device
  adapter  ONNX Runtime's LoraAdapter: an .onnx_adapter file (AdapterFormat), LoraAdapter.Load,
           RunOptions.add_active_adapter on every run

Each part: a greedy answer (4 new tokens: 5 decoder runs) and a closed-set score (yes/no: 1 run),
the three ways interleaved part by part (a shared machine's noise hits all of them alike); then
300 single decode-step runs per way, taking turns (the per-run feed cost with the least else in it). Also the
one-time setup per pack and where the values live (OrtValue.device_name()). Every way must give
the same tokens; the script exits 1 otherwise. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
INSTRUCTION, NEW_TOKENS, ANSWERS = "Is the part damaged?", 4, ["yes", "no"]
WAYS = ("numpy", "device", "ortvalue", "adapter")


class _WithRunOptions:
    """The decoder session, every run with `run_options` (the adapter way; lora=None then)."""

    def __init__(self, session, run_options, adapter):
        # RunOptions keeps a bare pointer to the adapter: without this reference the LoraAdapter is
        # freed when setup() returns and runs read freed memory (seen: wrong answers, a crash).
        self.session, self.run_options, self.adapter = session, run_options, adapter

    def run(self, names, feeds):
        return self.session.run(names, feeds, self.run_options)


def setup(eng, lora: dict, way: str, work: Path):
    """-> (lora argument for the engine, decoder object, setup ms, device of the values)."""
    import onnxruntime as ort

    from kaizen.runtime.lora_device import DeviceLora

    t = time.perf_counter()
    if way == "numpy":
        return lora, eng.decoder, 0.0, "host (numpy)"
    if way in ("device", "ortvalue"):
        dev = DeviceLora.create(eng.lora_feeds(lora), eng.decoder, ortvalues=True if way == "ortvalue" else None)
        value = next(iter(dev.feeds.values()))
        where = value.device_name() if isinstance(value, ort.OrtValue) else f"host (numpy, {dev.device})"
        return dev, eng.decoder, (time.perf_counter() - t) * 1e3, where
    values = {k: ort.OrtValue.ortvalue_from_numpy(v, "cpu", 0) for k, v in eng.lora_feeds(lora).items()}
    fmt = ort.AdapterFormat()
    fmt.set_parameters(values)
    path = work / "pack.onnx_adapter"
    fmt.export_adapter(str(path))
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    opts = ort.RunOptions()
    opts.add_active_adapter(adapter)
    # The Python binding has no device allocator: the adapter stays memory-mapped on the host.
    return None, _WithRunOptions(eng.decoder, opts, adapter), (time.perf_counter() - t) * 1e3, "host (mmap)"


def _decode_steps(eng, ways: dict, img, prompt, real_decoder, runs: int = 300) -> dict[str, float]:
    """p50 ms per way of one decode-step decoder run (batch 1, one new token after the prefill's
    cache), the LoRA fed as the way does (Engine.lora_feeds included, as generate calls it); the
    ways take turns run by run."""
    embeds, mask, pos = eng.build_inputs([img], [INSTRUCTION], prompt)
    _, past = eng._run(embeds, mask, pos, eng._empty_past(1), eng.lora_feeds(ways["numpy"][0]), keep=1)
    emb = eng.embed[[1]][:, None, :].astype(eng.float)
    mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
    times: dict[str, list[float]] = {w: [] for w in ways}
    try:
        for _ in range(runs):
            for w, (arg, decoder, _, _) in ways.items():
                eng.decoder = decoder
                t = time.perf_counter()
                eng._run(emb, mask, pos[:, -1:] + 1, past, eng.lora_feeds(arg), keep=1)
                times[w].append((time.perf_counter() - t) * 1e3)
    finally:
        eng.decoder = real_decoder
    return {w: float(np.percentile(v, 50)) for w, v in times.items()}


def bench_preset(bundle: Path, parts: int, threads: int, providers: list[str]) -> tuple[list[dict], bool]:
    from kaizen.runtime.bundle import Bundle
    from kaizen.runtime.engine import Engine

    eng = Engine(Bundle.open(bundle, providers=providers, threads=threads))
    rng = np.random.default_rng(0)
    size = eng.vision_pre.size
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(parts)]
    prompt = (rng.standard_normal((10, eng.embed.shape[1])) * 0.02).astype(np.float32)
    lora = {k: (rng.standard_normal(v) * 0.02).astype(eng.float) for k, v in eng.lora_shapes.items()}
    real_decoder = eng.decoder
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        ways = {w: setup(eng, lora, w, Path(tmp)) for w in WAYS}
        gen = {w: [] for w in WAYS}
        score = {w: [] for w in WAYS}
        answers = {w: [] for w in WAYS}
        for i, img in enumerate([images[0]] * 3 + images):  # 3 warm-up parts, not timed
            for w in WAYS[i % len(WAYS):] + WAYS[: i % len(WAYS)]:
                arg, eng.decoder = ways[w][0], ways[w][1]
                t = time.perf_counter()
                g = eng.generate([img], [INSTRUCTION], prompt, arg, NEW_TOKENS)[0]
                t1 = time.perf_counter()
                s = eng.score_answers([img], [INSTRUCTION], ANSWERS, prompt, arg)[0]
                t2 = time.perf_counter()
                eng.decoder = real_decoder
                if i >= 3:
                    gen[w].append((t1 - t) * 1e3)
                    score[w].append((t2 - t1) * 1e3)
                    answers[w].append((tuple(g.token_ids), s.answer, round(s.confidence, 4)))
        step = _decode_steps(eng, ways, images[0], prompt, real_decoder)
    same = all(answers[w] == answers["numpy"] for w in WAYS)
    rows = [{"way": w, "setup_ms": ways[w][2], "where": ways[w][3],
             "gen_p50": float(np.percentile(gen[w], 50)), "gen_p95": float(np.percentile(gen[w], 95)),
             "score_p50": float(np.percentile(score[w], 50)), "score_p95": float(np.percentile(score[w], 95)),
             "step_p50": step[w], "lora_mb": sum(a.nbytes for a in lora.values()) / 2**20} for w in WAYS]
    return rows, same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny-llama,small")
    ap.add_argument("--parts", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--providers", default="CPUExecutionProvider")
    ap.add_argument("--work", default=str(ROOT / "cache" / "bench"))
    a = ap.parse_args()
    from engine import ensure_base  # bench/engine.py: the same bundles

    print(f"providers {a.providers}, {a.parts} parts, {a.threads} threads; generate = {NEW_TOKENS} new tokens, "
          f"score = {ANSWERS}\n")
    print("| base | LoRA MB | way | values live on | setup ms (once per pack) | generate p50 / p95 ms | "
          "score p50 / p95 ms | decode step p50 ms |\n|---|---|---|---|---|---|---|---|")
    ok = True
    for preset in a.presets.split(","):
        _, bundle = ensure_base(preset, Path(a.work))
        rows, same = bench_preset(bundle, a.parts, a.threads, a.providers.split(","))
        ok &= same
        for r in rows:
            print(f"| {preset} | {r['lora_mb']:.2f} | {r['way']} | {r['where']} | {r['setup_ms']:.1f} | "
                  f"{r['gen_p50']:.2f} / {r['gen_p95']:.2f} | {r['score_p50']:.2f} / {r['score_p95']:.2f} | "
                  f"{r['step_p50']:.3f} |")
        if not same:
            print(f"{preset}: the ways gave different answers", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
