"""Fault injection for the reliability tests (``tests/faults``); inert unless the variable is set.

``LLMCLIP_INJECT_NAN_AT_STEP`` makes the training loss NaN at chosen optimizer steps, so the
non-finite path of both trainers (skip the step, count it, stop after
``run.max_nonfinite_steps`` in a row) runs for real. Entries are comma-separated
``STEP[:TIMES][@RANK]``: ``STEP`` is 1-based like ``metrics.jsonl`` and checkpoint names; ``TIMES``
limits the injection to the first attempts at that step (a skipped step is retried on the next
batch), default every attempt; ``RANK`` limits it to one rank, default every rank. Example:
``"3:1,5@1"`` = the first try of step 3 everywhere, and every try of step 5 on rank 1.
"""

from __future__ import annotations

import os
from collections import Counter

import torch

ENV = "LLMCLIP_INJECT_NAN_AT_STEP"
_attempts: Counter = Counter()


def _parse(spec: str) -> list[tuple[int, int | None, int | None]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        item, _, rank = item.partition("@")
        step, _, times = item.partition(":")
        out.append((int(step), int(times) if times else None, int(rank) if rank else None))
    return out


def inject_nonfinite(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """``loss`` + NaN when ``LLMCLIP_INJECT_NAN_AT_STEP`` selects this (step, attempt, rank)."""
    spec = os.environ.get(ENV)
    if not spec:
        return loss
    _attempts[step] += 1
    for at, times, only in _parse(spec):
        if at == step and (times is None or _attempts[step] <= times) and only in (None, rank):
            return loss + float("nan")
    return loss
