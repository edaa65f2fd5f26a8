"""One rank's stream of decoded samples (``ShardStream``): WebDataset stages, split by node and worker.

Per rank and DataLoader worker, for one epoch:

    shard list (shuffled by (seed, epoch), the same on every rank)
      -> split_by_node (rank r takes shards r, r+R, ...) -> split_by_worker (webdataset)
      -> open local shard files -> tar members -> samples grouped by key (webdataset)
      -> per-shard checks (duplicate keys, samples lost to a truncated tar)
      -> shuffle buffer seeded by (seed, epoch, rank, worker) -> decode -> epoch quota -> batches

With fewer shards than readers (ranks x workers) every reader reads all shards and keeps every
n-th sample instead, so small datasets still feed many ranks. ``resampled=True`` replaces the
split by shards drawn with replacement (seeded per rank and worker),
the usual way to give every rank the same number of batches on any shard count. ``epoch_samples``
fixes the samples per rank and epoch (in the non-resampled mode each worker cycles through its
shards until its quota is met), so all ranks step in lockstep.

Decoding is explicit: only ``json`` (strict UTF-8 JSON object) and ``png``/``jpg`` (PIL restricted
to that format) are ever looked at; every other member (``.pyd``, ``.pickle``, ``.pth``, ...) is
counted as ignored and dropped as bytes, so nothing is unpickled or executed. JPEGs are decoded at
reduced size with PIL's draft mode (DCT scaling 1/2..1/8), then resized (shorter side) and centre
cropped (``crop_resize``, the transform ``llmclip.load``'s ``preprocess`` shares). ``kind="text"``
reads the text shards, which carry no pixels at all.

Bad samples are skipped and counted per reason (never WebDataset's warn_and_continue, which sleeps),
passed from the workers alongside the batches, and reported when the epoch ends
(``loader.skipped``, ``loader.ignored``, a log line).
"""


from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from llmclip.data.images import decode_image
from llmclip.data.safetar import UnreadableTar, read_members
from llmclip.data.shards import IMAGE_EXTS, ShardInfo

log = logging.getLogger("llmclip.data")


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


class _Stats:
    """Counters of one worker; deltas travel to the main process with the next batch."""

    def __init__(self):
        self.skipped: Counter = Counter()
        self.ignored: Counter = Counter()
        self.raw = 0  # samples read from tars so far (lets a cycling worker see an empty pass)
        self.shard_errors = True  # False: another reader reads the same shards and counts them

    def take(self) -> dict[str, dict[str, int]]:
        out = {"skipped": dict(self.skipped), "ignored": dict(self.ignored)}
        self.skipped.clear()
        self.ignored.clear()
        return out


def _tar_error_handler(stats: _Stats, exn: Exception) -> bool:
    # Called by webdataset on errors while reading a tar; count, never sleep, keep going.
    if not stats.shard_errors:
        return True
    if isinstance(exn, UnreadableTar) or "unexpected end" in str(exn):
        stats.skipped["tar_error"] += 1
    elif isinstance(exn, ValueError) and "duplicate file name" in str(exn):
        stats.skipped["duplicate_member"] += 1
    else:
        stats.skipped[f"error_{type(exn).__name__}"] += 1
    return True


def _expand_tars(stats: _Stats, handler, src: Iterator[dict]) -> Iterator[dict]:
    """Members of each opened shard as ``{fname, data, __url__}`` and ``{}`` at each shard's end:
    webdataset's ``tar_file_expander`` (same end marker, errors to ``handler``), read through the
    safe reader (``llmclip.data.safetar``), so a member over ``MAX_MEMBER_BYTES`` is skipped unread."""
    for source in src:
        try:
            for m in read_members(source["stream"], label=source["url"]):
                if m.name.startswith("__") and m.name.endswith("__"):
                    continue
                if m.oversized:
                    stats.skipped["oversized_member"] += stats.shard_errors
                    continue
                yield {"fname": m.name, "data": m.data, "__url__": source["url"]}
            yield {}
        except Exception as exn:  # noqa: BLE001 - the handler counts it (truncated or corrupt tar)
            if not handler(exn):
                break


