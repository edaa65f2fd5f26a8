"""``PreemptionHandler``: SIGUSR1 on any one rank makes every rank stop after the same step."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist
import torch.multiprocessing as mp

from llmclip.distributed import exit_process
from llmclip.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler


def test_signal_sets_the_flag_and_close_restores_the_old_handler() -> None:
    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        handler = PreemptionHandler()
        assert handler.requested() is False
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested() is True
        handler.close()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # what the launcher set
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert PREEMPTED_EXIT_CODE == 75  # slurm/launch.sh reads this number


def _rank(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    handler = PreemptionHandler()
    seen = []
    for step in range(4):
        if rank == 1 and step == 2:  # only rank 1 is told, in the middle of its step
            os.kill(os.getpid(), signal.SIGUSR1)
        seen.append(handler.requested())
    out[rank] = seen
    handler.close()
    exit_process(0)  # tears the group down and skips finalisation (llmclip.distributed)


def test_one_rank_signalled_stops_all_ranks_at_the_same_step() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        # fork: the children already have torch imported (spawn would re-import it, ~10 s each)
        mp.start_processes(_rank, args=(port, out), nprocs=2, join=True, start_method="fork")
        result = dict(out)
    assert result[0] == result[1] == [False, False, True, True]
