"""The three batch scripts on a real one-node SLURM cluster, 2 CPU ranks each, and preemption.

Chain: stage 1 (tiny config) -> embedding cache with its encoder -> stage 2 on that cache. The
preemption test signals a second stage-1 job mid-way with USR1 (what `--signal=B:USR1@120` sends
before the time limit); the job must checkpoint, requeue itself, resume and end with the same
weights as the uninterrupted job.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from slurm_helpers import Job, job_info, job_logs, submit, wait

STAGE1 = "configs/stage1/tiny.yaml"
STAGE2 = "configs/stage2/tiny.yaml"


def run_job(script: str, *args: str, name: str) -> Job:
    """Submit a batch script as a user would and wait for the job to end."""
    return wait(submit(script, *args), name, timeout_s=900)


def checkpoints(run: Path) -> dict[int, Path]:
    return {
        int(json.loads((p / "state.json").read_text())["step"]): p
        for p in (run / "checkpoints").glob("step-*")
        if (p / "state.json").is_file()
    }


def last_logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.fixture(scope="module")
def stage1_run(slurm_cluster, openi_shards, tmp_path_factory) -> Path:
    """`sbatch slurm/stage1.sh configs/stage1/tiny.yaml`, uninterrupted."""
    run = tmp_path_factory.mktemp("slurm") / "stage1"
    job = run_job(
        "slurm/stage1.sh",
        STAGE1,
        "--set",
        f"data.shards={openi_shards}:train",
        "--set",
        f"run.out_dir={run}",
        name="llmclip-stage1",
    )
    assert job.rc == 0 and job.state == "COMPLETED", job.describe()
    return run


def test_stage1_job_trains_on_two_ranks_and_checkpoints(stage1_run: Path) -> None:
    ds = json.loads((stage1_run / "ds_config.json").read_text())
    per_rank = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    assert ds["train_batch_size"] == 2 * per_rank  # torchrun started 2 ranks
    ckpts = checkpoints(stage1_run)
    assert max(ckpts) == 10, sorted(ckpts)  # tiny.yaml: max_steps 10
    state = json.loads((ckpts[10] / "state.json").read_text())
    pos = state["data"]["position"]  # a global sample count (llmclip.data.order), 2 ranks fed
    assert pos["world_size"] == 2 and pos["epoch"] * pos["epoch_samples"] + pos["offset"] > 0
    assert (stage1_run / "checkpoints" / "latest").read_text().strip() == ckpts[10].name
    assert (stage1_run / "final" / "encoder.json").is_file()


def test_preempted_stage1_job_requeues_resumes_and_matches(
    stage1_run: Path, openi_shards, tmp_path: Path
) -> None:
    run = tmp_path / "stage1-preempted"
    # Keep every checkpoint, so the one written on USR1 is still there to be looked at.
    job_id = submit(
        "slurm/stage1.sh",
        STAGE1,
        "--set",
        f"data.shards={openi_shards}:train",
        "--set",
        f"run.out_dir={run}",
        "--set",
        "run.keep_checkpoints=20",
    )
    deadline = time.monotonic() + 900  # generous: a shared 2-core machine can be very slow
    # Mid-way: after the step-4 checkpoint, well before the last step (10).
    while last_logged_step(run) < 5:
        state = job_info(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job ended early: {state}\n{job_logs(job_id, 'llmclip-stage1')}"
        )
        assert time.monotonic() < deadline, (
            f"no step 5 in time\n{job_logs(job_id, 'llmclip-stage1')}"
        )
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], check=True, timeout=30)
    job = wait(job_id, "llmclip-stage1", timeout_s=max(60.0, deadline - time.monotonic()))

    assert job.rc == 0 and job.state == "COMPLETED", job.describe()
    assert job.restarts == 1, job.describe()  # requeued once, by the batch script itself
    assert "requeueing job" in job.log, job.describe()
    ckpts = checkpoints(run)
    save_every = 4
    on_signal = [s for s in ckpts if s % save_every and s < 10]
    assert len(on_signal) == 1, f"expected one checkpoint written on USR1, got {sorted(ckpts)}"
    assert 5 <= on_signal[0] < 10

    # The resumed run ends where the uninterrupted one did, bit for bit.
    got = load_file(ckpts[10] / "model.safetensors")
    ref = load_file(checkpoints(stage1_run)[10] / "model.safetensors")
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    fp = [
        json.loads((r / "final" / "encoder.json").read_text())["fingerprint"]
        for r in (run, stage1_run)
    ]
    assert fp[0] == fp[1]


@pytest.fixture(scope="module")
def cache_dir(stage1_run: Path, openi_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm") / "cache"
    # The run folder stands for its encoder (RUN/final); stage 2's tiny recipe needs these variants.
    job = run_job(
        "slurm/cache.sh",
        str(stage1_run),
        str(openi_shards),
        str(out),
        "--variants",
        "report,negated,laterality,severity",
        name="llmclip-cache",
    )
    assert job.rc == 0 and job.state == "COMPLETED", job.describe()
    return out


def test_cache_job_writes_every_sidecar(cache_dir: Path, openi_shards, stage1_run: Path) -> None:
    from llmclip.cache import EmbeddingCache
    from llmclip.data.shards import resolve_shards

    cache = EmbeddingCache(cache_dir)
    encoder = json.loads((stage1_run / "final" / "encoder.json").read_text())
    assert cache.fingerprint == encoder["fingerprint"]
    assert cache.variants == ["report", "negated", "laterality", "severity"]
    shards = resolve_shards(str(openi_shards), "text")
    assert len(shards) > 2  # both ranks had shards to encode
    for shard in shards:
        rows = cache.array(shard.name)
        assert rows.shape[:2] == (shard.count, 4)
        assert np.isfinite(np.asarray(rows, dtype=np.float32)).all()


def test_stage2_job_trains_on_the_cache(cache_dir: Path, openi_shards, tmp_path: Path) -> None:
    run = tmp_path / "stage2"
    job = run_job(
        "slurm/stage2.sh",
        STAGE2,
        "--set",
        f"data.shards={openi_shards}:train",
        "--set",
        f"data.cache={cache_dir}",
        "--set",
        f"run.out_dir={run}",
        "--set",
        "optim.max_steps=6",
        "--set",
        "run.save_every=3",
        name="llmclip-stage2",
    )
    assert job.rc == 0 and job.state == "COMPLETED", job.describe()
    ckpts = checkpoints(run)
    assert sorted(ckpts) == [3, 6], sorted(ckpts)
    assert json.loads((ckpts[6] / "state.json").read_text())["data"]["world_size"] == 2  # two ranks
    assert (run / "final" / "model.safetensors").is_file()
