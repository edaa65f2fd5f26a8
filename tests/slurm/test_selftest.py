"""`sbatch slurm/selftest.sh` on the one-node test cluster: one short run of each stage on both
CPU ranks of the node, then the per-node table and "selftest: OK"."""

from __future__ import annotations

import re

import pytest
from slurm_helpers import submit, wait

pytestmark = [pytest.mark.slurm, pytest.mark.multinode]


def test_selftest_job_runs_every_stage_and_reports_each_node(slurm_cluster, tmp_path) -> None:
    out = tmp_path / "selftest"
    job = wait(submit("slurm/selftest.sh", "--out", str(out)), "llmclip-selftest", timeout_s=900)
    assert job.rc == 0 and job.state == "COMPLETED", job.describe()
    assert "selftest: OK (2 ranks on 1 nodes" in job.log, job.describe()
    rows = re.findall(r"^\s*0 \S+\s+2\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
                      r"\s+([\d.]+)$", job.log, re.M)
    assert len(rows) == 1, job.describe()
    assert all(float(v) > 0 for v in rows[0]), rows  # every part ran and moved samples
    # What each part left: the encoder, the cache, the stage-2 model.
    assert (out / "stage1" / "final" / "encoder.json").is_file()
    assert (out / "cache" / "meta.json").is_file()
    assert (out / "stage2" / "final" / "model.safetensors").is_file()
