"""The tar writer of a shard build: one split's samples -> image and text shards, each published whole.

A shard is written to ``*.tar.tmp`` and renamed when full, so a reader (or a resumed build) never
sees a partial shard under its final name. Members carry a fixed mtime, mode and owner so that a
rebuilt shard is byte-identical to the first one.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from llmclip.config import writing
from llmclip.data.shards import sha256_file, shard_name


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
    with writing(tar.name):  # a full disk names the shard being written
        tar.addfile(info, io.BytesIO(data))


class SplitWriter:
    """Writes one split's shards in order; a shard becomes visible only when complete."""

    def __init__(self, out: Path, split: str, index: int, shard_size: int, with_images: bool):
        self.out, self.split, self.index, self.size = out, split, index, shard_size
        self.with_images = with_images
        self.tars: dict[str, tarfile.TarFile] = {}
        self.count, self.skipped, self.label_sources = 0, Counter(), Counter()

    def _paths(self, kind: str) -> Path:
        return (
            self.out
            / ("images" if kind == "image" else "text")
            / f"{shard_name(self.split, self.index)}.tar"
        )

    def _open(self) -> None:
        for kind in ("image", "text") if self.with_images else ("text",):
            tmp = self._paths(kind).with_suffix(".tar.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with writing(tmp):
                self.tars[kind] = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)

    def add(
        self, key: str, meta: dict[str, Any], image: tuple[str, bytes] | None, label_source: str
    ) -> None:
        if not self.tars:
            self._open()
        meta["split"] = self.split
        text = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        if self.with_images:
            _add(self.tars["image"], f"{key}.json", text)
            _add(self.tars["image"], f"{key}.{image[0]}", image[1])
        _add(self.tars["text"], f"{key}.json", text)
        self.count += 1
        self.label_sources[label_source] += 1

    def finish(self, last_ordinal: int) -> dict[str, Any] | None:
        """Close and publish the current shard; returns its manifest entry (None if nothing open)."""
        if not self.tars:
            return None
        entry: dict[str, Any] = {
            "split": self.split,
            "index": self.index,
            "count": self.count,
            "image": None,
            "text": None,
            "sha256": {},
        }
        for kind, tar in self.tars.items():
            final = self._paths(kind)
            tmp = final.with_suffix(".tar.tmp")
            with writing(tmp):
                tar.close()
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
            entry[kind] = str(final.relative_to(self.out))
            entry["sha256"][kind] = sha256_file(final)
        entry.update(
            last_ordinal=last_ordinal,
            skipped=dict(self.skipped),
            label_sources=dict(self.label_sources),
        )
        self.tars, self.index, self.count = {}, self.index + 1, 0
        self.skipped, self.label_sources = Counter(), Counter()
        return entry
