"""A 2-rank stage-2 run (each rank its own process, started the way ``srun`` starts tasks, so no
launcher kills the survivor for us) loses a rank mid-step: first SIGKILL (the rank dies), then, on the
resumed job, SIGSTOP (the rank hangs: a stalled node, no connection reset). Either way the surviving
rank exits non-zero with an error that says what happened, within ``run.collective_timeout_s`` (plus
teardown slack), instead of hanging; the rerun resumes from the last complete checkpoint."""

from __future__ import annotations

import random
import re
import signal
import time

from fault_tools import (
    PYTHON,
    TRAIN,
    Proc,
    count_lines,
    fault_seeds,
    free_port,
    metrics,
    rank_env,
    stage2_recipe,
    write_config,
)

from llmclip.checkpoint import latest_checkpoint

TIMEOUT_S = 20  # run.collective_timeout_s of this test
SLACK_S = 45  # teardown and a loaded machine


def _launch(cfg, tmp_path, tag: str) -> list[Proc]:
    port = free_port()
    return [Proc([PYTHON, str(TRAIN), "--config", str(cfg)], tmp_path / f"{tag}-rank{r}.log",
                 rank_env(rank=r, world=2, port=port)) for r in (0, 1)]


def _checkpointed_step(run) -> int:
    found = latest_checkpoint(run)
    return int(found.name.split("-")[1]) if found is not None else 0


def _lose_rank1(procs: list[Proc], run, after_steps: int, seed: int, sig: int) -> tuple[int, float, str]:
    """Wait until step ``after_steps`` is logged and checkpointed, a seeded delay, then signal rank
    1; returns rank 0's exit code, seconds from the signal to its exit, and its log.

    Waiting for the checkpoint, not only the metrics line: a step is logged before it is saved, and
    a rank lost during that save (a collective) rightly leaves no checkpoint of it, so a fault timed
    on the log alone could leave the resume step with nothing to resume from."""
    rank0, rank1 = procs
    deadline = time.monotonic() + 600
    while count_lines(run / "metrics.jsonl") < after_steps or _checkpointed_step(run) < after_steps:
        assert rank0.p.poll() is None and rank1.p.poll() is None, rank0.tail() + rank1.tail()
        assert time.monotonic() < deadline, "no progress:\n" + rank0.tail()
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    assert rank0.p.poll() is None, "rank 0 finished before the fault:\n" + rank0.tail()
    rank1.kill(sig)
    t0 = time.monotonic()
    rc = rank0.wait(TIMEOUT_S + SLACK_S + 120)
    took = time.monotonic() - t0
    rank1.kill(signal.SIGKILL)
    rank1.wait(60)
    return rc, took, rank0.log.read_text()


def test_a_rank_lost_mid_step_stops_the_survivor_in_bounded_time_and_the_job_resumes(
        tmp_path, openi_shards, stage2_cache, tiny_encoder_dir):
    run = tmp_path / "run"
    recipe = stage2_recipe(run, openi_shards, stage2_cache, tiny_encoder_dir, collective_timeout_s=TIMEOUT_S)
    # Room to fault after the resume: on a fast machine the first fault can land five steps in, and a
    # resumed job with nothing left to train would finish before rank 1 is lost.
    recipe["optim"]["max_steps"] = 40
    cfg = write_config(tmp_path / "cfg.yaml", recipe)
    seed = fault_seeds()[0]

    # 1. Rank 1 dies (SIGKILL) after the first logged step.
    rc, took, log = _lose_rank1(_launch(cfg, tmp_path, "die"), run, 1, seed, signal.SIGKILL)
    assert rc != 0 and took < TIMEOUT_S + SLACK_S, (rc, took, log[-3000:])
    assert re.search(r"rank|peer|connection|timed? ?out", log.split("Traceback")[-1], re.I), log[-3000:]
    first = latest_checkpoint(run)
    assert first is not None, "no checkpoint to resume from"

    # 2. The resumed job starts from that checkpoint; two steps later rank 1 hangs (SIGSTOP): no
    # connection is reset, only run.collective_timeout_s can stop rank 0.
    done = int(first.name.split("-")[1])
    procs = _launch(cfg, tmp_path, "hang")
    rc, took, log = _lose_rank1(procs, run, done + 2, seed + 1, signal.SIGSTOP)
    assert f"resumed from step {done}" in log, log[-3000:]
    assert rc != 0 and TIMEOUT_S * 0.5 <= took < TIMEOUT_S + SLACK_S, (rc, took, log[-3000:])
    assert re.search(r"timed? ?out", log, re.I), log[-3000:]
    # The resumed job trained on: more checkpoints, each step logged once.
    assert int(latest_checkpoint(run).name.split("-")[1]) >= done + 1
    logged = [r["step"] for r in metrics(run).values()]
    assert count_lines(run / "metrics.jsonl") == len(logged) == max(logged), "a step was logged twice"
