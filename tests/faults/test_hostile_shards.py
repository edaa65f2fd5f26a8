"""Hostile shards through every reader of shard files: the training loader (image and text), the cache
builder's report reader, ``llmclip shards verify`` and the cache's key lister. Nothing executes,
nothing is written outside the run folder, memory stays bounded, bad samples are counted (the loader)
or the shard is refused naming it (the cache, whose rows must align with every key).

The loader's own tests (tests/data) cover pickles, bad JSON/UTF-8, duplicate keys and truncated tars
in the loader; here the same attacks also go to the other readers, plus path-like and link members, a
2 GB member header and a 100K-member tar bomb.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
from fault_tools import (
    PYTHON,
    REPO,
    jpeg,
    peak_rss_mb_of,
    sample_meta,
    tar_member,
    write_manifest,
    write_tar,
)

from llmclip.cache import shard_keys
from llmclip.cache.texts import read_reports
from llmclip.config import ConfigError
from llmclip.data.loader import make_loader
from llmclip.data.order import build_index

RSS_LIMIT_MB = 1200  # a reader that holds a hostile member in memory needs 2-5 GB


class _Canary:
    """A pickle payload: unpickling it creates a file (proof that something executed)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _sample(key: str, image: bool) -> list:
    members = [tar_member(f"{key}.json", json.dumps(sample_meta(key)).encode())]
    return members + ([tar_member(f"{key}.jpg", jpeg(key))] if image else [])


