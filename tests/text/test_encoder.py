"""LLMEncoder on a tiny Llama built from a config (real SmolLM2 tokenizer): attention direction,
padding, instruction handling, pooling, gradients, encode() batching and the encoder dir."""

from __future__ import annotations

import json

import pytest
import torch

from llmclip.text.attention import make_bidirectional, make_causal
from llmclip.text.batching import balanced_batches
from llmclip.text.encoder import LLMEncoder
from llmclip.text.model_config import ModelConfig

REPORT = "The heart is normal in size. There is a small left pleural effusion. No pneumothorax."


def _build(attention: str, pooling: str = "mean", **kw) -> LLMEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(source="tiny:llama", attention=attention, pooling=pooling, max_length=64,
                      pooler_latents=8, pooler_heads=4, **kw)
    return LLMEncoder.build(cfg, torch.float32).eval()


@pytest.fixture(scope="module")
def encoders() -> dict[str, LLMEncoder]:
    return {a: _build(a) for a in ("eager", "sdpa")}


def _first_state_moves(enc: LLMEncoder, texts: list[str]) -> float:
    """How much the first report token's state changes when the last token of row 0 is edited."""
    b = enc.tokenize(texts)
    last = int(b["attention_mask"][0].sum()) - 1
    edited = b["input_ids"].clone()
    edited[0, last] = (edited[0, last] + 17) % enc.tokenizer.vocab_size
    with torch.no_grad():
        h0 = enc.hidden_states(b["input_ids"], b["attention_mask"])
        h1 = enc.hidden_states(edited, b["attention_mask"])
    return (h0[0, 1] - h1[0, 1]).abs().max().item()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_later_token_changes_earlier_state(encoders, attention):
    enc = encoders[attention]
    # One unpadded row is the trap: the mask is skipped and SDPA would fall back to is_causal=True.
    assert _first_state_moves(enc, [REPORT]) > 1e-4
    assert _first_state_moves(enc, [REPORT, "No effusion."]) > 1e-4
    assert _first_state_moves(enc, [REPORT, REPORT + " " + REPORT]) > 1e-4


def test_causal_model_does_not_see_the_future():
    # The same probe on the untouched causal model must read ~0, or the test above proves nothing.
    enc = _build("sdpa")
    make_causal(enc.base_model)
    assert _first_state_moves(enc, [REPORT]) < 1e-6
    make_bidirectional(enc.base_model)
    assert _first_state_moves(enc, [REPORT]) > 1e-4


@pytest.mark.parametrize("pooling", ["mean", "last_token", "latent_attention"])
def test_padding_invariance(pooling):
    enc = _build("sdpa", pooling=pooling)
    short = "No acute cardiopulmonary abnormality."
    with torch.no_grad():
        alone = enc(**enc.tokenize([short]))
        padded = enc(**enc.tokenize([REPORT + " " + REPORT, short]))[1:]
    assert enc.tokenize([REPORT, short])["attention_mask"][1].min() == 0  # really padded
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_instruction_is_embedded_but_not_pooled(encoders):
    enc = encoders["sdpa"]
    plain = enc.tokenize([REPORT])
    inst = enc.tokenize([REPORT], instruction="Retrieve the impression")
    n_inst = inst["input_ids"].shape[1] - plain["input_ids"].shape[1]
    assert n_inst > 0
    assert inst["pool_mask"][0, : 1 + n_inst].sum() == 0  # bos + instruction never pooled
    assert inst["pool_mask"].sum() == plain["pool_mask"].sum()
    with torch.no_grad():
        a, b = enc(**plain), enc(**inst)
    assert (a - b).abs().max() > 1e-5  # but it does steer the report tokens' states
    mixed = enc.tokenize([REPORT, REPORT], instruction=["Retrieve the impression", None])
    assert mixed["pool_mask"][0].sum() == mixed["pool_mask"][1].sum()


def test_latent_attention_pooler_starts_as_mean():
    torch.manual_seed(0)
    lat = _build("sdpa", pooling="latent_attention")
    b = lat.tokenize([REPORT, "No effusion."])
    with torch.no_grad():
        states = lat.hidden_states(b["input_ids"], b["attention_mask"])
        from llmclip.text.pooling import masked_mean

        torch.testing.assert_close(lat.pool(states, b["pool_mask"]), masked_mean(states, b["pool_mask"]))


def test_gradients_reach_only_trainable_parameters():
    from llmclip.text.objectives import contrastive_loss

    enc = _build("sdpa", pooling="latent_attention")
    enc.train()
    q = enc(**enc.tokenize([REPORT, "Mild cardiomegaly."], instruction="Retrieve"))
    d = enc(**enc.tokenize(["Normal heart size. Small left effusion.", "The heart is mildly enlarged.",
                            "The heart is normal in size. There is a small right pleural effusion.",
                            "No cardiomegaly."]))
    loss, _ = contrastive_loss(q, d[:2], d[2:], torch.ones(2, dtype=torch.bool), torch.tensor([1, 2]),
                               torch.tensor([3, 4]), scale=50.0)
    loss.backward()
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("pooler.") for n in trainable)
    for n, p in enc.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert any(p.grad.abs().sum() > 0 for n, p in enc.named_parameters() if "lora_B" in n)


