"""Rank and world size from any launcher, process-group setup, and the one all-gather with grad.

llmclip runs under the ``deepspeed`` launcher, ``torchrun`` or ``srun``; each sets a different set of
environment variables. Everything that needs "who am I" asks this module, so a 2-rank CPU run and a
64-GPU run take the same code path.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_int(*names: str, default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return default


def dist_env() -> DistEnv:
    """Rank/world/local rank: the live process group if any, else launcher env (torch/deepspeed, SLURM)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), _first_int("LOCAL_RANK", default=0))
    rank = _first_int("RANK", "SLURM_PROCID", default=0)
    world = _first_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _first_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return DistEnv(rank, world, local)


def init_distributed(timeout_s: int = 600) -> DistEnv:
    """Initialise the process group through DeepSpeed (gloo on CPU, NCCL on GPU) when launched multi-rank.

    The timeout bounds how long a surviving rank waits for a dead one in a collective.
    """
    env = dist_env()
    if env.world_size > 1 and not dist.is_initialized():
        import deepspeed

        timeout = datetime.timedelta(seconds=timeout_s)
        # DeepSpeed makes its data-parallel groups with torch's default timeout (30 min on gloo),
        # not this one: a rank hung while the others checkpoint would stall them for 30 min. Make
        # this timeout the default of every group created from now on.
        from torch.distributed import distributed_c10d

        for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
            if hasattr(distributed_c10d, name):
                setattr(distributed_c10d, name, timeout)
        deepspeed.init_distributed(timeout=timeout)
        env = dist_env()
        if not torch.cuda.is_available():
            atexit.register(remove_shm_buffers, os.environ.get("MASTER_ADDR", ""),
                            os.environ.get("MASTER_PORT", ""), env.local_rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    return env


def remove_shm_buffers(addr: str, port: str, local_rank: int) -> None:
    """Delete this rank's DeepSpeed CPU all-reduce buffer from /dev/shm at exit.

    DeepSpeed's shared-memory comm op (CPU hosts) creates one 66 MB file per rank, named by master
    address, port and local rank, and never removes it: every multi-rank CPU run left 130 MB of RAM
    behind (a day of tests had filled 12 GB and the machine swapped). Unlinking is safe once the
    rank is done: other ranks keep their mappings. A SIGKILLed rank still leaves its file.
    """
    if not addr or not port:
        return
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{local_rank}"):
        path.unlink(missing_ok=True)


def exit_process(rc: int) -> None:
    """End this process with exit code ``rc``; a rank of a process group skips the interpreter's
    finalisation.

    A rank tears its process group down while the interpreter is whole, runs the ``atexit``
    handlers, flushes and leaves with ``os._exit``. Why: with torch's gloo backend, about 1 in 40
    two-rank runs on this machine's torch aborted *after* every rank had finished, destroyed its
    group and returned (SIGABRT, "terminate called without an active exception", from threads torn
    down during finalisation); a job that did all its work must not exit non-zero, and under SLURM
    or torchrun that abort fails the job. A process without a process group exits normally.
    """
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(rc)
    try:
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - the work is done; say so, keep its exit code
        print(f"llmclip: process group teardown failed: {type(e).__name__}: {e}", file=sys.stderr)
    atexit._run_exitfuncs()  # what a normal exit runs first: shm cleanup, logging, tensorboard
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(rc)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients flowing back to each rank.

    This is the only cross-rank gather used by the contrastive losses (stage 1 and stage 2), so a
    2-rank loss equals the 1-rank loss on the concatenated batch. Every rank must pass the same shape.
    """
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: every rank's rows, in rank order. Backward: this rank's rows of the gradient summed
    over ranks, since each rank's loss reads every rank's rows (what a reduce-scatter gives; an
    all-reduce then a slice here, which gloo supports too, on tensors of embedding size)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[rank() * ctx.rows:(rank() + 1) * ctx.rows]


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (no gradient), e.g. label vectors for soft targets."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_max(n: int, device: torch.device | str = "cpu") -> int:
    """The largest ``n`` over all ranks (e.g. how many chunks every rank must run)."""
    if world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def free_port() -> int:
    """A free local TCP port for a rendezvous (a launcher's fixed default, e.g. 29500, may be taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
