"""An endless, resumable stream of report samples for one rank, from text-only shards.

The samples come in the global data order of ``llmclip.data.order``: every report with text, a
permutation per epoch drawn from the seed alone, epochs chained; each call to ``take(n)`` (every rank
at the same time, the same ``n``) hands rank ``r`` of ``W`` the stream positions
``[p + r*n, p + (r+1)*n)`` and moves the shared position ``p`` on by ``W*n``. That position is what a
checkpoint stores: a run resumed on any number of ranks continues from the exact sample, so it sees
exactly the samples an uninterrupted run would have seen, without replaying pair building.
"""

from __future__ import annotations

from typing import Any

from llmclip.data.order import RankStream, SampleIndex, build_index
from llmclip.distributed import dist_env
from llmclip.text.pairs import report_text


def report_index(spec: str) -> SampleIndex:
    """The index of the text shards ``spec``: every sample whose report has text (stage 1 reads
    the one clinical text, ``report_text``; reports without one are left out and counted)."""
    return build_index(spec, "text", usable=lambda meta: bool(report_text(meta)))


class ReportStream:
    """Report samples (sample json dicts) for this rank; ``position()`` is the resumable position."""

    def __init__(self, spec: str, seed: int, num_workers: int = 0, *, index: SampleIndex | None = None,
                 rank: int | None = None, world_size: int | None = None):
        env = dist_env()
        self.spec = spec
        self.index = index if index is not None else report_index(spec)
        self._stream = RankStream(self.index, seed=seed, n=1,
                                  rank=env.rank if rank is None else rank,
                                  world_size=env.world_size if world_size is None else world_size,
                                  num_workers=num_workers)

    @property
    def epoch(self) -> int:
        return self._stream.epoch

    @property
    def samples(self) -> int:
        """Samples taken by all ranks together since the first epoch began."""
        return self._stream.absolute

    @property
    def dropped(self) -> int:
        """Samples left out of the order (no report text, unreadable) or replaced when unreadable."""
        return sum(self.index.skipped.values()) + sum(self._stream.unreadable.values())

    def take(self, n: int) -> list[dict[str, Any]]:
        """This rank's next ``n`` samples (every rank calls with the same ``n`` at the same time)."""
        return [s["meta"] for s in self._stream.take(n)]

    def position(self) -> dict[str, Any]:
        """What a checkpoint stores (the same on every rank)."""
        return self._stream.position()

    def restore(self, saved: Any) -> None:
        """Continue from a checkpoint's ``position()``, taken on any number of ranks."""
        self._stream.restore(saved)
