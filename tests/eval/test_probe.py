"""Binary zero-shot and linear probe on constructed features with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmclip.eval.probe import binary_zero_shot, linear_probe


def _prompts(direction: int, k: int, d: int, gen: torch.Generator) -> torch.Tensor:
    e = torch.zeros(d)
    e[direction] = 1.0
    return F.normalize(e + 0.2 * torch.randn(k, d, generator=gen), dim=-1)


def test_binary_zero_shot_aligned_embeddings():
    gen = torch.Generator().manual_seed(0)
    d = 6
    pos_emb, neg_emb = _prompts(0, 5, d, gen), _prompts(1, 3, d, gen)
    y = np.array([1] * 15 + [0] * 25 + [-1] * 7)
    image = torch.zeros(len(y), d)
    image[y == 1, 0] = 1.0
    image[y == 0, 1] = 1.0
    image[y == -1] = torch.randn(7, d, generator=gen)  # uncertain: anything, must be dropped
    image = 3.0 * (image + 0.1 * torch.randn(len(y), d, generator=gen))  # not unit length
    r = binary_zero_shot(image, y, pos_emb, neg_emb, n_boot=200)
    assert r["value"] == 1.0 and r["lo"] == 1.0 and r["hi"] == 1.0
    assert (r["positives"], r["negatives"], r["n"], r["uncertain"]) == (15, 25, 40, 7)
    # Swapping the prompt sets inverts the score.
    assert binary_zero_shot(image, y, neg_emb, pos_emb, n_boot=50)["value"] == 0.0


def test_binary_zero_shot_uses_negative_prompts():
    # Every image is equally similar to the "X" prompt; only the "no X" prompt separates them.
    e = torch.eye(3)
    image = F.normalize(torch.tensor([[1.0, 0, 1]] * 4 + [[1.0, 1, 0]] * 6), dim=-1)
    y = np.array([1] * 4 + [0] * 6)
    r = binary_zero_shot(image, y, e[:1], e[1:2], n_boot=50)
    assert r["value"] == 1.0


def test_binary_zero_shot_one_class_gives_none():
    gen = torch.Generator().manual_seed(1)
    r = binary_zero_shot(
        torch.randn(5, 4, generator=gen),
        np.array([0, 0, -1, 0, 0]),
        _prompts(0, 2, 4, gen),
        _prompts(1, 2, 4, gen),
    )
    assert r["value"] is None and r["positives"] == 0 and r["uncertain"] == 1


def _split(rng: np.random.Generator, n: int, w: np.ndarray):
    x = rng.normal(size=(n, len(w)))
    linear = (x @ w > 0).astype(int)
    noise = (rng.random(n) < 0.5).astype(int)
    rare = np.zeros(n, dtype=int)
    rare[:3] = 1  # 3 positives: below min_positives
    y = np.stack([linear, noise, rare], axis=1)
    y[rng.random(n) < 0.1, 0] = -1  # some uncertain labels for the linear class
    return x, y


def test_linear_probe_separable_random_and_skipped():
    rng = np.random.default_rng(0)
    w = rng.normal(size=8)
    xtr, ytr = _split(rng, 400, w)
    xte, yte = _split(rng, 300, w)
    classes = ["Linear", "Random", "Rare"]
    r = linear_probe(torch.tensor(xtr, dtype=torch.float32), ytr, xte, yte, classes, n_boot=200)
    pc = r["per_class"]

    lin = pc["Linear"]
    assert lin["skipped"] is None and lin["auroc"] > 0.95
    assert lin["lo"] <= lin["auroc"] <= lin["hi"]
    assert lin["n"] == int((yte[:, 0] >= 0).sum()) < 300  # uncertain test rows dropped
    assert lin["positives"] == int((yte[:, 0] == 1).sum())
    assert lin["train_positives"] + lin["train_negatives"] == int((ytr[:, 0] >= 0).sum())

    rnd = pc["Random"]
    assert abs(rnd["auroc"] - 0.5) < 0.1 and rnd["lo"] < 0.5 < rnd["hi"]

    rare = pc["Rare"]
    assert rare["auroc"] is None and "positives" in rare["skipped"]
    assert rare["train_positives"] == 3

    assert r["macro_classes"] == ["Linear", "Random"]
    assert r["macro_auroc"] == pytest.approx((lin["auroc"] + rnd["auroc"]) / 2)
    m = r["macro_ci"]
    assert m["value"] == pytest.approx(r["macro_auroc"])
    assert m["lo"] <= m["value"] <= m["hi"] and m["n"] == 300


def test_linear_probe_all_skipped_and_bad_shapes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    y = np.zeros((30, 1), dtype=int)
    y[:5] = 1
    r = linear_probe(x, y, x, y, ["A"], min_positives=10)
    assert r["macro_auroc"] is None and r["macro_classes"] == []
    assert r["per_class"]["A"]["skipped"].startswith("fewer than 10")
    with pytest.raises(ValueError):
        linear_probe(x, y, x, y, ["A", "B"])
