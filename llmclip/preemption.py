"""Preemption on SLURM: stop every rank after the same step, checkpointed, and ask to be requeued.

slurm/launch.sh turns "time limit near" / "preempted" into SIGUSR1 on every rank; the trainer
checkpoints at the end of the current step and exits with ``PREEMPTED_EXIT_CODE``, and the batch
script requeues the job, which then resumes from ``latest``.
"""

from __future__ import annotations

from typing import Any

import torch

PREEMPTED_EXIT_CODE = 75
"""Exit status of a run that stopped on SIGUSR1 after a complete checkpoint (sysexits EX_TEMPFAIL:
"try again later"); slurm/launch.sh requeues the job on it."""


class PreemptionHandler:
    """Catches SIGUSR1 and tells every rank, at the same step boundary, to checkpoint and stop.

    Ranks get the signal at different moments, some in the middle of a collective, so the handler
    only records it; ``requested()`` (called by every rank once per optimizer step, at the same
    place) all-reduces the flag, so all ranks stop after the same step::

        preempt = PreemptionHandler()
        while step < max_steps:
            ...one optimizer step...
            if preempt.requested():
                save_checkpoint(out, step, engine, state)
                return PREEMPTED_EXIT_CODE
    """

    def __init__(self, signals: tuple[int, ...] | None = None):
        import signal
        import threading

        self.received = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for sig in signals if signals is not None else (signal.SIGUSR1,):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True

    def requested(self) -> bool:
        """True on every rank when any rank has received the signal (a collective call)."""
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received else 0.0])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
