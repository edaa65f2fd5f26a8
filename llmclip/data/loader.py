"""The shard loader of both stages: ``make_loader(spec, ...)`` -> batches for one rank.

The stream itself (shard order, split by node and worker, safe tar reading, shuffle buffer, decoding,
epoch quota) is ``llmclip.data.stream.ShardStream``; images go through ``llmclip.data.images``. This
module runs the stream in DataLoader workers, collects the per-worker counts of skipped samples and
ignored members, and reports them when the epoch ends (``loader.skipped``, ``loader.ignored``, a log
line).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

from torch.utils.data import DataLoader

from llmclip.config import ConfigError
from llmclip.data.shards import resolve_shards
from llmclip.data.stream import ShardStream
from llmclip.distributed import dist_env

log = logging.getLogger("llmclip.data")


class ShardLoader:
    """Iterable of dict batches for one rank; ``skipped``/``ignored`` hold the last epoch's counts."""

    def __init__(self, dataset: ShardStream, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers
        self.skipped: Counter = Counter()
        self.ignored: Counter = Counter()
        self.samples = 0

    def set_epoch(self, epoch: int) -> None:
        """Next iteration reads epoch ``epoch`` (its shard and sample order follow from (seed, epoch))."""
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank (known only with ``epoch_samples``)."""
        d = self.dataset
        if d.epoch_samples is None:
            raise TypeError("the number of batches is known only when epoch_samples is set")
        w = max(1, self.num_workers)
        return sum(math.ceil(d.worker_quota(i, w) / d.batch_size) for i in range(w))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped, self.ignored, self.samples = Counter(), Counter(), 0
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
        )
        for batch in loader:
            counts = batch.pop("_counts")
            self.skipped.update(counts["skipped"])
            self.ignored.update(counts["ignored"])
            if batch.pop("_end", False):
                continue
            self.samples += len(batch["key"])
            yield batch
        d = self.dataset
        msg = (
            f"rank {d.rank} epoch {d.epoch}: {self.samples} samples; skipped "
            f"{sum(self.skipped.values())} {dict(self.skipped) or ''}; ignored members {dict(self.ignored) or 'none'}"
        )
        (log.warning if self.skipped else log.info)(msg)


def make_loader(
    spec: str,
    *,
    kind: Literal["image", "text"],
    batch_size: int,
    image_size: int = 224,
    epoch: int = 0,
    seed: int = 0,
    num_workers: int = 2,
    shuffle: bool = True,
    resampled: bool = False,
    epoch_samples: int | None = None,
    channels: int = 3,
    shuffle_buffer: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
) -> ShardLoader:
    """A loader over the shards named by ``spec`` (``DIR``, ``DIR:train``, ``DIR:train,val``).

    Batches are dicts: ``key`` (list), ``meta`` (list of sample json), ``shard`` (list of shard names,
    for cache lookups) and, for ``kind="image"``, ``image`` (uint8 [B, channels, S, S]).
    Rank and world size come from the launcher unless given.
    """
    if batch_size < 1:
        raise ConfigError("must be >= 1", "batch_size")
    if kind == "image" and image_size < 8:
        raise ConfigError("must be >= 8", "image_size")
    if channels not in (1, 3):
        raise ConfigError("must be 1 or 3", "channels")
    if resampled and not epoch_samples:
        raise ConfigError(
            "resampled=True needs epoch_samples (a resampled stream has no end)", "epoch_samples"
        )
    if epoch_samples is not None and epoch_samples < 1:
        raise ConfigError("must be >= 1", "epoch_samples")
    shards = resolve_shards(spec, kind)
    env = dist_env()
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    readers = world_size * max(1, num_workers)
    if not resampled and len(shards) < readers:
        log.info(
            f"{spec}: {len(shards)} shards for {readers} readers (ranks x workers): every reader "
            "reads all shards and keeps its share of samples (more shards read faster)"
        )
    ds = ShardStream(
        shards,
        kind=kind,
        batch_size=batch_size,
        image_size=image_size,
        channels=channels,
        epoch=epoch,
        seed=seed,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        epoch_samples=epoch_samples,
        rank=rank,
        world_size=world_size,
    )
    return ShardLoader(ds, num_workers)
