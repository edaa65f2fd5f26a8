"""The one tar reader every llmclip reader goes through (``llmclip.data.safetar``)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from llmclip.data.safetar import UnreadableTar, read_members, split_key


def _tar(path: Path, members: list[tuple[str, bytes, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
    return path


def test_regular_files_only_and_payloads_only_when_asked(tmp_path):
    path = _tar(tmp_path / "a.tar", [("k.json", b"{}", tarfile.REGTYPE),
                                     ("s.json", b"", tarfile.SYMTYPE),
                                     ("h.json", b"", tarfile.LNKTYPE),
                                     ("k.png", b"\x89PNG", tarfile.REGTYPE)])
    got = [(m.name, m.data) for m in read_members(path, read=lambda n: n.endswith(".json"))]
    assert got == [("k.json", b"{}"), ("k.png", None)]


def test_a_member_over_the_cap_is_flagged_and_not_read(tmp_path):
    path = _tar(tmp_path / "a.tar", [("big.json", b"x" * 100, tarfile.REGTYPE),
                                     ("ok.json", b"y", tarfile.REGTYPE)])
    got = [(m.name, m.oversized, m.data) for m in read_members(path, max_bytes=10)]
    assert got == [("big.json", True, None), ("ok.json", False, b"y")]


def test_compressed_and_streamed_archives_read_the_same(tmp_path):
    members = [("r1.xml", b"<a/>", tarfile.REGTYPE), ("r2.xml", b"<b/>", tarfile.REGTYPE)]
    gz = _tar(tmp_path / "a.tgz", members, "w:gz")
    plain = _tar(tmp_path / "a.tar", members)
    from_path = [(m.name, m.data) for m in read_members(gz)]
    with plain.open("rb") as f:
        from_stream = [(m.name, m.data) for m in read_members(f, label="stream")]
    assert from_path == from_stream == [("r1.xml", b"<a/>"), ("r2.xml", b"<b/>")]


def test_a_truncated_tar_yields_what_precedes_the_damage_then_names_the_file(tmp_path):
    path = _tar(tmp_path / "a.tar", [("a.json", b"1" * 600, tarfile.REGTYPE),
                                     ("b.json", b"2" * 5000, tarfile.REGTYPE)])
    data = path.read_bytes()
    path.write_bytes(data[:512 + 1024 + 512 + 100])  # cut inside b.json's payload
    seen = []
    with pytest.raises(UnreadableTar, match="a.tar"):
        for m in read_members(path):
            seen.append(m.name)
    assert seen == ["a.json"]


def test_missing_file_is_unreadable_not_a_crash(tmp_path):
    with pytest.raises(UnreadableTar, match="nope.tar"):
        list(read_members(tmp_path / "nope.tar"))


@pytest.mark.parametrize("name, parts", [("openi-1-0.json", ("openi-1-0", "json")),
                                         ("d/k.seg.PNG", ("d/k", "seg.png")),
                                         ("noext", None), (".hidden", None)])
def test_split_key_follows_webdataset(name, parts):
    assert split_key(name) == parts
