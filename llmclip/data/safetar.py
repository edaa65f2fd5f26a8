"""The one way llmclip reads a tar file: shards, cache builds, labels, the Open-I archive, the index.

Every tar llmclip opens is untrusted input, so the reader enforces the same rules for all of them:

- Regular files only. Directories, symbolic and hard links, devices and FIFOs are passed over, so
  no member can point outside the archive or block a reader.
- Nothing is extracted to disk. A payload is read into memory, one member at a time, and only when
  the caller asks for it (``read``) and its declared size is at most ``max_bytes``; the size is
  checked from the header *before* reading, so a crafted header claiming gigabytes costs nothing.
- No member list is kept (``tar.members`` is emptied as it goes): a tar bomb of headers stays small.
- Payloads come back as bytes. Decoding is the caller's, with explicit decoders (strict UTF-8 JSON,
  PIL restricted to PNG/JPEG, defusedxml); nothing is unpickled or executed.
- Compression (gzip, bz2, xz) is detected from the data.
- A truncated or corrupt file raises ``UnreadableTar`` naming it, after every member read before the
  damage has been yielded, so callers can keep what was readable and count the rest.

Sample grouping follows WebDataset: a member ``dir/key.ext1.ext2`` belongs to sample ``dir/key``
with extension ``ext1.ext2`` (``split_key``).
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAX_MEMBER_BYTES = 256 << 20
"""Largest member any reader loads into memory (one image or one sample json)."""
MAX_JSON_BYTES = 16 << 20
"""Largest sample json the readers of reports alone (labels, cache builder) load: a real one is a few
KB, so anything this big is not a report."""


class UnreadableTar(ValueError):
    """A tar file that is truncated, corrupt or missing; the message names the file."""


@dataclass(frozen=True)
class Member:
    """One regular file of a tar, as the reader saw it."""

    name: str
    """Member path inside the archive (never used as a path on disk)."""
    size: int
    """Payload size declared by the header."""
    offset: int
    """Byte offset of the payload in the (uncompressed) archive: readers that only index a shard
    seek there later instead of reading now."""
    data: bytes | None
    """The payload, or None when it was not asked for or is over the size cap (``oversized``)."""
    oversized: bool
    """The header declares more than the reader's ``max_bytes``; the payload was not read."""


def split_key(name: str) -> tuple[str, str] | None:
    """``dir/openi-12-0.json`` -> (``dir/openi-12-0``, ``json``): WebDataset's key/extension rule
    (the key ends at the first dot of the base name); None for a name without one (or a dot file)."""
    head, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None
    key, ext = base.split(".", 1)
    return (f"{head}/{key}" if head else key), ext.lower()


def read_members(
    source: str | Path | BinaryIO,
    *,
    read: Callable[[str], bool] = lambda name: True,
    max_bytes: int = MAX_MEMBER_BYTES,
    label: str | None = None,
) -> Iterator[Member]:
    """Every regular file of a tar, in archive order (see the module docstring for the rules).

    ``source`` is a path (opened for random access, so unread payloads are skipped by seeking) or a
    binary stream (read sequentially, e.g. WebDataset's opened shard). ``read(name)`` says which
    payloads to load; ``label`` names the file in errors (default: the path)."""
    label = label or str(source)
    try:
        if isinstance(source, (str, Path)):
            tar = tarfile.open(source, mode="r:*")
        else:
            tar = tarfile.open(fileobj=source, mode="r|*")
        with tar:
            for info in tar:
                tar.members = []  # keep no member list
                if not info.isreg():
                    continue
                oversized = info.size > max_bytes
                data = None
                if not oversized and read(info.name):
                    f = tar.extractfile(info)
                    data = f.read() if f is not None else b""
                    if len(data) != info.size:
                        raise EOFError(f"member {info.name!r} ends early")
                yield Member(info.name, info.size, info.offset_data, data, oversized)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise UnreadableTar(f"{label}: {e}") from None
