"""The held-out evaluation family cannot be produced by a training generator, and every held-out
variant is what the Labeler says it is: checked over the whole real Open-I test split."""

from __future__ import annotations

import json
import random

import pytest

from llmclip.clinical import Labeler, equivalent_rewrites, negate, one_error_edits
from llmclip.clinical import lexicon as lx
from llmclip.clinical.edits import _SEVERITY_SWAP
from llmclip.clinical.facts import summarise
from llmclip.data.shards import read_tar
from llmclip.data.text import sample_text
from llmclip.eval import heldout as H

SEEDS = range(4)


@pytest.fixture(scope="module")
def openi_test_reports(tmp_path_factory) -> list[str]:
    """The clinical texts of the real Open-I test split (398 reports, patient-level split)."""
    from llmclip.data.build import build
    from llmclip.data.build_options import BuildOptions

    out = tmp_path_factory.mktemp("openi_all") / "shards"
    build(BuildOptions(source="openi", out=str(out), images="render", image_size=32, workers=2),
          progress=False)
    texts = []
    for p in sorted((out / "text").glob("test-*.tar")):
        texts += [sample_text(json.loads(m["json"])) for _k, m in read_tar(p)]
    return texts


def _training_outputs(text: str) -> set[str]:
    """Everything the training generators make of a report, over several seeds (stage-1 pairs draw
    rewrites, edits of the report and of its rewrites; stage 2 caches negate and one-error edits)."""
    out = {negate(text)}
    for seed in SEEDS:
        rng = random.Random(seed)
        rewrites = [v.text for v in equivalent_rewrites(text, rng, verify=False)]
        out |= set(rewrites)
        for base in [text, *rewrites]:
            out |= {v.text for v in one_error_edits(base, rng)}
            out.add(negate(base))
    return {" ".join(t.split()).lower() for t in out}


def _heldout_outputs(text: str, seed: int) -> set[str]:
    rng = random.Random(seed)
    short = H.abbreviate(text)
    out = {H.style(text), short, H.style(short) if short else None}
    for kind in (*H.EDIT_KINDS, "omission"):
        v = H.edit(text, kind, rng)
        if v is not None:
            out.add(H.style(v.text))
    return {" ".join(t.split()).lower() for t in out if t}


def test_lexicons_and_maps_are_disjoint_from_training():
    train_short = {a.lower() for a, _ in lx.ABBREVIATIONS}
    train_long = {b.lower() for _, b in lx.ABBREVIATIONS}
    for long, short in H.EVAL_ABBREVIATIONS:
        assert short.lower() not in train_short | train_long, short
        assert long.lower() not in train_long | train_short, long
    for word, new in H.EVAL_SEVERITY.items():
        assert _SEVERITY_SWAP.get(word) != new, word
    for word, new in H.EVAL_NEIGHBOURS.items():
        assert lx.NEIGHBOURS.get(word) != new, word
    assert not set(H.EVAL_DEVICE_SENTENCES) & set(lx.DEVICE_SENTENCES)


def test_no_heldout_variant_is_a_training_output(openi_test_reports):
    assert len(openi_test_reports) > 350
    produced = collided = 0
    for i, text in enumerate(openi_test_reports):
        train = _training_outputs(text)
        for seed in SEEDS:
            mine = _heldout_outputs(text, seed)
            produced += len(mine)
            collided += len(mine & train)
            assert not mine & train, f"report {i}: a held-out variant is a training output"
    assert produced > 1500 and collided == 0


def test_every_heldout_edit_is_confirmed_by_the_labeler(openi_test_reports):
    labeler = Labeler()
    made = {k: 0 for k in (*H.EDIT_KINDS, "omission")}
    for i, text in enumerate(openi_test_reports):
        before = summarise(labeler.label(text))
        for kind in made:
            v = H.edit(text, kind, random.Random(i))
            if v is None:
                continue
            made[kind] += 1
            after = summarise(labeler.label(v.text))
            changed = {o for o in set(before) | set(after) if before.get(o) != after.get(o)}
            if kind == "finding":
                assert v.target in changed and len(changed) <= 2
            else:
                assert changed == {v.target}, (kind, text, v.text)
            if kind == "omission":
                assert v.target not in after  # every sentence of the finding is gone
            # The style keeps what the Labeler reads.
            assert summarise(labeler.label(H.style(v.text) or v.text)) == after
    assert all(n >= 20 for n in made.values()), made
