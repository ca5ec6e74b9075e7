"""Evaluation of a method under the MCITlib protocol, and `kaizen eval --run RUN`.

After training task t, every task i <= t (and, with full_matrix, every task) is evaluated on
its test split: accuracy A[t][i] (exact match after normalisation, or the task's metric), and
for selection methods the selection accuracy (top-1 task == true task; the test phrasings
never occur in training). Decoding follows the station's rule (methods/base.py).

    row = evaluate_row(method, features, tasks, upto=t, full_matrix=True)
    kaizen eval --run runs/kaizen-s0          # re-evaluates every row from the checkpoints
"""

from __future__ import annotations

import argparse
import time

import torch

from .metrics import accuracy
from .progress import progress


def evaluate_task(method, features, tasks, i: int, batch_size: int = 32) -> dict:
    """{"acc", "selection" (or None), "n", "seconds"} of task i's test split."""
    task = tasks[i]
    refs = [(i, j) for j in range(len(task.test))]
    preds, picked = [], []
    start = time.perf_counter()
    for s in range(0, len(refs), batch_size):
        pred = method.predict(features.batch(tasks, refs[s:s + batch_size], "test"))
        preds += pred.answers
        picked += pred.selected
    seconds = time.perf_counter() - start
    sel = None
    if method.uses_selection:
        sel = 100.0 * sum(p == i for p in picked) / len(picked)
    return {"acc": accuracy(preds, [s.answer for s in task.test], task.metric), "selection": sel,
            "n": len(refs), "seconds": seconds, "predictions": preds}


def evaluate_row(method, features, tasks, upto: int, full_matrix: bool = True, batch_size: int = 32,
                 desc: str = "eval") -> dict:
    """Row t of the accuracy matrix (None where not evaluated) + selection + inference ms."""
    acc: list[float | None] = [None] * len(tasks)
    sel: list[float | None] = [None] * len(tasks)
    n, seconds = 0, 0.0
    todo = range(len(tasks)) if full_matrix else range(upto + 1)
    with torch.no_grad():
        for i in progress(todo, desc=desc):
            r = evaluate_task(method, features, tasks, i, batch_size)
            acc[i] = r["acc"]
            if i <= upto:
                sel[i] = r["selection"]
            n += r["n"]
            seconds += r["seconds"]
    seen_sel = [s for s in sel[: upto + 1] if s is not None]
    return {"acc": acc, "selection": sel if method.uses_selection else None,
            "selection_mean": sum(seen_sel) / len(seen_sel) if seen_sel else None,
            "infer_ms": 1000.0 * seconds / max(n, 1), "eval_samples": n}


def reevaluate(run_dir, progress_bar: bool = True) -> dict:
    """Rebuild the run's method after each finished task from its checkpoint and evaluate it.
    A continue run (`kaizen train --continue`) is evaluated on its whole stream: the tasks a
    `--new-task` added and the samples each `--task` added to a task's train split."""
    from . import train as tr
    from .data.added import rebuild_tasks

    session = tr.Session.from_run(run_dir)
    session.tasks = rebuild_tasks(session)
    rows = session.state["rows"]
    for t, row in enumerate(rows):
        method = session.restore(upto=t)
        new = evaluate_row(method, session.features, session.tasks, t, session.cfg.full_matrix,
                           session.cfg.eval_batch_size, desc=f"eval row {t}")
        row.update({"acc": new["acc"], "selection": new["selection"],
                    "selection_mean": new["selection_mean"], "infer_ms": new["infer_ms"]})
    return session.finish(rows)


def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kaizen eval", description="Re-evaluate a training run (accuracy "
                                 "matrix, MFT/MFN/MAA/BWT, selection accuracy) from its checkpoints.")
    ap.add_argument("--run", required=True, help="run folder written by `kaizen train`")
    a = ap.parse_args(argv)
    results = reevaluate(a.run)
    m = results["metrics"]
    print(f"{results['method']}: MFT {m['MFT']:.1f}  MFN {m['MFN']:.1f}  MAA {m['MAA']:.1f}  BWT {m['BWT']:+.1f}"
          f"  -> {a.run}/results.json")
    return 0
