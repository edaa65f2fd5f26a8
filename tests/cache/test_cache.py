"""The embedding cache on real Open-I report shards with the tiny stage-1 encoder.

One 1-rank build (in process) is the reference; a 2-rank build under the real ``deepspeed``
launcher and a build SIGKILLed half-way then rerun must reproduce it; ``verify`` and the reader
must catch NaN rows, missing keys and a foreign encoder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmclip.cache import CacheMismatch, EmbeddingCache, shard_keys
from llmclip.cache.build import BuildOptions, build_cache, encode_shard
from llmclip.cache.texts import read_reports
from llmclip.cli import main
from llmclip.config import ConfigError
from llmclip.data.text import clinical_text
from llmclip.precision import cpu_bf16_matmul

# The edit columns ride along so that 2-rank, 1-rank and resumed builds must pick the same edits.
VARIANTS = ["report", "negated", "impression", "laterality", "severity"]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LOCAL_WORLD_SIZE", None)
    return env


def _build_cmd(encoder: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "cache",
        "build",
        "--encoder",
        str(encoder),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--variants",
        ",".join(VARIANTS),
        "--no-progress",
        "--precision",  # compared with ref_cache, which the fp32 encoder object built
        "fp32",
        *extra,
    ]


def _assert_same_cache(a: Path, b: Path) -> None:
    ca, cb = EmbeddingCache(a), EmbeddingCache(b)
    assert ca.identity == cb.identity
    assert ca.counts == cb.counts
    for name in ca.counts:
        assert ca.keys(name) == cb.keys(name), name
        # Same shard, same batches on every rank: expected bit-identical (fp16 rounding allowed).
        np.testing.assert_allclose(
            ca.array(name).astype(np.float32),
            cb.array(name).astype(np.float32),
            rtol=1e-3,
            atol=1e-3,
            err_msg=name,
        )


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir):
    import torch

    from llmclip.text.encoder import LLMEncoder

    # One thread, as the subprocesses get: a 2-core CI box shared with other jobs makes 2 OpenMP
    # threads spin at every barrier (measured ~9x slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLMEncoder.from_dir(tiny_encoder_dir)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory, openi_shards, tiny_encoder_dir, encoder) -> Path:
    out = tmp_path_factory.mktemp("cache") / "ref"
    opts = BuildOptions(
        encoder=str(tiny_encoder_dir),
        shards=str(openi_shards),
        out=str(out),
        variants=list(VARIANTS),
        progress=False,
    )
    res = build_cache(opts, encoder=encoder)
    assert res.meta_written and res.reports == sum(EmbeddingCache(out).counts.values())
    return out


def test_rows_are_the_encoder_embeddings(ref_cache, openi_shards, encoder):
    from llmclip.clinical import negate
    from llmclip.data.shards import resolve_shards

    cache = EmbeddingCache(ref_cache)
    assert cache.variants == VARIANTS and cache.dim == encoder.dim
    assert cache.fingerprint == encoder.fingerprint
    shard = resolve_shards(str(openi_shards), "text")[1]
    samples = list(read_reports(shard.path))[:5]
    keys = [k for k, _ in samples][::-1]  # any order: rows follow the keys asked for
    got = cache.rows(shard.path, keys).astype(np.float32)
    assert got.shape == (5, len(VARIANTS), encoder.dim)
    reports = {k: r for k, r in samples}
    for col, text_of in enumerate(
        [
            clinical_text,
            lambda r: negate(clinical_text(r)),
            lambda r: r.get("impression") or clinical_text(r),
        ]
    ):
        want = encoder.encode([text_of(reports[k]).strip() for k in keys]).numpy()
        np.testing.assert_allclose(got[:, col], want, rtol=2e-2, atol=2e-3)
    assert not np.allclose(got[:, 0], got[:, 1]), "negated reports must embed differently"
    with pytest.raises(CacheMismatch, match="not in the embedding cache"):
        cache.rows(shard.name, ["openi-no-such-key"])
    with pytest.raises(CacheMismatch, match="train-999999"):
        cache.rows("train-999999", keys)


def _edit(kind: str, text: str) -> str | None:
    """The one training-family edit of ``kind`` the builder is meant to pick, or None."""
    import random

    from llmclip.clinical import one_error_edits

    edits = one_error_edits(text, random.Random(f"{kind}:{text}"))
    return next((v.text for v in edits if v.kind == kind), None)


def test_edit_columns_hold_the_edit_or_else_the_report(ref_cache, openi_shards, encoder):
    from llmclip.data.shards import resolve_shards

    cache = EmbeddingCache(ref_cache)
    col = {v: cache.variant_index(v) for v in ("report", "laterality", "severity")}
    kinds = {"laterality": "laterality_swap", "severity": "severity_change"}
    edited: dict[str, list[tuple[np.ndarray, str]]] = {v: [] for v in kinds}
    plain = dict.fromkeys(kinds, 0)
    for shard in resolve_shards(str(openi_shards), "text"):
        samples = list(read_reports(shard.path))
        rows = cache.rows(shard.name, [k for k, _ in samples]).astype(np.float32)
        for (_, report), row in zip(samples, rows, strict=True):
            text = clinical_text(report)
            for variant, kind in kinds.items():
                edit = _edit(kind, text)
                if edit is None:  # the report itself, encoded once: equal bits, masked in stage 2
                    np.testing.assert_array_equal(row[col[variant]], row[col["report"]])
                    plain[variant] += 1
                else:
                    assert edit != text
                    edited[variant].append((row[col[variant]], edit))
    for variant in kinds:
        assert len(edited[variant]) >= 3 and plain[variant] >= 3, (variant, plain, edited)
        got = np.stack([r for r, _ in edited[variant]])
        want = encoder.encode([t for _, t in edited[variant]]).numpy()
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-3)


def test_each_distinct_text_of_a_shard_is_encoded_once(ref_cache, openi_shards, encoder):
    from llmclip.data.shards import resolve_shards

    class Counting:
        dim = encoder.dim

        def __init__(self) -> None:
            self.texts: list[str] = []

        def encode(self, texts: list[str], **kw):
            self.texts += texts
            return encoder.encode(texts, **kw)

    shard = resolve_shards(str(openi_shards), "text")[0]
    counting = Counting()
    keys, emb = encode_shard(counting, shard.path, list(VARIANTS), None, 8192, "fp16")
    assert len(counting.texts) == len(set(counting.texts)) < len(keys) * len(VARIANTS)
    np.testing.assert_allclose(
        emb.astype(np.float32),
        EmbeddingCache(ref_cache).array(shard.name).astype(np.float32),
        rtol=1e-3,
        atol=1e-3,
    )


@pytest.mark.skipif(not cpu_bf16_matmul(), reason="auto is fp32 on a CPU without bf16 matmuls")
def test_auto_precision_encodes_in_bf16_on_a_cpu_with_bf16_matmuls(ref_cache, openi_shards,
                                                                   tiny_encoder_dir, tmp_path):
    """The default (``auto``) loads the encoder itself in bf16 here: rows that are not the fp32
    reference's bits, yet point where its rows point."""
    out = tmp_path / "auto"
    build_cache(BuildOptions(encoder=str(tiny_encoder_dir), shards=str(openi_shards), out=str(out),
                             variants=list(VARIANTS), progress=False))
    got, ref = EmbeddingCache(out), EmbeddingCache(ref_cache)
    assert got.identity == ref.identity and got.counts == ref.counts
    for name in ref.counts:
        a, b = got.array(name).astype(np.float32), ref.array(name).astype(np.float32)
        assert not np.array_equal(a, b), f"{name}: bf16 did not run"
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        assert cos.min() > 0.999, (name, float(cos.min()))


