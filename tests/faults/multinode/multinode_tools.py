"""Tools of the multi-node suite: start ranks and "nodes" on this machine as real processes, read
the sample keys every rank trained on (``LLMCLIP_RECORD_SAMPLES``, llmclip.data.order), and check
that they are exactly the global data order.

A "node" here is what ``slurm/launch.sh node`` starts on one host: one ``torchrun`` for that node's
ranks, with ``--nnodes``/``--node-rank``/master address and port, its own environment and nothing
shared with the other node but the files. Nothing is mocked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fault_tools import PYTHON, REPO, TRAIN, Proc, rank_env  # tests/faults, on sys.path (conftest)

from llmclip.data.order import RECORD_ENV, EpochOrder, build_index, read_records
from llmclip.distributed import free_port

LAUNCH = REPO / "slurm" / "launch.sh"
EXT_DIR = REPO / ".torch_extensions"  # the Makefile's: DeepSpeed's CPU comm op is built once


def base_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher or SLURM variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "LLMCLIP_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
               "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(EXT_DIR))
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def start_ranks(cfg: Path, world: int, log_dir: Path, tag: str, **env: str) -> list[Proc]:
    """``world`` ranks of ``llmclip/train.py``, each its own process (as ``srun`` starts tasks)."""
    port = free_port()
    return [Proc([PYTHON, str(TRAIN), "--config", str(cfg)], log_dir / f"{tag}-rank{r}.log",
                 rank_env(rank=r, world=world, port=port, TORCH_EXTENSIONS_DIR=str(EXT_DIR), **env))
            for r in range(world)]


def wait_all(procs: list[Proc], timeout: float = 600) -> list[int]:
    return [p.wait(timeout) for p in procs]


def assert_all_ok(procs: list[Proc], what: str) -> None:
    """Wait for every process; fail naming ``what``, the exit codes and each one's log tail."""
    rcs = wait_all(procs)
    assert rcs == [0] * len(procs), f"{what}: exit codes {rcs}\n" + "\n".join(p.tail() for p in procs)


def node_env(node: int, nnodes: int, nproc: int, port: int, **extra: str) -> dict[str, str]:
    """What SLURM (and the user) give ``launch.sh node`` on node ``node`` of an ``nnodes``-node job
    on this host: every node is 127.0.0.1, ``nproc`` ranks per node, one master port."""
    return base_env(SLURM_NODEID=str(node), SLURM_JOB_NODELIST=",".join(["127.0.0.1"] * nnodes),
                    SLURM_JOB_ID=str(port), SLURM_JOB_NAME="llmclip-multinode",
                    LLMCLIP_NPROC_PER_NODE=str(nproc), LLMCLIP_MASTER_PORT=str(port), **extra)


def start_nodes(args: list[str], nnodes: int, log_dir: Path, tag: str, nproc: int = 1,
                **env: str) -> list[Proc]:
    """``nnodes`` processes ``bash slurm/launch.sh node ARGS...``: the command every node of a
    SLURM job runs (it execs torchrun for the node), each with its own environment and log."""
    port = free_port()
    return [Proc(["bash", str(LAUNCH), "node", *args], log_dir / f"{tag}-node{n}.log",
                 node_env(n, nnodes, nproc, port, **env))
            for n in range(nnodes)]


def kill_node(proc: Proc) -> None:
    """SIGKILL every process of a node: its torchrun and the ranks torchrun started (each rank is in
    a session of its own, so the node's process group alone would leave them running)."""
    import psutil

    try:
        root = psutil.Process(proc.p.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


# ----------------------------------------------------------------------------------- sample keys
def takes(folder: Path, before: int | None = None) -> list[dict[str, Any]]:
    """The takes one run recorded; with ``before``, only those that start before that absolute
    stream position (a killed run's takes after its last checkpoint are taken again on resume)."""
    return [r for r in read_records(folder) if before is None or r["absolute"] < before]


def stream_keys(recs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The keys trained on, in global stream order, and the takes sorted that way."""
    recs = sorted(recs, key=lambda r: (r["absolute"], r["rank"]))
    assert recs, "no sample records"
    return [k for r in recs for k in r["keys"]], recs


def check_exact_epochs(keys: list[str], recs: list[dict[str, Any]], spec: str, kind: str, seed: int,
                       usable=None) -> int:
    """The recorded keys are the global order's prefix: epoch 0's order in full (every usable
    sample once), then epoch 1's order, ..., tiled by the takes without a gap or an overlap.
    Returns the epoch length."""
    index = build_index(spec, kind, **({"usable": usable} if usable else {}))
    order = EpochOrder(len(index), seed)
    want: list[str] = []
    e = 0
    while len(want) < len(keys):
        want += [index.keys[i] for i in order(e)]
        e += 1
    n = order.length
    for e in range(0, len(keys), n):  # every epoch: each sample at most once, all of them if complete
        block = keys[e: e + n]
        assert len(set(block)) == len(block), f"a sample was seen twice within epoch {e // n}"
        if len(block) == n:
            assert sorted(block) == sorted(index.keys), f"epoch {e // n} missed samples"
    assert keys == want[: len(keys)], _first_difference(keys, want)
    # No gap, no overlap: take starts are consecutive multiples in the absolute stream.
    pos = 0
    for r in recs:
        assert r["absolute"] == r["epoch"] * n + r["offset"], r
        start = r["absolute"] + r["rank"] * len(r["keys"])
        assert start == pos, f"take at absolute {start}, expected {pos}: {r}"
        pos += len(r["keys"])
    return n


def _first_difference(got: list[str], want: list[str]) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"stream position {i}: trained on {a!r}, the global order has {b!r}"
    return f"{len(got)} keys trained, {len(want)} expected"


__all__ = ["PYTHON", "RECORD_ENV", "REPO", "TRAIN", "Proc", "base_env", "check_exact_epochs",
           "kill_node", "start_nodes", "start_ranks", "stream_keys", "takes", "wait_all"]
