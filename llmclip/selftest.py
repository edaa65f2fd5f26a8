"""Cluster self-test: one short run of each stage on every rank of a job, and per-node speed.

    sbatch --nodes=2 slurm/selftest.sh [--out DIR] [--shards SPEC]      (SLURM, any node count)
    torchrun --nnodes N --node-rank I ... -m llmclip.selftest --out DIR  (what each node runs)

Every rank of the job runs, in one process, on the same process group:

1. data: ``--shards``, or a tiny shard folder built by rank 0 (Open-I reports shipped with
   torchxrayvision, rendered phantom films);
2. stage 1 (``configs/stage1/tiny.yaml``): one MNTP and one contrastive step, checkpoint, export;
3. the embedding cache of those shards with that encoder, each rank its share of the shards;
4. stage 2 (``configs/stage2/tiny.yaml``): one step, checkpoint, export;
5. an all-reduce of 16 MiB (CPU) / 256 MiB (GPU) across all ranks: the bus bandwidth the fabric gives.

Rank 0 then prints one line per node (host, ranks, seconds and samples/s of each part) and
``selftest: OK``. Any failure ends the job non-zero on every rank (a rank that cannot reach the
others fails within ``run.collective_timeout_s``). Stage times include start-up (model build,
DeepSpeed init, checkpoint, export): the numbers compare nodes with each other, they are not a
benchmark of the stages.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
STAGE1 = ROOT / "configs" / "stage1" / "tiny.yaml"
STAGE2 = ROOT / "configs" / "stage2" / "tiny.yaml"
TIMEOUT_S = 300  # run.collective_timeout_s of every part: a lost node ends the job in minutes
COLUMNS = ["stage1_s", "stage1_samples", "cache_s", "cache_reports", "stage2_s", "stage2_samples",
           "allreduce_s", "allreduce_bytes"]


def node_rank() -> int:
    """This process's node index: torchrun's GROUP_RANK, else SLURM's, else rank // ranks per node."""
    for var in ("GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return int(os.environ.get("RANK") or 0) // max(1, local)


def _load(config: Path, overrides: list[str]) -> tuple[Any, Any]:
    """(config, run function) through ``llmclip/train.py``'s own loader: read, typed, validated."""
    from llmclip.train import load

    return load(str(config), overrides)


def _train(stage: tuple[Any, Any]) -> None:
    cfg, run = stage
    rc = run(cfg)
    if rc not in (0, None):
        raise RuntimeError(f"stage {cfg.stage} ended with exit code {rc}")


def _data(out: Path, shards: str | None, env: Any) -> None:
    """The tiny shard folder ``OUT/shards`` (rank 0 builds it; the others wait)."""
    from llmclip.distributed import barrier

    if shards:
        return
    folder = out / "shards"
    if env.is_main and not (folder / "manifest.json").is_file():
        from llmclip.data.build import build
        from llmclip.data.build_options import BuildOptions

        build(BuildOptions(source="openi", out=str(folder), images="render", maxcount=96,
                           shard_size=8, image_size=64, workers=1), progress=False)
    barrier()


def _allreduce(device: torch.device) -> tuple[float, float]:
    """Seconds and bytes of 3 all-reduces of one large buffer (after one to warm up)."""
    import torch.distributed as dist

    n = (64 if device.type == "cuda" else 4) << 20  # float32 elements: 256 MiB / 16 MiB
    x = torch.ones(n, dtype=torch.float32, device=device)
    dist.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, 3.0 * x.numel() * x.element_size()


def run(out: Path, shards: str | None) -> dict[str, float]:
    """Every part on this rank; returns its measurements (``COLUMNS``)."""
    from llmclip.cache.build import BuildOptions, build_cache
    from llmclip.distributed import barrier, init_distributed

    spec = shards or str(out / "shards")
    common = [f"run.collective_timeout_s={TIMEOUT_S}", "run.resume=false", "run.save_every=0",
              "run.tensorboard=false", "optim.warmup_steps=0", f"data.shards={spec}:train"]
    s1 = out / "stage1"
    # Both recipes are checked before any work (a bad override fails at once, on every rank).
    stage1 = _load(STAGE1, [*common, f"run.out_dir={s1}", "optim.max_steps=2", "stage1.mntp_steps=1"])
    stage2 = _load(STAGE2, [*common, f"run.out_dir={out / 'stage2'}", f"data.cache={out / 'cache'}",
                            f"data.encoder={s1 / 'final'}", "data.num_workers=0", "optim.max_steps=1"])
    env = init_distributed(TIMEOUT_S)
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    _data(out, shards, env)
    res: dict[str, float] = {}

    t0 = time.perf_counter()
    _train(stage1)
    res["stage1_s"] = time.perf_counter() - t0
    res["stage1_samples"] = 2.0 * stage1[0].deepspeed.micro_batch_size  # 2 steps, this rank
    barrier()

    t0 = time.perf_counter()
    done = build_cache(BuildOptions(encoder=str(s1 / "final"), shards=spec, out=str(out / "cache"),
                                    overwrite=True, progress=False))
    barrier()  # the last rank to finish wrote meta.json
    res["cache_s"], res["cache_reports"] = time.perf_counter() - t0, float(done.reports)

    t0 = time.perf_counter()
    _train(stage2)
    res["stage2_s"] = time.perf_counter() - t0
    res["stage2_samples"] = float(stage2[0].deepspeed.micro_batch_size)  # 1 step, this rank
    barrier()
    res["allreduce_s"], res["allreduce_bytes"] = _allreduce(device)
    return res


def report(res: dict[str, float], world: int) -> list[str]:
    """One line per node from every rank's measurements (a collective; lines on rank 0 only)."""
    import torch.distributed as dist

    from llmclip.distributed import rank

    host = socket.gethostname().encode()[:64].ljust(64, b"\0")
    mine = torch.tensor([node_rank(), *[res[c] for c in COLUMNS], *host], dtype=torch.float64)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = [mine]
    if world > 1:
        rows = [torch.zeros_like(mine, device=device) for _ in range(world)]
        dist.all_gather(rows, mine.to(device))
    if rank() != 0:
        return []
    nodes: dict[int, list[torch.Tensor]] = {}
    for r in rows:
        nodes.setdefault(int(r[0]), []).append(r.cpu())
    k = len(COLUMNS)
    lines = [f"{'node':>4} {'host':<20} {'ranks':>5} {'stage1 s':>9} {'samples/s':>9} {'cache s':>8} "
             f"{'reports/s':>9} {'stage2 s':>9} {'samples/s':>9} {'allreduce GB/s':>14}"]
    for node, rs in sorted(nodes.items()):
        v = {c: [float(r[1 + i]) for r in rs] for i, c in enumerate(COLUMNS)}
        name = bytes(int(b) for b in rs[0][1 + k:]).rstrip(b"\0").decode(errors="replace")
        s1, c, s2 = max(v["stage1_s"]), max(v["cache_s"]), max(v["stage2_s"])
        # Bus bandwidth of a ring all-reduce: algorithm bandwidth x 2 (n - 1) / n.
        bus = (sum(v["allreduce_bytes"]) / sum(v["allreduce_s"])) * 2 * (world - 1) / max(world, 1)
        lines.append(f"{node:>4} {name[:20]:<20} {len(rs):>5} {s1:>9.1f} {sum(v['stage1_samples']) / s1:>9.2f} "
                     f"{c:>8.1f} {sum(v['cache_reports']) / c:>9.1f} {s2:>9.1f} "
                     f"{sum(v['stage2_samples']) / s2:>9.2f} {bus / 1e9:>14.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="llmclip cluster self-test (every rank of a job runs it)")
    job = os.environ.get("SLURM_JOB_ID", "local")
    p.add_argument("--out", default=str(ROOT / "runs" / f"selftest-{job}"),
                   help="work folder on a filesystem every node sees (default runs/selftest-JOBID)")
    p.add_argument("--shards", default=None,
                   help="shard folder (its train split) to use instead of a tiny built one")
    args = p.parse_args(argv)
    from llmclip.distributed import dist_env

    world = dist_env().world_size
    out = Path(args.out)
    try:
        res = run(out, args.shards)
        lines = report(res, world)
    except Exception as e:  # noqa: BLE001 - one line naming the part and the node, then exit 1
        print(f"selftest: FAILED on node {node_rank()} ({socket.gethostname()}) rank "
              f"{dist_env().rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    for line in lines:
        print(line, flush=True)
    if lines:
        print(f"selftest: OK ({world} ranks on {len(lines) - 1} nodes; work folder {out})", flush=True)
    return 0


if __name__ == "__main__":
    from llmclip.distributed import exit_process

    exit_process(main())
