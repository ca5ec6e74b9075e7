"""Reports of runs and comparisons: JSON + Markdown table + PNG heat map (matplotlib, Agg).

    results = build_results(run_state, tasks); write_run_reports(run_dir, results)
    -> RUN/results.json, RUN/results.md, RUN/matrix.png
    write_compare(out_dir, summary) -> compare.json, compare.md

Accuracies and metrics are percentages. MFT/MFN/MAA/BWT come from kaizen.trainer.metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .checkpoint import write_json
from .metrics import summarize

NOTES = {
    "joint": "joint trains once, at the last task, on all tasks' data: read its MFN; its MFT/MAA/BWT "
             "use base-only rows and are not meaningful.",
    "zeroshot": "zeroshot trains nothing: every row is the frozen base.",
    "olora": "olora answers with the sum of all LoRAs so far; its pack of task t holds that sum (rank (t+1)*r).",
}


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def build_results(state: dict, tasks) -> dict:
    """results.json content from run.json's state (rows = finished tasks)."""
    rows = state["rows"]
    k = len(rows)
    matrix = [row["acc"] for row in rows]
    metrics = summarize([[_nan(a) for a in r[:k]] for r in matrix]) if k else {}
    last = rows[-1] if rows else {}
    counts = [row["params"] for row in rows]
    results = {
        "method": state["method"], "stream": state["stream"], "seed": state["config"]["seed"],
        "config": state["config"], "base_fingerprint": state.get("base_fingerprint"),
        "status": state.get("status"), "tasks_finished": k,
        "matrix": matrix, "metrics": metrics,
        "selection": None, "selection_final": last.get("selection_mean"),
        "params_per_task": counts, "trainable_params_per_task": [r["trainable_params"] for r in rows],
        "pack_bytes_per_task": [r["pack_bytes"] for r in rows],
        "train_seconds_per_task": [r["train_seconds"] for r in rows],
        "train_seconds_total": sum(r["train_seconds"] for r in rows),
        "infer_ms_per_sample": last.get("infer_ms"),
        "loss_last_per_task": [r["loss_last"] for r in rows],
        "notes": NOTES.get(state["method"], ""),
    }
    if rows and rows[0].get("selection") is not None:
        results["selection"] = [r["selection"] for r in rows]
    return results


def summary_line(results: dict) -> str:
    m = results["metrics"]
    line = (f"{results['method']} seed {results['seed']}: MFT {m['MFT']:.1f}  MFN {m['MFN']:.1f}  "
            f"MAA {m['MAA']:.1f}  BWT {m['BWT']:+.1f}")
    if results.get("selection_final") is not None:
        line += f"  selection {results['selection_final']:.1f}%"
    return line + f"  train {results['train_seconds_total']:.1f}s"


def _cell(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def run_markdown(results: dict) -> str:
    ids = results["stream"]
    lines = [f"# {results['method']} (seed {results['seed']})", "",
             "Accuracy matrix A[t][i] (%): row = after training task t, column = evaluated task i.", "",
             "| after \\ on | " + " | ".join(ids) + " |", "|---|" + "---|" * len(ids)]
    for t, row in enumerate(results["matrix"]):
        lines.append(f"| {ids[t]} | " + " | ".join(_cell(v) for v in row) + " |")
    m = results["metrics"]
    lines += ["", "| MFT | MFN | MAA | BWT | selection (final, %) | train s | infer ms/sample |",
              "|---|---|---|---|---|---|---|",
              (f"| {m['MFT']:.1f} | {m['MFN']:.1f} | {m['MAA']:.1f} | {m['BWT']:+.1f} | "
              f"{_cell(results['selection_final'])} | {results['train_seconds_total']:.1f} | "
              f"{_cell(results['infer_ms_per_sample'])} |"), "",
              "| task | trainable params | pack bytes (f32 arrays) | train s |", "|---|---|---|---|"]
    for i, t in enumerate(ids[: results["tasks_finished"]]):
        parts = " + ".join(f"{v} {k}" for k, v in results["params_per_task"][i].items()) or "0"
        lines.append(f"| {t} | {results['trainable_params_per_task'][i]} ({parts}) | {results['pack_bytes_per_task'][i]} | "
                     f"{results['train_seconds_per_task'][i]:.1f} |")
    if results["notes"]:
        lines += ["", f"Note: {results['notes']}"]
    return "\n".join(lines) + "\n"


def heatmap(matrix, ids: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    a = np.array([[_nan(v) for v in row] for row in matrix])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(ids), 1.0 + 0.7 * len(matrix)))
    im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(ids)), ids, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(matrix)), [f"after {i}" for i in ids[: len(matrix)]], fontsize=8)
    for (t, i), v in np.ndenumerate(a):
        if not math.isnan(v):
            ax.text(i, t, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run_reports(run_dir, results: dict) -> None:
    run_dir = Path(run_dir)
    write_json(run_dir / "results.json", results)
    (run_dir / "results.md").write_text(run_markdown(results))
    heatmap(results["matrix"], results["stream"], f"{results['method']} seed {results['seed']}: A[t][i] %",
            run_dir / "matrix.png")


COMPARE_FIELDS = ("MFT", "MFN", "MAA", "BWT", "selection", "train_s", "infer_ms", "params_per_task",
                  "pack_bytes_per_task")


def compare_markdown(summary: dict) -> str:
    lines = [f"# Method comparison on `{summary['stream']}` (seeds {summary['seeds']})", "",
             ("mean ± std over seeds [min, max]; accuracies in %; train_s = training seconds per run; "
             "params/bytes = mean per task."), "",
             "| method | " + " | ".join(COMPARE_FIELDS) + " |", "|---|" + "---|" * len(COMPARE_FIELDS)]
    for name, stats in summary["methods"].items():
        cells = []
        for f in COMPARE_FIELDS:
            s = stats.get(f)
            cells.append("—" if s is None else f"{s['mean']:.1f} ± {s['std']:.1f} [{s['min']:.1f}, {s['max']:.1f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"- {m}: {NOTES[m]}" for m in summary["methods"] if m in NOTES]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", f"Wall time: {summary['wall_seconds']:.0f} s; per method (all seeds): " +
              ", ".join(f"{m} {s:.0f} s" for m, s in summary["wall_seconds_per_method"].items())]
    return "\n".join(lines) + "\n"


def write_compare(out_dir, summary: dict) -> None:
    out_dir = Path(out_dir)
    write_json(out_dir / "compare.json", summary)
    (out_dir / "compare.md").write_text(compare_markdown(summary))


def load_results(run_dir) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())
