"""Fixtures of the data tests: real report texts and rendered JPEGs from the session's Open-I shards."""

from __future__ import annotations

import json

import pytest

from llmclip.data.shards import read_tar


@pytest.fixture(scope="session")
def openi_texts(openi_shards) -> list[str]:
    """Full texts of real Open-I reports (from the session's Open-I shards)."""
    texts = []
    for p in sorted((openi_shards / "text").glob("*.tar")):
        for _key, members in read_tar(p):
            texts.append(json.loads(members["json"])["report"]["full"])
    return texts


@pytest.fixture(scope="session")
def openi_jpegs(openi_shards) -> list[bytes]:
    """Rendered 64 px JPEGs from the session's Open-I shards."""
    out = []
    for _key, members in read_tar(openi_shards / "images" / "train-000000.tar"):
        out.append(members["jpg"])
    return out
