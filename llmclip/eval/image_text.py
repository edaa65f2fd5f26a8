"""Image-text evaluation of a stage-2 model on held-out shards.

- Zero-shot classification per CheXpert finding with prompt ensembles (``prompts.py``):
  score = cos(img, mean positive prompt) - cos(img, mean negative prompt); AUROC per finding
  (scikit-learn) over images labelled positive (1) vs negative or not mentioned (0 / absent);
  uncertain (-1) images are left out. Macro AUROC over findings with at least ``min_positives``
  (10) positive and negative images (fewer make one AUROC swing by 0.1 per image); for synthetic
  images only findings the phantom renderer draws. Every finding's AUROC is reported.
  CheXpert 5x200-style accuracy: images positive for exactly one of the five competition findings,
  classified by argmax of the positive-prompt similarity.
- Retrieval R@1/5/10 image->report and report->image, identical reports merged into one candidate
  (a query is right when any image of its report, or its report group, is in the top K).
- CXR-Align (``align.py``): the true report against one with a fact wrong, seen and held-out
  families. Every figure has a 95% percentile-bootstrap interval (``stats.py``) and its n.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmclip.eval.prompts import COMPETITION_5, PROMPTS

KS = (1, 5, 10)


@dataclass
class TestSet:
    """Held-out samples with their embeddings (normalised, in the shared space)."""

    keys: list[str]
    metas: list[dict[str, Any]]
    shards: list[str]
    image: torch.Tensor
    """[N, d] image embeddings."""
    thumbs: dict[str, np.ndarray] = field(default_factory=dict)
    """A few uint8 grayscale images by key, for the report's example grid."""


# ------------------------------------------------------------------------------------------------
# Labels and texts
# ------------------------------------------------------------------------------------------------


def label_targets(metas: list[dict[str, Any]], cls: str) -> np.ndarray:
    """1 positive, 0 negative / not mentioned, -1 uncertain (left out of AUROC)."""
    out = np.zeros(len(metas), dtype=np.int64)
    for i, m in enumerate(metas):
        v = (m.get("labels") or {}).get(cls)
        out[i] = 1 if v == 1 else (-1 if v == -1 else 0)
    return out


def normalise_report(text: str) -> str:
    """Key under which identical reports are merged (case and white space ignored)."""
    return re.sub(r"\s+", " ", text.strip().lower())


# ------------------------------------------------------------------------------------------------
# Metrics (pure functions of embeddings and labels)
# ------------------------------------------------------------------------------------------------


