"""MCITlib metrics (MFT, MFN, MAA, BWT) on hand-computed matrices, answer scoring, spreads.

    .venv/bin/python -m pytest -q tests/test_metrics.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kaizen.trainer.data.types import KNOWN_METRICS, DataError
from kaizen.trainer.metrics import (
    SCORERS,
    accuracy,
    as_matrix,
    bwt,
    contains_match,
    exact_match,
    maa,
    mean_and_spread,
    mfn,
    mft,
    summarize,
)

NAN = float("nan")

# A[t][i]: accuracy on task i after training task t (percent); NaN above the diagonal.
A3 = [[90.0, NAN, NAN],
      [70.0, 80.0, NAN],
      [50.0, 60.0, 100.0]]


def test_three_task_matrix_by_hand():
    # MFT = (90 + 80 + 100) / 3 = 90
    assert mft(A3) == pytest.approx(90.0)
    # MFN = (50 + 60 + 100) / 3 = 70
    assert mfn(A3) == pytest.approx(70.0)
    # MAA = (90 + (70 + 80) / 2 + (50 + 60 + 100) / 3) / 3 = (90 + 75 + 70) / 3
    assert maa(A3) == pytest.approx(235.0 / 3)
    # BWT = ((50 - 90) + (60 - 80)) / 2 = -30
    assert bwt(A3) == pytest.approx(-30.0)
    assert summarize(A3) == pytest.approx({"MFT": 90.0, "MFN": 70.0, "MAA": 235.0 / 3, "BWT": -30.0})


def test_upper_triangle_is_ignored_and_positive_transfer():
    filled = np.array(A3)
    filled[np.triu_indices(3, 1)] = 3.0  # junk where tasks were not trained yet
    assert summarize(filled) == pytest.approx(summarize(A3))
    better = [[40.0, NAN], [60.0, 80.0]]  # task 0 improved after task 1: BWT = +20
    assert summarize(better) == pytest.approx({"MFT": 60.0, "MFN": 70.0, "MAA": 55.0, "BWT": 20.0})


def test_single_task_bwt_is_zero():
    assert summarize([[72.5]]) == {"MFT": 72.5, "MFN": 72.5, "MAA": 72.5, "BWT": 0.0}


def test_no_forgetting_matrix():
    a = [[100.0, NAN], [100.0, 100.0]]
    assert summarize(a) == {"MFT": 100.0, "MFN": 100.0, "MAA": 100.0, "BWT": 0.0}


@pytest.mark.parametrize("matrix, pattern", [
    ([[1.0, 2.0]], "square"),
    ([], "square"),
    ([[50.0, NAN], [NAN, 60.0]], "NaN/inf on or below the diagonal"),
    ([[0.5, NAN], [0.4, 1.2]], None),  # fractions are valid percents (just small ones)
    ([[150.0]], "percentages in 0..100"),
    ([[-1.0]], "percentages in 0..100"),
    ([["a"]], "table of numbers"),
])
def test_matrix_validation(matrix, pattern):
    if pattern is None:
        as_matrix(matrix)
        return
    with pytest.raises(DataError, match=pattern):
        summarize(matrix)


def test_exact_match_normalises_case_whitespace_punctuation():
    assert exact_match("Yes.", "yes")
    assert exact_match("  upside   down ", "Upside-down")
    assert exact_match("3", "3!")
    assert not exact_match("yes", "no")
    assert not exact_match("3 holes", "3")
    assert contains_match("There are 3 holes.", "3")
    assert not contains_match("There are 13 holes.", "3")
    assert tuple(SCORERS) == KNOWN_METRICS


def test_accuracy_in_percent():
    assert accuracy(["Yes", "no", "YES!", "maybe"], ["yes", "yes", "yes", "no"]) == 50.0
    assert accuracy(["it is red"], ["red"], metric="contains") == 100.0
    with pytest.raises(DataError, match="2 predictions for 1 gold"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(DataError, match="unknown metric"):
        accuracy(["a"], ["a"], metric="bleu")
    with pytest.raises(DataError, match="no samples"):
        accuracy([], [])


def test_mean_and_spread_over_seeds():
    runs = [summarize(A3), summarize([[70.0, NAN, NAN], [70.0, 60.0, NAN], [70.0, 40.0, 90.0]])]
    # second run: MFT 220/3, MFN 200/3, MAA (70 + 65 + 200/3)/3, BWT ((70-70) + (40-60))/2 = -10
    out = mean_and_spread(runs)
    assert set(out) == {"MFT", "MFN", "MAA", "BWT"}
    assert out["BWT"]["mean"] == pytest.approx(-20.0)
    assert out["BWT"]["std"] == pytest.approx(math.sqrt(200.0))  # sample std of -30, -10
    assert (out["BWT"]["min"], out["BWT"]["max"], out["BWT"]["n"]) == (-30.0, -10.0, 2)
    assert out["MFT"]["mean"] == pytest.approx((90.0 + 220.0 / 3) / 2)
    single = mean_and_spread([summarize(A3)])
    assert single["MFN"] == {"mean": 70.0, "std": 0.0, "min": 70.0, "max": 70.0, "n": 1}


def test_mean_and_spread_rejects_bad_runs():
    with pytest.raises(DataError, match="no runs"):
        mean_and_spread([])
    with pytest.raises(DataError, match="run #1 has keys"):
        mean_and_spread([{"MFT": 1.0}, {"MFN": 1.0}])
    with pytest.raises(DataError, match="run #0 field 'BWT' is not a finite number"):
        mean_and_spread([{"BWT": None}])
