"""Finding-conditioned synthetic chest radiographs ("phantoms") for sources that ship reports only.

No CXR pixels ship in any installable package, so tests and the demo render an image from what the
report says. A phantom is a frontal (PA) view drawn in an attenuation map (bright = dense):
body, two lungs with vessel markings, heart, mediastinum and spine, domed hemidiaphragms, ribs and
clavicles. Findings change it in the way a reader would look for them:

- Cardiomegaly: heart width (cardiothoracic ratio grows with severity)
- Enlarged Cardiomediastinum: a wider upper mediastinum
- Pleural Effusion: a basal fluid level with a meniscus rising along the lateral wall, on the stated side
- Pneumothorax: an apical/lateral lucency without vessel markings, bounded by a thin pleural line
- Consolidation / Pneumonia / Lung Opacity: a lobar density (patchy for pneumonia, fainter for opacity)
- Atelectasis: a plate-like band above the hemidiaphragm
- Edema: bilateral perihilar haze, with septal lines when severe
- Lung Lesion: a nodule (a mass when severe)
- Support Devices: endotracheal / enteric tube, central line, pacemaker, chest tube (from the sentence)
- Fracture: a rib with a gap and callus;  Pleural Other: lateral pleural thickening

Sides follow the radiological convention: the patient's right is on the image's left.
Severity (trace..severe) sets size/intensity; uncertain findings are drawn faint. Each image also has
seeded jitter in anatomy, pose (rotation, scale, shift), exposure (gamma) and noise. Everything is
seeded by the sample key, so the same key and spec always give the same pixels.

What to draw (``PhantomSpec``, from the labeler's mentions) is defined in ``phantom_spec.py``.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from llmclip.data.phantom_spec import SEVERITY, Finding, PhantomSpec


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(
        int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    )


def _sev(f: Finding) -> float:
    s = SEVERITY.get((f.severity or "").lower(), 0.5)
    return s * 0.5 if f.uncertain else s


def _sides(f: Finding, rng: np.random.Generator) -> list[int]:
    """Image-x sign of the stated side(s): patient right = image left = -1."""
    lat = (f.laterality or "").lower()
    if lat.startswith("bilat") or lat == "both":
        return [-1, 1]
    if lat == "right":
        return [-1]
    if lat == "left":
        return [1]
    return [int(rng.choice([-1, 1]))]


def _line(layer: Image.Image, pts: list[tuple[float, float]], width: float, value: float) -> None:
    """Draw a polyline (points in [0,1] coords, width as a fraction of the image) on a PIL layer."""
    n = layer.size[0]
    ImageDraw.Draw(layer).line(
        [(x * n, y * n) for x, y in pts],
        fill=int(value * 255),
        width=max(1, round(2 * width * n)),
        joint="curve",
    )


class _Chest:
    """Anatomy of one phantom on an S x S grid; findings modify it in place before compositing."""

    def __init__(self, size: int, rng: np.random.Generator, finding_rng: np.random.Generator):
        # Two streams: anatomy/pose/noise and finding placement, so adding a finding to a spec
        # changes only the finding's pixels (what the tests and a reader compare).
        self.size, self.rng, self.frng = size, rng, finding_rng
        g = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.X, self.Y = np.meshgrid(g, g)
        j = lambda a: float(rng.uniform(-a, a))  # noqa: E731
        self.lung_cx = {s: 0.5 + s * (0.2 + j(0.01)) for s in (-1, 1)}
        self.lung_rx = 0.165 + j(0.01)
        self.lung_cy, self.lung_ry = 0.5 + j(0.015), 0.36 + j(0.015)
        self.dome = {-1: 0.76 + j(0.015), 1: 0.78 + j(0.015)}  # right hemidiaphragm sits higher
        self.ctr = 0.44 + j(0.03)
        self.mediastinum = 0.055 + j(0.006)
        self.markings = 1.0
        self.extra = np.zeros((size, size), np.float32)  # density added inside the lungs
        self.overlay = np.zeros((size, size), np.float32)  # thin bright lines (max-composited)
        self.devices = Image.new("L", (size, size), 0)  # radiopaque tubes and lines, drawn by PIL
        self.ptx = np.zeros((size, size), bool)
        self.rib_mask: np.ndarray | float = 1.0
        self.lung = {s: self._lung_mask(s) for s in (-1, 1)}

    def rho(self, s: int) -> np.ndarray:
        return np.hypot(
            (self.X - self.lung_cx[s]) / self.lung_rx, (self.Y - self.lung_cy) / self.lung_ry
        )

    def dome_y(self, s: int) -> np.ndarray:
        u = np.clip((self.X - self.lung_cx[s]) / self.lung_rx, -1, 1)
        return self.dome[s] - 0.05 * (1 - u * u)

    def _lung_mask(self, s: int) -> np.ndarray:
        return (self.rho(s) < 1) & (self.Y < self.dome_y(s))

    def lateralness(self, s: int) -> np.ndarray:
        """0 at the medial lung edge, 1 at the lateral chest wall."""
        return np.clip(0.5 + s * (self.X - self.lung_cx[s]) / (2 * self.lung_rx), 0, 1)

    def blob(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return np.exp(-(((self.X - cx) / rx) ** 2 + ((self.Y - cy) / ry) ** 2))

    def compose(self) -> np.ndarray:
        X, Y, rng = self.X, self.Y, self.rng
        body = np.hypot((X - 0.5) / 0.47, (Y - 0.62) / 0.62) < 1
        img = np.where(body, 0.55, 0.04).astype(np.float32)
        lungs = self.lung[-1] | self.lung[1]
        # vessel markings: radial streaks fading from each hilum; absent where air replaced lung
        marks = np.zeros_like(img)
        for s in (-1, 1):
            hx, hy = self.lung_cx[s] - s * 0.08, 0.47
            ang, r = np.arctan2(Y - hy, X - hx), np.hypot(X - hx, Y - hy)
            streak = np.maximum(np.cos(ang * 23 + np.float32(rng.uniform(0, 6.3))), 0)
            streak *= streak
            streak *= streak
            streak *= streak  # ** 8: thin streaks, by squaring (much cheaper than a float power)
            marks += 0.09 * streak * np.exp(-r / 0.2) * self.lung[s]
        marks *= self.markings * ~self.ptx
        img = np.where(lungs, 0.17 + marks, img)
        img = np.where(self.ptx, 0.08, img)
        img += self.extra * lungs
        # heart (shifted to the patient's left) and mediastinum cover the medial lungs
        hw = self.ctr * 0.8 / 2
        heart = np.hypot((X - 0.5 - 0.3 * hw) / hw, (Y - 0.66) / 0.12) < 1
        med = (np.abs(X - 0.5) < self.mediastinum + 0.03 * np.clip(Y - 0.15, 0, 1)) & (Y > 0.08)
        img = np.where(heart | med, np.maximum(img, 0.72), img)
        below = Y > np.minimum(self.dome_y(-1), self.dome_y(1)) + 0.02
        img = np.where(body & below & ~lungs, np.maximum(img, 0.62), img)
        # bones: spine, posterior ribs (one arc family per hemithorax), clavicles
        img += 0.1 * (np.abs(X - 0.5) < 0.035) * body
        ribs = np.zeros(img.shape, bool)
        for s in (-1, 1):
            u = (X - self.lung_cx[s]) / self.lung_rx
            v = Y - 0.16 - 0.05 * u * s - 0.04 * u * u
            on_rib = np.abs(v - 0.065 * np.round(v / 0.065)) < 0.011
            ribs |= on_rib & (v > -0.02) & (v < 0.62) & (np.abs(u) < 1.15)
        img += 0.09 * ribs * body * self.rib_mask * ~below
        bones = Image.new("L", (self.size, self.size), 0)
        for s in (-1, 1):
            _line(bones, [(0.5 + s * 0.04, 0.17), (0.5 + s * 0.32, 0.11)], 0.012, 0.8)
        dev = np.maximum(np.asarray(bones), np.asarray(self.devices)).astype(np.float32) / 255
        return np.maximum(np.maximum(img, self.overlay), dev)


def _draw(ch: _Chest, f: Finding) -> None:
    rng, X, Y = ch.frng, ch.X, ch.Y
    sev = _sev(f)
    obs = f.observation
    if obs == "Cardiomegaly":
        ch.ctr = max(ch.ctr, 0.52 + 0.2 * sev)
    elif obs == "Enlarged Cardiomediastinum":
        ch.mediastinum = max(ch.mediastinum, 0.075 + 0.06 * sev)
    elif obs == "Pleural Effusion":
        for s in _sides(f, rng):
            level = ch.dome[s] - 0.05 - 0.3 * sev
            meniscus = level + 0.08 * (1 - ch.lateralness(s)) ** 2  # fluid climbs the lateral wall
            ch.extra += (0.42 * (Y > meniscus) * ch.lung[s]).astype(np.float32)
    elif obs == "Pneumothorax":
        for s in _sides(f, rng):
            depth = 0.08 + 0.3 * sev
            rho = ch.rho(s)
            upper = Y < ch.lung_cy + 0.1
            ch.ptx |= (rho > 1 - depth) & (rho < 1) & upper
            pleura = 0.45 * ((np.abs(rho - (1 - depth)) < 0.012) & upper)
            np.maximum(ch.overlay, pleura, out=ch.overlay)
    elif obs in ("Consolidation", "Pneumonia", "Lung Opacity"):
        amp = {"Consolidation": 0.4, "Pneumonia": 0.34, "Lung Opacity": 0.24}[obs] * (0.5 + sev)
        for s in _sides(f, rng):
            cy = ch.lung_cy + ch.lung_ry * float(rng.choice([-0.45, 0.1, 0.45]))
            cx = ch.lung_cx[s] + s * ch.lung_rx * float(rng.uniform(0, 0.3))
            density = ch.blob(cx, cy, 0.06 + 0.07 * sev, 0.05 + 0.06 * sev)
            if obs == "Pneumonia":
                density *= 0.6 + 0.4 * rng.random(density.shape, dtype=np.float32)
            ch.extra += (amp * density * ch.lung[s]).astype(np.float32)
    elif obs == "Atelectasis":
        for s in _sides(f, rng):
            band = np.abs(Y - (ch.dome_y(s) - 0.06 - 0.03 * rng.random())) < 0.008 + 0.02 * sev
            ch.extra += (0.3 * band * ch.lung[s]).astype(np.float32)
    elif obs == "Edema":
        for s in (-1, 1):
            haze = ch.blob(ch.lung_cx[s] - s * 0.07, 0.5, 0.12, 0.16)
            ch.extra += ((0.12 + 0.3 * sev) * haze * ch.lung[s]).astype(np.float32)
            if sev >= 0.6:  # Kerley B lines: short horizontal septal lines at the lateral bases
                for k in range(5):
                    y = ch.dome[s] - 0.1 + 0.018 * k
                    lines = (np.abs(Y - y) < 0.003) & (ch.lateralness(s) > 0.8)
                    ch.extra += (0.25 * lines * ch.lung[s]).astype(np.float32)
        ch.markings = 1.5
    elif obs == "Lung Lesion":
        for s in _sides(f, rng):
            r = 0.012 + 0.045 * sev
            cx = ch.lung_cx[s] + float(rng.uniform(-0.5, 0.5)) * ch.lung_rx
            cy = ch.lung_cy + float(rng.uniform(-0.5, 0.3)) * ch.lung_ry
            d = np.hypot(X - cx, Y - cy)
            ch.extra += (0.4 * np.clip((r - d) / (0.3 * r), 0, 1) * ch.lung[s]).astype(np.float32)
    elif obs == "Support Devices":
        _device(ch, f.device or "line", f)
    elif obs == "Fracture":
        s = _sides(f, rng)[0]
        k = int(rng.integers(3, 8))
        y0 = 0.16 + k * 0.065 + 0.05 * 0.9 + 0.04 * 0.81  # rib k at 90% of the way to the wall
        cx = ch.lung_cx[s] + s * 0.9 * ch.lung_rx
        d = np.hypot(X - cx, Y - y0)
        ch.rib_mask = np.where(d < 0.02, 0.0, 1.0)
        np.maximum(ch.overlay, 0.62 * (np.abs(d - 0.026) < 0.006), out=ch.overlay)  # callus
    elif obs == "Pleural Other":
        for s in _sides(f, rng):
            rim = (ch.rho(s) > 0.9 - 0.06 * sev) & (Y > ch.lung_cy - 0.1)
            ch.extra += (0.3 * rim * ch.lung[s]).astype(np.float32)


def _device(ch: _Chest, kind: str, f: Finding) -> None:
    w = 0.0045
    if kind == "et":
        _line(ch.devices, [(0.5, 0.0), (0.5, 0.3)], w * 2, 0.9)
    elif kind == "ng":
        _line(ch.devices, [(0.49, 0.0), (0.49, 0.5), (0.52, 0.8), (0.62, 0.88)], w, 0.92)
    elif kind == "pacemaker":
        n = ch.size
        ImageDraw.Draw(ch.devices).rounded_rectangle(
            [0.69 * n, 0.135 * n, 0.79 * n, 0.205 * n], radius=0.01 * n, fill=247
        )
        _line(
            ch.devices, [(0.72, 0.17), (0.6, 0.22), (0.52, 0.4), (0.5, 0.6), (0.56, 0.7)], w, 0.95
        )
    elif kind == "wires":  # sternotomy wires: small loops down the midline
        n, draw = ch.size, ImageDraw.Draw(ch.devices)
        for k in range(5):
            y = (0.3 + 0.06 * k) * n
            draw.ellipse(
                [0.485 * n, y - 0.012 * n, 0.515 * n, y + 0.012 * n],
                outline=245,
                width=max(1, round(0.006 * n)),
            )
    elif kind == "clips":
        n, draw = ch.size, ImageDraw.Draw(ch.devices)
        for _ in range(3):
            x, y = ch.frng.uniform(0.3, 0.7), ch.frng.uniform(0.25, 0.6)
            draw.line(
                [(x * n, y * n), ((x + 0.02) * n, (y + 0.01) * n)],
                fill=250,
                width=max(1, round(0.008 * n)),
            )
    elif kind == "valve":
        n = ch.size
        ImageDraw.Draw(ch.devices).ellipse(
            [0.5 * n, 0.6 * n, 0.56 * n, 0.65 * n], outline=245, width=max(1, round(0.008 * n))
        )
    elif kind == "chest_tube":
        s = _sides(f, ch.frng)[0]
        pts = [(0.5 + s * 0.45, 0.75), (ch.lung_cx[s] + s * 0.1, 0.6), (ch.lung_cx[s], 0.2)]
        _line(ch.devices, pts, w * 1.6, 0.9)
    else:  # central venous line from the right subclavian into the SVC
        _line(ch.devices, [(0.2, 0.15), (0.4, 0.2), (0.47, 0.27), (0.48, 0.42)], w, 0.93)


def render(spec: PhantomSpec, key: str, size: int = 256) -> np.ndarray:
    """Render ``spec`` as a uint8 [size, size] grayscale image; same (spec, key, size) -> same pixels."""
    if size < 16:
        raise ValueError(f"phantom size must be >= 16, got {size}")
    rng = _rng(key)
    ch = _Chest(size, rng, _rng(key + "/findings"))
    for f in spec.findings:
        _draw(ch, f)
    img = ch.compose()
    # exposure (gamma), detector noise, pose jitter, then the unsharpness of a real radiograph
    gamma = float(rng.uniform(0.8, 1.25))
    lut = np.clip(
        255 * (np.arange(256) / 255) ** gamma, 0, 255
    )  # gamma on 256 levels, not per pixel
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(
        255 * rng.uniform(0.01, 0.025)
    )
    img = lut[np.clip(img * 255, 0, 255).astype(np.uint8)] + noise
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L")
    angle, scale = float(rng.uniform(-4, 4)), float(rng.uniform(0.95, 1.05))
    dx, dy = (float(v) * size for v in rng.uniform(-0.03, 0.03, 2))
    c = size / 2
    a, b = np.cos(np.radians(angle)) / scale, np.sin(np.radians(angle)) / scale
    # inverse affine map about the centre: rotate by angle, scale, shift
    coeffs = (a, b, c - a * (c + dx) - b * (c + dy), -b, a, c + b * (c + dx) - a * (c + dy))
    pil = pil.transform(
        (size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=10
    )
    pil = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 0.9)) * size / 256))
    return np.asarray(pil)


def encode(pixels: np.ndarray, fmt: str = "jpg", quality: int = 92) -> bytes:
    """PNG (lossless) or JPEG bytes of a uint8 grayscale image."""
    buf = io.BytesIO()
    pil = Image.fromarray(pixels, "L")
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=3)
    elif fmt == "jpg":
        pil.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"image format must be png or jpg, got {fmt!r}")
    return buf.getvalue()
