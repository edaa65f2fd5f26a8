"""One report text end to end: what is labelled, cached, graphed, negated and evaluated is one string.

Sample by sample on the session's real Open-I shards, every stage's reader of "the report text" must
give ``llmclip.data.text.sample_text`` (findings + impression, no INDICATION / COMPARISON / HISTORY),
the shard's labels must be the Labeler's on that string, and the cache's rows must be the encoder's
embedding of it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmclip.cache import META, CacheMismatch, EmbeddingCache
from llmclip.data.shards import read_tar
from llmclip.data.text import TEXT_SPEC, clinical_text, sample_text


def _metas(openi_shards) -> list[tuple[str, str, dict]]:
    out = []
    for p in sorted((openi_shards / "text").glob("*.tar")):
        for key, members in read_tar(p):
            out.append((p.stem, key, json.loads(members["json"])))
    return out


def test_every_stage_reads_the_same_text(openi_shards):
    from llmclip.cache.texts import VARIANTS
    from llmclip.clinical import Labeler, ReportGraph, negate
    from llmclip.clip.batching import report_text as stage2_text
    from llmclip.labels.commands import report_text as labels_text
    from llmclip.text.pairs import report_text as stage1_text

    labeler = Labeler()
    metas = _metas(openi_shards)
    assert len(metas) > 200
    with_indication = 0
    for _shard, key, meta in metas:
        text = sample_text(meta)
        rep = meta["report"]
        assert text, key
        readers = {
            "cache report column": VARIANTS["report"](rep),
            "stage 2 (graph, eval)": stage2_text(meta),
            "stage 1 pairs": stage1_text(meta),
            "labels command": labels_text(meta),
        }
        for who, got in readers.items():
            assert got == text, f"{key}: {who} reads another text"
        assert VARIANTS["negated"](rep) == negate(text), key
        # The labels of the shard are the Labeler's on exactly this string.
        assert meta["label_source"] == "labeler"
        assert meta["labels"] == dict(labeler.label(text).vector), key
        # The graph the GCN and the g term see is the graph of this string.
        assert ReportGraph.from_report(stage2_text(meta)).to_json() == (
            ReportGraph.from_report(text).to_json()
        )
        if rep.get("indication"):
            with_indication += 1
            assert not rep["full"] == text, key
            assert "INDICATION" not in text and "COMPARISON" not in text
    assert with_indication > 20, "the check must meet reports with an INDICATION section"


def test_cache_rows_encode_the_clinical_text(stage2_cache, openi_shards, tiny_encoder_dir):
    import torch

    from llmclip.text.encoder import LLMEncoder

    cache = EmbeddingCache(stage2_cache)
    assert cache.identity.text == TEXT_SPEC
    assert json.loads((stage2_cache / META).read_text())["text"] == TEXT_SPEC
    enc = LLMEncoder.from_dir(tiny_encoder_dir, device="cpu", dtype=torch.float32)
    metas = [m for m in _metas(openi_shards) if m[0] == "test-000000"]
    keys = [k for _, k, _ in metas]
    got = cache.rows("test-000000", keys).astype(np.float32)[:, 0]
    texts = [sample_text(m) for _, _, m in metas]
    want = enc.encode(texts).numpy()
    # The cache may be built in bf16 (``auto`` on a CPU with bf16 matmuls): each row must point where
    # the fp32 embedding of its own text points, and nearer to it than to any other text's.
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cos = unit(got) @ unit(want).T
    assert np.diag(cos).min() > 0.999, float(np.diag(cos).min())
    for i, text in enumerate(texts):
        others = [j for j, t in enumerate(texts) if t != text]
        assert cos[i, i] > cos[i, others].max(), keys[i]


def test_a_cache_of_another_text_is_refused(stage2_cache, tmp_path):
    import shutil

    old = tmp_path / "cache"
    shutil.copytree(stage2_cache, old)
    meta = json.loads((old / META).read_text())
    meta["text"] = "full"
    (old / META).write_text(json.dumps(meta))
    with pytest.raises(CacheMismatch, match="report text 'full'"):
        EmbeddingCache(old)
    del meta["text"]  # written before the text was recorded: it read the whole report
    (old / META).write_text(json.dumps(meta))
    with pytest.raises(CacheMismatch, match="rebuild"):
        EmbeddingCache(old)


def test_clinical_text_rules():
    assert clinical_text({"findings": " Heart  normal. ", "impression": "No acute disease."}) == (
        "Heart normal. No acute disease."
    )
    assert clinical_text({"findings": "", "impression": "Clear lungs."}) == "Clear lungs."
    assert clinical_text({"indication": "cough", "full": "INDICATION: cough"}) == ""
    assert sample_text({"report": "not a dict"}) == ""
