"""Hand-made shard folders for the data tests (bad input, hostile members)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from llmclip.data.shards import FORMAT, sha256_file


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def meta(key: str, split: str = "train", findings: str = "Heart size is normal.", **extra) -> dict:
    return {
        "key": key,
        "source": "test",
        "patient_id": key,
        "study_id": key,
        "image_id": "",
        "view": "PA",
        "split": split,
        "report": {
            "findings": findings,
            "impression": "",
            "indication": "",
            "comparison": "",
            "history": "",
            "full": findings,
        },
        "labels": {},
        "label_source": "labeler",
        "synthetic_image": True,
        **extra,
    }


def write_shard_dir(
    root: Path,
    shards: list[tuple[str, int, list[tuple[str, bytes]], int]],
    source: str = "test",
    text_only: bool = False,
) -> Path:
    """shards: (split, index, tar members, manifest count). Writes images/ (or text/) + manifest."""
    kind_dir = "text" if text_only else "images"
    (root / kind_dir).mkdir(parents=True, exist_ok=True)
    entries, splits = [], {}
    for split, index, members, count in shards:
        rel = f"{kind_dir}/{split}-{index:06d}.tar"
        (root / rel).write_bytes(tar_bytes(members))
        kind = "text" if text_only else "image"
        entries.append(
            {
                "split": split,
                "index": index,
                "count": count,
                "image": None if text_only else rel,
                "text": rel if text_only else None,
                "sha256": {kind: sha256_file(root / rel)},
            }
        )
        splits[split] = splits.get(split, 0) + count
    if not text_only:  # matching text shards with the json members only
        (root / "text").mkdir(exist_ok=True)
        for e, (_, _, members, _) in zip(entries, shards, strict=True):
            rel = e["image"].replace("images/", "text/")
            (root / rel).write_bytes(tar_bytes([(n, d) for n, d in members if n.endswith(".json")]))
            e["text"], e["sha256"]["text"] = rel, sha256_file(root / rel)
    manifest = {
        "format": FORMAT,
        "source": source,
        "created_by": "tests",
        "shards": entries,
        "splits": splits,
        "label_source": "labeler",
        "synthetic_images": True,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root
