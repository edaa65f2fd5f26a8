"""Per-record work of a shard build, run in the worker processes: one source record -> one sample.

Labels come from the Labeler when the dataset has none, pixels are rendered as a phantom when the
build renders, and source images are decoded once so a corrupt file is skipped at build time rather
than found by a training run. The build's options live in a module global set by ``_init_worker``:
a pool's initializer is the only place a worker receives them (an in-process build calls it too).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from llmclip.data import phantom
from llmclip.data.build_options import BuildOptions
from llmclip.data.phantom_spec import spec_from_mentions
from llmclip.data.sources import Record

_W: dict[str, Any] = {}


def _init_worker(opts: BuildOptions, render: bool) -> None:
    _W.update(opts=opts, render=render, labeler=None)


def _labeler():
    if _W.get("labeler") is None:
        from llmclip.clinical import Labeler  # the clinical toolkit: rule-based CheXpert labeler

        _W["labeler"] = Labeler()
    return _W["labeler"]


def _check_image(path: Path, max_side: int) -> tuple[str, bytes]:
    """(ext, bytes) of a source image after decoding it once (a corrupt file raises)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data), formats=["JPEG", "PNG"]) as im:
        ext, size = ("jpg" if im.format == "JPEG" else "png"), im.size
        if im.format == "JPEG":  # a reduced-scale decode still reads (and checks) the whole stream
            im.draft("L", (max(64, im.width // 8), max(64, im.height // 8)))
        im.load()
    if max_side and max(size) > max_side:
        with Image.open(io.BytesIO(data), formats=["JPEG", "PNG"]) as im:
            if im.mode in ("I;16", "I;16B", "I"):  # 16-bit PNG (PadChest): scale to 8 bit
                import numpy as np

                a = np.asarray(im, dtype=np.float32)
                im = Image.fromarray((a * (255.0 / max(float(a.max()), 1.0))).astype("uint8"), "L")
            elif im.mode not in ("L", "RGB"):
                im = im.convert("L")
            im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            im.save(
                buf,
                format="JPEG" if ext == "jpg" else "PNG",
                **({"quality": 95} if ext == "jpg" else {}),
            )
            data = buf.getvalue()
    return ext, data


Result = tuple[str | None, dict[str, Any] | None, tuple[str, bytes] | None, str | None]


def process(rec: Record) -> Result:
    """(skip reason, sample json, (ext, image bytes) or None, label source) for one record.

    Any unexpected error becomes a counted skip reason, so one strange record cannot stop a build.
    """
    try:
        return _process(rec)
    except Exception as e:  # noqa: BLE001 - counted and reported in the manifest, never silent
        return f"error_{type(e).__name__}", None, None, None


def _process(rec: Record) -> Result:
    opts: BuildOptions = _W["opts"]
    if rec.error:
        return rec.error, None, None, None
    if rec.report.is_empty:
        return "empty_report", None, None, None
    labels, label_source, mentions = rec.labels, rec.label_source, None
    if labels is None:
        result = _labeler().label(rec.report.findings_impression)
        labels, label_source, mentions = dict(result.vector), "labeler", result.mentions
    image = None
    if _W["render"]:
        if mentions is None:
            mentions = _labeler().label(rec.report.findings_impression).mentions
        spec = spec_from_mentions(mentions)
        pixels = phantom.render(spec, rec.key, opts.image_size)
        image = (opts.image_format, phantom.encode(pixels, opts.image_format))
    elif rec.image_path is not None:
        if not rec.image_path.is_file():
            return "missing_image", None, None, None
        try:
            image = _check_image(rec.image_path, opts.max_side)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return "bad_image", None, None, None
    meta = {
        "key": rec.key,
        "source": rec.source,
        "patient_id": rec.patient_id,
        "study_id": rec.study_id,
        "image_id": rec.image_id,
        "view": rec.view,
        "report": rec.report.to_dict(),
        "labels": labels,
        "label_source": label_source,
        "synthetic_image": bool(_W["render"]),
        **rec.extra,
    }
    return None, meta, image, label_source
