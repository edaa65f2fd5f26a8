"""Streaming loader over shards: WebDataset stages, split by node and worker, safe explicit decoding.

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
import io
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from llmclip.config import ConfigError
from llmclip.data.safetar import UnreadableTar, read_members
from llmclip.data.shards import IMAGE_EXTS, ShardInfo, resolve_shards
from llmclip.distributed import dist_env

log = logging.getLogger("llmclip.data")


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def crop_resize(im: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size] grayscale: 16-bit scaled to 8 bit, shorter side to ``size``, centre crop.

    The one image transform of the project: training and ``llmclip eval`` reach it through
    ``decode_image``, ``llmclip.load``'s ``preprocess`` through ``pil_pixels``, so a model sees at
    inference exactly what it was trained on (a centre square, never a squashed whole film).
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNGs (PadChest): scale to 8 bit
        a = np.asarray(im, dtype=np.float32)
        im = Image.fromarray((a * (255.0 / max(float(a.max()), 1.0))).astype(np.uint8), "L")
    elif im.mode != "L":
        im = im.convert("L")
    w, h = im.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    im = im.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(im)


def decode_image(data: bytes, ext: str, size: int) -> np.ndarray:
    """uint8 [size, size] grayscale from encoded bytes: reduced-size JPEG decode, then ``crop_resize``."""
    im = Image.open(io.BytesIO(data), formats=["JPEG"] if ext == "jpg" else ["PNG"])
    if im.format == "JPEG":
        im.draft("L", (size, size))  # decode straight to luma at the smallest DCT scale >= size
    return crop_resize(im, size)


def pil_pixels(im: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size] grayscale from a PIL image, as the loader would make it from its file.

    A JPEG opened with ``Image.open`` and not loaded yet is decoded from its own bytes like a shard
    member (reduced-size DCT decode, ``decode_image``): the result then equals the training tensor
    bit for bit, and the caller's image object is left as it was. An image already in memory goes
    through ``crop_resize`` from its full resolution: on real films about a grey level from the
    reduced decode on average, more at sharp edges (the reduced decode rounds the film's size up
    to whole 8x8 blocks).
    """
    fp = getattr(im, "fp", None)
    if im.format == "JPEG" and getattr(im, "tile", None) and fp is not None:
        try:
            pos = fp.tell()
            fp.seek(0)
            data = fp.read()
            fp.seek(pos)
        except (OSError, ValueError, AttributeError):  # an unseekable stream: decode as it is
            data = b""
        if data[:2] == b"\xff\xd8":  # the stream starts with the JPEG itself
            return decode_image(data, "jpg", size)
    return crop_resize(im, size)


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
