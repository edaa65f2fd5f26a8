"""What one shard build is: its options, their checks, and the identity a resume must match.

``workers`` and ``out`` are left out of the identity: they change how and where a build runs, not
the bytes it writes, so a killed build may be resumed with another worker count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmclip.config import ConfigError


@dataclass
class BuildOptions:
    """Options of one shard build; all but ``workers`` must match when a build is resumed."""

    source: str
    """Source reader name: openi, mimic-cxr, chexpert-plus, padchest, csv."""
    out: str
    """Output folder (created); holds manifest.json, images/, text/."""
    root: str | None = None
    """Dataset folder or file; None for sources shipped in packages (openi, padchest)."""
    images: str | None = None
    """'render' (phantoms from the report), a folder of images (openi, padchest), or None (source default)."""
    maxcount: int | None = None
    """Read at most this many source records (a quick subset); None reads everything."""
    shard_size: int = 256
    """Samples per shard (the last shard of each split may hold fewer)."""
    image_size: int = 256
    """Side of rendered phantoms in pixels."""
    image_format: str = "jpg"
    """Encoding of rendered phantoms: jpg (smaller) or png (lossless)."""
    max_side: int = 0
    """Re-encode source images whose longer side exceeds this (0 keeps the original bytes)."""
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """train/val/test fractions of patients for the hash split."""
    split_mode: str = "auto"
    """auto: the dataset's official split where it has one, else hash; hash: always hash."""
    workers: int = 2
    """Worker processes for labels, rendering and image checks (1 = in-process)."""

    def validate(self) -> None:
        if self.shard_size < 1:
            raise ConfigError("must be >= 1", "--shard-size")
        if self.maxcount is not None and self.maxcount < 1:
            raise ConfigError("must be >= 1", "--maxcount")
        if self.image_size < 16:
            raise ConfigError("must be >= 16", "--image-size")
        if self.image_format not in ("jpg", "png"):
            raise ConfigError("must be jpg or png", "--image-format")
        if self.max_side < 0:
            raise ConfigError("must be >= 0", "--max-side")
        if (
            len(self.splits) != 3
            or any(f < 0 for f in self.splits)
            or abs(sum(self.splits) - 1) > 1e-6
        ):
            raise ConfigError(
                f"must be three fractions summing to 1, got {self.splits}", "--splits"
            )
        if self.split_mode not in ("auto", "hash"):
            raise ConfigError("must be auto or hash", "--split-mode")
        if self.workers < 1:
            raise ConfigError("must be >= 1", "--workers")

    def identity(self) -> dict[str, Any]:
        """What makes two builds the same build (resume is allowed only between equal identities)."""
        d = dataclasses.asdict(self)
        d.pop("workers")
        d.pop("out")
        d["root"] = str(Path(self.root).resolve()) if self.root else None
        d["images"] = (
            self.images if self.images in (None, "render") else str(Path(self.images).resolve())
        )
        d["splits"] = list(self.splits)
        return d
