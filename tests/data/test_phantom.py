"""The phantom renderer: deterministic, and each finding visible where and as strongly as stated."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from llmclip.clinical import Labeler
from llmclip.data.phantom import encode, render
from llmclip.data.phantom_spec import Finding, PhantomSpec, spec_from_mentions

S = 128


def diff(spec: PhantomSpec, key: str = "k") -> np.ndarray:
    """Pixels the spec adds to the normal phantom of the same key (same anatomy, pose, noise)."""
    return render(spec, key, S).astype(float) - render(PhantomSpec(), key, S).astype(float)


def region(a: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> float:
    return float(a[int(y0 * S) : int(y1 * S), int(x0 * S) : int(x1 * S)].mean())


# image x: the patient's right is on the image's left
RIGHT_BASE, LEFT_BASE = (0.1, 0.45, 0.55, 0.8), (0.55, 0.9, 0.55, 0.8)


def test_deterministic_by_key_and_size():
    spec = PhantomSpec((Finding("Pleural Effusion", "left", "small"),))
    a = render(spec, "openi-1-0", S)
    assert a.dtype == np.uint8 and a.shape == (S, S)
    assert np.array_equal(a, render(spec, "openi-1-0", S))
    assert not np.array_equal(a, render(spec, "openi-2-0", S))  # jitter differs per key
    assert render(spec, "openi-1-0", 64).shape == (64, 64)


@pytest.mark.parametrize("key", ["a", "b"])
def test_effusion_side_and_severity(key):
    large_left = diff(PhantomSpec((Finding("Pleural Effusion", "left", "large"),)), key)
    small_left = diff(PhantomSpec((Finding("Pleural Effusion", "left", "small"),)), key)
    right = diff(PhantomSpec((Finding("Pleural Effusion", "right", "moderate"),)), key)
    assert region(large_left, *LEFT_BASE) > 20 and region(large_left, *RIGHT_BASE) == 0
    assert region(right, *RIGHT_BASE) > 10 and region(right, *LEFT_BASE) == 0
    assert region(large_left, *LEFT_BASE) > region(small_left, *LEFT_BASE) + 8


def test_pneumothorax_is_apical_lucency_without_markings():
    spec = PhantomSpec((Finding("Pneumothorax", "right", "moderate"),))
    d = diff(spec)
    assert region(d, 0.1, 0.45, 0.1, 0.5) < -2 and region(d, 0.55, 0.9, 0.1, 0.5) == 0
    ptx, base = render(spec, "k", S).astype(float), render(PhantomSpec(), "k", S).astype(float)
    lucent = d < -20  # where lung became air: darker and flatter than the lung it replaced
    assert lucent.sum() > 100 and ptx[lucent].std() < base[lucent].std()


def test_cardiomegaly_edema_nodule_devices():
    card = diff(PhantomSpec((Finding("Cardiomegaly", severity="severe"),)))
    assert region(card, 0.3, 0.8, 0.55, 0.75) > 15 and region(card, 0, 1, 0, 0.4) == 0
    mild = diff(PhantomSpec((Finding("Cardiomegaly", severity="mild"),)))
    assert region(card, 0.3, 0.8, 0.55, 0.75) > region(mild, 0.3, 0.8, 0.55, 0.75)
    edema = diff(PhantomSpec((Finding("Edema", None, "moderate"),)))
    assert min(region(edema, 0.2, 0.4, 0.35, 0.65), region(edema, 0.6, 0.8, 0.35, 0.65)) > 15
    nodule = diff(PhantomSpec((Finding("Lung Lesion", "right", "moderate"),)))
    assert nodule.max() > 60 and region(nodule, 0.5, 1, 0, 1) == 0
    pacer = diff(PhantomSpec((Finding("Support Devices", device="pacemaker"),)))
    assert pacer.max() > 120 and region(pacer, 0.6, 0.85, 0.05, 0.25) > 15
    uncertain = diff(PhantomSpec((Finding("Pleural Effusion", "left", "large", uncertain=True),)))
    assert (
        0
        < region(uncertain, *LEFT_BASE)
        < region(diff(PhantomSpec((Finding("Pleural Effusion", "left", "large"),))), *LEFT_BASE)
    )


def test_spec_from_real_labeler_mentions():
    text = (
        "There is a large left pleural effusion. No pneumothorax. Left-sided pacemaker in place. "
        "Possible right lower lobe consolidation."
    )
    spec = spec_from_mentions(Labeler().label(text).mentions)
    by_obs = {f.observation: f for f in spec.findings}
    assert by_obs["Pleural Effusion"] == Finding("Pleural Effusion", "left", "large")
    assert by_obs["Support Devices"].device == "pacemaker"
    assert by_obs["Consolidation"].uncertain
    assert "Pneumothorax" not in by_obs  # negated: not drawn
    assert region(diff(spec), *LEFT_BASE) > 20


def test_encode_png_lossless_and_jpeg():
    a = render(PhantomSpec(), "x", 64)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode(a, "png")))), a)
    j = np.asarray(Image.open(io.BytesIO(encode(a, "jpg")))).astype(float)
    assert np.abs(j - a).mean() < 4
    with pytest.raises(ValueError):
        encode(a, "gif")
