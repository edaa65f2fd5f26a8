"""Submit the slurm/ scripts to the test cluster and wait for them; read their logs and state."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_UP = ROOT / "tests" / "slurm" / "cluster_up.sh"
# Terminal job states: anything else (PENDING, RUNNING, REQUEUED, COMPLETING...) is still going.
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# The test cluster's node has no GPUs; the scripts' --gpus-per-node=8 default is overridden the way
# a user on a CPU partition would.
CPU_JOB = ["--gpus-per-node=0"]


def cluster_problem() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM client commands (sbatch, sinfo) are not installed"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s (is slurmctld running?)"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s in ("idle", "mix", "alloc", "comp") for s in states):
        return f"no usable SLURM node (sinfo rc={out.returncode}: {out.stdout.strip()} {out.stderr.strip()})"
    return None


@dataclass
class Job:
    id: int
    rc: int
    state: str
    restarts: int
    log: str

    def describe(self) -> str:
        return f"job {self.id}: state {self.state}, exit {self.rc}, restarts {self.restarts}\n{self.log}"


def job_info(job_id: int) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30
    )
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def job_logs(job_id: int, name: str) -> str:
    """The batch log and every node log of a job (for failure messages)."""
    parts = []
    logs = ROOT / "slurm" / "logs"
    for path in [logs / f"{name}-{job_id}.out", *sorted((logs / f"{name}-{job_id}").glob("*.log"))]:
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            lines = [ln for ln in text.splitlines() if "Warning" not in ln and "warn(" not in ln]
            parts.append(f"--- {path.relative_to(ROOT)}\n" + "\n".join(lines[-60:]))
    return "\n".join(parts)


def submit(script: str, *args: str, sbatch: list[str] | None = None) -> int:
    """``sbatch --parsable`` from the repository root (the scripts' documented way); the job id.

    Tests then poll with ``wait`` rather than use ``sbatch --wait``, whose backoff notices the end
    of a job 20-30 s late.
    """
    cmd = ["sbatch", "--parsable", *CPU_JOB, *(sbatch or []), script, *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)} failed: {out.stderr}"
    return int(out.stdout.strip().split(";")[0])


def wait(job_id: int, name: str, timeout_s: float) -> Job:
    """Poll until the job reaches a final state (requeues included); cancel it on timeout."""
    deadline = time.monotonic() + timeout_s
    info: dict[str, str] = {}
    try:
        while time.monotonic() < deadline:
            info = job_info(job_id)
            if info.get("JobState") in FINAL_STATES:
                rc = int(info.get("ExitCode", "1:0").split(":")[0])
                return Job(
                    job_id,
                    rc,
                    info["JobState"],
                    int(info.get("Restarts", 0)),
                    job_logs(job_id, name),
                )
            time.sleep(0.5)
    finally:
        if info.get("JobState") not in FINAL_STATES:
            subprocess.run(["scancel", str(job_id)], timeout=30)
    pytest.fail(
        f"job {job_id} not finished after {timeout_s:.0f} s (state {info.get('JobState')}); "
        f"cancelled\n{job_logs(job_id, name)}"
    )
