"""Rewrites, one-error edits and negation, checked by the Labeler over the real Open-I reports."""

from __future__ import annotations

import functools
import random

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmclip.clinical import Labeler, Variant, equivalent_rewrites, negate, one_error_edits

L = Labeler()


@functools.cache
def texts() -> list[str]:
    """Open-I findings + impression texts (module-level so hypothesis does not repr them)."""
    from llmclip.assets import openi_reports_tgz
    from llmclip.labels.openi import read_openi

    return [r.text for r in read_openi(openi_reports_tgz()) if r.text.strip()]


SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
REWRITE_KINDS = {
    "bullets",
    "lowercase",
    "uppercase",
    "abbreviate",
    "expand",
    "telegraphic",
    "shuffle",
    "synonym",
    "impression_only",
    "findings_only",
}
EDIT_KINDS = {
    "negation_flip",
    "laterality_swap",
    "severity_change",
    "device_add",
    "device_remove",
    "measurement_change",
    "finding_swap",
}


def facts(text: str) -> dict[str, tuple]:
    """Test oracle: per observation, its value and the attributes of its non-negative mentions."""
    res = L.label(text)
    out = {}
    for obs, value in res.vector.items():
        if obs == "No Finding":
            continue
        ms = [m for m in res.mentions if m.observation == obs and m.status != "negative"]
        out[obs] = (
            value,
            sorted({m.laterality for m in ms if m.laterality}),
            sorted({m.severity for m in ms if m.severity}),
            sorted({m.measurement for m in ms if m.measurement}),
            sorted({m.term for m in ms}) if obs == "Support Devices" else [],
        )
    return out


def changed(a: dict, b: dict) -> dict[str, list[int]]:
    out = {}
    for obs in set(a) | set(b):
        x, y = a.get(obs), b.get(obs)
        if x != y:
            out[obs] = [0] if x is None or y is None else [i for i in range(5) if x[i] != y[i]]
    return out


def test_negate_examples():
    assert negate("Small left pleural effusion.") == "No left pleural effusion."
    assert negate("No pneumothorax or pleural effusion.") == "Pneumothorax or pleural effusion."
    assert negate("The heart is mildly enlarged.") == "The heart is normal."
    assert negate("Heart size is normal.") == "Heart size is enlarged."
    assert (
        negate("Lungs are clear without focal consolidation.")
        == "Lungs are clear with focal consolidation."
    )
    assert negate("Possible pneumonia.") == "Possible pneumonia."  # uncertain stays uncertain
    assert negate("") == ""
    t = "Mild cardiomegaly. No pneumothorax. Small right effusion. No acute cardiopulmonary process."
    assert L.label(negate(t)).vector == {
        "No Finding": 0,
        "Cardiomegaly": 0,
        "Pneumothorax": 1,
        "Pleural Effusion": 0,
    }


def test_negation_over_openi(openi_texts):
    """negate flips >= 95% of decided observations; negate(negate(r)) keeps r's labels in >= 98%."""
    flipped = decided = same = 0
    for t in openi_texts:
        before = L.label(t).vector
        once = negate(t)
        after = L.label(once).vector
        for obs, v in before.items():
            if obs != "No Finding" and v != -1:
                decided += 1
                flipped += after.get(obs) == 1 - v
        same += L.label(negate(once)).vector == before
    print(f"flip rate {flipped / decided:.4f}, double negation {same / len(openi_texts):.4f}")
    assert flipped / decided >= 0.95
    assert same / len(openi_texts) >= 0.98


def test_rewrites_keep_labels_before_verification(openi_texts):
    """The rewrite rules themselves (before the Labeler filter) keep the vector in >= 98%."""
    rng = random.Random(0)
    kept = total = 0
    for t in random.Random(1).sample(openi_texts, 500):
        ref = L.label(t).vector
        for v in equivalent_rewrites(t, rng, verify=False):
            if v.kind in ("impression_only", "findings_only"):
                continue  # a summary may legitimately drop findings; kept only when verified
            total += 1
            kept += L.label(v.text).vector == ref
    print(f"rewrites keep labels: {kept}/{total} = {kept / total:.4f}")
    assert total > 1000 and kept / total >= 0.98


def test_every_edit_kind_is_produced(openi_texts):
    rng = np.random.default_rng(0)
    kinds = set()
    with_edit = 0
    for t in openi_texts[:400]:
        edits = one_error_edits(t, rng)
        with_edit += bool(edits)
        kinds |= {e.kind for e in edits}
    assert kinds == EDIT_KINDS
    assert with_edit / 400 >= 0.9


@SETTINGS
@given(i=st.integers(min_value=0, max_value=10**6), seed=st.integers(0, 2**31 - 1))
def test_rewrites_property(i, seed):
    t = texts()[i % len(texts())]
    ref = L.label(t).vector
    for v in equivalent_rewrites(t, random.Random(seed)):
        assert isinstance(v, Variant) and v.kind in REWRITE_KINDS and v.detail
        assert v.text != t and L.label(v.text).vector == ref


@SETTINGS
@given(i=st.integers(min_value=0, max_value=10**6), seed=st.integers(0, 2**31 - 1))
def test_edits_change_exactly_one_fact(i, seed):
    t = texts()[i % len(texts())]
    before = facts(t)
    for v in one_error_edits(t, random.Random(seed)):
        assert v.kind in EDIT_KINDS and v.detail
        d = changed(before, facts(v.text))
        if v.kind == "finding_swap":
            # one finding changes identity: a new observation appears, the old may vanish
            assert 1 <= len(d) <= 2 and all(f == [0] for f in d.values()), (v, d)
        else:
            assert len(d) == 1, (v, d)
            (fields,) = d.values()
            want = {
                "negation_flip": [0],
                "laterality_swap": [1],
                "severity_change": [2],
                "measurement_change": [3],
            }.get(v.kind)
            if v.kind == "negation_flip":
                # the status flips; attributes of a finding that is now absent go with it
                assert 0 in fields, (v, d)
            elif want is not None:
                assert fields == want, (v, d)
            else:
                assert list(d) == ["Support Devices"], (v, d)


@SETTINGS
@given(i=st.integers(min_value=0, max_value=10**6))
def test_negate_is_fluent_text(i):
    t = texts()[i % len(texts())]
    n = negate(t)
    assert isinstance(n, str) and "  " not in n and n.strip()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(text=st.text(max_size=400))
def test_arbitrary_text_never_raises(text):
    rng = random.Random(0)
    assert isinstance(negate(text), str)
    equivalent_rewrites(text, rng)
    one_error_edits(text, rng)
