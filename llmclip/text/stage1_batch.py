"""Stage-1 micro-batches: the tensors of one micro-step on one rank.

A batch is a pure function of its seeds and the reports drawn (``step_seed`` depends only on the
seed, step, rank and micro-step), so a run resumed from a checkpoint builds the very batches a run
that never stopped would have.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from llmclip.text.encoder import LLMEncoder
from llmclip.text.pairs import Pair, build_pairs, report_text, text_id
from llmclip.text.stage1_config import ObjectiveConfig


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """Seed of one micro-step on one rank: independent of where the run (re)started."""
    return (seed * 1_000_003 + step * 1_009 + micro * 101 + rank) % (2**63 - 1)


def summary_share(obj: ObjectiveConfig, task_seed: int) -> float:
    """The findings -> impression share of one micro-step: the recipe's mix, or with ``task_batches``
    0 or 1 for the whole step (1 with probability ``summary_fraction``)."""
    if not obj.task_batches:
        return obj.summary_fraction
    return float(random.Random(task_seed).random() < obj.summary_fraction)


def encoded_negatives(valid: list[bool], others: int, buckets: int) -> list[bool]:
    """Which hard-negative slots a micro-step encodes: the real edits, not the fillers.

    A report with fewer one-error edits than ``hard_negatives`` fills its slots with masked
    placeholders (``pairs._pad``) so that every rank gathers keys of one shape; on the Open-I
    reports a third of the slots are fillers, ~9% of a step's text. Their scores are masked in the
    loss, so encoding them is pure waste: the module gives them zero embeddings instead. Only when
    the micro-step would then hold fewer texts than ``length_buckets`` are some fillers encoded, since
    every rank must run the same number of forwards (ZeRO-3 gathers weights around each one).
    """
    rows = list(valid)
    missing = buckets - others - sum(rows)
    for i, v in enumerate(valid):
        if missing <= 0:
            break
        if not v:
            rows[i], missing = True, missing - 1
    return rows


def make_batch(kind: str, metas: list[dict[str, Any]], enc: LLMEncoder, obj: ObjectiveConfig,
               seed: int, blank_id: int, task_seed: int) -> dict[str, Any]:
    """Tensors for one micro-step, built deterministically from ``seed`` (this rank's) and
    ``task_seed`` (the same on every rank: it picks the step's pair type with ``task_batches``)."""
    from llmclip.text.objectives import mntp_mask

    if kind == "mntp":
        # Length buckets, as for the contrastive pairs: a report batch padded to its longest row
        # spends about half its activations (time and memory) on padding.
        t = enc.tokenize_buckets([report_text(m) for m in metas], buckets=obj.length_buckets)
        gen = torch.Generator().manual_seed(seed)
        masked = [mntp_mask(i, a, blank_id, obj.mntp_mask_prob, gen)
                  for i, a in zip(t["input_ids"], t["attention_mask"], strict=True)]
        return {"kind": "mntp", "buckets": {"input_ids": [m[0] for m in masked],
                                            "attention_mask": t["attention_mask"],
                                            "labels": [m[1] for m in masked]}}
    rng = random.Random(seed)
    pairs = build_pairs(metas, rng, obj.hard_negatives, summary_share(obj, task_seed))
    valid = [v for p in pairs for v in p.negative_valid]
    rows = encoded_negatives(valid, 2 * len(pairs), obj.length_buckets)
    return {
        "kind": "contrastive",
        "texts": contrastive_texts(pairs, rows, enc, obj),
        "queries": len(pairs),
        "neg_valid": torch.tensor(valid, dtype=torch.bool),
        "neg_rows": torch.tensor(rows, dtype=torch.bool),
        "pos_ids": torch.tensor([text_id(p.positive) for p in pairs], dtype=torch.long),
        "neg_ids": torch.tensor([text_id(n) for p in pairs for n in p.negatives], dtype=torch.long),
    }


def negatives_to_encode(pairs: list[Pair], rows: list[bool]) -> list[str]:
    """The hard negatives a micro-step runs through the encoder (``rows`` of
    ``encoded_negatives``), in slot order."""
    negs = [n for p in pairs for n in p.negatives]
    return [n for n, r in zip(negs, rows, strict=True) if r]


def contrastive_texts(pairs: list[Pair], rows: list[bool], enc: LLMEncoder,
                      obj: ObjectiveConfig) -> dict[str, Any]:
    """Length buckets of a micro-step's queries (with their instruction), positives and the hard
    negatives of ``rows``.

    Queries and documents share the buckets: one forward per bucket for the whole micro-step, so
    fewer, larger matmuls and, under ZeRO-3, fewer gathers of every weight (measured on a CPU: 5
    forwards, 2 query + 3 document buckets, were slower).
    """
    docs = [p.positive for p in pairs] + negatives_to_encode(pairs, rows)
    return enc.tokenize_buckets([p.query for p in pairs] + docs,
                                [obj.instructions[p.kind] for p in pairs] + [None] * len(docs),
                                buckets=obj.length_buckets)


def _to(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to(v, device) for v in batch]
    return batch
