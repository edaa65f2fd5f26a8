"""`sbatch --nodes=2 slurm/selftest.sh` on a real two-node SLURM cluster on this machine (two slurmd,
``tests/faults/multinode/slurm_sandbox.py``): the batch script starts one srun task per node, each runs
``launch.sh node`` -> torchrun for its node, and one short run of each stage (stage 1, the
embedding cache, stage 2) spans both nodes; the table has one line per node.

Root only, like tests/slurm (``make test`` runs as root): without SLURM this test FAILS with the
reason, it never skips.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from multinode_tools import EXT_DIR, REPO
from slurm_sandbox import FIRST_JOB_ID, TwoNodeSlurm

sys.path.insert(0, str(REPO / "tests" / "slurm"))
from slurm_helpers import CLUSTER_UP, submit, wait  # noqa: E402

pytestmark = [pytest.mark.multinode, pytest.mark.slurm]


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.fail("the two-node SLURM cluster needs root (it starts slurmctld and two slurmd)")
    up = subprocess.run([str(CLUSTER_UP)], capture_output=True, text=True, timeout=600)  # munge
    if up.returncode != 0:
        pytest.fail(f"tests/slurm/cluster_up.sh failed (SLURM and munge needed):\n{up.stderr[-3000:]}")
    # A short root: slurmstepd's socket lives in the spool folder, and a Unix socket path may not
    # exceed 108 bytes (pytest's tmp_path under a long test name does).
    root = Path(tempfile.mkdtemp(prefix="slurm2-", dir="/tmp"))
    cluster = TwoNodeSlurm(root)
    try:
        cluster.up()
        # sbatch/scontrol here, and srun inside the job, talk to this cluster; one rank per node.
        monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
        monkeypatch.setenv("LLMCLIP_NPROC_PER_NODE", "1")
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(EXT_DIR)))
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)


def test_selftest_job_spans_two_slurm_nodes(two_nodes, tmp_path: Path) -> None:
    out = tmp_path / "selftest"
    job_id = submit("slurm/selftest.sh", "--out", str(out), sbatch=["--nodes=2"])
    assert job_id >= FIRST_JOB_ID  # submitted to the two-node cluster, not the shared one
    job = wait(job_id, "llmclip-selftest", timeout_s=900)
    assert job.rc == 0 and job.state == "COMPLETED", job.describe()
    assert "nodes=2 nproc_per_node=1 world_size=2" in job.log, job.describe()
    assert "selftest: OK (2 ranks on 2 nodes" in job.log, job.describe()
    rows = re.findall(r"^\s*([01]) \S+\s+1(?:\s+[\d.]+){7}$", job.log, re.M)
    assert sorted(rows) == ["0", "1"], job.describe()
    logs = sorted(p.name for p in (REPO / "slurm" / "logs" / f"llmclip-selftest-{job_id}").glob("node*.log"))
    assert [n[:5] for n in logs] == ["node0", "node1"], logs
    assert (out / "stage2" / "final" / "model.safetensors").is_file()