def prompt_classifier(
    encode_text, classes: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per class, the normalised mean positive and mean negative prompt embeddings."""
    out = {}
    for cls in classes:
        pos = encode_text(PROMPTS[cls]["positive"]).mean(0)
        neg = encode_text(PROMPTS[cls]["negative"]).mean(0)
        out[cls] = (pos / pos.norm(), neg / neg.norm())
    return out


def zero_shot(
    image: torch.Tensor,
    metas: list[dict[str, Any]],
    classifier: dict[str, tuple[torch.Tensor, torch.Tensor]],
    eligible: list[str],
    min_positives: int = 10,
) -> dict[str, Any]:
    """AUROC per finding, macro AUROC over ``eligible`` findings with enough positives/negatives,
    the ROC curves (for the report) and 5x200-style multi-class accuracy."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from llmclip.eval.stats import auroc, auroc_ci, statistic_ci

    per_class: dict[str, dict[str, Any]] = {}
    scores: dict[str, np.ndarray] = {}
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for cls, (pos, neg) in classifier.items():
        y = label_targets(metas, cls)
        keep = y >= 0
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        entry: dict[str, Any] = {"positives": n_pos, "negatives": n_neg, "auroc": None}
        score = (image @ pos - image @ neg).numpy()
        scores[cls] = score
        if n_pos >= 1 and n_neg >= 1:
            entry["auroc"] = float(roc_auc_score(y[keep], score[keep]))
            entry["ci"] = auroc_ci(y[keep], score[keep])
            fpr, tpr, _ = roc_curve(y[keep], score[keep])
            curves[cls] = (fpr.tolist(), tpr.tolist())
        entry["in_macro"] = bool(
            cls in eligible and n_pos >= min_positives and n_neg >= min_positives
        )
        per_class[cls] = entry
    used = [c for c, e in per_class.items() if e["in_macro"] and e["auroc"] is not None]
    macro = float(np.mean([per_class[c]["auroc"] for c in used])) if used else None
    macro_ci = None
    if used:
        # Images are resampled jointly across findings: the macro's interval keeps their correlation.
        ys = np.stack([label_targets(metas, c) for c in used], axis=1)
        ss = np.stack([scores[c] for c in used], axis=1)

        def _macro(y: np.ndarray, s: np.ndarray) -> float | None:
            vals = [auroc(y[y[:, j] >= 0, j], s[y[:, j] >= 0, j]) for j in range(len(used))]
            return None if any(v is None for v in vals) else float(np.mean(vals))

        macro_ci = statistic_ci(_macro, (ys, ss))
    return {
        "per_class": per_class,
        "macro_auroc": macro,
        "macro_ci": macro_ci,
        "macro_classes": used,
        "curves": curves,
        "competition": competition_accuracy(image, metas, classifier),
    }


def competition_accuracy(
    image: torch.Tensor,
    metas: list[dict[str, Any]],
    classifier: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, Any]:
    """5x200-style: among images positive for exactly one of COMPETITION_5, argmax over those five."""
    classes = [c for c in COMPETITION_5 if c in classifier]
    ys = (
        np.stack([label_targets(metas, c) == 1 for c in classes], axis=1)
        if classes
        else np.zeros((len(metas), 0))
    )
    rows = np.where(ys.sum(1) == 1)[0]
    counts = {c: int(ys[rows, j].sum()) for j, c in enumerate(classes)}
    if len(rows) == 0 or sum(1 for v in counts.values() if v) < 2:
        return {"accuracy": None, "n": int(len(rows)), "counts": counts}
    protos = torch.stack([classifier[c][0] for c in classes])
    from llmclip.eval.stats import mean_ci

    pred = (image[rows] @ protos.T).argmax(1).numpy()
    truth = ys[rows].argmax(1)
    ci = mean_ci((pred == truth).astype(np.float64))
    return {"accuracy": ci["value"], "n": int(len(rows)), "counts": counts, "ci": ci}


def retrieval(
    image: torch.Tensor, text: torch.Tensor, reports: list[str], max_k: int = 50
) -> dict[str, Any]:
    """R@K both directions with identical reports merged; also full recall curves up to ``max_k``."""
    groups: dict[str, int] = {}
    gid = np.array([groups.setdefault(normalise_report(r), len(groups)) for r in reports])
    first = np.array([int(np.where(gid == g)[0][0]) for g in range(len(groups))])
    g_text = text[torch.as_tensor(first)]
    sim = (image @ g_text.T).numpy()  # [N images, G reports]
    # image -> report: rank of the image's own group
    own = sim[np.arange(len(gid)), gid]
    i2t_rank = (sim > own[:, None]).sum(1)
    # report -> image: best rank among the group's images
    order = np.argsort(-sim.T, axis=1, kind="stable")  # [G, N]
    t2i_rank = np.array([int(np.where(gid[order[g]] == g)[0][0]) for g in range(len(groups))])
    ks = range(1, max_k + 1)
    out: dict[str, Any] = {"n_images": int(len(gid)), "n_reports": int(len(groups))}
    # Fraction of the other reports ranked below the true one, averaged over images (chance 0.5):
    # uses every comparison, so it moves before R@1 does on small or hard sets.
    out["i2t_percentile"] = float(1.0 - i2t_rank.mean() / max(1, len(groups) - 1))
    from llmclip.eval.stats import mean_ci

    out["ci"] = {}
    for k in KS:
        out[f"i2t_r{k}"] = float((i2t_rank < k).mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).mean())
        out["ci"][f"i2t_r{k}"] = mean_ci((i2t_rank < k).astype(np.float64))
        out["ci"][f"t2i_r{k}"] = mean_ci((t2i_rank < k).astype(np.float64))
    out["curves"] = {
        "k": list(ks),
        "i2t": [float((i2t_rank < k).mean()) for k in ks],
        "t2i": [float((t2i_rank < k).mean()) for k in ks],
        "i2t_chance": [min(1.0, k / len(groups)) for k in ks],
    }
    return out


# ------------------------------------------------------------------------------------------------
# Embedding a held-out split
# ------------------------------------------------------------------------------------------------


def embed_test_set(
    clip: Any, spec: str, batch_size: int = 64, num_workers: int = 1, n_thumbs: int = 8
) -> TestSet:
    """Every sample of the image shards in ``spec``, in shard order, through the image tower."""
    from tqdm import tqdm

    from llmclip.cache import shard_name
    from llmclip.clip.batching import unbatch
    from llmclip.data.loader import make_loader
    from llmclip.data.shards import resolve_shards

    shards = resolve_shards(spec, "image")
    total = sum(s.count for s in shards)
    loader = make_loader(
        spec,
        kind="image",
        batch_size=batch_size,
        image_size=clip.image_size,
        epoch=0,
        seed=0,
        num_workers=num_workers,
        shuffle=False,
    )
    key_to_shard = {}
    keys: list[str] = []
    metas: list[dict[str, Any]] = []
    embs: list[torch.Tensor] = []
    thumbs: dict[str, np.ndarray] = {}
    with tqdm(total=total, desc="eval images", unit="img", dynamic_ncols=True) as bar:
        for batch in loader:
            samples = unbatch(batch)
            images = torch.stack([torch.as_tensor(s["image"]) for s in samples])
            embs.append(clip.encode_image(images).cpu())
            for s, img in zip(samples, images, strict=True):
                keys.append(s["key"])
                metas.append(s["meta"])
                if len(thumbs) < n_thumbs:
                    thumbs[s["key"]] = img[0].numpy().copy()
                for f in ("shard", "__url__", "url"):
                    if s.get(f):
                        key_to_shard[s["key"]] = shard_name(str(s[f]))
                        break
            bar.update(len(samples))
    if not keys:
        from llmclip.config import ConfigError

        raise ConfigError(f"no samples in {spec}", "shards")
    if len(key_to_shard) < len(keys):
        from llmclip.cache import shard_keys

        for s in shards:
            for k in shard_keys(s.path):
                key_to_shard.setdefault(k, s.name)
    return TestSet(keys, metas, [key_to_shard.get(k, "") for k in keys], torch.cat(embs), thumbs)
