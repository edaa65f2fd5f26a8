"""CXR-Align: each held-out image must score its true report above a report with one fact wrong.

Two families of wrong reports, reported side by side:

- **seen**: what training made hard negatives from (``negate`` of the whole report, and the
  training laterality / severity edits of ``one_error_edits``), on the report as written; a gain
  here may be the model learning those templates;
- **held-out** (``llmclip.eval.heldout``): one chosen finding negated by a template, omitted (every
  sentence that mentions it, in every section), mirrored left <-> right, or regraded in severity;
  the true text is ``style(report)`` and the wrong one ``style(edit(report))``, so they differ only
  in the fact. Each edit is confirmed by the ``Labeler``; unconfirmed ones are dropped and counted.

Only images with the finding present take part in negation, omission, laterality and severity
(the wrong report then denies or misplaces what the image shows).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

SEEN_KINDS = ("negated", "laterality", "severity")
HELDOUT_KINDS = ("negation", "omission", "laterality", "severity")
_TRAINING_EDIT = {"laterality": "laterality_swap", "severity": "severity_change"}


def seen_variant(text: str, kind: str) -> str | None:
    """The training family's wrong report: the very strings the cache's columns hold."""
    from llmclip.clinical import negate
    from llmclip.clinical.edits import one_edit

    if kind == "negated":
        out = negate(text)
        return out if out.strip() and out != text else None
    return one_edit(text, _TRAINING_EDIT[kind])


def heldout_pair(text: str, kind: str, rng: random.Random, dropped: Any) -> tuple[str, str] | None:
    """(styled true report, styled wrong report) of one positive finding, or None."""
    from llmclip.eval import heldout

    styled = heldout.style(text)
    if styled is None:
        return None
    positives = heldout.positive_findings(text)
    rng.shuffle(positives)
    for obs in positives:
        v = heldout.edit(text, kind, rng, dropped, target=obs)
        wrong = heldout.style(v.text) if v else None
        if wrong and wrong != styled:
            return styled, wrong
    return None


def preference_ci(image: torch.Tensor, true: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """Share of images whose true report scores strictly above the other one, with its interval."""
    from llmclip.eval.stats import mean_ci

    if len(image) == 0:
        return {"accuracy": None, "value": None, "lo": None, "hi": None, "n": 0}
    margin = ((image * true).sum(-1) - (image * other).sum(-1)).numpy()
    ci = mean_ci((margin > 0).astype(np.float64))
    return {"accuracy": ci["value"], **ci, "mean_margin": float(margin.mean())}


def cxr_align(
    image: torch.Tensor,
    texts: list[str],
    true_emb: torch.Tensor,
    encode: Callable[[list[str]], torch.Tensor],
    seen_emb: dict[str, torch.Tensor | None],
    seed: int = 0,
) -> dict[str, Any]:
    """Both families. ``true_emb``: the reports as trained on (cache rows where available);
    ``seen_emb``: cached rows of seen-family columns (None: encode the variant online)."""
    from llmclip.eval.heldout import Dropped, positive_findings

    has_finding = [bool(positive_findings(t)) for t in texts]
    out: dict[str, Any] = {"seen": {}, "heldout": {}}
    for kind in SEEN_KINDS:
        variants = [seen_variant(t, kind) if has_finding[i] else None for i, t in enumerate(texts)]
        idx = [i for i, v in enumerate(variants) if v is not None]
        cached = seen_emb.get(kind)
        other = (
            cached[idx] if cached is not None else encode([variants[i] for i in idx])
        ) if idx else torch.zeros(0, true_emb.shape[1])
        out["seen"][kind] = preference_ci(image[idx], true_emb[idx], other)
    dropped = Dropped()
    for kind in HELDOUT_KINDS:
        pairs = {}
        for i, t in enumerate(texts):
            if has_finding[i]:
                pair = heldout_pair(t, kind, random.Random(f"{seed}:{kind}:{i}"), dropped)
                if pair is not None:
                    pairs[i] = pair
        idx = sorted(pairs)
        if idx:
            true = encode([pairs[i][0] for i in idx])
            wrong = encode([pairs[i][1] for i in idx])
        else:
            true = wrong = torch.zeros(0, true_emb.shape[1])
        out["heldout"][kind] = preference_ci(image[idx], true, wrong)
    out["heldout_dropped"] = dropped.counts
    out["images_with_a_finding"] = int(sum(has_finding))
    return out