def test_two_ranks_under_deepspeed_equal_one_rank(
    ref_cache, openi_shards, tiny_encoder_dir, tmp_path
):
    out = tmp_path / "two"
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--no_local_rank",
        "--master_port",
        "29731",
        "--module",
        "llmclip.cli",
        *_build_cmd(tiny_encoder_dir, openi_shards, out),
    ]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "cache rank 0/2: encoded" in log and "cache rank 1/2: encoded" in log
    _assert_same_cache(ref_cache, out)


def test_killed_build_resumes_to_the_same_cache(
    ref_cache, openi_shards, tiny_encoder_dir, encoder, tmp_path
):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "llmclip.cli",
        *_build_cmd(tiny_encoder_dir, openi_shards, out, "--batch-tokens", "512"),
    ]
    proc = subprocess.Popen(
        cmd, env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        for line in proc.stderr:  # kill right after the first sidecar lands
            if ": wrote " in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    total = len(EmbeddingCache(ref_cache).counts)
    done = sorted(out.glob("*.emb.npy"))
    assert 1 <= len(done) < total, f"kill was not half-way: {len(done)} of {total} sidecars"
    assert not (out / "meta.json").exists(), "an unfinished cache must not look finished"
    with pytest.raises(ConfigError, match="not a finished embedding cache"):
        EmbeddingCache(out)
    # A sidecar cut short on disk (keys present, array truncated) must be redone, not trusted.
    first = done[0]
    first.write_bytes(first.read_bytes()[:200])

    # The rerun (same code path as the CLI, in process to save a model load) redoes only the rest.
    opts = BuildOptions(
        encoder=str(tiny_encoder_dir),
        shards=str(openi_shards),
        out=str(out),
        variants=list(VARIANTS),
        batch_tokens=512,
        progress=False,
    )
    res = build_cache(opts, encoder=encoder)
    assert sorted(res.skipped) == sorted(p.name[: -len(".emb.npy")] for p in done[1:])
    assert len(res.encoded) == total - len(done) + 1 and res.meta_written
    assert not list(out.glob("*.tmp"))
    _assert_same_cache(ref_cache, out)


def _verify(cache: Path, shards: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["cache", "verify", str(cache), "--shards", str(shards), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_verify_accepts_a_good_cache_and_names_the_first_mismatch(
    ref_cache, openi_shards, tiny_encoder_dir, tmp_path, capsys
):
    code, msg = _verify(ref_cache, openi_shards, capsys, "--encoder", str(tiny_encoder_dir))
    assert code == 0 and "OK" in msg, msg
    name = sorted(EmbeddingCache(ref_cache).counts)[1]

    nan = shutil.copytree(ref_cache, tmp_path / "nan")
    rows = np.load(nan / f"{name}.emb.npy", mmap_mode="r+")
    key = json.loads((nan / f"{name}.keys.json").read_text())["keys"][3]
    rows[3, 1, 7] = np.nan
    rows.flush()
    del rows
    code, msg = _verify(nan, openi_shards, capsys)
    assert code == 1 and "NaN" in msg and key in msg and "negated" in msg, msg

    zero = shutil.copytree(ref_cache, tmp_path / "zero")
    rows = np.load(zero / f"{name}.emb.npy", mmap_mode="r+")
    rows[2, 0] = 0
    rows.flush()
    del rows
    code, msg = _verify(zero, openi_shards, capsys)
    assert code == 1 and "norm" in msg and "row 2" in msg, msg

    # A key missing from the sidecar (and its row): counts and keys no longer match the shard.
    missing = shutil.copytree(ref_cache, tmp_path / "missing")
    kp, ep = missing / f"{name}.keys.json", missing / f"{name}.emb.npy"
    side = json.loads(kp.read_text())
    dropped = side["keys"].pop(4)
    kp.write_text(json.dumps(side))
    np.save(ep, np.delete(np.load(ep), 4, axis=0))
    meta = json.loads((missing / "meta.json").read_text())
    meta["shards"][name] -= 1
    (missing / "meta.json").write_text(json.dumps(meta))
    code, msg = _verify(missing, openi_shards, capsys)
    assert code == 1 and name in msg and "stale" in msg, msg
    meta["shards"][name] += 1  # counts fixed up by hand: the key check still finds the hole
    (missing / "meta.json").write_text(json.dumps(meta))
    side["keys"].insert(9, "openi-forged-0")
    kp.write_text(json.dumps(side))
    np.save(ep, np.insert(np.load(ep), 9, 1.0, axis=0))
    code, msg = _verify(missing, openi_shards, capsys)
    assert code == 1 and name in msg and f"row 4: shard key {dropped!r}" in msg, msg

    # A cache from another encoder: verify --encoder and the stage-2 reader refuse it.
    foreign = shutil.copytree(ref_cache, tmp_path / "foreign")
    meta = json.loads((foreign / "meta.json").read_text())
    meta["fingerprint"] = "f" * 64
    (foreign / "meta.json").write_text(json.dumps(meta))
    code, msg = _verify(foreign, openi_shards, capsys, "--encoder", str(tiny_encoder_dir))
    assert code == 1 and "built by encoder ffffffff" in msg, msg
    code, msg = _verify(foreign, openi_shards, capsys)  # sidecars disagree with the meta
    assert code == 1 and "fingerprint" in msg, msg


def test_reader_check_matches(ref_cache, openi_shards, encoder):
    from llmclip.data.shards import resolve_shards

    cache = EmbeddingCache(ref_cache)
    shards = resolve_shards(str(openi_shards), "text")
    cache.check_matches(shards, fingerprint=encoder.fingerprint, check_keys=True)
    with pytest.raises(CacheMismatch, match="not 0000"):
        cache.check_matches(shards, fingerprint="0" * 64)
    extra = type(shards[0])(**{**shards[0].__dict__, "index": 999, "path": shards[0].path})
    with pytest.raises(CacheMismatch, match=f"shard {extra.name} is not in the embedding cache"):
        cache.check_matches([extra])
    assert shard_keys(shards[0].path) == cache.keys(shards[0].name)


def test_foreign_cache_refused_unless_overwrite(
    ref_cache, openi_shards, tiny_encoder_dir, encoder, tmp_path
):
    out = shutil.copytree(ref_cache, tmp_path / "other")
    name = sorted(EmbeddingCache(ref_cache).counts)[0]
    side = json.loads((out / f"{name}.keys.json").read_text())
    side["build"]["fingerprint"] = "e" * 64  # one sidecar from another encoder, meta removed
    (out / f"{name}.keys.json").write_text(json.dumps(side))
    (out / "meta.json").unlink()
    opts = BuildOptions(
        encoder=str(tiny_encoder_dir),
        shards=str(openi_shards),
        out=str(out),
        variants=list(VARIANTS),
        progress=False,
    )
    with pytest.raises(ConfigError, match="eeeeeeee.*--overwrite"):
        build_cache(opts, encoder=encoder)
    opts.overwrite = True
    res = build_cache(opts, encoder=encoder)
    assert res.encoded == [name] and res.meta_written
    _assert_same_cache(ref_cache, out)


def test_bad_options_fail_before_loading(openi_shards, tiny_encoder_dir, tmp_path, capsys):
    base = _build_cmd(tiny_encoder_dir, openi_shards, tmp_path / "c")
    assert main([*base, "--variants", "report,sarcastic"]) == 2
    assert "unknown variant 'sarcastic'" in capsys.readouterr().err
    assert main([*base[:2], "--encoder", str(tmp_path / "nope"), *base[4:]]) == 2
    assert "encoder folder not found" in capsys.readouterr().err
