"""Benchmark: the ONNX Runtime engine vs the reference way (transformers + peft, eager torch).

    .venv/bin/python bench/engine.py [--presets tiny-llama,small,real-fast,real-small] [--parts 40]
        [--threads 2] [--paths torch,ort] [--work cache/bench] [--precision fp32|fp16|int8|int4]
        # --paths ort: the engine alone; --precision: the engine's bundle (torch runs the fp32 base)

Same base, same pack-like adapter (10-token soft prompt + rank-8 LoRA), same parts (image +
instruction -> short greedy answer, 4 new tokens). Each path runs in its own fresh process so
import time and peak RSS are its own. Prints a table and writes reports/bench/engine.json.
The ORT row says whether the bundle's decoder takes `logits_to_keep` (bundles exported before
issue 12 compute logits for every prefill position); a bundle in --work is reused, not re-exported.
`small` has a realistic shape but random weights (figures are for speed and memory only).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "Is the part damaged?"
NEW_TOKENS = 4


def _percentiles(xs):
    import numpy as np

    return {"p50_ms": float(np.percentile(xs, 50)), "p95_ms": float(np.percentile(xs, 95))}


def run_path(path: str, base_dir: str, bundle_dir: str, parts: int, threads: int) -> dict:
    t0 = time.perf_counter()
    if path == "ort":
        import numpy as np

        from kaizen.runtime.bundle import Bundle
        from kaizen.runtime.engine import Engine
    else:
        import numpy as np
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    import_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    meta = json.loads((Path(bundle_dir) / "base.json").read_text())
    size = json.loads((Path(bundle_dir) / "preprocess.json").read_text())["vision"]["size"]
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(parts)]
    prompt = (rng.standard_normal((10, meta["text"]["hidden_size"])) * 0.02).astype(np.float32)
    lora = {k: (rng.standard_normal(v) * 0.02).astype(np.float32) for k, v in meta["lora"]["shapes"].items()}
    if path == "ort":
        import onnxruntime as ort

        threads_ok = ort.get_available_providers()
        eng = Engine(Bundle.open(bundle_dir, providers=["CPUExecutionProvider"], threads=threads))
        run = lambda img: eng.generate([img], [INSTRUCTION], prompt, lora, NEW_TOKENS)[0].token_ids
        del threads_ok
    else:
        from kaizen.export.loading import load_base
        from kaizen.export.reference import apply_peft_lora, embed_prompt, torch_generate
        from kaizen.runtime.preprocess import preprocess_batch

        torch.set_num_threads(threads)
        base = load_base(base_dir)
        model = apply_peft_lora(base.model, lora, meta["lora"]["rank"], meta["lora"]["targets"])
        p_t = torch.from_numpy(prompt)

        def run(img):
            with torch.no_grad():
                px = torch.from_numpy(preprocess_batch([img], base.preprocess))
                emb, mask = embed_prompt(model, base, px, [INSTRUCTION], p_t)
                return torch_generate(model, base, emb, mask, NEW_TOKENS)[0]
    for img in images[:3]:
        run(img)  # warm-up
    lat, toks = [], 0
    for img in images:
        t = time.perf_counter()
        out = run(img)
        lat.append((time.perf_counter() - t) * 1000)
        toks += len(out)
    rss_mb = peak_rss_mb()
    keeps = eng.keeps_logits if path == "ort" else None
    return {"path": path, "import_s": import_s, **_percentiles(lat), "tokens_per_s": toks / (sum(lat) / 1000),
            "peak_rss_mb": rss_mb, "parts": parts, "logits_to_keep": keeps}


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM, which exec resets (ru_maxrss of a child inherits the
    parent's peak across fork+exec, so a parent that exported a bundle would set both figures)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best available


def ensure_base(preset: str, work: Path, precision: str = "fp32") -> tuple[Path, Path]:
    """A built-in preset (random init: bench/common.py) or a real one (assembled from packaged
    parts, not aligned: the figures are speed and memory, which alignment does not change)."""
    from kaizen.trainer.presets import REAL_PRESETS

    if preset not in REAL_PRESETS:  # imported here: the timed children import no bench helpers
        from common import ensure_base as ensure_random_base

        return ensure_random_base(preset, work, precision)
    base = work / preset / "base"
    bundle = work / preset / ("bundle" if precision == "fp32" else f"bundle-{precision}")
    if not (bundle / "base.json").exists():
        from kaizen.export.base_export import export_bundle
        from kaizen.trainer.assemble import assemble

        if not (base / "config.json").exists():
            assemble(preset, base, cache=work / "parts")
        export_bundle(base, bundle, precision=precision)
    return base, bundle


def child(path, base, bundle, parts, threads) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--base", str(base), "--bundle", str(bundle),
           "--parts", str(parts), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny-llama,small")
    ap.add_argument("--parts", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default="torch,ort", help="which paths to run: torch, ort or both")
    ap.add_argument("--work", default=str(ROOT / "cache" / "bench"))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"],
                    help="the engine's bundle (torch always runs the fp32 base)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench"))
    ap.add_argument("--child")
    ap.add_argument("--base")
    ap.add_argument("--bundle")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_path(a.child, a.base, a.bundle, a.parts, a.threads)))
        return
    paths = [p for p in a.paths.split(",") if p]
    if not paths or set(paths) - {"torch", "ort"}:
        ap.error(f"--paths {a.paths!r}: give torch, ort or torch,ort")
    rows = []
    for preset in a.presets.split(","):
        base, bundle = ensure_base(preset, Path(a.work), a.precision)
        row = {"preset": preset, "precision": a.precision, **{p: child(p, base, bundle, a.parts, a.threads) for p in paths}}
        if len(paths) == 2:
            torch_r, ort_r = row["torch"], row["ort"]
            row.update(speedup_p50=torch_r["p50_ms"] / ort_r["p50_ms"],
                       import_ratio=torch_r["import_s"] / ort_r["import_s"],
                       rss_ratio=ort_r["peak_rss_mb"] / torch_r["peak_rss_mb"])
        rows.append(row)
    print("| base | path | p50 ms | p95 ms | tokens/s | import s | peak RSS MB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        for p in paths:
            x = r[p]
            name = "transformers+peft" if p == "torch" else (
                f"kaizen engine (ORT, {r['precision']})" + ("" if x["logits_to_keep"] else ", full prefill logits"))
            print(f"| {r['preset']} | {name} | {x['p50_ms']:.1f} | {x['p95_ms']:.1f} | {x['tokens_per_s']:.0f} | "
                  f"{x['import_s']:.2f} | {x['peak_rss_mb']:.0f} |")
    for r in (r for r in rows if "speedup_p50" in r):
        print(f"{r['preset']}: engine {r['speedup_p50']:.1f}x faster per part (p50), imports "
              f"{r['import_ratio']:.1f}x faster, uses {r['rss_ratio']:.2f}x the torch stack's peak RSS")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
