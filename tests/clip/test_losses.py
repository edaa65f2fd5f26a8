"""Stage-2 losses: closed-form properties on one rank, and 2 real gloo ranks == 1 rank on the
concatenated batch (value and gradients) for every loss and every gather option."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmclip.clip.losses import (
    LossConfig,
    NegationConfig,
    SoftLabelConfig,
    clip_loss,
    edit_mask,
    label_similarity,
    set_similarity,
    soft_targets,
    total_loss,
)
from llmclip.config import ConfigError, validate
from llmclip.distributed import exit_process, free_port

N, D, RAW, V = 8, 16, 24, 32


def _normed(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_plain_clip_loss_matches_cross_entropy_reference():
    g = torch.Generator().manual_seed(0)
    a, b = _normed(torch.randn(N, D, generator=g)), _normed(torch.randn(N, D, generator=g))
    scale = torch.tensor(10.0)
    logits = scale * a @ b.T
    ref = 0.5 * (
        F.cross_entropy(logits, torch.arange(N)) + F.cross_entropy(logits.T, torch.arange(N))
    )
    assert torch.allclose(clip_loss(a, b, scale), ref, atol=1e-6)
    assert torch.allclose(clip_loss(a, b, scale, local_loss=False), ref, atol=1e-6)
    # Aligned pairs give a lower loss than shuffled ones.
    assert clip_loss(a, a, scale) < clip_loss(a, a[torch.randperm(N, generator=g)], scale)


def test_soft_labels_reduce_to_plain_infonce_at_mix_weight_zero():
    g = torch.Generator().manual_seed(1)
    a = _normed(torch.randn(N, D, generator=g))
    b = _normed(a + 0.2 * torch.randn(N, D, generator=g))
    raw = torch.randn(N, RAW, generator=g)
    labels = (torch.rand(N, 14, generator=g) > 0.7).float()
    nodes = (torch.rand(N, V, generator=g) > 0.8).float()
    cfg = SoftLabelConfig(enabled=True)
    scale = torch.tensor(14.0)
    t0 = soft_targets(cfg, 0.0, raw, labels, nodes)
    assert torch.equal(t0, torch.eye(N))
    assert torch.allclose(clip_loss(a, b, scale, target=t0), clip_loss(a, b, scale), atol=1e-6)
    # Through total_loss too, and a nonzero weight changes the loss.
    feats = {"image": a, "text": b, "scale": scale}
    aux = {"text_raw": raw, "labels": labels, "graph_nodes": nodes}
    lcfg = LossConfig(soft_labels=cfg)
    zero, _ = total_loss(lcfg, feats, aux, alpha=0.0)
    plain, _ = total_loss(LossConfig(), feats, aux)
    half, logs = total_loss(lcfg, feats, aux, alpha=0.5)
    assert torch.allclose(zero, plain, atol=1e-6)
    assert not torch.allclose(half, plain, atol=1e-3)
    assert logs["alpha"] == 0.5


def test_soft_targets_formula_rows_sum_to_one_and_prefer_clinical_twins():
    # Studies 0 and 1 share findings and report embeddings; study 2 differs in everything.
    raw = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    nodes = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    cfg = SoftLabelConfig(
        enabled=True, weight_text=1.0, weight_labels=2.0, weight_graph=1.0, temperature=0.2
    )
    alpha = 0.4
    t = soft_targets(cfg, alpha, raw, labels, nodes)
    assert torch.allclose(t.sum(1), torch.ones(3), atol=1e-6)
    assert t[0, 1] > t[0, 2] and t[1, 0] > t[1, 2]
    # The documented formula, written out by hand.
    e = F.normalize(raw, dim=-1)
    s = (1.0 * (e @ e.T) + 2.0 * label_similarity(labels) + 1.0 * set_similarity(nodes)) / 4.0
    expected = (1 - alpha) * torch.eye(3) + alpha * torch.softmax(s / 0.2, dim=1)
    assert torch.allclose(t, expected, atol=1e-6)
    # Jaccard pieces: identical rows -> 1, disjoint -> 0, empty vs empty -> 1.
    assert label_similarity(torch.tensor([[1.0, 0.5], [1.0, 0.0]]))[0, 1] == pytest.approx(
        1.0 / 1.5
    )
    assert set_similarity(torch.zeros(2, 4))[0, 1] == 1.0
    assert set_similarity(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))[0, 1] == 0.0


def test_alpha_schedule_ramps_and_validation():
    cfg = SoftLabelConfig(
        enabled=True, alpha_start=0.0, alpha_end=0.4, ramp_start=0.25, ramp_end=0.75
    )
    assert cfg.alpha(0, 100) == 0.0
    assert cfg.alpha(50, 100) == pytest.approx(0.2)
    assert cfg.alpha(100, 100) == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="ramp_start"):
        validate(SoftLabelConfig(ramp_start=0.8, ramp_end=0.2))
    with pytest.raises(ConfigError, match="temperature"):
        validate(LossConfig(soft_labels=SoftLabelConfig(temperature=0.0)), "loss")


def test_negation_column_is_a_hard_negative_and_masked_when_identical():
    g = torch.Generator().manual_seed(2)
    a = _normed(torch.randn(N, D, generator=g))
    b = _normed(a + 0.1 * torch.randn(N, D, generator=g))
    scale = torch.tensor(20.0)
    far = _normed(torch.randn(N, D, generator=g))
    near = _normed(
        a + 0.05 * torch.randn(N, D, generator=g)
    )  # a negated report that looks like the image
    base = clip_loss(a, b, scale)
    with_far = clip_loss(a, b, scale, extra_a=far)
    with_near = clip_loss(a, b, scale, extra_a=near)
    assert base < with_far < with_near
    # Masked everywhere == no negation column at all.
    masked = clip_loss(a, b, scale, extra_a=near, extra_valid=torch.zeros(N, dtype=torch.bool))
    assert torch.allclose(masked, base, atol=1e-6)
    # Written out: image->report row i has N + 1 candidates, the last its own negated report.
    logits = torch.cat([scale * a @ b.T, (scale * (a * near).sum(-1)).unsqueeze(1)], dim=1)
    ref = 0.5 * (
        F.cross_entropy(logits, torch.arange(N)) + F.cross_entropy(scale * b @ a.T, torch.arange(N))
    )
    assert torch.allclose(with_near, ref, atol=1e-5)
    # Weight beta = the negated report counted beta times (here: two identical extra columns).
    twice = torch.cat([logits, logits[:, -1:]], dim=1)
    ref2 = 0.5 * (
        F.cross_entropy(twice, torch.arange(N)) + F.cross_entropy(scale * b @ a.T, torch.arange(N))
    )
    assert torch.allclose(clip_loss(a, b, scale, extra_a=near, extra_weight=2.0), ref2, atol=1e-5)
    # The gradient pushes the image away from its negated report.
    a2 = a.clone().requires_grad_(True)
    clip_loss(a2, b, scale, extra_a=near).backward()
    assert (a2.grad * near).sum(-1).mean() > 0  # descent direction -grad lowers img . neg


def test_hard_negative_columns_each_enter_the_softmax_and_masked_ones_change_nothing():
    """loss.negation.hard_negatives: k cached columns per image ([n, k, E]), each one more extra
    candidate of the image->report row with the same beta; a masked column is as if absent."""
    g = torch.Generator().manual_seed(5)
    a = _normed(torch.randn(N, D, generator=g))
    b = _normed(a + 0.1 * torch.randn(N, D, generator=g))
    neg = _normed(torch.randn(N, D, generator=g))
    lat = _normed(torch.randn(N, D, generator=g))
    sev = _normed(torch.randn(N, D, generator=g))
    valid = torch.rand(N, 3, generator=g) > 0.3
    valid[:, 0] = True
    scale = torch.tensor(15.0)
    one = NegationConfig(enabled=True, weight=2.0)
    three = NegationConfig(enabled=True, weight=2.0, hard_negatives=["laterality", "severity"])

    def loss(cfg, edited, ok):
        feats = {"image": a, "text": b, "scale": scale, "negated": edited}
        aux = {"text_raw": torch.randn(N, RAW), "negated_valid": ok}
        return total_loss(LossConfig(negation=cfg, graph_weight=0.0), feats, aux)[0]

    # hard_negatives: [] is today's loss, bit for bit, in either shape the trainer may hand over.
    today = clip_loss(a, b, scale, extra_a=neg, extra_valid=valid[:, 0], extra_weight=2.0)
    assert torch.equal(loss(one, neg, valid[:, 0]), today)
    assert torch.equal(loss(one, neg.unsqueeze(1), valid[:, :1]), today)
    # Written out: row i has N + 3 candidates, each extra one counted beta times, masked ones absent.
    stack = torch.stack([neg, lat, sev], dim=1)
    extra = scale * torch.einsum("nd,nkd->nk", a, stack) + math.log(2.0)
    logits = torch.cat([scale * a @ b.T, extra.masked_fill(~valid, -math.inf)], dim=1)
    ref = 0.5 * (
        F.cross_entropy(logits, torch.arange(N)) + F.cross_entropy(scale * b @ a.T, torch.arange(N))
    )
    assert torch.allclose(loss(three, stack, valid), ref, atol=1e-5)
    # Every extra column counts: moving a laterality edit toward its image raises the loss.
    closer = torch.stack([neg, _normed(a + 0.05 * lat), sev], dim=1)
    all_valid = torch.ones(N, 3, dtype=torch.bool)
    assert (
        loss(three, closer, all_valid) > loss(three, stack, all_valid) > loss(one, neg, valid[:, 0])
    )
    # Masked columns change nothing, wherever they point.
    only_neg = valid.clone()
    only_neg[:, 1:] = False
    assert torch.allclose(loss(three, closer, only_neg), loss(one, neg, valid[:, 0]), atol=1e-6)
    # The gradient pushes each image away from its own (unmasked) edited reports.
    a2 = a.clone().requires_grad_(True)
    feats = {"image": a2, "text": b, "scale": scale, "negated": closer}
    aux = {"text_raw": torch.randn(N, RAW), "negated_valid": all_valid}
    total_loss(LossConfig(negation=three, graph_weight=0.0), feats, aux)[0].backward()
    assert (a2.grad * closer[:, 1]).sum(-1).mean() > 0  # descent lowers img . laterality edit


def test_edit_mask_masks_edits_identical_to_the_report():
    g = torch.Generator().manual_seed(6)
    text = torch.randn(4, RAW, generator=g)
    nudged = text.clone()
    nudged[:, 0] += 0.05  # a real edit, within 1e-4 of the report in cosine
    edited = torch.stack([torch.randn(4, RAW, generator=g), text.clone(), nudged], dim=1)
    assert edit_mask(edited, text, 0.9999).tolist() == [[True, False, False]] * 4
    assert edit_mask(edited[:, 0], text, 0.9999).shape == (4, 1)
    # At 1.0 only the exact copy is masked (the cosine of equal rows may round below 1).
    assert edit_mask(edited, text, 1.0).tolist() == [[True, False, True]] * 4


def test_hard_negative_columns_are_validated_and_looked_up_by_name():
    cfg = NegationConfig(enabled=True, hard_negatives=["laterality", "severity"])
    validate(cfg)
    assert cfg.columns() == ["negated", "laterality", "severity"]
    assert cfg.column_indices(["report", "severity", "negated", "laterality"]) == [2, 3, 1]
    for bad in (["laterality", "laterality"], ["negated"], [""]):
        with pytest.raises(ConfigError, match="loss.negation.hard_negatives"):
            validate(LossConfig(negation=NegationConfig(hard_negatives=bad)), "loss")
    with pytest.raises(
        ConfigError, match=r"loss.negation.hard_negatives: .*'severity'.*report, negated"
    ):
        cfg.column_indices(["report", "negated", "laterality"])
    with pytest.raises(ConfigError, match="loss.negation.variant"):
        cfg.column_indices(["report", "laterality", "severity"])


def test_graph_alignment_term_is_added_with_its_weight():
    g = torch.Generator().manual_seed(3)
    a, b, gr = (_normed(torch.randn(N, D, generator=g)) for _ in range(3))
    scale = torch.tensor(10.0)
    feats = {"image": a, "text": b, "graph": gr, "scale": scale}
    loss, logs = total_loss(LossConfig(graph_weight=0.25), feats, {"text_raw": torch.randn(N, RAW)})
    assert torch.allclose(loss, clip_loss(a, b, scale) + 0.25 * clip_loss(a, gr, scale), atol=1e-6)
    assert set(logs) == {"loss_clip", "loss_graph"}


# ------------------------------------------------------------------------------------------------
# 2 real gloo ranks vs 1 rank on the concatenated batch
# ------------------------------------------------------------------------------------------------

CASES = {
    "plain": dict(),
    "negation": dict(negation=NegationConfig(enabled=True, weight=3.0)),
    "soft_labels": dict(soft_labels=SoftLabelConfig(enabled=True, alpha_end=0.5)),
    "soft_labels_graph_embedding": dict(
        soft_labels=SoftLabelConfig(enabled=True, alpha_end=0.5, graph_similarity="embedding")
    ),
    "graph": dict(graph_weight=0.7),
    "hard_negatives": dict(
        negation=NegationConfig(enabled=True, weight=2.0, hard_negatives=["laterality", "severity"])
    ),
    "full": dict(
        negation=NegationConfig(enabled=True),
        soft_labels=SoftLabelConfig(enabled=True, alpha_end=0.5),
        graph_weight=0.7,
    ),
}
GATHER = [
    (True, True),
    (False, True),
    (False, False),
    (True, False),
]  # (local_loss, gather_with_grad)
EXACT_GRAD = {(True, True), (False, True), (False, False)}


def _problem(seed: int = 7) -> dict[str, torch.Tensor]:
    """A global batch of 2n samples: raw inputs and one shared set of projection weights."""
    g = torch.Generator().manual_seed(seed)
    n2 = 2 * 6
    return {
        "x_img": torch.randn(n2, RAW, generator=g),
        "x_txt": torch.randn(n2, RAW, generator=g),
        "x_neg": torch.randn(n2, RAW, generator=g),
        "x_gph": torch.randn(n2, RAW, generator=g),
        "labels": (torch.rand(n2, 14, generator=g) > 0.6).float(),
        "nodes": (torch.rand(n2, V, generator=g) > 0.7).float(),
        "neg_valid": torch.rand(n2, generator=g) > 0.25,
        "x_hard": torch.randn(n2, 2, RAW, generator=g),
        "hard_valid": torch.rand(n2, 2, generator=g) > 0.4,
        "w": torch.randn(4, D, RAW, generator=g) * 0.3,
    }


def _run_case(
    p: dict[str, torch.Tensor], rows: slice, case: str, local_loss: bool, with_grad: bool
):
    """Loss and weight gradient on ``rows`` of the problem (all rows when run on one rank)."""
    w = p["w"].clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(12.0), requires_grad=True)
    feats = {
        "image": _normed(p["x_img"][rows] @ w[0].T),
        "text": _normed(p["x_txt"][rows] @ w[1].T),
        "negated": _normed(p["x_neg"][rows] @ w[2].T),
        "graph": _normed(p["x_gph"][rows] @ w[3].T),
        "scale": log_scale.exp(),
    }
    cfg = LossConfig(
        local_loss=local_loss, gather_with_grad=with_grad, **({"graph_weight": 0.0} | CASES[case])
    )
    if cfg.graph_weight == 0 and cfg.soft_labels.graph_similarity != "embedding":
        del feats["graph"]
    aux = {
        "text_raw": p["x_txt"][rows],
        "labels": p["labels"][rows],
        "graph_nodes": p["nodes"][rows],
        "negated_valid": p["neg_valid"][rows],
    }
    if cfg.negation.hard_negatives:  # [n, 3, E]: the negated report, then two more columns
        edited = torch.cat([p["x_neg"].unsqueeze(1), p["x_hard"]], dim=1)[rows]
        feats["negated"] = _normed(edited @ w[2].T)
        aux["negated_valid"] = torch.cat([p["neg_valid"].unsqueeze(1), p["hard_valid"]], 1)[rows]
    alpha = cfg.soft_labels.alpha(1, 1)
    loss, _ = total_loss(cfg, feats, aux, alpha)
    loss.backward()
    return loss.detach(), w.grad.detach(), log_scale.grad.detach()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    p = _problem()
    n = p["x_img"].shape[0] // world
    results = {}
    for case in CASES:
        for local_loss, with_grad in GATHER:
            loss, gw, gs = _run_case(
                p, slice(rank * n, (rank + 1) * n), case, local_loss, with_grad
            )
            # What DeepSpeed does with replicated parameters: average gradients and (for logging) losses.
            for t in (loss, gw, gs):
                dist.all_reduce(t)
                t /= world
            results[f"{case}/{local_loss}/{with_grad}"] = torch.cat(
                [loss.view(1), gw.flatten(), gs.view(1)]
            )
    if rank == 0:
        from safetensors.torch import save_file

        save_file(
            {k.replace("/", "|"): v.contiguous() for k, v in results.items()},
            os.path.join(out_dir, "r.st"),
        )
    dist.barrier()
    exit_process(0)  # tears the group down and skips finalisation (llmclip.distributed)


def test_two_gloo_ranks_equal_one_rank_on_concatenated_batch(tmp_path: Path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.start_processes(
        _worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    got = {k.replace("|", "/"): v for k, v in load_file(tmp_path / "r.st").items()}
    p = _problem()
    checked = 0
    for case in CASES:
        for local_loss, with_grad in GATHER:
            loss, gw, gs = _run_case(p, slice(None), case, local_loss, with_grad)
            ref = torch.cat([loss.view(1), gw.flatten(), gs.view(1)])
            two = got[f"{case}/{local_loss}/{with_grad}"]
            assert torch.allclose(two[0], ref[0], atol=1e-5), (case, local_loss, with_grad, "loss")
            if (local_loss, with_grad) in EXACT_GRAD:
                assert torch.allclose(two[1:], ref[1:], atol=1e-5, rtol=1e-4), (
                    case,
                    local_loss,
                    with_grad,
                )
                checked += 1
            else:
                # Documented approximation: the gradient through other ranks' rows is dropped.
                assert not torch.allclose(two[1:], ref[1:], atol=1e-5, rtol=1e-4), case
    assert checked == len(CASES) * len(EXACT_GRAD)
