"""The streaming loader: exact epochs, determinism, quotas, text-only mode, hostile and broken shards."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from data_helpers import meta, write_shard_dir

from llmclip.config import ConfigError
from llmclip.data.loader import make_loader
from llmclip.data.shards import load_manifest, read_tar, resolve_shards, verify


def keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def split_keys(root: Path, split: str) -> int:
    return load_manifest(root)["splits"][split]


def test_image_batches_and_exact_epoch(openi_shards):
    loader = make_loader(
        f"{openi_shards}:train", kind="image", batch_size=16, image_size=48, num_workers=2
    )
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == split_keys(openi_shards, "train")
    b = batches[0]
    assert b["image"].dtype == torch.uint8 and tuple(b["image"].shape[1:]) == (3, 48, 48)
    assert b["image"].float().std() > 10  # real pixels, not a blank tensor
    assert all(
        m["key"] == k and m["split"] == "train" for m, k in zip(b["meta"], b["key"], strict=True)
    )
    assert all(s.startswith("train-") for s in b["shard"])
    assert not loader.skipped and not loader.ignored and loader.samples == len(keys)
    one = make_loader(
        f"{openi_shards}:val", kind="image", batch_size=4, image_size=32, channels=1, num_workers=0
    )
    assert tuple(next(iter(one))["image"].shape) == (4, 1, 32, 32)


def test_epoch_order_is_deterministic_from_seed_and_epoch(openi_shards):
    spec = f"{openi_shards}:train"
    a = keys_of(make_loader(spec, kind="text", batch_size=8, seed=3, epoch=1, num_workers=2))
    b = keys_of(make_loader(spec, kind="text", batch_size=8, seed=3, epoch=1, num_workers=2))
    c = keys_of(make_loader(spec, kind="text", batch_size=8, seed=3, epoch=2, num_workers=2))
    assert a == b and a != c and sorted(a) == sorted(c)
    loader = make_loader(spec, kind="text", batch_size=8, seed=3, epoch=0, num_workers=2)
    loader.set_epoch(2)
    assert keys_of(loader) == c
    plain = keys_of(make_loader(spec, kind="text", batch_size=8, shuffle=False, num_workers=0))
    assert plain == [
        k for s in resolve_shards(spec, "text") for k, _ in read_tar(s.path)
    ]  # file order


def test_epoch_samples_and_resampled(openi_shards):
    spec = f"{openi_shards}:train"
    n = split_keys(openi_shards, "train")
    loader = make_loader(spec, kind="text", batch_size=10, num_workers=2, epoch_samples=n + 37)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == n + 37 and len(batches) == len(loader)
    got = Counter(k for b in batches for k in b["key"])
    assert set(got) <= set(keys_of(make_loader(spec, kind="text", batch_size=64)))
    assert len(got) > 0.5 * n  # cycles through the shards (the shuffle buffer reads ahead)
    res = make_loader(
        spec,
        kind="image",
        batch_size=7,
        image_size=32,
        num_workers=2,
        resampled=True,
        epoch_samples=50,
    )
    assert sum(len(b["key"]) for b in res) == 50 and len(res) == 8
    with pytest.raises(ConfigError, match="resampled"):
        make_loader(spec, kind="text", batch_size=4, resampled=True)


def test_fewer_shards_than_readers_split_by_sample(openi_shards):
    """1 val shard, 3 ranks x 2 workers: every reader reads the shard and keeps its share."""
    spec = f"{openi_shards}:val"
    per_rank = [
        keys_of(make_loader(spec, kind="text", batch_size=4, num_workers=2, rank=r, world_size=3))
        for r in range(3)
    ]
    allk = [k for ks in per_rank for k in ks]
    assert (
        all(per_rank)
        and sorted(allk) == sorted(set(allk))
        and len(allk) == split_keys(openi_shards, "val")
    )
    quota = [
        sum(
            len(b["key"])
            for b in make_loader(
                spec,
                kind="text",
                batch_size=4,
                num_workers=2,
                rank=r,
                world_size=3,
                epoch_samples=40,
            )
        )
        for r in range(3)
    ]
    assert quota == [40, 40, 40]


def test_text_mode_never_reads_pixels(openi_shards, tmp_path):
    copy = tmp_path / "textonly"
    shutil.copytree(openi_shards, copy, ignore=shutil.ignore_patterns("images"))
    assert not (copy / "images").exists()
    batches = list(make_loader(f"{copy}:train,val", kind="text", batch_size=32, num_workers=2))
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == split_keys(copy, "train") + split_keys(copy, "val")
    assert all("image" not in b for b in batches)
    assert all(m["report"]["full"] for b in batches for m in b["meta"])


class _CreatesFile:
    """A pickle payload: unpickling it calls open(path, "w"), creating the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_never_executed(tmp_path, openi_jpegs):
    canary = tmp_path / "canary_proof"
    pickle.loads(
        pickle.dumps(_CreatesFile(str(canary)))
    )  # the payload is live: it does create a file
    assert canary.exists()
    target = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(str(target)))
    members = []
    for i in range(3):
        k = f"evil-{i}"
        members += [
            (f"{k}.json", json.dumps(meta(k)).encode()),
            (f"{k}.jpg", openi_jpegs[i]),
            (f"{k}.pyd", payload),
            (f"{k}.pickle", payload),
            (f"{k}.pth", payload),
        ]
    root = write_shard_dir(tmp_path / "evil", [("train", 0, members, 3)])
    loader = make_loader(str(root), kind="image", batch_size=2, image_size=32, num_workers=2)
    keys = keys_of(loader)
    assert sorted(keys) == ["evil-0", "evil-1", "evil-2"]
    assert loader.ignored == Counter({"pyd": 3, "pickle": 3, "pth": 3}) and not loader.skipped
    assert verify(root).ok
    assert not target.exists()


