"""The training data order: one global sample sequence per epoch, the same for any number of ranks,
and a data position that is a count of samples, so that a run checkpointed on W ranks resumes on
W' ranks (W' != W) from the exact sample.

The rule, for both training stages (``llmclip.text.stream`` for stage 1, the stage-2 trainer):

1. **Index** (``llmclip.data.sample_index``): every usable sample of the training shards, shard
   after shard in manifest order, each shard in tar order. Built from tar headers (each member's
   byte range) and each sample's json, read once: a strict UTF-8 JSON object whose ``key`` is the
   member key and whose report has text (``usable``); an image shard's sample also needs a png/jpg
   member. Path-like keys, links and devices, oversized and duplicate members are left out and
   counted, as by the loader. The same files give the same index on every rank and every node.
2. **Epoch order**: a permutation of the index drawn from ``(seed, epoch)`` alone, cut to
   ``epoch_samples`` when that is smaller. It depends on neither the rank nor the world size.
3. **Stream**: epoch 0's order, then epoch 1's, and so on. The **position** ``(epoch, offset)`` is
   how many samples all ranks together have taken from the stream (``offset < epoch length``).
4. **Take**: the ranks take one micro-batch of ``n`` samples each at the same time (lockstep): rank
   ``r`` of ``W`` gets the stream positions ``[p + r*n, p + (r+1)*n)``, and the position moves to
   ``p + W*n``. A take may run on into the next epoch.

So the position alone (not the world size that reached it) says which samples are done: resumed on
``W'`` ranks, rank ``r'`` takes ``[p + r'*n, p + (r'+1)*n)``, and the samples taken before the
checkpoint plus those taken after it are the stream itself, every sample exactly once per epoch,
however often the world size changed. The global micro-batch is ``W*n`` samples, so it changes with
the world size (it always did; lower ``deepspeed.grad_accum`` to keep the global batch).

Each rank reads only its own samples, by byte range (no rank reads another rank's images), in
DataLoader workers when ``num_workers > 0``. A sample that passed the index but then fails to read
(an image that does not decode, a file changed under the run) is replaced by the next readable sample
of the epoch order after it, counted and logged: every rank's micro-batch keeps its size.

``LLMCLIP_RECORD_SAMPLES=DIR`` (tests only, inert otherwise) makes every rank append one JSON line
per take it hands to the trainer to ``DIR/rank{R}.jsonl``: the take's position (epoch, offset and
``absolute`` = samples before it since epoch 0), rank, world size, sample keys and shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llmclip.config import ConfigError
from llmclip.data.sample_index import SampleIndex, build_index, check_meta, has_report, read_range
from llmclip.data.shards import IMAGE_EXTS

log = logging.getLogger("llmclip.data")

RECORD_ENV = "LLMCLIP_RECORD_SAMPLES"
__all__ = ["RECORD_ENV", "EpochOrder", "Position", "RankStream", "SampleIndex", "build_index",
           "has_report", "read_records"]


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


# ------------------------------------------------------------------------------------------ order
@dataclass(frozen=True)
class Position:
    """Samples taken by all ranks together: ``epoch`` full epochs plus ``offset`` of the next."""

    epoch: int = 0
    offset: int = 0

    def to_json(self, index: SampleIndex, epoch_len: int, world_size: int) -> dict[str, Any]:
        # world_size is informational: resuming needs the position only.
        return {"epoch": self.epoch, "offset": self.offset, "epoch_samples": epoch_len,
                "index": index.fingerprint, "world_size": world_size}


class EpochOrder:
    """Rule 2: the samples of each epoch, in order (the same on every rank)."""

    def __init__(self, n: int, seed: int, epoch_samples: int = 0):
        if n == 0:
            raise ConfigError("no usable samples in the training shards", "data.shards")
        if epoch_samples > n:
            raise ConfigError(f"{epoch_samples} is more than the {n} usable training samples",
                              "data.epoch_samples")
        self.n, self.seed = n, seed
        self.length = epoch_samples or n
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, epoch: int) -> np.ndarray:
        order = self._cache.get(epoch)
        if order is None:
            rng = np.random.Generator(np.random.PCG64(_seed(self.seed, epoch, "order")))
            order = rng.permutation(self.n)[: self.length]
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = order
        return order


class _Reader:
    """Reads samples of an index by byte range; keeps a few shard files open (per process)."""

    def __init__(self, index: SampleIndex, image_size: int, channels: int = 3):
        self.index, self.image_size, self.channels = index, image_size, channels
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn/forkserver get a copy without this process's files.
        return {**self.__dict__, "_files": {}, "_pid": -1}

    def _file(self, s: int) -> Any:
        if self._pid != os.getpid():  # a forked DataLoader worker must not share file offsets
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(s)
        if f is None:
            if len(self._files) >= 16:
                self._files.pop(next(iter(self._files))).close()
            f = self._files[s] = open(self.index.shards[s].path, "rb")  # noqa: SIM115
        return f

    def read(self, i: int) -> dict[str, Any]:
        """Sample ``i`` as the loader yields it; raises ``ValueError``/``OSError`` if unreadable."""
        from llmclip.data.images import decode_image

        idx = self.index
        f = self._file(int(idx.shard[i]))
        meta = check_meta(read_range(f, *idx.json[i]), idx.keys[i], lambda m: True)
        if isinstance(meta, str):
            raise ValueError(f"{meta} (changed since the index was built?)")
        sample = {"key": idx.keys[i], "meta": meta, "shard": idx.shards[idx.shard[i]].name}
        if idx.kind == "image":
            off, size, ext = (int(v) for v in idx.image[i])
            img = decode_image(read_range(f, off, size), IMAGE_EXTS[ext], self.image_size)
            sample["image"] = np.repeat(img[None], self.channels, axis=0)
        return sample


def _take(reader: _Reader, order: EpochOrder, start: int, n: int, stats: Counter) -> list[dict]:
    """Samples at absolute stream positions ``[start, start + n)`` (rule 4), each unreadable one
    replaced by the next readable sample of its epoch's order."""
    out = []
    for a in range(start, start + n):
        epoch, offset = divmod(a, order.length)
        seq = order(epoch)
        for tries in range(order.length):
            i = int(seq[(offset + tries) % order.length])
            try:
                out.append(reader.read(i))
                break
            except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three
                stats[f"unreadable {type(e).__name__}"] += 1
                if sum(stats.values()) in (1, 10, 100, 1000):
                    log.warning("sample %s of %s unreadable (%s); the next one stands in",
                                reader.index.keys[i], reader.index.shards[reader.index.shard[i]].path, e)
        else:
            raise ConfigError("no readable sample left in the training shards", "data.shards")
    return out


