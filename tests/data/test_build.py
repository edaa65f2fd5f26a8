"""Shard building: Open-I from the package, patient split, manifest, verify/stats, CLI errors, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from llmclip.cli import main
from llmclip.data.build import STATE, assign_split, build
from llmclip.data.build_options import BuildOptions
from llmclip.data.shards import load_manifest, read_tar, resolve_shards, stats, verify

REPO = Path(__file__).resolve().parents[2]


def all_meta(root: Path) -> list[dict]:
    return [
        json.loads(m["json"])
        for s in resolve_shards(str(root), "text")
        for _, m in read_tar(s.path)
    ]


def test_openi_manifest_counts_and_samples(openi_shards):
    m = load_manifest(openi_shards)
    assert (
        m["source"] == "openi" and m["synthetic_images"] is True and m["label_source"] == "labeler"
    )
    assert m["records_read"] == 240
    assert m["samples"] + sum(m["skipped"].values()) == 240  # every report written or counted
    assert all(m["splits"][s] > 0 for s in ("train", "val", "test"))
    assert sum(s["count"] for s in m["shards"]) == m["samples"]
    assert verify(openi_shards).ok
    metas = all_meta(openi_shards)
    assert len(metas) == m["samples"] == len({x["key"] for x in metas})
    for x in metas:
        assert x["synthetic_image"] is True and x["label_source"] == "labeler"
        assert isinstance(x["mesh"], list) and x["key"].startswith("openi-") and "." not in x["key"]
        assert x["report"]["findings"] or x["report"]["impression"]
    by_key = {x["key"]: x for x in metas}
    assert by_key["openi-1-0"]["mesh"] == ["normal"]
    assert by_key["openi-1-0"]["labels"].get("No Finding") == 1
    # image and text shards: same keys, same order
    for img, txt in zip(
        resolve_shards(str(openi_shards), "image"),
        resolve_shards(str(openi_shards), "text"),
        strict=True,
    ):
        assert img.name == txt.name
        image_members = [(k, sorted(v)) for k, v in read_tar(img.path)]
        assert [k for k, _ in image_members] == [k for k, _ in read_tar(txt.path)]
        assert all(exts == ["jpg", "json"] for _, exts in image_members)


def test_no_patient_in_two_splits(openi_shards):
    splits = defaultdict(set)
    for x in all_meta(openi_shards):
        splits[x["patient_id"]].add(x["split"])
    assert splits and all(len(s) == 1 for s in splits.values())


def test_hash_split_is_deterministic_with_requested_fractions():
    ids = [f"p{i}" for i in range(20000)]
    got = Counter(assign_split(p, (0.7, 0.2, 0.1)) for p in ids)
    assert abs(got["train"] / 20000 - 0.7) < 0.02 and abs(got["val"] / 20000 - 0.2) < 0.02
    assert [assign_split(p, (0.7, 0.2, 0.1)) for p in ids[:50]] == [
        assign_split(p, (0.7, 0.2, 0.1)) for p in ids[:50]
    ]
    assert (
        assign_split("p1", (1.0, 0.0, 0.0)) == "train"
        and assign_split("p1", (0.0, 0.0, 1.0)) == "test"
    )


def test_stats_and_verify_cli(openi_shards, capsys):
    s = stats(openi_shards)
    assert s["splits"]["train"]["samples"] == load_manifest(openi_shards)["splits"]["train"]
    assert s["splits"]["train"]["positive"]["No Finding"] > 0.3  # most Open-I reports are normal
    assert main(["shards", "stats", str(openi_shards)]) == 0
    assert "No Finding" in capsys.readouterr().out
    assert main(["shards", "verify", str(openi_shards)]) == 0


def test_verify_catches_corruption(openi_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(openi_shards, copy)
    shard = copy / "text" / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = verify(copy)
    assert not r.ok and any("val-000000.tar: sha256 mismatch" in p for p in r.problems)
    assert main(["shards", "verify", str(copy)]) == 1


def test_cli_bad_input_exits_2(openi_shards, tmp_path, capsys):
    assert main(["shards", "build", "--source", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown source 'nope'" in err and "openi" in err and "padchest" in err
    # an output folder holding shards of another source
    assert (
        main(["shards", "build", "--source", "padchest", "--out", str(openi_shards), "--quiet"])
        == 2
    )
    assert "holds shards of another source ('openi'" in capsys.readouterr().err
    # same source, other options
    assert (
        main(
            [
                "shards",
                "build",
                "--source",
                "openi",
                "--out",
                str(openi_shards),
                "--images",
                "render",
                "--maxcount",
                "240",
                "--shard-size",
                "32",
                "--image-size",
                "128",
                "--quiet",
            ]
        )
        == 2
    )
    assert "other options (image_size)" in capsys.readouterr().err
    # a folder with unrelated files
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["shards", "build", "--source", "padchest", "--out", str(tmp_path / "mine")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (
        main(
            [
                "shards",
                "build",
                "--source",
                "openi",
                "--out",
                str(tmp_path / "y"),
                "--splits",
                "0.5,0.5",
            ]
        )
        == 2
    )
    assert main(["shards", "verify", str(tmp_path / "mine")]) == 2  # no manifest: a clear error


def test_rerun_of_complete_build_is_a_no_op(openi_shards):
    before = {p: p.stat().st_mtime_ns for p in openi_shards.rglob("*.tar")}
    m = build(
        BuildOptions(
            source="openi",
            out=str(openi_shards),
            images="render",
            maxcount=240,
            shard_size=32,
            image_size=64,
            workers=1,
        ),
        progress=False,
    )
    assert m["samples"] == load_manifest(openi_shards)["samples"]
    assert before == {p: p.stat().st_mtime_ns for p in openi_shards.rglob("*.tar")}


def test_padchest_text_only_resumes_after_kill(tmp_path):
    """Kill a real build process mid-way, rerun: complete shards kept, partial redone, same bytes."""
    args = ["--source", "padchest", "--maxcount", "6000", "--shard-size", "100", "--workers", "1"]
    ref = build(
        BuildOptions(
            source="padchest", out=str(tmp_path / "ref"), maxcount=6000, shard_size=100, workers=1
        ),
        progress=False,
    )
    assert ref["synthetic_images"] is False and ref["label_source"] == "padchest"
    assert (
        all(s["image"] is None for s in ref["shards"])
        and not (tmp_path / "ref" / "images").exists()
    )
    assert ref["samples"] + sum(ref["skipped"].values()) == 6000

    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "llmclip.cli",
        "shards",
        "build",
        "--out",
        str(out),
        "--quiet",
        *args,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / STATE
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(json.loads(state.read_text())["shards"]) >= 4:
                break
        except (FileNotFoundError, ValueError):
            pass
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    kept = {
        e["text"]: (out / e["text"]).stat().st_mtime_ns
        for e in json.loads(state.read_text())["shards"]
    }
    assert len(kept) >= 4

    assert main(["shards", "build", "--out", str(out), "--quiet", *args]) == 0
    m = load_manifest(out)
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert m["splits"] == ref["splits"] and m["skipped"] == ref["skipped"]
    assert all((out / rel).stat().st_mtime_ns == t for rel, t in kept.items())  # not rewritten
    assert not list(out.rglob("*.tmp")) and not state.exists()
    x = all_meta(out)[0]
    assert x["source"] == "padchest" and x["label_source"] == "padchest" and "padchest_labels" in x
    assert verify(out).ok


@pytest.mark.parametrize("images", ["render", None])
def test_build_options_are_validated(tmp_path, images):
    with pytest.raises(Exception, match="--shard-size"):
        build(BuildOptions(source="openi", out=str(tmp_path / "o"), images=images, shard_size=0))


def test_openi_without_images_flag_renders(tmp_path):
    out = tmp_path / "o"
    assert (
        main(
            [
                "shards",
                "build",
                "--source",
                "openi",
                "--out",
                str(out),
                "--maxcount",
                "12",
                "--image-size",
                "32",
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    m = load_manifest(out)
    assert m["synthetic_images"] and m["build"]["images"] == "render" and m["records_read"] == 12
    assert all(s["image"] for s in m["shards"])
    # the explicit flag is the same build: a rerun with it is a no-op, not a conflict
    assert (
        main(
            [
                "shards",
                "build",
                "--source",
                "openi",
                "--out",
                str(out),
                "--maxcount",
                "12",
                "--image-size",
                "32",
                "--images",
                "render",
                "--quiet",
            ]
        )
        == 0
    )
