"""Continual-learning metrics of MCITlib (arXiv 2508.07307), and answer scoring. No torch.

A[t][i] is the accuracy on task i after training task t (0-based, T tasks, a T x T list or
array). Only the lower triangle (i <= t, diagonal included) is read; entries above the
diagonal (tasks not trained yet) may be NaN or anything. ALL VALUES ARE IN PERCENT (0..100):
inputs, and every metric returned.

    MFT = mean_i A[i][i]                        accuracy right after learning each task
    MFN = mean_i A[T-1][i]                      final accuracy over all tasks
    MAA = mean_t mean_{i<=t} A[t][i]            average accuracy over the whole stream
    BWT = mean_{i<T-1} (A[T-1][i] - A[i][i])    backward transfer (negative = forgetting)

With a single task (T = 1) nothing can be forgotten and BWT is 0.0 by definition (a number,
not None, so it averages over seeds like the others).

    from kaizen.trainer.metrics import accuracy, summarize, mean_and_spread
    acc = accuracy(["Yes.", "no"], ["yes", "yes"])        # 50.0
    summarize([[80, float("nan")], [60, 90]])            # {'MFT': 85.0, 'MFN': 75.0, 'MAA': 77.5, 'BWT': -20.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .data.types import KNOWN_METRICS, DataError, normalize_answer

METRIC_NAMES = ("MFT", "MFN", "MAA", "BWT")


def exact_match(pred: str, gold: str) -> bool:
    """True when the answers are equal after normalising case, whitespace and punctuation."""
    return normalize_answer(pred) == normalize_answer(gold)


def contains_match(pred: str, gold: str) -> bool:
    """True when the normalised gold answer occurs as whole words in the normalised prediction."""
    g = normalize_answer(gold)
    return bool(g) and f" {g} " in f" {normalize_answer(pred)} "


SCORERS: dict[str, Callable[[str, str], bool]] = {"exact": exact_match, "contains": contains_match}
assert tuple(SCORERS) == KNOWN_METRICS, "metrics.SCORERS and types.KNOWN_METRICS must agree"


def accuracy(preds: Sequence[str], golds: Sequence[str], metric: str = "exact") -> float:
    """Percentage (0..100) of predictions that match their gold answer under `metric`."""
    if metric not in SCORERS:
        raise DataError(f"unknown metric {metric!r}; use one of {list(SCORERS)}")
    if len(preds) != len(golds):
        raise DataError(f"accuracy: {len(preds)} predictions for {len(golds)} gold answers")
    if not golds:
        raise DataError("accuracy: no samples to score")
    hits = sum(SCORERS[metric](p, g) for p, g in zip(preds, golds))
    return 100.0 * hits / len(golds)


def as_matrix(matrix: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Validate an accuracy matrix: square, T >= 1, lower triangle finite and within 0..100."""
    try:
        a = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(f"accuracy matrix must be a T x T table of numbers ({err})") from err
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise DataError(f"accuracy matrix must be square T x T with T >= 1, got shape {list(a.shape)}")
    lower = a[np.tril_indices(a.shape[0])]
    if not np.all(np.isfinite(lower)):
        raise DataError("accuracy matrix has NaN/inf on or below the diagonal (A[t][i], i <= t); "
                        "every task seen so far must be evaluated")
    if lower.min() < 0 or lower.max() > 100:
        raise DataError(f"accuracy matrix values must be percentages in 0..100, got "
                        f"{lower.min():g}..{lower.max():g}")
    return a


def mft(matrix) -> float:
    a = as_matrix(matrix)
    return float(np.mean(np.diag(a)))


def mfn(matrix) -> float:
    a = as_matrix(matrix)
    return float(np.mean(a[-1]))


def maa(matrix) -> float:
    a = as_matrix(matrix)
    return float(np.mean([np.mean(a[t, : t + 1]) for t in range(a.shape[0])]))


def bwt(matrix) -> float:
    a = as_matrix(matrix)
    t = a.shape[0]
    if t == 1:
        return 0.0
    return float(np.mean(a[-1, : t - 1] - np.diag(a)[: t - 1]))


def summarize(matrix) -> dict[str, float]:
    """{"MFT", "MFN", "MAA", "BWT"} of one accuracy matrix, in percent."""
    return {"MFT": mft(matrix), "MFN": mfn(matrix), "MAA": maa(matrix), "BWT": bwt(matrix)}


def mean_and_spread(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric over runs (e.g. seeds): mean, std (sample std, ddof=1; 0.0 for one run), min,
    max and n. Every run must hold the same keys with finite numbers."""
    if not runs:
        raise DataError("mean_and_spread: no runs given")
    keys = list(runs[0])
    out: dict[str, dict[str, float]] = {}
    for k, run in enumerate(runs):
        if set(run) != set(keys):
            raise DataError(f"mean_and_spread: run #{k} has keys {sorted(run)}, run #0 has {sorted(keys)}")
    for key in keys:
        values = []
        for k, run in enumerate(runs):
            v = run[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DataError(f"mean_and_spread: run #{k} field {key!r} is not a finite number: {v!r}")
            values.append(float(v))
        arr = np.array(values)
        out[key] = {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                    "min": float(arr.min()), "max": float(arr.max()), "n": len(arr)}
    return out