class _Takes(IterableDataset):
    """This rank's takes from absolute position ``first`` on (endless); DataLoader worker ``w`` of
    ``k`` makes takes ``w, w + k, ...``, which the DataLoader hands out in order."""

    def __init__(self, reader: _Reader, order: EpochOrder, first: int, n: int, rank: int, world: int):
        super().__init__()
        self.reader, self.order, self.first, self.n, self.rank, self.world = (
            reader, order, first, n, rank, world)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, k = (info.id, info.num_workers) if info else (0, 1)
        for j in itertools.count(w, k):
            stats: Counter = Counter()
            start = self.first + j * self.world * self.n + self.rank * self.n
            yield {"samples": _take(self.reader, self.order, start, self.n, stats), "stats": dict(stats)}


class RankStream:
    """This rank's takes of ``n`` samples, endless; ``position`` is the resumable data position.

    Every rank of the job must call ``next()`` the same number of times (lockstep); the position
    then is the same on every rank.
    """

    def __init__(self, index: SampleIndex, *, seed: int, n: int, rank: int, world_size: int,
                 image_size: int = 0, num_workers: int = 0, epoch_samples: int = 0):
        if n < 1:
            raise ConfigError("must be >= 1", "deepspeed.micro_batch_size")
        self.index, self.n, self.rank, self.world = index, n, rank, world_size
        self.num_workers = num_workers
        self.order = EpochOrder(len(index), seed, epoch_samples)
        self.reader = _Reader(index, image_size)
        self.absolute = 0  # samples taken by all ranks together since epoch 0 began
        self.unreadable: Counter = Counter()
        self._it: Iterator[dict[str, Any]] | None = None
        self._record = os.environ.get(RECORD_ENV)

    # -- position --------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.absolute // self.order.length

    def position(self) -> dict[str, Any]:
        """What a checkpoint stores (the same on every rank)."""
        pos = Position(*divmod(self.absolute, self.order.length))
        return pos.to_json(self.index, self.order.length, self.world)

    def restore(self, saved: Any) -> None:
        """Continue from a checkpoint's ``position()``, taken on any world size. A position counted
        over other samples (the shards or ``epoch_samples`` changed) cannot be mapped: the stream
        then starts the epoch after the saved one, with a warning."""
        self._it = None
        if not isinstance(saved, dict) or "offset" not in saved:
            log.warning("checkpoint without a global data position (older llmclip): the data order "
                        "restarts at epoch 0")
            self.absolute = 0
            return
        epoch, offset = int(saved["epoch"]), int(saved["offset"])
        same = (saved.get("index") == self.index.fingerprint
                and int(saved.get("epoch_samples", -1)) == self.order.length)
        if not same:
            log.warning("the training samples changed since the checkpoint (%s samples per epoch "
                        "then, %d now): the data order restarts at epoch %d",
                        saved.get("epoch_samples"), self.order.length, epoch + 1)
            self.absolute = (epoch + 1) * self.order.length
            return
        if not 0 <= offset < self.order.length:
            raise ConfigError(f"data position offset {offset} outside the epoch of "
                              f"{self.order.length} samples", "checkpoint")
        self.absolute = epoch * self.order.length + offset

    # -- takes -----------------------------------------------------------------------------------
    def _open(self) -> Iterator[dict[str, Any]]:
        ds = _Takes(self.reader, self.order, self.absolute, self.n, self.rank, self.world)
        if self.num_workers == 0:
            return iter(ds)
        return iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                               prefetch_factor=2, persistent_workers=False))

    def next(self) -> list[dict[str, Any]]:
        """This rank's next ``n`` samples (dicts: key, meta, shard, and image for image shards)."""
        if self._it is None:
            self._it = self._open()
        item = next(self._it)
        self.unreadable.update(item["stats"])
        if self._record:
            self._write_record(item["samples"])
        self.absolute += self.world * self.n
        return item["samples"]

    def take(self, n: int) -> list[dict[str, Any]]:
        """``next()`` with a take size of ``n`` (every rank passes the same ``n``)."""
        if n != self.n:
            self.n, self._it = n, None
        return self.next()

    def _write_record(self, samples: list[dict[str, Any]]) -> None:
        epoch, offset = divmod(self.absolute, self.order.length)
        rec = {"epoch": epoch, "offset": offset, "absolute": self.absolute, "rank": self.rank,
               "world": self.world, "keys": [s["key"] for s in samples],
               "shards": [s["shard"] for s in samples]}
        folder = Path(self._record)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank{self.rank}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self._it = None


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Every take recorded under ``LLMCLIP_RECORD_SAMPLES=folder`` (tests), in stream order."""
    recs = []
    for path in sorted(Path(folder).glob("rank*.jsonl")):
        recs += [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return sorted(recs, key=lambda r: (r["absolute"], r["rank"]))
