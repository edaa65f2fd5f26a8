"""Stage-1 training examples from real reports, through the clinical toolkit.

Two pair types, each with its own task instruction (prepended to the query only, excluded from
pooling; the symmetric report <-> rewrite task has none, as the cached reports have none):

- ``rewrite``: query = the report (findings + impression); positive = a clinically equivalent
  rewrite (abbreviations expanded or contracted, sentences reordered, another style); hard negatives =
  the report or the rewrite with exactly one clinical error (negation flipped, side swapped, severity
  or a measurement changed). Edits are taken from either side so that "looks almost like the query"
  is never a shortcut for "wrong".
- ``summary``: query = the findings; positive = the impression that summarises them; hard negatives =
  the impression with one error.

Every rank must contribute the same number of pairs per step (the contrastive keys are gathered),
so ``build_pairs`` returns exactly one pair per sample it is given, falling back from ``summary`` to
``rewrite`` to the report itself as its own positive when the toolkit has nothing to offer.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any

INSTRUCTIONS: dict[str, str] = {
    # Report <-> rewrite is symmetric, and the cache encodes reports with no instruction: so the
    # query goes without one too, and training shapes the very space stage 2 reads. An instruction
    # on one side only taught the encoder to match across the prefix (abbreviation retrieval with
    # it fell far below the untrained base). "" = no instruction.
    "rewrite": "",
    "summary": "Given the findings of a chest X-ray report, retrieve its impression",
}

_SPACE = re.compile(r"\s+")


@dataclass
class Pair:
    """One contrastive example: a query, its positive and exactly ``H`` hard negatives."""

    kind: str
    query: str
    positive: str
    negatives: list[str]
    negative_valid: list[bool]


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def text_id(text: str) -> int:
    """A stable int64 identity of a text (case and spacing ignored), for duplicate masking."""
    digest = hashlib.blake2b(normalise(text).lower().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def report_text(meta: dict[str, Any]) -> str:
    """The text stage 1 encodes for a sample: the one clinical text (``llmclip.data.text``)."""
    from llmclip.data.text import sample_text

    return sample_text(meta)


def _sections(meta: dict[str, Any]) -> tuple[str, str]:
    rep = meta.get("report") or {}
    return normalise(str(rep.get("findings") or "")), normalise(str(rep.get("impression") or ""))


def _edits(text: str, rng: random.Random, k: int) -> list[str]:
    from llmclip.clinical import one_error_edits

    seen, out = {normalise(text).lower()}, []
    for v in one_error_edits(text, rng):
        t = normalise(v.text)
        if t and t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    rng.shuffle(out)
    return out[:k]


def _rewrite(text: str, rng: random.Random) -> str | None:
    from llmclip.clinical import equivalent_rewrites

    options = [normalise(v.text) for v in equivalent_rewrites(text, rng)]
    options = [t for t in options if t and t.lower() != normalise(text).lower()]
    return rng.choice(options) if options else None


def _pad(negs: list[str], filler: str, k: int) -> tuple[list[str], list[bool]]:
    return negs + [filler] * (k - len(negs)), [True] * len(negs) + [False] * (k - len(negs))


def build_pair(meta: dict[str, Any], rng: random.Random, hard_negatives: int,
               summary_fraction: float) -> Pair | None:
    """One pair for a sample, or None when the sample has no usable text."""
    text = report_text(meta)
    if not text:
        return None
    findings, impression = _sections(meta)
    if findings and impression and rng.random() < summary_fraction:
        negs, valid = _pad(_edits(impression, rng, hard_negatives), impression, hard_negatives)
        return Pair("summary", findings, impression, negs, valid)
    positive = _rewrite(text, rng) or text
    side = positive if rng.random() < 0.5 else text
    edits = _edits(side, rng, hard_negatives)
    if len(edits) < hard_negatives:
        other = text if side is positive else positive
        edits += [e for e in _edits(other, rng, hard_negatives) if e not in edits]
    negs, valid = _pad(edits[:hard_negatives], positive, hard_negatives)
    return Pair("rewrite", text, positive, negs, valid)


def build_pairs(metas: list[dict[str, Any]], rng: random.Random, hard_negatives: int,
                summary_fraction: float) -> list[Pair]:
    """One pair per sample with text (the stream already dropped samples without text)."""
    pairs = [build_pair(m, rng, hard_negatives, summary_fraction) for m in metas]
    return [p for p in pairs if p is not None]