def _hostile_members(root: Path, image: bool) -> tuple[list, dict[str, Path]]:
    """Good samples a..d mixed with every attack; returns the members and the paths that must never
    appear (what an extracting reader would write)."""
    canary = root.parent / f"executed-{uuid.uuid4().hex[:8]}"
    absolute = Path("/tmp") / f"llmclip-abs-{uuid.uuid4().hex[:8]}"
    payload = pickle.dumps(_Canary(str(canary)))
    m = [*_sample("a", image), *_sample("b", image)]
    m += [tar_member("b.pyd", payload), tar_member("b.pickle", payload)]  # joins sample b
    m += [tar_member("../../escape.json", json.dumps(sample_meta("../../escape")).encode()),
          tar_member(f"{absolute}/abs.json", json.dumps(sample_meta(f"{absolute}/abs")).encode())]
    m += [tar_member("s.json", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
          tar_member("h.json", b"", type=tarfile.LNKTYPE, linkname="a.json"),
          tar_member("dev.json", b"", type=tarfile.CHRTYPE, devmajor=1, devminor=3)]
    m += [tar_member("g.json", b"{not json"), tar_member("u.json", b'{"key": "u", "x": "caf\xe9"}')]
    m += [*_sample("c", image), *_sample("a", image), *_sample("d", image)]  # "a" again: duplicate key
    never = {"canary": canary, "escape": root.parent.parent / "escape.json",
             "escape_cwd": REPO.parent / "escape.json", "absolute": absolute}
    return m, never


@pytest.fixture
def hostile(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    shards = run / "shards"
    (shards / "images").mkdir(parents=True)
    (shards / "text").mkdir()
    img, never = _hostile_members(shards, image=True)
    write_tar(shards / "images" / "train-000000.tar", img)
    txt, _ = _hostile_members(shards, image=False)
    write_tar(shards / "text" / "train-000000.tar", txt)
    write_manifest(shards, count=8)
    return shards, never


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_members_never_execute_or_escape_and_are_counted(hostile, tmp_path):
    shards, never = hostile
    before = _files(tmp_path)
    for kind in ("image", "text"):
        loader = make_loader(str(shards), kind=kind, batch_size=2, image_size=32, num_workers=0,
                             shuffle=False)
        batches = list(loader)
        keys = [k for b in batches for k in b["key"]]
        # Only well-formed samples come out; path-like keys break the key contract (no dots, no
        # slashes) and are skipped like any bad sample, not delivered to code that names files by key.
        assert keys == ["a", "b", "c", "d"], (kind, keys, dict(loader.skipped))
        assert all("passwd" not in json.dumps(m) and "root:" not in json.dumps(m) for b in batches for m in b["meta"])
        sk = loader.skipped
        assert sk["bad_json"] >= 1 and sk["bad_utf8"] == 1 and sk["duplicate_key"] == 1, dict(sk)
        assert sk["bad_key"] == 2, dict(sk)
        assert loader.ignored["pyd"] == 1 and loader.ignored["pickle"] == 1
        # The training data order's index (llmclip.data.order) keeps the same samples, same reasons.
        index = build_index(str(shards), kind)
        assert sorted(index.keys) == ["a", "b", "c", "d"], (kind, index.keys, dict(index.skipped))
        assert {k: index.skipped[k] for k in ("bad_key", "duplicate_key", "bad_utf8")} == \
            {"bad_key": 2, "duplicate_key": 1, "bad_utf8": 1} and index.skipped["bad_json"] >= 1
    # The cache builder needs a row for every key in order: it refuses the shard, naming it.
    with pytest.raises(ConfigError, match="train-000000.tar"):
        list(read_reports(shards / "text" / "train-000000.tar"))
    # The key lister (cache check_keys) reads member names only.
    assert "a" in shard_keys(shards / "images" / "train-000000.tar")
    # `llmclip shards verify` reports the problems (exit 1), no traceback.
    r = subprocess.run([PYTHON, "-m", "llmclip.cli", "shards", "verify", str(shards)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout[-2000:], r.stderr[-2000:])
    assert "duplicate keys" in r.stdout + r.stderr
    # Nothing executed, nothing written anywhere: not outside, not even inside the run folder.
    for what, path in never.items():
        assert not path.exists(), f"{what}: {path} was created"
    assert _files(tmp_path) == before


def _big_member_shard(root: Path, sparse: bool) -> Path:
    """One good sample, then a member whose header claims 2 GiB: truncated after 10 bytes, or (sparse)
    followed by 2 GiB of zeros that cost no disk."""
    (root / "text").mkdir(parents=True)
    path = root / "text" / "train-000000.tar"
    good = json.dumps(sample_meta("a")).encode()
    info, _ = tar_member("big.json")
    info.size = 2**31
    with open(path, "wb") as f:
        ginfo, _ = tar_member("a.json", good)
        f.write(ginfo.tobuf(format=tarfile.GNU_FORMAT) + good + b"\0" * (-len(good) % 512))
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        if sparse:
            f.seek(2**31, os.SEEK_CUR)
            f.write(b"\0" * 1024)  # end-of-archive blocks
        else:
            f.write(b"{" * 10)
    return write_manifest(root, count=2, with_images=False)


def _tar_bomb(root: Path, n: int = 100_000) -> Path:
    """100K empty members with distinct keys (no json): ~51 MB of headers."""
    (root / "text").mkdir(parents=True)
    header = tarfile.TarInfo
    with open(root / "text" / "train-000000.tar", "wb") as f:
        for i in range(n):
            info = header(f"bomb{i}.txt")
            f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.write(b"\0" * 1024)
    return write_manifest(root, count=n, with_images=False)


READ_ALL = """
import json, sys
from llmclip.cache.texts import read_reports
from llmclip.config import ConfigError
from llmclip.data.loader import make_loader
from llmclip.data.shards import verify
root = sys.argv[1]
loader = make_loader(root, kind="text", batch_size=4, num_workers=0, shuffle=False)
keys = [k for b in loader for k in b["key"]]
from llmclip.data.order import build_index
index = build_index(root, "text")
try:
    n = sum(1 for _ in read_reports(root + "/text/train-000000.tar"))
    cache = f"read {n}"
except ConfigError as e:
    cache = f"ConfigError: {e}"
v = verify(root)
print(json.dumps({"keys": keys, "skipped": dict(loader.skipped), "cache": cache, "index": index.keys,
                  "verify_ok": v.ok, "problems": len(v.problems), "first": v.problems[:2]}))
"""


@pytest.mark.parametrize("attack", ["2GB-header-truncated", "2GB-header-sparse", "tar-bomb-100K"])
def test_huge_or_countless_members_keep_memory_bounded(attack, tmp_path):
    root = tmp_path / "shards"
    if attack == "tar-bomb-100K":
        _tar_bomb(root)
    else:
        _big_member_shard(root, sparse=attack.endswith("sparse"))
    log = tmp_path / "read.log"
    rc, peak = peak_rss_mb_of([PYTHON, "-c", READ_ALL, str(root)], log, timeout=600)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    res = json.loads(text.strip().splitlines()[-1])
    assert peak < RSS_LIMIT_MB, f"{attack}: peak RSS {peak:.0f} MiB"
    assert not res["verify_ok"] and res["problems"] >= 1
    assert res["cache"].startswith("ConfigError") and "train-000000.tar" in res["cache"], res
    assert res["index"] == res["keys"], res  # the training order's index keeps what the loader does
    if attack == "tar-bomb-100K":
        assert res["keys"] == [] and res["skipped"] == {"missing_json": 100_000}, res["skipped"]
    else:
        assert res["keys"] == ["a"], res
        assert sum(res["skipped"].values()) >= 1, res["skipped"]
