"""An endless, resumable per-rank stream of report samples from text-only shards.

The data loader (``llmclip.data.loader.make_loader(kind="text")``) splits shards by rank and worker
and shuffles per epoch from ``seed``; this stream chains its epochs forever, drops samples without
report text (counted), and counts every raw sample it pulls. That count *is* the data position: a
resumed run rebuilds the same epochs and skips the same number of raw samples, so it sees exactly
the samples the uninterrupted run would have seen, without replaying pair building.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from llmclip.config import ConfigError
from llmclip.text.pairs import report_text

log = logging.getLogger(__name__)


def _metas(batch: Any) -> list[dict[str, Any]]:
    """Sample metadata dicts from one loader batch (a dict of lists, or a list of sample dicts)."""
    if isinstance(batch, dict):
        metas = batch.get("meta")
        if metas is None:
            raise ValueError(f"text loader batch without 'meta': keys {sorted(batch)}")
        return list(metas)
    return [s["meta"] for s in batch]


class ReportStream:
    """Report samples for this rank, epoch after epoch; ``consumed`` is the resumable position."""

    def __init__(self, spec: str, seed: int, num_workers: int = 0, loader_batch: int = 64):
        self.spec = spec
        self.seed = seed
        self.num_workers = num_workers
        self.loader_batch = loader_batch
        self.consumed = 0
        """Raw samples pulled so far (kept and dropped)."""
        self.dropped = 0
        """Samples without report text, skipped."""
        self.epoch = 0
        self._it: Iterator[dict[str, Any]] = self._samples()

    def _samples(self) -> Iterator[dict[str, Any]]:
        from llmclip.data.loader import make_loader

        while True:
            loader = make_loader(self.spec, kind="text", batch_size=self.loader_batch, image_size=0,
                                 epoch=self.epoch, seed=self.seed, num_workers=self.num_workers,
                                 shuffle=True)
            n = 0
            for batch in loader:
                for meta in _metas(batch):
                    n += 1
                    yield meta
            if n == 0:
                raise ConfigError(f"no text samples reached this rank from {self.spec} in epoch "
                                  f"{self.epoch}; use at least as many text shards as ranks", "data.shards")
            self.epoch += 1

    def skip(self, raw: int) -> None:
        """Fast-forward to position ``raw`` (from a checkpoint) without building anything."""
        while self.consumed < raw:
            meta = next(self._it)
            self.consumed += 1
            if not report_text(meta):
                self.dropped += 1

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` samples that have report text."""
        out: list[dict[str, Any]] = []
        while len(out) < n:
            meta = next(self._it)
            self.consumed += 1
            if report_text(meta):
                out.append(meta)
            else:
                self.dropped += 1
                if self.dropped in (1, 10, 100, 1000):
                    log.warning("%d samples without report text skipped so far (%s)", self.dropped, self.spec)
        return out
