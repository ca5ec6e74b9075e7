"""Benchmark: peak memory (RSS) and wall time of exporting a base, and what a 7B export needs.

    .venv/bin/python bench/export_memory.py                          # tiny-llama, small, medium
    .venv/bin/python bench/export_memory.py --presets tiny-llama small --root /tmp/kaizen-export-mem

For each built-in preset: `kaizen base init` (once, kept under --root), then the export with its
parity check in a fresh child process (exec, so /proc/self/status VmHWM starts from nothing and
is that process's own peak; ru_maxrss would inherit the parent's). A thread in the child samples
VmRSS every 50 ms to split the peak into export and parity phases. Figures: weights bytes (fp32
parameters of the VLM + query encoder), peak RSS, peak / weights, wall times, bundle bytes, which
graphs went to external data. Then a least-squares line peak = a + b * weights (and the same for
export wall time) over the measured presets, evaluated at LLaVA-1.5-7B's size (7.06e9 parameters:
Vicuna-7B 6.74e9 + CLIP ViT-L/14-336 0.30e9 + projector 0.02e9, held in fp32 as the exporter loads
it). Prints a table, writes reports/bench/export_memory.json (--out).

Needs no GPU; the medium base (~640M parameters) peaks near 10 GB and takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAVA_7B_PARAMS = 7.06e9
GIB = 2**30

# Runs in the child: export one base with parity, report VmHWM and the phase peaks as one JSON line.
CHILD = r"""
import json, os, sys, threading, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
samples, marks, stop = [], {}, threading.Event()
def sample():
    while not stop.is_set():
        samples.append((time.perf_counter(), status("VmRSS")))
        if samples[-1][1] > float(sys.argv[5]) * 2**30:  # the machine's guard: stop, never swap or OOM
            print(f"RSS LIMIT: {samples[-1][1] / 2**30:.1f} GiB > {sys.argv[5]} GiB", file=sys.stderr, flush=True)
            os._exit(3)
        time.sleep(0.05)
import torch
torch.set_num_threads(int(sys.argv[4]))
from kaizen.export.base_export import export_bundle
rss_imports = status("VmRSS")
threading.Thread(target=sample, daemon=True).start()
def log(msg):
    marks.setdefault("exported" if msg.startswith("exported") else msg.split()[0], time.perf_counter())
t0 = time.perf_counter()
meta = export_bundle(sys.argv[1], sys.argv[2], precision=sys.argv[3], log=log)
t1 = time.perf_counter()
stop.set()
cut = marks.get("exported", t1)
print("RESULT " + json.dumps({
    "peak_rss": status("VmHWM"), "rss_after_imports": rss_imports,
    "peak_rss_export_sampled": max([r for t, r in samples if t <= cut] or [0]),
    "peak_rss_parity_sampled": max([r for t, r in samples if t > cut] or [0]),
    "export_s": cut - t0, "parity_s": t1 - cut, "total_s": t1 - t0,
    "external_data": meta["external_data"]}))
"""


def run_child(code: str, *args: str) -> tuple[dict | None, float, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True,
                          env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return (json.loads(lines[-1][7:]) if lines else None), wall, proc.stderr


def weights_bytes(base: Path) -> int:
    """fp32 parameter bytes of the VLM and its query encoder (the safetensors files, header aside)."""
    return sum(p.stat().st_size for p in list(base.glob("*.safetensors")) + list((base / "clip").glob("*.safetensors")))


def measure(preset: str, root: Path, precision: str, threads: int, limit_gib: float) -> dict:
    base, bundle = root / preset / "base", root / preset / f"bundle-{precision}"
    init_s = None
    if not (base / "kaizen_base.json").exists():
        code = "import sys; from kaizen.trainer.bases import init_base; init_base(sys.argv[1], sys.argv[2])"
        _, init_s, _ = run_child(code, preset, str(base))
    res, wall, _ = run_child(CHILD, str(base), str(bundle), precision, str(threads), str(limit_gib))
    w = weights_bytes(base)
    files = {p.name: p.stat().st_size for p in sorted(bundle.iterdir()) if p.is_file()}
    return {"preset": preset, "precision": precision, "weights_bytes": w, "init_s": init_s, "child_wall_s": wall,
            **res, "peak_over_weights": res["peak_rss"] / w, "bundle_bytes": sum(files.values()), "files": files}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny-llama", "small", "medium"])
    ap.add_argument("--root", default="/tmp/kaizen-export-mem", help="where bases and bundles are written")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-gib", type=float, default=18.0, help="stop the export child past this RSS")
    ap.add_argument("--out", default=str(REPO / "reports" / "bench" / "export_memory.json"))
    a = ap.parse_args(argv)
    rows = []
    for preset in a.presets:
        print(f"exporting {preset} ...", flush=True)
        rows.append(measure(preset, Path(a.root), a.precision, a.threads, a.limit_gib))
    print("\n| preset | weights GB | peak RSS GB | peak/weights | export s | parity s | external data |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['weights_bytes'] / 1e9:.3f} | {r['peak_rss'] / 1e9:.2f} | "
              f"{r['peak_over_weights']:.2f} | {r['export_s']:.1f} | {r['parity_s']:.1f} | "
              f"{', '.join(f for fs in r['external_data'].values() for f in fs) or '-'} |")
    report = {"rows": rows, "threads": a.threads, "machine": {"cpus": os.cpu_count()}}
    if len(rows) >= 2:
        w7 = LLAVA_7B_PARAMS * 4
        xs = [r["weights_bytes"] for r in rows]
        a_m, b_m = fit(xs, [r["peak_rss"] for r in rows])
        a_t, b_t = fit(xs, [r["export_s"] for r in rows])
        a_p, b_p = fit(xs, [r["parity_s"] for r in rows])
        report["llava_7b"] = {"weights_bytes_fp32": w7, "peak_rss_bytes": a_m + b_m * w7,
                              "export_s": a_t + b_t * w7, "parity_s": a_p + b_p * w7,
                              "fit": {"peak": [a_m, b_m], "export_s": [a_t, b_t], "parity_s": [a_p, b_p]}}
        e = report["llava_7b"]
        print(f"\nLLaVA-1.5-7B (fp32 weights {w7 / 1e9:.1f} GB), from the line through {len(rows)} presets: "
              f"peak RSS {e['peak_rss_bytes'] / 1e9:.1f} GB ({e['peak_rss_bytes'] / GIB:.1f} GiB), export "
              f"{e['export_s'] / 60:.0f} min + parity {e['parity_s'] / 60:.0f} min on {a.threads} threads")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
