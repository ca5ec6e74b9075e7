"""`kaizen compare`: several methods x several seeds on one stream, one table (mean ± std).

    kaizen compare --methods kaizen,modalprompt,lora_ft,replay,olora,individual,joint,zeroshot \
        --seeds 0,1,2 --base bases/tiny --out reports/compare

Each (method, seed) is a normal run folder OUT/runs/<method>/seed<k> (results.json, matrix.png);
one process shares the frozen base, CLIP and feature cache across all of them. A run whose
results.json already exists with the same config is reused (so an interrupted comparison
continues). Writes OUT/compare.json and OUT/compare.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kaizen.runtime.errors import ConfigError

from . import report
from .methods import METHODS
from .metrics import mean_and_spread
from .train import RESUME_FREE, Shared, add_train_args, config_from_args, train


def run_metrics(results: dict) -> dict[str, float]:
    """The per-run numbers the comparison averages over seeds."""
    out = dict(results["metrics"])
    if results.get("selection_final") is not None:
        out["selection"] = results["selection_final"]
    per = results["trainable_params_per_task"]
    out.update({"train_s": results["train_seconds_total"], "infer_ms": results["infer_ms_per_sample"],
                "params_per_task": sum(per) / len(per),
                "pack_bytes_per_task": sum(results["pack_bytes_per_task"]) / len(results["pack_bytes_per_task"])})
    return out


def _reusable(cfg, run: Path, fingerprint: str) -> dict | None:
    """The finished run's results when it was made with this config on this very base (a rebuilt
    or re-aligned base at the same path has another fingerprint: its runs are trained anew)."""
    path = run / "results.json"
    if not path.exists():
        return None
    old = report.load_results(run)
    want = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}
    have = {k: v for k, v in old["config"].items() if k not in RESUME_FREE}
    same_base = old.get("base_fingerprint") == fingerprint
    return old if want == have and same_base and old.get("status") == "done" else None


def compare(args, methods: list[str], seeds: list[int], out: Path, log=print) -> dict:
    shared = Shared(args.base, args.clip)
    per_method: dict[str, list[dict]] = {m: [] for m in methods}
    wall: dict[str, float] = {m: 0.0 for m in methods}
    start = time.perf_counter()
    for seed in seeds:
        for m in methods:
            run = out / "runs" / m / f"seed{seed}"
            cfg = config_from_args(args, m, str(run), seed)
            t0 = time.perf_counter()
            results = _reusable(cfg, run, shared.fingerprint)
            if results is None:
                if (run / "run.json").exists():
                    import shutil

                    shutil.rmtree(run)  # a stale or different run: start it again
                results = train(cfg, shared=shared)
            wall[m] += time.perf_counter() - t0
            per_method[m].append(results)
            log(report.summary_line(results) + f"  ({time.perf_counter() - t0:.0f} s)")
    summary = {"stream": args.stream, "seeds": seeds, "methods": {},
               "config": config_from_args(args, methods[0], str(out)).to_dict(),
               "wall_seconds": time.perf_counter() - start, "wall_seconds_per_method": wall, "per_seed": {}}
    for m, runs in per_method.items():
        summary["methods"][m] = mean_and_spread([run_metrics(r) for r in runs])
        summary["per_seed"][m] = [run_metrics(r) for r in runs]
    report.write_compare(out, summary)
    return summary


def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kaizen compare", description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--out", default="reports/compare", help="output folder")
    add_train_args(ap)
    a = ap.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {unknown}; choose among {sorted(METHODS)}")
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError as err:
        raise ConfigError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from err
    out = Path(a.out)
    summary = compare(a, methods, seeds, out)
    print((out / "compare.md").read_text())
    print(f"wrote {out}/compare.json and compare.md in {summary['wall_seconds']:.0f} s")
    return 0
