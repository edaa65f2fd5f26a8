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
        negs = [n for p in pairs for n in p.negatives]
        encoded = [n for n, r in zip(negs, batch["neg_rows"].tolist(), strict=True) if r]
        alone += [enc(**enc.tokenize([t])) for t in [p.positive for p in pairs] + encoded]
    assert emb.shape[0] == 2 * b + len(encoded)
    torch.testing.assert_close(emb, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_encoded_negatives_skip_fillers_but_keep_every_bucket():
    from llmclip.text.stage1_batch import encoded_negatives

    assert encoded_negatives([True, False, True, False], 8, 3) == [True, False, True, False]
    # 2 queries' texts and no real edit: one filler is encoded so that 3 buckets still run.
    assert encoded_negatives([False, False, False], 2, 3) == [True, False, False]
    assert encoded_negatives([False, True, False], 1, 3) == [True, True, False]
    assert encoded_negatives([False, False], 4, 1) == [False, False]


def test_fillers_left_out_of_the_forward_give_the_same_loss_and_gradients(openi_shards):
    # A third of the hard-negative slots on Open-I are masked fillers (reports with fewer edits than
    # hard_negatives). make_batch encodes only the real edits and the module puts zero rows in the
    # fillers' slots; the loss and every adapter's gradient must equal the step that encodes all.
    import torch

    from llmclip.text.encoder import LLMEncoder
    from llmclip.text.model_config import ModelConfig
    from llmclip.text.objectives import blank_token_id
    from llmclip.text.stage1 import Stage1Module
    from llmclip.text.stage1_batch import make_batch

    torch.manual_seed(0)
    enc = LLMEncoder.build(ModelConfig(source="tiny:llama", attention="sdpa", max_length=96),
                           torch.float32)
    obj = ObjectiveConfig(hard_negatives=3, length_buckets=3)
    module = Stage1Module(enc, obj, autocast=False).eval()  # no LoRA dropout: the two runs compare
    for p in module.parameters():  # LoRA B starts at zero: give the adapters a non-trivial state
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    metas = ReportStream(f"{openi_shards}:train", seed=2).take(8)
    batch = make_batch("contrastive", metas, enc, obj, seed=5, blank_id=blank_token_id(enc.tokenizer),
                       task_seed=5)
    skipped = int((~batch["neg_rows"]).sum())
    assert skipped > 0 and not batch["neg_valid"][~batch["neg_rows"]].any()
    pairs = build_pairs(metas, random.Random(5), 3, summary_share(obj, 5))
    b = len(pairs)
    everything = dict(batch, neg_rows=torch.ones_like(batch["neg_rows"]),
                      texts=enc.tokenize_buckets(
                          [p.query for p in pairs] + [p.positive for p in pairs]
                          + [n for p in pairs for n in p.negatives],
                          [obj.instructions[p.kind] for p in pairs] + [None] * (b + 3 * b), buckets=3))
    assert sum(int(m.sum()) for m in everything["texts"]["attention_mask"]) > sum(
        int(m.sum()) for m in batch["texts"]["attention_mask"])

    def run(bt):
        module.zero_grad(set_to_none=True)
        loss = module(**bt)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}

    loss_all, grads_all = run(everything)
    loss_skip, grads_skip = run(batch)
    assert 0.1 < float(loss_all) and torch.isfinite(loss_skip)
    torch.testing.assert_close(loss_skip, loss_all, rtol=1e-5, atol=1e-6)
    assert grads_all.keys() == grads_skip.keys() and len(grads_all) > 0
    for n in grads_all:
        torch.testing.assert_close(grads_skip[n], grads_all[n], rtol=1e-4, atol=1e-6, msg=n)
