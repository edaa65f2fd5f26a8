"""``llmclip cache build`` on two "nodes" of this machine, started exactly as ``slurm/launch.sh
node cache ...`` starts it on two hosts (one torchrun per node, ``--nnodes 2``, one rank per node,
nothing shared but the files): the cache equals, byte for byte, the one the single-node job of the
same world size (one node, 2 ranks) writes, and every shard is encoded by exactly one rank."""

from __future__ import annotations

import re

import pytest
from fault_tools import digest
from multinode_tools import start_nodes, wait_all

from llmclip.cache import EmbeddingCache

pytestmark = pytest.mark.multinode


def test_two_nodes_build_the_cache_of_one_node(tmp_path, openi_shards, tiny_encoder_dir):
    outs = {"one_node": tmp_path / "one_node", "two_nodes": tmp_path / "two_nodes"}
    for tag, nnodes, nproc in (("one_node", 1, 2), ("two_nodes", 2, 1)):
        args = ["cache", str(tiny_encoder_dir), str(openi_shards), str(outs[tag]),
                "--variants", "report,negated"]
        procs = start_nodes(args, nnodes, tmp_path, tag, nproc=nproc)
        rcs = wait_all(procs)
        assert rcs == [0] * nnodes, "\n".join(p.tail() for p in procs)
    want = digest(outs["one_node"])
    assert any(k.endswith(".emb.npy") for k in want) and "meta.json" in want
    assert digest(outs["two_nodes"]) == want
    cache = EmbeddingCache(outs["two_nodes"])
    # Each node's rank wrote its own shards (i % 2 == node), none twice.
    wrote = {n: re.findall(r"wrote (\S+) \(", (tmp_path / f"two_nodes-node{n}.log").read_text())
             for n in (0, 1)}
    assert wrote[0] and wrote[1] and not set(wrote[0]) & set(wrote[1])
    assert sorted(wrote[0] + wrote[1]) == sorted(cache.counts)
