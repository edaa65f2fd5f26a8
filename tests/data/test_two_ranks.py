"""Two real processes (torch.distributed, gloo) x two DataLoader workers read an epoch exactly once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from llmclip.data.shards import read_tar, resolve_shards

REPO = Path(__file__).resolve().parents[2]

RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from llmclip.data.loader import make_loader

dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment
spec, out = sys.argv[1], sys.argv[2]
world = dist.get_world_size()
loader = make_loader(spec, kind="image", batch_size=8, image_size=32, num_workers=2, seed=5, epoch=1)
keys = [k for b in loader for k in b["key"]]
every = [None] * world
dist.all_gather_object(every, keys)
res = make_loader(spec, kind="text", batch_size=8, num_workers=2, resampled=True, epoch_samples=30)
batches = [None] * world
dist.all_gather_object(batches, sum(1 for _ in res))
if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump({"keys": every, "batches": batches, "skipped": dict(loader.skipped)}, f)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_two_workers_read_each_sample_once(openi_shards, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "keys.json"
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(openi_shards), str(out)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for p in procs:
        log = p.communicate(timeout=300)[0].decode()
        assert p.returncode == 0, log
    res = json.loads(out.read_text())
    expected = [k for s in resolve_shards(str(openi_shards), "image") for k, _ in read_tar(s.path)]
    rank0, rank1 = res["keys"]
    assert rank0 and rank1 and not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(expected)  # every sample exactly once
    assert res["skipped"] == {}
    assert res["batches"] == [4, 4]  # resampled epoch of 30 samples: same batch count on both ranks
