"""Bootstrap intervals: coverage and width against known truths, exact agreement of the
vectorised AUROC bootstrap with a plain scikit-learn loop, edge cases and formatting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from llmclip.eval.stats import auroc, auroc_ci, fmt_ci, mean_ci, statistic_ci


def _width(d: dict) -> float:
    return d["hi"] - d["lo"]


def test_mean_ci_contains_value_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small = mean_ci(rng.random(50) < 0.7)
    large = mean_ci(rng.random(5000) < 0.7)
    for d, n in ((small, 50), (large, 5000)):
        assert d["n"] == n
        assert d["lo"] <= d["value"] <= d["hi"]
        assert d["lo"] < d["hi"]
    # Width scales like 1/sqrt(n): 100x the items -> ~10x narrower.
    assert _width(large) < _width(small) / 5
    # And matches the normal approximation 2 * 1.96 * sqrt(p(1-p)/n) within 20%.
    expect = 2 * 1.96 * np.sqrt(0.7 * 0.3 / 5000)
    assert _width(large) == pytest.approx(expect, rel=0.2)
    assert large["lo"] < 0.7 < large["hi"]


def test_mean_ci_coverage_of_true_mean():
    rng = np.random.default_rng(2)
    hits = 0
    for i in range(200):
        d = mean_ci(rng.random(100) < 0.6, seed=i)
        hits += d["lo"] <= 0.6 <= d["hi"]
    # Nominal 95%; the percentile bootstrap runs a little under at n=100. Not trivially wide either.
    assert 0.88 * 200 <= hits <= 0.995 * 200


def test_mean_ci_edge_cases_seed_and_level():
    assert mean_ci([]) == {"value": None, "lo": None, "hi": None, "n": 0}
    assert mean_ci([0.25]) == {"value": 0.25, "lo": 0.25, "hi": 0.25, "n": 1}
    assert mean_ci(np.ones(30)) == {"value": 1.0, "lo": 1.0, "hi": 1.0, "n": 30}
    x = np.random.default_rng(3).normal(size=200)
    assert mean_ci(x, seed=5) == mean_ci(torch.tensor(x), seed=5)
    assert mean_ci(x, seed=5) != mean_ci(x, seed=6)
    assert _width(mean_ci(x, level=0.5)) < _width(mean_ci(x, level=0.95))
    with pytest.raises(ValueError):
        mean_ci(x, level=95)
    with pytest.raises(ValueError):
        mean_ci(x, n_boot=0)


def test_mean_ci_fast_for_large_n():
    import time

    x = np.random.default_rng(4).random(10_000) < 0.3
    t = time.perf_counter()
    d = mean_ci(x)
    assert time.perf_counter() - t < 5.0
    assert d["lo"] < 0.3 < d["hi"] or abs(d["value"] - 0.3) < 0.02


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(5)
    y = rng.random(300) < 0.3
    s = rng.integers(0, 4, size=300) + y  # integer scores -> many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(np.ones(5), np.arange(5)) is None


def test_auroc_ci_perfect_separation():
    y = np.array([0] * 20 + [1] * 10)
    s = np.concatenate([np.linspace(0, 1, 20), np.linspace(2, 3, 10)])
    d = auroc_ci(y, s)
    assert d == {"value": 1.0, "lo": 1.0, "hi": 1.0, "n": 30, "positives": 10, "negatives": 20}


def test_auroc_ci_random_scores_contains_half():
    rng = np.random.default_rng(6)
    y = (rng.random(400) < 0.4).astype(int)
    d = auroc_ci(y, rng.normal(size=400))
    assert abs(d["value"] - 0.5) < 0.08
    assert d["lo"] < 0.5 < d["hi"]
    assert 0.05 < _width(d) < 0.2


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_auroc_ci_equals_sklearn_bootstrap_loop():
    # statistic_ci draws the same index matrices; roc_auc_score raises (or gives NaN) on
    # single-class resamples, which are skipped in both -> identical intervals.
    rng = np.random.default_rng(7)
    y = (rng.random(25) < 0.2).astype(int)  # few positives: some resamples have none
    s = rng.integers(0, 3, size=25) + y  # 4 distinct scores: ties across classes everywhere
    fast = auroc_ci(y, s, n_boot=300, seed=11)
    slow = statistic_ci(roc_auc_score, (y, s), n_boot=300, seed=11)
    assert fast["value"] == pytest.approx(slow["value"])
    assert fast["lo"] == pytest.approx(slow["lo"], abs=1e-12)
    assert fast["hi"] == pytest.approx(slow["hi"], abs=1e-12)


def test_auroc_ci_missing_class_and_bad_labels():
    d = auroc_ci(np.zeros(10), np.arange(10))
    assert d["value"] is None and d["lo"] is None and d["hi"] is None
    assert d["positives"] == 0 and d["negatives"] == 10
    with pytest.raises(ValueError):
        auroc_ci(np.array([1, 0, -1]), np.arange(3))
    with pytest.raises(ValueError):
        auroc_ci(np.array([1, 0]), np.arange(3))


def test_statistic_ci_resamples_rows_jointly():
    rng = np.random.default_rng(8)
    x = rng.normal(size=100)
    # x paired with itself: every joint resample has correlation 1 (independent ones would not).
    d = statistic_ci(lambda a, b: np.corrcoef(a, b)[0, 1], (x, x.copy()), n_boot=200)
    assert d["lo"] == pytest.approx(1.0) and d["hi"] == pytest.approx(1.0)
    # Same index stream as mean_ci; torch tensors are resampled too.
    ref = mean_ci(x, n_boot=200, seed=3)
    got = statistic_ci(lambda t: float(t.mean()), (torch.tensor(x),), n_boot=200, seed=3)
    assert got["lo"] == pytest.approx(ref["lo"]) and got["hi"] == pytest.approx(ref["hi"])
    # Undefined on the data -> None; mismatched lengths -> error.
    assert statistic_ci(lambda a: None, (x,))["value"] is None
    with pytest.raises(ValueError):
        statistic_ci(lambda a, b: 0.0, (x, x[:5]))


def test_fmt_ci():
    assert fmt_ci({"value": 0.83, "lo": 0.7512, "hi": 0.898, "n": 88}) == "83.0 [75.1, 89.8] (n=88)"
    assert fmt_ci({"value": 0.5, "lo": 0.25, "hi": 0.75, "n": 4}, pct=False, digits=2) == (
        "0.50 [0.25, 0.75] (n=4)"
    )
    assert fmt_ci({"value": 0.5, "lo": None, "hi": None, "n": 2}) == "50.0 (n=2)"
    assert fmt_ci({"value": None, "lo": None, "hi": None, "n": 0}) == "-"
    assert fmt_ci(None) == "-"
