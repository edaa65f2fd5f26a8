"""Stage-1 objectives: MNTP masking, and the gathered contrastive loss on 2 real gloo ranks equal to
the 1-rank loss on the concatenated batch (value and gradients)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmclip.distributed import exit_process, free_port
from llmclip.text.objectives import (
    IGNORE,
    chunked_linear_cross_entropy,
    contrastive_loss,
    mntp_loss,
    mntp_mask,
)

B, H, D, WORLD = 3, 2, 8, 2


def _inputs():
    """A global batch: 6 queries, their positives and 2 hard negatives each; one duplicate positive
    text (ids 0 and 4) and one missing hard negative, so both masks matter."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(WORLD * B, D, generator=g)
    pos = q + 0.5 * torch.randn(WORLD * B, D, generator=g)
    neg = torch.randn(WORLD * B * H, D, generator=g)
    valid = torch.ones(WORLD * B * H, dtype=torch.bool)
    valid[3] = False
    pos_ids = torch.tensor([10, 11, 12, 13, 10, 15])
    neg_ids = torch.arange(100, 100 + WORLD * B * H)
    return q, pos, neg, valid, pos_ids, neg_ids


def _loss_and_grads(q, pos, neg, valid, pos_ids, neg_ids):
    q, pos, neg = (t.clone().requires_grad_(True) for t in (q, pos, neg))
    loss, _ = contrastive_loss(q, pos, neg, valid, pos_ids, neg_ids, scale=20.0)
    loss.backward()
    return loss.detach(), q.grad, pos.grad, neg.grad


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        q, pos, neg, valid, pos_ids, neg_ids = _inputs()
        rows, negs = slice(rank * B, (rank + 1) * B), slice(rank * B * H, (rank + 1) * B * H)
        res = _loss_and_grads(q[rows], pos[rows], neg[negs], valid[negs], pos_ids[rows], neg_ids[negs])
        out[rank] = [t.clone() for t in res]
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_process(0)  # tears the group down and skips finalisation (llmclip.distributed)


def test_two_rank_gathered_loss_equals_one_rank_loss():
    ref_loss, ref_q, ref_pos, ref_neg = _loss_and_grads(*_inputs())
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    # The global loss is the mean of the rank losses (equal local batch sizes).
    torch.testing.assert_close((out[0][0] + out[1][0]) / WORLD, ref_loss)
    # Each rank's gradient, averaged over ranks the way DeepSpeed averages, is the 1-rank gradient
    # of its own slice (the all-gather's backward sums the other ranks' contributions in).
    got_q = torch.cat([out[r][1] for r in range(WORLD)]) / WORLD
    got_pos = torch.cat([out[r][2] for r in range(WORLD)]) / WORLD
    got_neg = torch.cat([out[r][3] for r in range(WORLD)]) / WORLD
    torch.testing.assert_close(got_q, ref_q)
    torch.testing.assert_close(got_pos, ref_pos)
    torch.testing.assert_close(got_neg, ref_neg)
    assert ref_neg[3].abs().sum() == 0  # the padded hard negative takes no part


def test_duplicate_positive_text_is_not_a_negative():
    q, pos, neg, valid, pos_ids, neg_ids = _inputs()
    # A perfect encoder (query == its positive): rows 0 and 4 share their positive's text (and
    # vector); masked, the loss is ~0; unmasked, each of them has two equally good keys (~ln 2).
    same = torch.cat([pos[:4], pos[0:1], pos[5:]])
    loss, metrics = contrastive_loss(same, same, neg, valid, pos_ids, neg_ids, scale=50.0)
    assert loss.item() < 1e-3 and metrics["contrastive_acc"] == 1.0
    unmasked, _ = contrastive_loss(same, same, neg, valid, torch.arange(6), neg_ids, scale=50.0)
    assert abs(unmasked.item() - 2 * torch.log(torch.tensor(2.0)).item() / 6) < 1e-3


def test_mntp_mask_rate_and_positions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 40), generator=g)
    attn = torch.ones_like(ids)
    attn[::2, 25:] = 0  # padded rows
    masked, labels = mntp_mask(ids, attn, blank_id=3, prob=0.2, generator=g)
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[attn == 0].any()
    assert (masked[chosen] == 3).all() and (masked[~chosen] == ids[~chosen]).all()
    assert (labels[chosen] == ids[chosen]).all()
    rate = chosen.sum().item() / (attn[:, 1:].sum().item())
    assert 0.15 < rate < 0.25
    assert chosen.any(1).all()  # every row trains something
    short = torch.tensor([[7, 8]])
    _, lab = mntp_mask(short, torch.ones_like(short), 3, 0.01, g)
    assert (lab != IGNORE).sum() == 1


