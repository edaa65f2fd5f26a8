"""``llmclip eval text``: the metrics on hand-made embeddings (they can fail), and the command end to
end on real held-out Open-I reports with a tiny encoder and every baseline."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from llmclip.config import ConfigError
from llmclip.eval.text import TextSuite, build_suite, load_reports, register_args, run, score


def _suite() -> TextSuite:
    s = TextSuite(reports=["r0", "r1"], findings=["f0", "f1", "f2"], impressions=["i0", "i1"],
                  impression_of=[0, 1, 0], abbreviated=[(0, "a0"), (1, "a1")])
    s.error_items = [(0, "w0", ["e0a", "e0b", "e0c"], "shuffle"), (1, "w1", ["e1a", "e1b", "e1c"], "expand")]
    return s


def _table_encoder(vectors: dict[str, list[float]]):
    return lambda texts, instruction: np.asarray([vectors[t] for t in texts], dtype=np.float32)


def test_metrics_reward_the_right_geometry_and_punish_the_wrong_one():
    good = {"r0": [1, 0, 0], "r1": [0, 1, 0], "w0": [1, 0.1, 0], "w1": [0.1, 1, 0],
            "e0a": [1, 0, 1], "e0b": [1, 1, 1], "e0c": [0, 0, 1], "e1a": [0, 1, 1], "e1b": [1, 1, 0.5],
            "e1c": [0, 0, 1], "f0": [0, 0, 1], "f1": [1, 0, 0], "f2": [0, 0.1, 1], "i0": [0, 0, 1],
            "i1": [1, 0, 0], "a0": [0.9, 0, 0], "a1": [0, 0.9, 0.1]}
    m = score(_suite(), _table_encoder(good), {})
    assert m["error_discrimination"] == 1.0 and m["error_pairwise"] == 1.0
    assert m["findings_to_impression_r1"] == 1.0 and m["abbreviation_r1"] == 1.0
    bad = dict(good, w0=[0, 0, 1], w1=[1, 0, 0], f1=[0, 0, 1], a1=[1, 0, 0])
    m = score(_suite(), _table_encoder(bad), {})
    assert m["error_discrimination"] == 0.0 and m["error_pairwise"] == 0.0
    assert m["findings_to_impression_r1"] == pytest.approx(2 / 3) and m["abbreviation_r1"] == 0.5
    assert m["findings_to_impression_r5"] == 1.0  # only two distinct impressions


def test_suite_from_real_held_out_reports(openi_shards):
    metas = load_reports(f"{openi_shards}:test", max_reports=400, seed=0)
    assert len({m["key"] for m in metas}) == len(metas) >= 10
    assert all(m["split"] == "test" for m in metas)
    s = build_suite(metas, seed=0)
    assert s.error_items and s.findings and len(s.impressions) <= len(s.findings)
    for i, rewrite, edits, _ in s.error_items:
        assert len(edits) == 3 and len(set(edits)) == 3 and rewrite not in edits
        assert s.reports[i] not in edits
    again = build_suite(metas, seed=0)
    assert again.error_items == s.error_items  # every encoder is asked the same questions
    assert again.heldout_items == s.heldout_items and s.heldout_abbreviated
    for _i, styled, edits, kind in s.heldout_items:
        # Held-out items: the styled report and three styled one-error edits of it, all distinct.
        assert kind == "enumerate" and styled.startswith("1. ") and len(set(edits)) == 3
        assert styled not in edits and all(e.startswith("1. ") for e in edits)
    for i, short in s.heldout_abbreviated:
        assert short != s.reports[i]


def test_eval_text_command(openi_shards, tiny_encoder_dir, tmp_path):
    p = argparse.ArgumentParser()
    register_args(p)
    out = tmp_path / "eval_text.json"
    args = p.parse_args(["--encoder", str(tiny_encoder_dir), "--shards", f"{openi_shards}:test",
                         "--out", str(out), "--max-reports", "40"])
    assert run(args) == 0
    res = json.loads(out.read_text())
    names = [r["encoder"] for r in res["table"]]
    assert len(names) == 4 and names[0].startswith("stage-1") and "TF-IDF" in names
    assert any("MiniLM" in n for n in names) and any("untrained base LLM" in n for n in names)
    for row in res["table"]:
        for k in ("error_discrimination", "error_pairwise", "findings_to_impression_r1",
                  "heldout_abbreviation_r1"):
            ci = row["ci"][k]
            assert 0.0 <= ci["lo"] <= row[k] == ci["value"] <= ci["hi"] <= 1.0 and ci["n"] > 0
    tfidf = next(r for r in res["table"] if r["encoder"] == "TF-IDF")
    assert tfidf["findings_to_impression_r5"] > 0.2  # words shared by findings and impressions
    assert res["fingerprint"] and res["counts"]["error_items"] > 0
    with pytest.raises(ConfigError, match="--baselines"):
        run(p.parse_args(["--encoder", str(tiny_encoder_dir), "--baselines", "bm25"]))
    with pytest.raises(ConfigError, match="--encoder"):
        run(p.parse_args(["--encoder", str(tmp_path)]))
