"""Benchmark: task selection by the base's query encoders alone (prototype keys, no training).

    .venv/bin/python bench/selection.py BASE [--stream realdev|inspection] [--n-train 200 --n-test 50]

Per task, the key is the prototype ModalPrompt starts from (mean unit image query and mean unit
text query of the task's TRAINING parts); test parts use phrasings never seen in training. Prints
per-task selection accuracy, the confusion table, and the no-match figures: the threshold is
calibrated on the training parts only (the `--keep` quantile of their best scores, default 1 %),
then applied to the test parts (share still selected) and to parts from none of the tasks
(trainer/data/realdev.py `nomatch_set`: other clip-art kinds, textures, off-task questions; share
answered "no task matches"). Writes JSON next to the base (selection-<stream>.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> dict:
    from kaizen.export.loading import load_base, load_query
    from kaizen.runtime.selection import scores
    from kaizen.trainer.data.stream import builtin_stream
    from kaizen.trainer.data.types import Task
    from kaizen.trainer.features import FeatureCache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("--stream", default="realdev")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--n-nomatch", type=int, default=120)
    ap.add_argument("--keep", type=float, default=0.01, help="share of training parts allowed below the threshold")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    base = load_base(a.base)
    fc = FeatureCache(base, load_query(base))
    tasks = builtin_stream(a.stream, seed=0, n_train=a.n_train, n_test=a.n_test)
    keys, train_q, test_q = [], [], []
    for t in tasks:
        tr, te = fc.split(t, "train"), fc.split(t, "test")
        img, txt = tr.clip_img.mean(0), tr.clip_txt.mean(0)
        keys.append(torch.cat([img / img.norm(), txt / txt.norm()]) if not fc.aligned else
                    (img / img.norm() + txt / txt.norm()) / 2)
        train_q.append((tr.clip_img.numpy(), tr.clip_txt.numpy()))
        test_q.append((te.clip_img.numpy(), te.clip_txt.numpy()))
    K = torch.stack(keys).numpy()
    names = [t.task_id for t in tasks]
    best_train = np.concatenate([scores(i, x, K).max(1) for i, x in train_q])
    threshold = float(np.quantile(best_train, a.keep))
    confusion = np.zeros((len(tasks), len(tasks)), int)
    kept = []
    for ti, (i, x) in enumerate(test_q):
        s = scores(i, x, K)
        for row in s:
            confusion[ti, int(row.argmax())] += 1
            kept.append(row.max() >= threshold)
    per_task = {n: float(confusion[i, i] / confusion[i].sum()) for i, n in enumerate(names)}
    report = {"base": a.base, "stream": a.stream, "n_train": a.n_train, "n_test": a.n_test,
              "query_kind": "clip" if fc.aligned else "vision+text", "selection": float(np.trace(confusion) / confusion.sum()),
              "per_task": per_task, "confusion": confusion.tolist(), "tasks": names, "threshold": threshold,
              "test_kept_above_threshold": float(np.mean(kept))}
    if a.stream == "realdev" and a.n_nomatch:
        from kaizen.trainer.data.realdev import nomatch_set

        nm = Task("nomatch", nomatch_set(seed=0, n=a.n_nomatch), nomatch_set(seed=0, n=a.n_nomatch)[:1])
        f = fc.split(nm, "train")
        s = scores(f.clip_img.numpy(), f.clip_txt.numpy(), K)
        report["nomatch_refused"] = float(np.mean(s.max(1) < threshold))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: v for k, v in report.items() if k != "confusion"}, indent=1))
    print("confusion (rows: true task, cols: selected):")
    for n, row in zip(names, confusion):
        print(f"  {n:>20} " + " ".join(f"{v:4d}" for v in row))
    (Path(a.base) / f"selection-{a.stream}.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
