"""A full disk under the three long writers: the shard builder, the cache builder and training
checkpoints. Each fails with a clear error naming the file it could not write, leaves the previous
complete state readable (and nothing partial that a reader would take for complete), and a rerun
once space is back finishes with the same bytes as a run that never ran out of space (checkpoints:
saves again).

The output folder is a small tmpfs (``SmallDisk``) filled to a few hundred KB; where mounting is not
permitted, ``RLIMIT_FSIZE`` stands in for it (then the first write over the limit fails instead)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess

import numpy as np
import pytest
from fault_tools import ENGINE, PYTHON, REPO, digest, rank_env

from llmclip.cache import EmbeddingCache, emb_path, sidecar_names, sidecar_state
from llmclip.cache.build import BuildOptions as CacheOptions
from llmclip.cache.build import build_cache
from llmclip.config import ConfigError
from llmclip.data.build import build
from llmclip.data.build_options import BuildOptions


def _shard_options(reference, out) -> BuildOptions:
    """The options the reference shards were built with (their manifest records them)."""
    ident = json.loads((reference / "manifest.json").read_text())["build"]
    ident["splits"] = tuple(ident["splits"])
    return BuildOptions(out=str(out), workers=2, **ident)


def test_shard_builder_on_a_full_disk(small_disk, openi_shards):
    out = small_disk.path / "shards"
    opts = _shard_options(openi_shards, out)
    with small_disk.full(leave=600_000 if small_disk.mode == "tmpfs" else 40_000):
        with pytest.raises(ConfigError) as info:
            build(dataclasses.replace(opts), progress=False)
    assert f"cannot write {small_disk.path}" in str(info.value), str(info.value)
    # Nothing partial is visible: every published shard is complete (equal to the reference's), no
    # manifest (the build is not complete), and readers refuse the folder.
    want = digest(openi_shards)
    published = digest(out, "*/*.tar")
    assert all(published[name] == want[name] for name in published)
    if small_disk.mode == "tmpfs":
        assert len(published) >= 2, published  # the space ran out midway, after complete shards
    assert not (out / "manifest.json").exists()
    # Space is back: the rerun resumes and ends byte-identical to an uninterrupted build.
    build(dataclasses.replace(opts), progress=False)
    assert digest(out) == want


def test_cache_builder_on_a_full_disk(small_disk, openi_shards, stage2_cache, tiny_encoder_dir):
    meta = json.loads((stage2_cache / "meta.json").read_text())
    opts = CacheOptions(encoder=str(tiny_encoder_dir), shards=str(openi_shards), out=str(small_disk.path / "cache"),
                        variants=list(meta["variants"]), dtype=meta["dtype"], progress=False)
    with small_disk.full(leave=30_000 if small_disk.mode == "tmpfs" else 5_000):
        with pytest.raises(ConfigError) as info:
            build_cache(dataclasses.replace(opts))
    out = small_disk.path / "cache"
    assert f"cannot write {out}" in str(info.value), str(info.value)
    # Unfinished: the reader refuses it; sidecars present are complete and equal the reference's.
    with pytest.raises(ConfigError, match="not a finished embedding cache"):
        EmbeddingCache(out)
    done = [n for n in sidecar_names(out) if sidecar_state(out, n)[0] == "complete"]
    if small_disk.mode == "tmpfs":
        assert done, "the space ran out midway, after complete sidecars"
    for name in done:
        assert np.array_equal(np.load(emb_path(out, name)), np.load(emb_path(stage2_cache, name)))
    assert not list(out.glob("*.tmp")), "a failed write left its temporary file taking space"
    build_cache(dataclasses.replace(opts))
    ref = EmbeddingCache(stage2_cache)
    got = EmbeddingCache(out)
    assert got.counts == ref.counts and got.identity == ref.identity
    for name in ref.counts:
        assert np.array_equal(got.array(name), ref.array(name)), name


CHECKPOINTS = ENGINE + r"""
from fault_tools import SmallDisk

disk = SmallDisk.attach(Path(sys.argv[1]), sys.argv[2])
run = disk.path / "run"
first = save_checkpoint(run, 1, engine, {"data": {}})
size = sum(f.stat().st_size for f in first.iterdir())
out = {}
engine(torch.randn(2, 64)).pow(2).mean()
with disk.full(leave=size // 2):  # less than one more checkpoint (tmpfs) / no optimizer.pt (rlimit)
    try:
        save_checkpoint(run, 2, engine, {"data": {}})
        out["save"] = "saved"
    except ConfigError as e:
        out["save"] = "ConfigError: " + str(e)
out["latest"] = str(latest_checkpoint(run))
out["left"] = sorted(p.name for p in (run / "checkpoints").iterdir())
out["loaded"] = load_checkpoint(latest_checkpoint(run), engine)["step"]
out["after"] = str(save_checkpoint(run, 2, engine, {"data": {}}))  # space is back
print("RESULT " + json.dumps(out))
"""


def test_checkpoints_on_a_full_disk(small_disk):
    """llmclip.checkpoint under a real DeepSpeed engine, in a child process that fills the disk
    between two checkpoints."""
    r = subprocess.run([PYTHON, "-c", CHECKPOINTS, str(small_disk.path), small_disk.mode], cwd=REPO,
                       env=rank_env(), capture_output=True, text=True, timeout=600)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, (r.stdout[-2000:], r.stderr[-3000:])
    out = json.loads(line[len("RESULT "):])
    ckpts = small_disk.path / "run" / "checkpoints"
    assert re.match(rf"ConfigError: cannot write {ckpts}/\.tmp-step-000002-\d+/\S+: .*bytes free", out["save"]), out
    # The previous complete checkpoint is still `latest` and loads; the failed one left nothing.
    assert out["latest"] == str(ckpts / "step-000001") and out["loaded"] == 1, out
    assert out["left"] == ["latest", "step-000001"], out
    assert out["after"] == str(ckpts / "step-000002")