class ShardStream(IterableDataset):
    """One rank's stream of decoded samples, batched inside the DataLoader workers."""

    def __init__(
        self,
        shards: list[ShardInfo],
        *,
        kind: str,
        batch_size: int,
        image_size: int,
        channels: int,
        epoch: int,
        seed: int,
        shuffle: bool,
        shuffle_buffer: int,
        resampled: bool,
        epoch_samples: int | None,
        rank: int,
        world_size: int,
    ):
        super().__init__()
        self.shards, self.kind, self.batch_size = shards, kind, batch_size
        self.image_size, self.channels = image_size, channels
        self.epoch, self.seed, self.shuffle, self.shuffle_buffer = (
            epoch,
            seed,
            shuffle,
            shuffle_buffer,
        )
        self.resampled, self.epoch_samples = resampled, epoch_samples
        self.rank, self.world_size = rank, world_size
        self.expected = {str(s.path): s.count for s in shards}
        self.names = {str(s.path): s.name for s in shards}

    # -- stages -------------------------------------------------------------------------------

    def _urls(self) -> list[dict[str, str]]:
        urls = [str(s.path) for s in self.shards]
        if self.shuffle:
            random.Random(_seed(self.seed, self.epoch, "shards")).shuffle(urls)
        return [{"url": u} for u in urls]

    def split_by_node(self, src: Iterator[dict]) -> Iterator[dict]:
        """Rank r of R takes every R-th shard (the order is the same on all ranks)."""
        for i, item in enumerate(src):
            if i % self.world_size == self.rank:
                yield item

    def _sample_split(self, workers: int) -> bool:
        """Fewer shards than readers (ranks x workers): every reader reads every shard and keeps
        every n-th sample instead, so no reader is left without data (small datasets, many ranks)."""
        return not self.resampled and len(self.shards) < self.world_size * workers

    def _cycle(self, worker: int, workers: int, stats: _Stats) -> Iterator[dict]:
        """This reader's shards; with an epoch quota, again (reshuffled) until the quota is met."""
        shared = self._sample_split(workers)
        items = (
            self._urls()
            if shared
            else list(wds.split_by_worker(self.split_by_node(iter(self._urls()))))
        )
        if self.epoch_samples is None:
            yield from items
            return
        quota = self.worker_quota(worker, workers) or 0
        readers = self.world_size * workers if shared else 1
        rep, passes = 0, None
        while items and (passes is None or rep < passes):
            before = stats.raw
            if rep and self.shuffle:  # the same order on every reader when they share the shards
                who = ("all",) if shared else (self.rank, worker)
                random.Random(_seed(self.seed, self.epoch, *who, rep)).shuffle(items)
            yield from items
            rep += 1
            per_pass = (stats.raw - before) // readers
            if per_pass == 0:
                return  # the shards hold nothing readable: stop instead of spinning
            # passes needed if every sample were good, plus slack for bad ones; then stop for sure
            passes = passes or math.ceil(quota / per_pass) + 2

    def _take_share(self, reader: int, readers: int, src: Iterator[dict]) -> Iterator[dict]:
        for i, sample in enumerate(src):
            if i % readers == reader:
                yield sample

    @staticmethod
    def _open(src: Iterator[dict]) -> Iterator[dict]:
        # Local files only (paths come from a checked manifest): never webdataset's gopen, which
        # would run "pipe:" URLs as shell commands. "#n" numbers each reading of a shard, so a shard
        # read twice in a row (cycling, resampling) is still seen as two readings downstream.
        for n, item in enumerate(src):
            with open(item["url"], "rb") as f:
                yield {"url": f"{item['url']}#{n}", "stream": f}

    def _check_shards(self, stats: _Stats, src: Iterator[dict]) -> Iterator[dict]:
        """Drop duplicate keys within a shard; count samples a broken shard failed to deliver."""
        url, keys, n = None, set(), 0

        def close() -> None:
            path = url.rsplit("#", 1)[0] if url else None
            if path is not None and n < self.expected.get(path, n) and stats.shard_errors:
                stats.skipped["lost_in_broken_tar"] += self.expected[path] - n

        for sample in src:
            if sample["__url__"] != url:
                close()
                url, keys, n = sample["__url__"], set(), 0
            n += 1
            stats.raw += 1
            if sample["__key__"] in keys:
                stats.skipped["duplicate_key"] += stats.shard_errors
                continue
            keys.add(sample["__key__"])
            yield sample
        close()

    def _decode(self, stats: _Stats, src: Iterator[dict]) -> Iterator[dict]:
        for raw in src:
            key = raw["__key__"]
            if not key or "/" in key or "\\" in key:  # path-like names: not a key of the contract
                stats.skipped["bad_key"] += 1
                continue
            for ext in raw:
                if not ext.startswith("__") and ext != "json" and ext not in IMAGE_EXTS:
                    stats.ignored[ext] += 1  # .pyd/.pickle/.pth/...: bytes dropped, never decoded
            if "json" not in raw:
                stats.skipped["missing_json"] += 1
                continue
            try:
                meta = json.loads(raw["json"].decode("utf-8"))
            except UnicodeDecodeError:
                stats.skipped["bad_utf8"] += 1
                continue
            except ValueError:
                stats.skipped["bad_json"] += 1
                continue
            if not isinstance(meta, dict) or meta.get("key") != key:
                stats.skipped["bad_json"] += 1
                continue
            report = meta.get("report") if isinstance(meta.get("report"), dict) else {}
            if not (report.get("findings") or report.get("impression") or report.get("full")):
                stats.skipped["empty_report"] += 1
                continue
            sample = {
                "key": key,
                "meta": meta,
                "shard": self.names.get(raw["__url__"].rsplit("#", 1)[0], ""),
            }
            if self.kind == "image":
                ext = next((e for e in IMAGE_EXTS if e in raw), None)
                if ext is None:
                    stats.skipped["missing_image"] += 1
                    continue
                try:
                    sample["image"] = decode_image(raw[ext], ext, self.image_size)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                    stats.skipped["bad_image"] += 1
                    continue
            yield sample

    def _batches(self, stats: _Stats, src: Iterator[dict]) -> Iterator[dict]:
        buf: list[dict] = []
        for sample in src:
            buf.append(sample)
            if len(buf) == self.batch_size:
                yield self._collate(buf, stats)
                buf = []
        if buf:
            yield self._collate(buf, stats)
        yield {"_counts": stats.take(), "_end": True}  # counts of the tail, then nothing

    def _collate(self, samples: list[dict], stats: _Stats) -> dict[str, Any]:
        batch: dict[str, Any] = {k: [s[k] for s in samples] for k in ("key", "meta", "shard")}
        if self.kind == "image":
            img = torch.from_numpy(np.stack([s["image"] for s in samples]))[:, None]
            batch["image"] = img.expand(-1, self.channels, -1, -1).contiguous()
        batch["_counts"] = stats.take()
        return batch

    # -- the pipeline ---------------------------------------------------------------------------

    def worker_quota(self, worker: int, workers: int) -> int | None:
        if self.epoch_samples is None:
            return None
        return self.epoch_samples // workers + (worker < self.epoch_samples % workers)

    @staticmethod
    def _workers() -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = self._workers()
        stats = _Stats()
        handler = partial(_tar_error_handler, stats)
        if self.resampled:
            shards = wds.ResampledShards(
                [str(s.path) for s in self.shards],
                deterministic=True,
                worker_seed=lambda: _seed(self.seed, self.epoch, self.rank, worker),
            )
        else:
            shards = partial(self._cycle, worker, workers, stats)
        stages = [
            shards,
            self._open,
            partial(_expand_tars, stats, handler),
            partial(group_by_keys, handler=handler),
            partial(self._check_shards, stats),
        ]
        if self._sample_split(workers):
            reader = self.rank * workers + worker
            stats.shard_errors = reader == 0  # errors before the share are seen by every reader
            stages.append(partial(self._take_share, reader, self.world_size * workers))
        if self.shuffle:
            stages.append(
                wds.shuffle(
                    self.shuffle_buffer,
                    initial=min(self.shuffle_buffer, 100),
                    seed=_seed(self.seed, self.epoch, self.rank, worker, "samples"),
                )
            )
        stages.append(partial(self._decode, stats))
        quota = self.worker_quota(worker, workers)
        if quota is not None:
            stages.append(lambda src: (s for _, s in zip(range(quota), src)))  # noqa: B905
        stages.append(partial(self._batches, stats))
        yield from wds.DataPipeline(*stages)
