"""Raw-pixel baselines of the realdev stream: the bar a learned method has to clear.

Per task, given the oracle task id (no selection), two test accuracies:
  majority  always the most common training answer;
  probe     a linear softmax classifier (numpy, L2-regularised, full-batch gradient descent) on
            the raw pixels downsampled to `grid` x `grid` RGB and standardised; the L2 strength
            is picked on a held-out fifth of the training set, then refit on all of it.

    python -m kaizen.trainer.data.realdev_probe [--n-train 200 --n-test 50 --seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from .realdev import TASK_IDS, realdev_stream
from .types import Sample

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def features(samples: list[Sample], grid: int) -> np.ndarray:
    """Each image box-downsampled to grid x grid RGB, flattened, in [0, 1]."""
    rows = [np.asarray(Image.fromarray(s.load_image()).resize((grid, grid), Image.BOX), np.float32)
            for s in samples]
    return np.stack(rows).reshape(len(samples), -1) / 255.0


def fit_softmax(x: np.ndarray, y: np.ndarray, k: int, l2: float, steps: int = 300) -> np.ndarray:
    """Weights [d + 1, k] of a softmax regression (bias last), full-batch Adam on the mean
    cross-entropy + l2 * |W|^2."""
    xb = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
    w = np.zeros((xb.shape[1], k), np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    onehot = np.eye(k)[y]
    for t in range(1, steps + 1):
        logits = xb @ w
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = xb.T @ (p - onehot) / len(x) + 2 * l2 * np.vstack([w[:-1], np.zeros((1, k))])
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        w -= 0.05 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    return w


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1) @ w).argmax(axis=1)


def probe(train: list[Sample], test: list[Sample], answers: list[str], grid: int,
          seed: int) -> tuple[float, float, float]:
    """(majority accuracy, probe accuracy, chosen l2) on the test samples."""
    code = {a: i for i, a in enumerate(answers)}
    xtr, xte = features(train, grid), features(test, grid)
    ytr = np.array([code[s.answer] for s in train])
    yte = np.array([code[s.answer] for s in test])
    majority = float((yte == np.bincount(ytr, minlength=len(answers)).argmax()).mean())
    mu, sd = xtr.mean(axis=0), xtr.std(axis=0) + 1e-3
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    order = np.random.default_rng(seed).permutation(len(xtr))
    val, fit = order[: len(order) // 5], order[len(order) // 5:]
    scores = [(float((predict(fit_softmax(xtr[fit], ytr[fit], len(answers), l2), xtr[val])
                      == ytr[val]).mean()), -l2) for l2 in L2_GRID]
    l2 = -max(scores)[1]
    acc = float((predict(fit_softmax(xtr, ytr, len(answers), l2), xte) == yte).mean())
    return majority, acc, l2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    print(f"task                majority  probe({args.grid}x{args.grid} RGB)  per seed "
          f"[n_train={args.n_train} n_test={args.n_test}]")
    for task_id in TASK_IDS:
        t0, rows = time.perf_counter(), []
        for seed in args.seeds:
            (task,) = realdev_stream(seed, args.n_train, args.n_test, tasks=(task_id,))
            rows.append(probe(task.train, task.test, task.answers, args.grid, seed))
        maj, acc = np.mean([r[0] for r in rows]), np.mean([r[1] for r in rows])
        per = " ".join(f"{r[1]:.2f}(l2={r[2]:g})" for r in rows)
        print(f"{task_id:<18}  {maj:.3f}     {acc:.3f}              {per}  "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