def test_bad_samples_are_skipped_and_counted(tmp_path, openi_jpegs):
    good = lambda k: [(f"{k}.json", json.dumps(meta(k)).encode()), (f"{k}.jpg", openi_jpegs[0])]  # noqa: E731
    png_trunc = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    shard0 = [
        *good("a"),
        ("b.json", json.dumps(meta("b")).encode()),
        ("b.jpg", openi_jpegs[1][: len(openi_jpegs[1]) // 2]),
        ("c.json", json.dumps(meta("c")).encode()),
        ("c.png", png_trunc),
        ("d.jpg", openi_jpegs[2]),  # no json
        ("e.json", b'{"key": "e", "report": {"full": "caf\xe9"}}'),
        ("e.jpg", openi_jpegs[3]),  # not UTF-8
        ("f.json", json.dumps(meta("f", findings="")).encode()),
        ("f.jpg", openi_jpegs[4]),  # empty report
        ("g.json", b"{not json"),
        ("g.jpg", openi_jpegs[5]),
        *good("h"),
        *good("a"),  # duplicate key later in the shard
        ("i.json", json.dumps(meta("i")).encode()),  # json but no image
    ]
    shard1 = [m for k in ("j", "k", "l", "m") for m in good(k)]
    root = write_shard_dir(tmp_path / "bad", [("train", 0, shard0, 10), ("train", 1, shard1, 4)])
    # truncate shard 1 inside the image data of its third sample ("l"): the tar reader fails there
    p = root / "images" / "train-000001.tar"
    data = p.read_bytes()
    p.write_bytes(data[: data.index(b"l.jpg") + 512 + 100])
    loader = make_loader(str(root), kind="image", batch_size=4, image_size=32, num_workers=0)
    keys = keys_of(loader)
    assert sorted(keys) == ["a", "h", "j", "k"]
    sk = loader.skipped
    assert sk["bad_image"] == 2 and sk["missing_json"] == 1 and sk["bad_utf8"] == 1
    assert sk["empty_report"] == 1 and sk["bad_json"] == 1 and sk["duplicate_key"] == 1
    assert sk["tar_error"] >= 1  # the read error itself, counted (not slept on)
    # "i" has no image; "l" lost its image to the truncation; "m" never arrived
    assert sk["missing_image"] == 2 and sk["lost_in_broken_tar"] == 1
    # nothing is lost silently: delivered + skipped samples == what the manifest promised
    per_sample = sum(v for r, v in sk.items() if r != "tar_error")
    assert len(keys) + per_sample == 14
    assert not verify(root).ok


def test_unknown_spec_and_kind_are_clear_errors(openi_shards, tmp_path):
    with pytest.raises(ConfigError, match="unknown split"):
        make_loader(f"{openi_shards}:training", kind="text", batch_size=2)
    with pytest.raises(ConfigError, match="no manifest.json"):
        make_loader(str(tmp_path), kind="text", batch_size=2)
    root = write_shard_dir(
        tmp_path / "t",
        [("train", 0, [("x.json", json.dumps(meta("x")).encode())], 1)],
        text_only=True,
    )
    with pytest.raises(ConfigError, match="text-only"):
        make_loader(str(root), kind="image", batch_size=2)
    m = json.loads((root / "manifest.json").read_text())
    m["shards"][0]["text"] = "pipe:touch /tmp/x"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="text path"):
        make_loader(str(root), kind="text", batch_size=2)


def test_decode_image_draft_jpeg_and_16bit_png():
    import io

    import numpy as np
    from PIL import Image

    from llmclip.data.images import decode_image

    a = (np.arange(300 * 200).reshape(200, 300) % 4096).astype(np.uint16) * 16
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")  # 16-bit grayscale, as PadChest ships
    out = decode_image(buf.getvalue(), "png", 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8 and out.max() > 200
    buf = io.BytesIO()
    Image.fromarray((a // 256).astype(np.uint8)).convert("RGB").save(buf, format="JPEG")
    assert decode_image(buf.getvalue(), "jpg", 32).shape == (32, 32)
    with pytest.raises(OSError):
        decode_image(buf.getvalue(), "png", 32)  # a JPEG named .png is refused, not sniffed
