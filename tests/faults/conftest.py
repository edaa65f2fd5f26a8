"""Fixtures of the fault-injection suite: tiny stage-1 / stage-2 recipes and their uninterrupted
reference runs (one rank, started like ``srun`` starts a task: no launcher), and a small disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_tools import SmallDisk, stage1_recipe, stage2_recipe, train_solo, write_config


@pytest.fixture(scope="session")
def stage1_reference(tmp_path_factory, openi_shards) -> Path:
    """An uninterrupted stage-1 run of ``stage1_recipe``."""
    root = tmp_path_factory.mktemp("faults_stage1_ref")
    cfg = write_config(root / "stage1.yaml", stage1_recipe(root / "run", openi_shards))
    rc = train_solo(cfg, root / "log.txt")
    assert rc == 0, (root / "log.txt").read_text()[-4000:]
    return root / "run"


@pytest.fixture(scope="session")
def stage2_reference(tmp_path_factory, openi_shards, stage2_cache, tiny_encoder_dir) -> Path:
    """An uninterrupted stage-2 run of ``stage2_recipe``."""
    root = tmp_path_factory.mktemp("faults_stage2_ref")
    cfg = write_config(root / "stage2.yaml",
                       stage2_recipe(root / "run", openi_shards, stage2_cache, tiny_encoder_dir))
    rc = train_solo(cfg, root / "log.txt")
    assert rc == 0, (root / "log.txt").read_text()[-4000:]
    return root / "run"


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path)
    try:
        yield disk
    finally:
        disk.close()
