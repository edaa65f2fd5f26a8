"""``llmclip labels``: shard side file (resumable, bad samples counted), Open-I eval, show, errors."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from llmclip.cli import main


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(root, reports: list[str], per_shard: int = 3):
    """A text-only shard folder in the llmclip-shards/1 format, written by hand."""
    (root / "text").mkdir(parents=True)
    entries = []
    for index, start in enumerate(range(0, len(reports), per_shard)):
        rel = f"text/train-{index:06d}.tar"
        with tarfile.open(root / rel, "w") as tar:
            for i, text in enumerate(reports[start : start + per_shard], start):
                key = f"openi-{i}-0"
                if text is None:  # a corrupt sample
                    _add(tar, f"{key}.json", b"\xff{not json")
                    continue
                meta = {"key": key, "report": {"findings": text, "impression": "", "full": text}}
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        entries.append(
            {
                "split": "train",
                "index": index,
                "count": len(reports[start : start + per_shard]),
                "image": None,
                "text": rel,
                "sha256": {"image": None, "text": None},
            }
        )
    manifest = {
        "format": "llmclip-shards/1",
        "source": "openi",
        "shards": entries,
        "splits": {"train": len(reports)},
        "label_source": "mesh",
        "synthetic_images": False,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_labels_shards_side_file_and_resume(tmp_path, openi_texts, capsys):
    reports = openi_texts[:7] + [None]
    root = _shards(tmp_path / "shards", reports)
    assert main(["labels", "--shards", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "labelled 7 reports in 3 shards (1 bad samples skipped, 0 shards resumed)" in out
    rows = [json.loads(x) for x in (root / "labels.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"openi-{i}-0" for i in range(7)]
    assert all(r["graph"]["format"] == "llmclip-report-graph/1" for r in rows)
    from llmclip.clinical import Labeler

    assert rows[3]["labels"] == Labeler().label(openi_texts[3]).vector
    meta = json.loads((root / "labels.meta.json").read_text())
    assert (
        meta["samples"] == 7 and meta["bad_samples"] == 1 and meta["format"] == "llmclip-labels/1"
    )
    first = (root / "labels.jsonl").read_bytes()
    # a second run resumes every finished shard and writes the same file
    assert main(["labels", "--shards", f"{root}:train", "--quiet"]) == 0
    assert "3 shards resumed" in capsys.readouterr().out
    assert (root / "labels.jsonl").read_bytes() == first
    assert not list(root.rglob("*.tmp"))


def test_labels_errors_exit_2(tmp_path, capsys):
    assert main(["labels", "--shards", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert main(["labels"]) == 2
    assert main(["labels", "eval"]) == 2


def test_labels_eval_openi(tmp_path, capsys):
    out_json = tmp_path / "scores.json"
    assert main(["labels", "eval", "--openi", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "Pleural Effusion" in out and "macro-F1 over" in out
    doc = json.loads(out_json.read_text())
    assert doc["macro_f1"] >= 0.85 and doc["classes"]["Cardiomegaly"]["support"] > 300


def test_labels_show(capsys):
    assert main(["labels", "show", "Small left pleural effusion. No pneumothorax."]) == 0
    out = capsys.readouterr().out
    assert "Pleural Effusion" in out and '"Pneumothorax": 0' in out
    assert "negated: No left pleural effusion. Pneumothorax." in out


def test_openi_reader_refuses_entity_declarations(tmp_path):
    """Both Open-I readers share one guard: a DTD / entity declaration (billion laughs, external
    entities) is refused with an error naming the archive, not expanded."""
    from llmclip.config import ConfigError
    from llmclip.labels.openi import read_openi

    data = b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>'
    path = tmp_path / "hostile.tgz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("1.xml")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ConfigError, match="hostile.tgz.*entity"):
        read_openi(path)