def test_mntp_loss_predicts_token_from_previous_position():
    vocab, d = 11, 6
    head = torch.nn.Linear(d, vocab, bias=False)
    states = torch.randn(1, 5, d)
    labels = torch.full((1, 5), IGNORE)
    labels[0, 3] = 7
    loss = mntp_loss(states, head, labels)
    expected = torch.nn.functional.cross_entropy(head(states[0, 2:3]), torch.tensor([7]))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(("chunk_rows", "vocab_block"), [(1, None), (7, 1), (64, 100), (1000, None),
                                                         (1000, 997), (150, 5000)])
def test_chunked_cross_entropy_equals_materialised_logits(chunk_rows, vocab_block):
    """Loss and both gradients equal the plain [N, V] logits path, for any row and head blocking."""
    g = torch.Generator().manual_seed(0)
    n, d, vocab = 150, 24, 997
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t)
    gh_ref, gw_ref = torch.autograd.grad(ref * 3.0, (h, w))
    out = chunked_linear_cross_entropy(h, w, t, chunk_rows, vocab_block)
    gh, gw = torch.autograd.grad(out * 3.0, (h, w))  # a non-unit upstream gradient is applied
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, gh_ref)
    torch.testing.assert_close(gw, gw_ref.to(gw.dtype))
    assert not torch.allclose(gh, torch.zeros_like(gh))


def test_chunked_cross_entropy_under_bf16_autocast_matches_plain():
    """Under CPU bf16 autocast the head blocks are cast per block; loss and input gradient agree with
    the plain autocast path (bf16 logits) to bf16 precision, and the result is not the fp32 one's
    exact copy (autocast is really applied)."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(90, 32, generator=g, requires_grad=True)
    w = torch.randn(1500, 32, generator=g) * 0.3
    t = torch.randint(0, 1500, (90,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.cross_entropy((h @ w.t()).float(), t)
        out = chunked_linear_cross_entropy(h, w, t, 16, 64)
    (g_ref,) = torch.autograd.grad(ref, h)
    (g_out,) = torch.autograd.grad(out, h)
    assert out.dtype == torch.float32 and g_out.dtype == h.dtype
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(g_out, g_ref, rtol=3e-2, atol=2e-4)
    exact = chunked_linear_cross_entropy(h, w, t, 16, 64)
    assert not torch.equal(out.detach(), exact.detach())


def test_mntp_loss_chunked_matches_plain_with_a_frozen_head():
    """The MNTP path as stage 1 runs it: frozen head, gradient only into the states."""
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 503, bias=False).requires_grad_(False)
    states = torch.randn(3, 40, 16, generator=g, requires_grad=True)
    labels = torch.full((3, 40), IGNORE)
    labels[:, 1:][torch.rand(3, 39, generator=g) < 0.3] = 5
    labels[0, 7] = 502
    plain = mntp_loss(states, head, labels, chunk_mib=0)
    (g_plain,) = torch.autograd.grad(plain, states)
    chunked = mntp_loss(states, head, labels, chunk_mib=0.01)  # a few rows per chunk
    (g_chunk,) = torch.autograd.grad(chunked, states)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(g_chunk, g_plain)


def test_checkpointed_chunks_match_plain():
    """The ZeRO-3 path (the head called per chunk, recomputed in the backward) equals the plain loss."""
    from llmclip.text.objectives import _checkpointed_chunks

    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(16, 301, bias=False)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 301, (50,), generator=g)
    ref = torch.nn.functional.cross_entropy(head(h), t)
    refs = torch.autograd.grad(ref, (h, head.weight))
    out = _checkpointed_chunks(h, head, t, rows=7)
    outs = torch.autograd.grad(out, (h, head.weight))
    torch.testing.assert_close(out, ref)
    for a, b in zip(outs, refs, strict=True):
        torch.testing.assert_close(a, b)


def test_length_buckets_are_as_many_on_every_rank():
    """ZeRO-3 gathers weights in every forward: ranks must run equally many bucket forwards, even
    where a rank's lengths are all equal (one group would pad as little)."""
    from llmclip.text.batching import _split_points

    assert len(_split_points([7, 7, 7, 7], 3)) == 2  # 3 groups
    assert len(_split_points([3, 5, 8, 40, 41], 3)) == 2
    assert _split_points([9, 9], 3) == [1]  # min(k, n) groups
