"""Fixtures for the clinical toolkit tests: the real Open-I reports, read once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def openi_reports():
    """All 3,955 Open-I reports (torchxrayvision's archive) with their MeSH terms."""
    from llmclip.assets import openi_reports_tgz
    from llmclip.labels.openi import read_openi

    return read_openi(openi_reports_tgz())


@pytest.fixture(scope="session")
def openi_texts(openi_reports):
    """Findings + impression of every Open-I report that has any."""
    return [r.text for r in openi_reports if r.text.strip()]
