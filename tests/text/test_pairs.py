"""Stage-1 pairs from real Open-I reports: with ``task_batches`` every micro-step holds one pair
type, the same on every rank; without it, the pair types mix within a step."""

from __future__ import annotations

import random

from llmclip.text.pairs import build_pairs
from llmclip.text.stage1_batch import step_seed, summary_share
from llmclip.text.stage1_config import ObjectiveConfig
from llmclip.text.stream import ReportStream


def test_task_batches_give_one_pair_type_per_step_on_every_rank(openi_shards):
    metas = ReportStream(f"{openi_shards}:train", seed=0).take(32)
    both = [m for m in metas if (m.get("report") or {}).get("findings") and m["report"].get("impression")]
    assert len(both) >= 8
    obj = ObjectiveConfig(hard_negatives=3, summary_fraction=0.3, task_batches=True)
    shares = [summary_share(obj, step_seed(0, step, 0, 0)) for step in range(400)]
    assert set(shares) == {0.0, 1.0} and 0.22 < sum(shares) / len(shares) < 0.38
    for share in (0.0, 1.0):
        for rank in (0, 1):  # each rank draws its own pairs; the step's type is shared
            kinds = {p.kind for p in build_pairs(both, random.Random(rank), 3, share)}
            assert kinds == {"summary" if share else "rewrite"}
    mixed = ObjectiveConfig(summary_fraction=0.3)
    assert summary_share(mixed, 123) == 0.3
    kinds = [p.kind for p in build_pairs(both * 8, random.Random(0), 3, summary_share(mixed, 123))]
    assert {"summary", "rewrite"} <= set(kinds)
