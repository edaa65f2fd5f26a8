"""Stage 1 (tiny Llama, LoRA, ZeRO-3) on two "nodes" of this machine, started exactly as
``slurm/launch.sh node`` starts them on two hosts (see test_stage2_nodes.py), then resumed on one
rank from the exact sample.

One chain of runs, shared by the tests (``LLMCLIP_RECORD_SAMPLES`` records the report keys every
rank trained on; the data is one train shard, so that 9 steps cover an epoch):

- ``ref``: one node with 2 ranks, 9 steps (4 reports a step);
- ``A``: two nodes x 1 rank, 9 steps: every report of the shard once, then epoch 1 begins;
- ``B``: resumed on 1 rank (2 reports a step) to step 17.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from fault_tools import metrics, stage1_recipe, write_config
from multinode_tools import (
    RECORD_ENV,
    assert_all_ok,
    check_exact_epochs,
    start_nodes,
    start_ranks,
    stream_keys,
    takes,
)
from safetensors.torch import load_file

from llmclip.text.pairs import report_text

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def chain(tmp_path_factory, one_shard):
    tmp = tmp_path_factory.mktemp("stage1_nodes")
    run, ref = tmp / "run", tmp / "ref"
    rec = {k: tmp / f"records-{k}" for k in ("ref", "A", "B")}

    def cfg(out: Path, tag: str, steps: int) -> Path:
        recipe = stage1_recipe(out, one_shard, save_every=0)
        recipe["optim"]["max_steps"] = steps
        return write_config(tmp / f"{tag}.yaml", recipe)

    assert_all_ok(start_nodes(["train", str(cfg(ref, "ref", 9))], 1, tmp, "ref", nproc=2,
                    **{RECORD_ENV: str(rec["ref"])}), "one node, 2 ranks")
    assert_all_ok(start_nodes(["train", str(cfg(run, "A", 9))], 2, tmp, "A", **{RECORD_ENV: str(rec["A"])}),
        "two nodes")
    shutil.copytree(run / "final", tmp / "final-A")
    assert_all_ok(start_ranks(cfg(run, "B", 17), 1, tmp, "B", **{RECORD_ENV: str(rec["B"])}), "resume on 1 rank")
    return {"tmp": tmp, "run": run, "ref": ref, "rec": rec}


def _usable(meta) -> bool:
    return bool(report_text(meta))


def test_two_nodes_train_exactly_like_one_node_of_the_same_world_size(chain):
    a, ref = metrics(chain["run"]), metrics(chain["ref"])
    assert sorted(ref) == list(range(1, 10))
    assert [a[s]["loss"] for s in range(1, 10)] == [ref[s]["loss"] for s in range(1, 10)]
    final, want_dir = chain["tmp"] / "final-A", chain["ref"] / "final"
    weights = sorted(str(p.relative_to(final)) for p in final.rglob("*.safetensors"))
    assert weights and weights == sorted(str(p.relative_to(want_dir)) for p in want_dir.rglob("*.safetensors"))
    for name in weights:
        got, want = load_file(str(final / name)), load_file(str(want_dir / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    fingerprint = [json.loads((d / "encoder.json").read_text())["fingerprint"] for d in (final, want_dir)]
    assert fingerprint[0] == fingerprint[1]
    assert takes(chain["rec"]["A"]) == takes(chain["rec"]["ref"])


def test_every_report_is_seen_once_per_epoch_across_nodes(chain, one_shard):
    recs = takes(chain["rec"]["A"])
    assert {r["rank"] for r in recs} == {0, 1} and {r["world"] for r in recs} == {2}
    keys, recs = stream_keys(recs)
    n = check_exact_epochs(keys, recs, f"{one_shard}:train", "text", seed=0, usable=_usable)
    assert n <= len(keys) == 9 * 4


def test_resumed_on_one_rank_from_the_exact_sample(chain, one_shard):
    rec = chain["rec"]
    log = (chain["tmp"] / "B-rank0.log").read_text()
    assert re.search(r"resumed from \S*step-0*9 at step 9\b", log), log[-3000:]
    keys, recs = stream_keys(takes(rec["A"]) + takes(rec["B"]))
    assert {r["world"] for r in takes(rec["B"])} == {1} and len(keys) == 9 * 4 + 8 * 2
    n = check_exact_epochs(keys, recs, f"{one_shard}:train", "text", seed=0, usable=_usable)
    assert n < len(keys)
    assert sorted(metrics(chain["run"])) == list(range(1, 18)), "a step was logged twice or lost"
