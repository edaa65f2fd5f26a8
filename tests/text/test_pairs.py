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


def test_shared_length_buckets_embed_each_text_as_alone(openi_shards):
    # A contrastive micro-step runs queries and documents through the same length buckets. Each
    # text's embedding must not depend on its bucket mates (padding is masked) nor on its place:
    # the bucketed embeddings equal the texts embedded one at a time, queries with their
    # instruction, documents without.
    import torch

    from llmclip.text.encoder import LLMEncoder
    from llmclip.text.model_config import ModelConfig
    from llmclip.text.objectives import blank_token_id
    from llmclip.text.stage1_batch import make_batch

    torch.manual_seed(0)
    enc = LLMEncoder.build(ModelConfig(source="tiny:llama", attention="sdpa", max_length=96),
                           torch.float32, lora=False).eval()
    metas = ReportStream(f"{openi_shards}:train", seed=1).take(6)
    obj = ObjectiveConfig(hard_negatives=2, length_buckets=3)
    batch = make_batch("contrastive", metas, enc, obj, seed=3, blank_id=blank_token_id(enc.tokenizer),
                       task_seed=3)
    pairs = build_pairs(metas, random.Random(3), 2, summary_share(obj, 3))
    b = batch["queries"]
    assert b == len(pairs) and len(batch["texts"]["input_ids"]) == 3
    assert len({int(m.shape[1]) for m in batch["texts"]["attention_mask"]}) == 3  # padded apart
    with torch.no_grad():
        emb = enc.embed_buckets(batch["texts"])
        alone = [enc(**enc.tokenize([p.query], obj.instructions[p.kind])) for p in pairs]
        alone += [enc(**enc.tokenize([t])) for t in [p.positive for p in pairs]
                  + [n for p in pairs for n in p.negatives]]
    assert emb.shape[0] == 4 * b
    torch.testing.assert_close(emb, torch.cat(alone), rtol=1e-4, atol=1e-5)