def test_encode_keeps_order_and_ignores_batching(encoders):
    enc = encoders["sdpa"]
    texts = [REPORT, "No effusion.", "", "Mild cardiomegaly. " * 20, "Lungs are clear."]
    big = enc.encode(texts, batch_tokens=100_000)
    small = enc.encode(texts, batch_tokens=40)
    assert big.shape == (5, enc.dim) and big.dtype == torch.float32
    torch.testing.assert_close(big, small, atol=1e-5, rtol=1e-5)
    one = enc.encode([texts[1]])
    torch.testing.assert_close(one[0], big[1], atol=1e-5, rtol=1e-5)


def test_encoder_dir_round_trip(tiny_encoder_dir):
    from llmclip.text.export import compute_fingerprint

    meta = json.loads((tiny_encoder_dir / "encoder.json").read_text())
    enc = LLMEncoder.from_dir(tiny_encoder_dir)
    assert enc.fingerprint == meta["fingerprint"] == compute_fingerprint(tiny_encoder_dir, meta)
    assert enc.dim == 64 and enc.pooling == "mean" and enc.max_length == 128
    assert json.loads((tiny_encoder_dir / "model" / "config.json").read_text())["is_causal"] is False
    assert _first_state_moves(enc, [REPORT]) > 1e-4  # still bidirectional after reload
    emb = enc.encode([REPORT, "No effusion."])
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()


def test_length_buckets_match_one_padded_batch(encoders):
    enc = encoders["sdpa"]
    texts = ["No effusion.", REPORT * 3, "Clear lungs.", "Mild cardiomegaly with small bilateral effusions.", "x"]
    ins = ["Retrieve", None, "Retrieve", None, "Summarize"]
    b = enc.tokenize_buckets(texts, ins, buckets=3)
    one = enc.tokenize(texts, ins)
    assert len(b["input_ids"]) == 3
    assert sum(t.numel() for t in b["input_ids"]) < 0.6 * one["input_ids"].numel()  # less padding
    with torch.no_grad():
        torch.testing.assert_close(enc.embed_buckets(b), enc(**one), atol=1e-5, rtol=1e-5)


def test_standardize_centres_scales_and_survives_the_encoder_dir(tmp_path):
    from llmclip.text.export import save_encoder_dir
    from llmclip.text.model_config import pooler_args
    from llmclip.text.pooling import Standardize

    cfg = ModelConfig(source="tiny:llama", attention="sdpa", max_length=64, standardize=True)
    torch.manual_seed(0)
    enc = LLMEncoder.build(cfg, torch.float32, lora=False).eval()
    texts = [REPORT, "No effusion.", "Mild cardiomegaly.", "Left lower lobe opacity. Small effusion.",
             "Lungs are clear. Heart size normal.", "Right pneumothorax."]
    b = enc.tokenize(texts)
    with torch.no_grad():
        raw = enc.pooler.raw(enc.hidden_states(b["input_ids"], b["attention_mask"]), b["pool_mask"]).double()
        # Before calibration Standardize is the identity.
        torch.testing.assert_close(enc(**b).double(), raw, atol=1e-5, rtol=1e-5)
        center, inv = Standardize.statistics(torch.tensor([len(texts)], dtype=torch.float64), raw.sum(0),
                                             (raw * raw).sum(0), eps=0.0)
        enc.pooler.standardize.center.copy_(center.float())
        enc.pooler.standardize.inv_scale.copy_(inv.float())
        out = enc(**b).double()
    torch.testing.assert_close(out.mean(0), torch.zeros_like(out[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.ones_like(out[0]), atol=1e-3, rtol=0)
    # The calibrated statistics travel with the exported encoder.
    d = save_encoder_dir(tmp_path / "enc", enc.decoder, enc.tokenizer, enc.pooler, pooling="mean", max_length=64,
                         dtype="float32", pooler_args=pooler_args(cfg), extra={"base_model": "tiny:llama"})
    again = LLMEncoder.from_dir(d)
    torch.testing.assert_close(again.encode(texts), enc.encode(texts), atol=1e-4, rtol=1e-4)
    plain = LLMEncoder.build(ModelConfig(source="tiny:llama", attention="sdpa", max_length=64), torch.float32,
                             lora=False)
    assert not any("standardize" in k for k in plain.pooler.state_dict())


def test_balanced_batches_keep_the_greedy_count_within_budget_and_even_out_the_tail():
    padded = sorted([23, 180, 95, 41, 77, 77, 150, 64, 33, 120, 58, 201, 88, 45] * 9, reverse=True)
    runs = balanced_batches(padded, 1024)
    # Contiguous, covering every row once, in order.
    assert runs[0][0] == 0 and runs[-1][1] == len(padded)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))
    # Within the budget (padded to each run's longest, the first row since it is sorted).
    assert all(padded[s] * (e - s) <= 1024 for s, e in runs)
    # As many runs as the plain greedy fill, whose last run is the small leftover.
    greedy, start = [], 0
    while start < len(padded):
        size = 1024 // padded[start]
        greedy.append(padded[start : start + size])
        start += size
    assert len(runs) == len(greedy)
    cost = [padded[s] * (e - s) for s, e in runs]
    assert min(cost) > padded[-1] * len(greedy[-1])  # the tail grew
    assert min(cost) >= 0.6 * max(cost), cost
    # A row longer than the budget still gets its own run.
    assert balanced_batches([3000, 10, 10], 1024) == [(0, 1), (1, 3)]
