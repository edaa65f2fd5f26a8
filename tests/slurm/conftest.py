"""A real one-node SLURM cluster and helpers to submit the slurm/ scripts to it and wait for them.

The cluster is brought up by ``tests/slurm/cluster_up.sh`` (``make test`` runs it as root first;
the fixture runs it again, which is a no-op on a healthy cluster). Without a working cluster the
tests that need one FAIL with the reason: they never skip.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from slurm_helpers import CLUSTER_UP, ROOT, cluster_problem


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A running one-node cluster, or a test failure saying why there is none."""
    if os.geteuid() == 0:
        up = subprocess.run([str(CLUSTER_UP)], capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            pytest.fail(
                f"tests/slurm/cluster_up.sh failed (rc={up.returncode}):\n{up.stderr[-3000:]}"
            )
    problem = cluster_problem()
    if problem:
        pytest.fail(
            f"SLURM is needed by tests/slurm and is not usable: {problem}. As root, "
            f"`{CLUSTER_UP.relative_to(ROOT)}` installs and starts a one-node cluster."
        )
