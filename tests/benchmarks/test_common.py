"""The benchmark helpers that every ratio depends on: rotation, medians, peak memory of a tree."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402


def test_interleaved_rotates_order_and_times_every_rep():
    calls: list[str] = []
    runners = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = C.interleaved(runners, reps=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_interleaved_measures_the_slower_runner_as_slower():
    times = C.interleaved({"fast": lambda: None, "slow": lambda: time.sleep(0.02)}, reps=3)
    assert C.median(times["slow"]) >= 0.02 > C.median(times["fast"])
    assert C.ratio_of_medians(times["fast"], times["slow"]).value > 10


def test_ratio_is_the_ratio_of_medians_not_the_median_of_ratios():
    # ours takes 1, 1, 10 s and the peer 2, 4, 5 s for the same work: medians 1 vs 4 -> 4x faster,
    # while the per-repetition ratios 2, 4, 0.5 have the median 2.
    r = C.ratio_of_medians([1.0, 1.0, 10.0], [2.0, 4.0, 5.0])
    assert r.value == 4.0 and r.reps == 3
    assert (r.lo, r.hi) == (0.5, 4.0) and r.lo <= r.q1 <= r.q3 <= r.hi
    assert "4.00x" in str(r) and "met" in C.verdict("x", r, 3.9) and "NOT met" in C.verdict("x", r, 4.1)
    with pytest.raises(ValueError):
        C.ratio_of_medians([1.0], [1.0, 2.0])


@pytest.mark.parametrize("reps", [2, 3, 4, 5, 7])
def test_the_spread_of_a_ratio_lies_within_its_repetitions(reps):
    # Per-repetition ratios 1, 2, ..., reps: the inter-quartile range must sit inside min-max even
    # for two repetitions (an extrapolating quantile method put Q1 below the smallest ratio).
    r = C.ratio_of_medians([1.0] * reps, [float(i + 1) for i in range(reps)])
    assert (r.lo, r.hi) == (1.0, float(reps))
    assert r.lo <= r.q1 <= r.value <= r.q3 <= r.hi, r


def test_gemm_peak_and_flop_count_agree_on_a_matmul():
    import torch

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert C.count_flops(lambda: a @ b) == 2 * 64 * 32 * 16
    assert C.gemm_peak([(64, 32, 16)], reps=2) > 0
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    assert C.linear_shapes(lin, 10) == [(10, 8, 4), (10, 4, 2)]
    assert C.linear_shapes(lin, 10, skip=("1",)) == [(10, 8, 4)]


def test_table_aligns_columns():
    out = C.table(["name", "x"], [["a", 1.5], ["long name", 1234.0]]).splitlines()
    assert out[0].startswith("name") and set(out[1]) <= {"-", " "}
    assert out[2].endswith("1.5") and out[3].endswith("1,234")
    assert len({len(line) for line in out[1:]}) == 1


def test_run_measured_sees_memory_of_a_grandchild(tmp_path):
    # The parent stays small; a grandchild holds ~300 MiB for a moment: the tree's peak sees it.
    code = (
        "import subprocess, sys;"
        "subprocess.run([sys.executable, '-c', "
        '\'import time; b = bytearray(300 * 2**20); b[::4096] = b"x" * len(b[::4096]); '
        "time.sleep(0.5)'], check=True)"
    )
    wall, peak = C.run_measured([sys.executable, "-c", code], log=tmp_path / "log")
    assert peak > 300 * 2**20
    assert 0.5 < wall < 30


def test_run_measured_fails_loudly(tmp_path):
    with pytest.raises(SystemExit, match="command failed"):
        C.run_measured([sys.executable, "-c", "raise SystemExit(3)"], log=tmp_path / "log")


def test_llm2vec_bridge_rewrites_only_formats(tmp_path):
    """The peer's folder conversion: tokenizer class, merges as strings, rope_theta; same vocab."""
    sys.path.insert(0, str(BENCH))
    import _llm2vec_peer as peer

    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    tok = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]],
                     "ignore_merges": False}}  # fmt: skip
    (src / "tokenizer.json").write_text(json.dumps(tok))
    (src / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 5e5}}))
    (src / "model.safetensors").write_bytes(b"weights")
    dst = peer.compatible_copy(src, tmp_path / "dst")
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tc["model_input_names"] == ["input_ids", "attention_mask"]
    model = json.loads((dst / "tokenizer.json").read_text())["model"]
    assert model["merges"] == ["a b"] and model["vocab"] == tok["model"]["vocab"]
    assert json.loads((dst / "config.json").read_text())["rope_theta"] == 5e5
    assert (dst / "model.safetensors").read_bytes() == b"weights"


def test_cache_time_split_counts_every_matmul_of_the_encode(tiny_encoder_dir):
    # The cache benchmark's --profile reads the matmuls' FLOPs off the profiler's recorded shapes.
    # Equal texts (no padding): they must be exactly 2 x the decoder's linear weights per token.
    import cache as B
    import torch

    from llmclip.text.encoder import LLMEncoder

    enc = LLMEncoder.from_dir(tiny_encoder_dir, dtype=torch.float32)
    texts = ["Small left pleural effusion. No pneumothorax."] * 6
    tokens = enc.tokenize(texts, enc.instruction)["input_ids"].numel()
    layers = enc.decoder.config.num_hidden_layers
    per_layer = sum(m.weight.numel() for m in enc.decoder.layers[0].modules()
                    if isinstance(m, torch.nn.Linear))
    split = B.time_split(enc, texts, batch_tokens=64, peak=1e12)
    assert split["matmul_flops"] == 2.0 * layers * per_layer * tokens
    shares = (split["matmul_share"], split["attention_share"], split["other_share"])
    assert all(0 < x < 1 for x in shares) and abs(sum(shares) - 1) < 1e-9
    assert split["ceiling"] == split["seconds"] / (split["matmul_flops"] / 1e12)
