"""95% bootstrap confidence intervals for evaluation figures.

Test sets here are small (tens to a few thousand images; some findings have a dozen positives),
so a point estimate alone over-states what a comparison shows. Every figure gets a
nonparametric percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13): draw ``n_boot``
resamples of the items (images) with replacement, recompute the figure on each, and report the
``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles (numpy's linear interpolation) of the
resampled figures. Resampling is seeded (``numpy.random.default_rng(seed)``) so a report is
reproducible. Items are the unit of resampling: for a figure computed over several columns
(macro AUROC over findings) whole rows are resampled jointly, keeping the findings' correlation.
A resample on which the figure is undefined (an AUROC with one class) is skipped; the interval
is then conditional on both classes being present, which matters only for tiny class counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

_CHUNK_ELEMS = 1_000_000  # index-matrix elements per chunk (8 MB of int64) for large n


def _bounds(stats: np.ndarray, level: float) -> tuple[float | None, float | None]:
    """Percentile interval of the finite bootstrap statistics (None, None if there are none)."""
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return None, None
    a = (1.0 - level) / 2.0
    lo, hi = np.percentile(stats, [100.0 * a, 100.0 * (1.0 - a)])
    return float(lo), float(hi)


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _index_chunks(rng: np.random.Generator, n: int, n_boot: int) -> Iterator[np.ndarray]:
    """Bootstrap index matrices [rows, n] covering ``n_boot`` resamples, chunked so memory stays
    bounded for large n while each chunk is one vectorised draw."""
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    done = 0
    while done < n_boot:
        k = min(rows, n_boot - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def mean_ci(values: Any, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Mean of per-item outcomes (0/1 hits for accuracy / recall@K, or real values) with its
    percentile bootstrap interval. Vectorised: one index matrix per chunk, no per-resample loop.

    Returns ``{"value", "lo", "hi", "n"}``; ``n == 0`` gives None for value/lo/hi and ``n == 1``
    gives ``lo == hi == value`` (every resample is the single item).
    """
    _check(n_boot, level)
    v = _np(values).astype(np.float64).ravel()
    n = int(v.size)
    if n == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    value = float(v.mean())
    if n == 1:
        return {"value": value, "lo": value, "hi": value, "n": 1}
    rng = np.random.default_rng(seed)
    means = np.concatenate([v[idx].mean(axis=1) for idx in _index_chunks(rng, n, n_boot)])
    lo, hi = _bounds(means, level)
    return {"value": value, "lo": lo, "hi": hi, "n": n}


def auroc(y: Any, score: Any) -> float | None:
    """AUROC as the Mann-Whitney statistic with mid-ranks for ties (equal to scikit-learn's
    ``roc_auc_score`` for binary labels), None when one class is missing. Much cheaper than
    sklearn per call, which matters inside a 1000-resample loop."""
    from scipy.stats import rankdata

    y = _np(y).ravel().astype(bool)
    s = _np(score).astype(np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_ci(
    y: Any, score: Any, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """AUROC (scikit-learn, on all items) with a percentile bootstrap interval over (label, score)
    pairs resampled jointly; resamples with a single class are skipped.

    ``y`` is 1 positive / 0 negative (drop uncertain items before calling). Returns
    ``{"value", "lo", "hi", "n", "positives", "negatives"}``; value/lo/hi are None when a class is
    missing (lo/hi also when no resample had both classes).
    """
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    _check(n_boot, level)
    yy = _np(y).ravel().astype(np.int64)
    s = _np(score).astype(np.float64).ravel()
    if yy.shape != s.shape:
        raise ValueError(f"y and score differ in length: {yy.shape} vs {s.shape}")
    if np.any((yy != 0) & (yy != 1)):
        raise ValueError("y must be 0/1 (drop uncertain -1 items first)")
    n, n_pos = int(yy.size), int(yy.sum())
    out: dict[str, Any] = {
        "value": None,
        "lo": None,
        "hi": None,
        "n": n,
        "positives": n_pos,
        "negatives": n - n_pos,
    }
    if n_pos == 0 or n_pos == n:
        return out
    out["value"] = float(roc_auc_score(yy, s))
    rng = np.random.default_rng(seed)
    aucs = []
    for idx in _index_chunks(rng, n, n_boot):
        yb, sb = yy[idx], s[idx]
        p = yb.sum(axis=1).astype(np.float64)
        q = n - p
        r = rankdata(sb, axis=1)  # mid-ranks per resample: Mann-Whitney handles ties exactly
        with np.errstate(divide="ignore", invalid="ignore"):
            a = ((r * yb).sum(axis=1) - p * (p + 1) / 2.0) / (p * q)
        aucs.append(np.where((p > 0) & (q > 0), a, np.nan))
    out["lo"], out["hi"] = _bounds(np.concatenate(aucs), level)
    return out


def _take(a: Any, idx: np.ndarray) -> Any:
    if isinstance(a, torch.Tensor):
        return a[torch.from_numpy(idx).to(a.device)]
    return a[idx]


def statistic_ci(
    fn: Callable[..., float | None],
    arrays: tuple[Any, ...],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Any figure ``fn(*arrays) -> float`` with a percentile bootstrap interval, resampling the
    rows (first axis) of all ``arrays`` jointly, e.g. macro AUROC with rows = images and columns =
    findings. ``fn`` may return None / NaN, or raise ValueError, on a resample where the figure
    is undefined (one class missing): that resample is skipped.

    Returns ``{"value", "lo", "hi", "n"}``; all None but n if ``fn`` is undefined on the data.
    """
    _check(n_boot, level)
    if not arrays:
        raise ValueError("statistic_ci needs at least one array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays differ in length: {[len(a) for a in arrays]}")

    def call(*xs: Any) -> float:
        try:
            r = fn(*xs)
        except ValueError:
            return float("nan")
        return float("nan") if r is None else float(r)

    out: dict[str, Any] = {"value": None, "lo": None, "hi": None, "n": n}
    value = call(*arrays) if n else float("nan")
    if not np.isfinite(value):
        return out
    out["value"] = value
    rng = np.random.default_rng(seed)
    stats = np.array(
        [
            call(*(_take(a, row) for a in arrays))
            for idx in _index_chunks(rng, n, n_boot)
            for row in idx
        ]
    )
    out["lo"], out["hi"] = _bounds(stats, level)
    return out


def fmt_ci(d: dict[str, Any] | None, pct: bool = True, digits: int = 1) -> str:
    """``"83.0 [75.1, 89.8] (n=88)"`` (times 100 when ``pct``); ``"-"`` when there is no value;
    the bracket is left out when the interval is undefined, the count when ``d`` has no n."""
    if not d or d.get("value") is None:
        return "-"
    k = 100.0 if pct else 1.0
    s = f"{d['value'] * k:.{digits}f}"
    if d.get("lo") is not None and d.get("hi") is not None:
        s += f" [{d['lo'] * k:.{digits}f}, {d['hi'] * k:.{digits}f}]"
    if d.get("n") is not None:
        s += f" (n={d['n']})"
    return s
