"""Paper B's remaining image tasks: binary zero-shot detection and linear probes.

- ``binary_zero_shot``: RSNA-pneumonia / SIIM-pneumothorax style detection of one finding.
  score = cos(img, normalised mean of "X" prompts) - cos(img, normalised mean of "no X" prompts),
  the same prompt-ensemble rule as the per-finding zero-shot AUROC in ``image_text.py``; AUROC
  with a bootstrap interval (``stats.auroc_ci``). Uncertain (-1) images are left out.
- ``linear_probe``: how linearly decodable each finding is from the frozen image features (the
  standard CLIP probe protocol): per finding a standardised, class-balanced logistic regression on
  the train split, AUROC with a bootstrap interval on the test split. A finding with fewer than
  ``min_positives`` positive or negative images in either split is skipped (too few to fit or to
  give a stable AUROC), and the macro AUROC is over the findings that were not skipped, with a
  bootstrap interval resampling test images jointly across findings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmclip.eval.stats import auroc, auroc_ci, statistic_ci

_WHAT = {
    "train_positives": "train positives",
    "train_negatives": "train negatives",
    "positives": "test positives",
    "negatives": "test negatives",
}


def _features(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, d], got shape {x.shape}")
    return x


def _labels(y: Any, n: int, k: int | None = None) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y).astype(np.int64)
    want = (n,) if k is None else (n, k)
    if y.shape != want:
        raise ValueError(f"labels must have shape {want}, got {y.shape}")
    if np.any((y != 1) & (y != 0) & (y != -1)):
        raise ValueError("labels must be 1 (positive), 0 (negative) or -1 (uncertain)")
    return y


def binary_zero_shot(
    image: torch.Tensor,
    y: Any,
    pos_emb: torch.Tensor,
    neg_emb: torch.Tensor,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Binary zero-shot AUROC for one finding from "X" vs "no X" prompt ensembles.

    ``image`` [N, d] image embeddings (re-normalised here, so the score is a true cosine);
    ``y`` [N] 1 / 0 / -1 (uncertain, dropped); ``pos_emb`` [P, d] and ``neg_emb`` [Q, d] prompt
    embeddings. Returns ``auroc_ci``'s fields plus ``"uncertain"`` (images dropped).
    """
    img = F.normalize(image.detach().float().cpu(), dim=-1)
    if img.ndim != 2:
        raise ValueError(f"image must be [N, d], got shape {tuple(img.shape)}")
    yy = _labels(y, img.shape[0])
    pos = F.normalize(pos_emb.detach().float().cpu().reshape(-1, img.shape[1]).mean(0), dim=0)
    neg = F.normalize(neg_emb.detach().float().cpu().reshape(-1, img.shape[1]).mean(0), dim=0)
    score = (img @ pos - img @ neg).numpy()
    keep = yy >= 0
    out = auroc_ci(yy[keep], score[keep], n_boot=n_boot, seed=seed)
    out["uncertain"] = int((~keep).sum())
    return out


def _macro_auroc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Mean over columns of the AUROC on that column's certain rows (None if any is undefined)."""
    aucs = []
    for j in range(y.shape[1]):
        keep = y[:, j] >= 0
        a = auroc(y[keep, j], score[keep, j])
        if a is None:
            return None
        aucs.append(a)
    return float(np.mean(aucs))


def linear_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    classes: list[str],
    min_positives: int = 10,
    C: float = 1.0,
    seed: int = 0,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Per-finding logistic-regression probe on frozen image features, AUROC on the test split.

    ``*_x`` [N, d] features; ``*_y`` [N, len(classes)] 1 / 0 / -1 (uncertain rows dropped per
    class). Model: ``StandardScaler`` (fitted on train) + ``LogisticRegression(lbfgs,
    max_iter=1000, class_weight="balanced")``. Returns ``{"per_class": {cls: entry},
    "macro_auroc", "macro_classes", "macro_ci"}``; an entry holds ``auroc`` (= ``value``), ``lo``,
    ``hi``, ``n``, test ``positives`` / ``negatives``, ``train_positives`` / ``train_negatives``
    and ``skipped`` (None, or why the class was skipped, with ``auroc`` None).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, xte = _features(train_x), _features(test_x)
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train/test feature widths differ: {xtr.shape[1]} vs {xte.shape[1]}")
    k = len(classes)
    ytr, yte = _labels(train_y, xtr.shape[0], k), _labels(test_y, xte.shape[0], k)

    per_class: dict[str, dict[str, Any]] = {}
    used: list[str] = []
    used_cols: list[int] = []
    scores: list[np.ndarray] = []
    for j, cls in enumerate(classes):
        counts = {
            "train_positives": int((ytr[:, j] == 1).sum()),
            "train_negatives": int((ytr[:, j] == 0).sum()),
            "positives": int((yte[:, j] == 1).sum()),
            "negatives": int((yte[:, j] == 0).sum()),
        }
        short = [_WHAT[name] for name, c in counts.items() if c < min_positives]
        if short:
            per_class[cls] = {
                "auroc": None,
                "value": None,
                "lo": None,
                "hi": None,
                "n": counts["positives"] + counts["negatives"],
                **counts,
                "skipped": f"fewer than {min_positives} {' / '.join(short)}",
            }
            continue
        keep = ytr[:, j] >= 0
        model = make_pipeline(
            StandardScaler(),
            LogisticRegression(
                C=C, solver="lbfgs", max_iter=1000, class_weight="balanced", random_state=seed
            ),
        )
        model.fit(xtr[keep], ytr[keep, j])
        score = model.decision_function(xte)
        test_keep = yte[:, j] >= 0
        ci = auroc_ci(yte[test_keep, j], score[test_keep], n_boot=n_boot, seed=seed)
        per_class[cls] = {"auroc": ci["value"], **ci, **counts, "skipped": None}
        used.append(cls)
        used_cols.append(j)
        scores.append(score)

    macro = float(np.mean([per_class[c]["auroc"] for c in used])) if used else None
    macro_ci: dict[str, Any] = {"value": None, "lo": None, "hi": None, "n": int(xte.shape[0])}
    if used:
        macro_ci = statistic_ci(
            _macro_auroc, (yte[:, used_cols], np.stack(scores, axis=1)), n_boot=n_boot, seed=seed
        )
    return {
        "per_class": per_class,
        "macro_auroc": macro,
        "macro_classes": used,
        "macro_ci": macro_ci,
    }
