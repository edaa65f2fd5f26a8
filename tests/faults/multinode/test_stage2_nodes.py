"""Stage 2 on two "nodes" of this machine, started exactly as ``slurm/launch.sh node`` starts them on
two hosts (one torchrun per node, ``--nnodes 2``, node ranks 0 and 1, one master address and port,
one rank per node, each node its own environment, nothing shared but the files), then resumed on
other world sizes, and a node lost mid-step.

One chain of runs of the same run folder, shared by the tests (``LLMCLIP_RECORD_SAMPLES`` records
the keys every rank trained on):

- ``ref``: one node with 2 ranks, 13 steps (the single-node run of the same world size);
- ``A``: two nodes x 1 rank, 13 steps (16 samples a step: the 197 train samples, then 11 more);
- ``B``: resumed on 1 rank (no launcher) to step 21;
- ``C``: resumed on two nodes; once its step-24 checkpoint is written, every process of node 1 is
  SIGKILLed mid-step;
- ``D``: resumed on one node (1 rank) from C's last checkpoint, to step 45.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from fault_tools import metrics, stage2_recipe, write_config
from multinode_tools import (
    RECORD_ENV,
    assert_all_ok,
    check_exact_epochs,
    kill_node,
    start_nodes,
    start_ranks,
    stream_keys,
    takes,
)
from safetensors.torch import load_file

from llmclip.checkpoint import latest_checkpoint

pytestmark = pytest.mark.multinode

TIMEOUT_S = 20  # run.collective_timeout_s of phase C
SLACK_S = 45  # teardown and a loaded machine (only how long the test waits)


def _args(cfg: Path) -> list[str]:
    return ["train", str(cfg)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, openi_shards, stage2_cache, tiny_encoder_dir):
    tmp = tmp_path_factory.mktemp("stage2_nodes")
    run, ref = tmp / "run", tmp / "ref"
    rec = {k: tmp / f"records-{k}" for k in ("ref", "A", "B", "C", "D")}

    def cfg(out: Path, tag: str, steps: int, **run_cfg) -> Path:
        recipe = stage2_recipe(out, openi_shards, stage2_cache, tiny_encoder_dir,
                               **{"save_every": 0, **run_cfg})
        recipe["optim"]["max_steps"] = steps
        return write_config(tmp / f"{tag}.yaml", recipe)

    assert_all_ok(start_nodes(_args(cfg(ref, "ref", 13)), 1, tmp, "ref", nproc=2,
                    **{RECORD_ENV: str(rec["ref"])}), "one node, 2 ranks")
    assert_all_ok(start_nodes(_args(cfg(run, "A", 13)), 2, tmp, "A", **{RECORD_ENV: str(rec["A"])}), "two nodes")
    shutil.copytree(run / "final", tmp / "final-A")
    assert_all_ok(start_ranks(cfg(run, "B", 21), 1, tmp, "B", **{RECORD_ENV: str(rec["B"])}), "resume on 1 rank")

    # C: two nodes again; node 1 lost mid-step after the step-24 checkpoint.
    nodes = start_nodes(_args(cfg(run, "C", 60, save_every=3, collective_timeout_s=TIMEOUT_S)), 2,
                        tmp, "C", **{RECORD_ENV: str(rec["C"])})
    deadline = time.monotonic() + 600
    while (latest_checkpoint(run) or Path("step-0")).name < "step-000024":
        assert all(p.p.poll() is None for p in nodes), "\n".join(p.tail() for p in nodes)
        assert time.monotonic() < deadline, nodes[0].tail()
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.3))
    assert nodes[0].p.poll() is None, "node 0 finished before the fault:\n" + nodes[0].tail()
    kill_node(nodes[1])
    t0 = time.monotonic()
    lost_rc = nodes[0].wait(TIMEOUT_S + SLACK_S + 120)
    lost = {"rc": lost_rc, "took": time.monotonic() - t0, "checkpoint": latest_checkpoint(run).name,
            "log": nodes[0].log.read_text(errors="replace")}
    nodes[1].wait(60)
    (tmp / "lost.json").write_text(json.dumps({k: v for k, v in lost.items() if k != "log"}))

    assert_all_ok(start_nodes(_args(cfg(run, "D", 45, save_every=3)), 1, tmp, "D", nproc=1,
                    **{RECORD_ENV: str(rec["D"])}), "rerun on one node")
    return {"tmp": tmp, "run": run, "ref": ref, "rec": rec, "lost": lost}


def test_two_nodes_train_exactly_like_one_node_of_the_same_world_size(chain):
    a, ref = metrics(chain["run"]), metrics(chain["ref"])
    assert sorted(ref) == list(range(1, 14))
    assert [a[s]["loss"] for s in range(1, 14)] == [ref[s]["loss"] for s in range(1, 14)]
    for name in ("model.safetensors",):
        got = load_file(str(chain["tmp"] / "final-A" / name))
        want = load_file(str(chain["ref"] / "final" / name))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), "final weights differ"
    # The same takes, rank for rank (rank = node rank x 1 + local rank 0 on two nodes).
    assert takes(chain["rec"]["A"]) == takes(chain["rec"]["ref"])


def test_every_sample_is_seen_once_per_epoch_across_nodes(chain, openi_shards):
    recs = takes(chain["rec"]["A"])
    assert {r["rank"] for r in recs} == {0, 1} and {r["world"] for r in recs} == {2}
    keys, recs = stream_keys(recs)
    n = check_exact_epochs(keys, recs, f"{openi_shards}:train", "image", seed=0)
    assert n <= len(keys) == 13 * 16  # epoch 0 complete, then the start of epoch 1


def test_a_lost_node_stops_the_other_within_the_collective_timeout(chain):
    lost = chain["lost"]
    # A killed node closes its sockets: node 0 fails at once (here ~0.3 s), well within the timeout
    # that would end it were node 1 hung instead (tests/faults/test_rank_death.py covers a hang).
    assert lost["rc"] != 0 and lost["took"] < TIMEOUT_S, (lost["rc"], lost["took"], lost["log"][-3000:])
    # gloo names the lost peer ("Connection closed by peer [addr]:port ... a remote worker
    # crashing"); a hung node would end in "timed out" after run.collective_timeout_s.
    assert re.search(r"closed by peer|connection reset|timed? ?out", lost["log"], re.I), lost["log"][-3000:]
    assert int(lost["checkpoint"].split("-")[1]) >= 24


def test_resumed_on_other_world_sizes_from_the_exact_sample(chain, openi_shards):
    rec = chain["rec"]
    d = takes(rec["D"])
    # C was killed: its takes after the checkpoint D resumed from are trained again by D.
    c = takes(rec["C"], before=min(r["absolute"] for r in d))
    assert c, "phase C trained nothing before it was cut"
    keys, recs = stream_keys(takes(rec["A"]) + takes(rec["B"]) + c + d)
    n = check_exact_epochs(keys, recs, f"{openi_shards}:train", "image", seed=0)
    k = int(chain["lost"]["checkpoint"].split("-")[1])  # C's last checkpoint, where D resumed
    assert len(keys) == 13 * 16 + (21 - 13) * 8 + (k - 21) * 16 + (45 - k) * 8
    assert len(keys) > 2 * n  # epochs 0 and 1 complete, on world sizes 2, 1, 2, 1
    assert [{r["world"] for r in x} for x in (takes(rec["B"]), c, d)] == [{1}, {2}, {1}]
    log = (chain["tmp"] / "D-node0.log").read_text()
    assert re.search(rf"resumed from step {chain['lost']['checkpoint'].split('-')[1].lstrip('0')}\b",
                     log), log[-3000:]
    steps = sorted(metrics(chain["run"]))
    assert steps == list(range(1, 46)), "a step was logged twice or lost"
