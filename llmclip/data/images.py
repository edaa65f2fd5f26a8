"""The one image transform of the project: encoded bytes or a PIL image -> uint8 grey square.

Training (the loader), ``llmclip eval`` and ``llmclip.load``'s ``preprocess`` all go through
``crop_resize``, so a model sees at inference exactly what it was trained on. PIL is restricted to
the member's own format (PNG or JPEG); JPEGs are decoded at reduced size with PIL's draft mode (DCT
scaling 1/2..1/8) before the resize.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def crop_resize(im: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size] grayscale: 16-bit scaled to 8 bit, shorter side to ``size``, centre crop.

    The one image transform of the project: training and ``llmclip eval`` reach it through
    ``decode_image``, ``llmclip.load``'s ``preprocess`` through ``pil_pixels``, so a model sees at
    inference exactly what it was trained on (a centre square, never a squashed whole film).
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNGs (PadChest): scale to 8 bit
        a = np.asarray(im, dtype=np.float32)
        im = Image.fromarray((a * (255.0 / max(float(a.max()), 1.0))).astype(np.uint8), "L")
    elif im.mode != "L":
        im = im.convert("L")
    w, h = im.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    im = im.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(im)


def decode_image(data: bytes, ext: str, size: int) -> np.ndarray:
    """uint8 [size, size] grayscale from encoded bytes: reduced-size JPEG decode, then ``crop_resize``."""
    im = Image.open(io.BytesIO(data), formats=["JPEG"] if ext == "jpg" else ["PNG"])
    if im.format == "JPEG":
        im.draft("L", (size, size))  # decode straight to luma at the smallest DCT scale >= size
    return crop_resize(im, size)


def pil_pixels(im: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size] grayscale from a PIL image, as the loader would make it from its file.

    A JPEG opened with ``Image.open`` and not loaded yet is decoded from its own bytes like a shard
    member (reduced-size DCT decode, ``decode_image``): the result then equals the training tensor
    bit for bit, and the caller's image object is left as it was. An image already in memory goes
    through ``crop_resize`` from its full resolution: on real films about a grey level from the
    reduced decode on average, more at sharp edges (the reduced decode rounds the film's size up
    to whole 8x8 blocks).
    """
    fp = getattr(im, "fp", None)
    if im.format == "JPEG" and getattr(im, "tile", None) and fp is not None:
        try:
            pos = fp.tell()
            fp.seek(0)
            data = fp.read()
            fp.seek(pos)
        except (OSError, ValueError, AttributeError):  # an unseekable stream: decode as it is
            data = b""
        if data[:2] == b"\xff\xd8":  # the stream starts with the JPEG itself
            return decode_image(data, "jpg", size)
    return crop_resize(im, size)
