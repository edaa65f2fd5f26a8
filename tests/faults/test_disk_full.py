"""A full disk under the three long writers: the shard builder, the cache builder and training
checkpoints. Each fails with a clear error naming the file it could not write, leaves the previous
complete state readable (and nothing partial that a reader would take for complete), and a rerun
once space is back finishes with the same bytes as a run that never ran out of space.

The output folder is a small tmpfs (``SmallDisk``) filled to a few hundred KB; where mounting is not
permitted, ``RLIMIT_FSIZE`` stands in for it (then the first write over the limit fails instead)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from fault_tools import digest, metrics, stage2_recipe, train_solo, write_config
from safetensors.torch import load_file

from llmclip.cache import EmbeddingCache, emb_path, sidecar_names, sidecar_state
from llmclip.cache_build import BuildOptions as CacheOptions
from llmclip.cache_build import build_cache
from llmclip.checkpoint import latest_checkpoint
from llmclip.config import ConfigError
from llmclip.data.build import BuildOptions, build


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


def test_checkpoints_on_a_full_disk(small_disk, tmp_path, openi_shards, stage2_cache, tiny_encoder_dir,
                                    stage2_reference):
    """A real stage-2 run whose run folder fills up after two checkpoints."""
    one = sum(f.stat().st_size for f in (stage2_reference / "checkpoints" / "step-000001").iterdir())
    run = small_disk.path / "run"
    recipe = stage2_recipe(run, openi_shards, stage2_cache, tiny_encoder_dir, keep_checkpoints=2)
    cfg = write_config(tmp_path / "cfg.yaml", recipe)
    log = tmp_path / "log.txt"
    # tmpfs: room for two checkpoints; RLIMIT_FSIZE: no optimizer.pt fits (the first save fails).
    leave = int(2.5 * one) if small_disk.mode == "tmpfs" else one // 2
    with small_disk.full(leave=leave):
        rc = train_solo(cfg, log)
    text = log.read_text()
    assert rc == 2, text[-3000:]
    errors = [ln for ln in text.splitlines() if "config error" in ln]
    assert len(errors) == 1 and re.search(rf"cannot write {run}/checkpoints/\S+", errors[0]), errors
    assert "Traceback" not in text
    # The previous complete checkpoint is `latest` and readable; nothing partial is left behind.
    last = latest_checkpoint(run)
    if small_disk.mode == "tmpfs":
        assert last is not None and last.name == "step-000002", last
        want = load_file(str(stage2_reference / "checkpoints" / "step-000002" / "model.safetensors"))
        got = load_file(str(last / "model.safetensors"))
        assert all((got[k] == want[k]).all() for k in want)
    assert not list((run / "checkpoints").glob(".tmp-*")), "the failed checkpoint's temp folder is left"
    assert not (run / "final").exists()
    # Space is back: the rerun resumes from that checkpoint and ends where the reference ended.
    assert train_solo(cfg, log) == 0, log.read_text()[-3000:]
    loss = {s: r["loss"] for s, r in metrics(run).items()}
    assert loss == {s: r["loss"] for s, r in metrics(stage2_reference).items()}
    got = load_file(str(run / "final" / "model.safetensors"))
    want = load_file(str(stage2_reference / "final" / "model.safetensors"))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
