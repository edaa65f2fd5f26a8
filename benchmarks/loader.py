"""Images/s of llmclip's loader vs the usual open_clip WebDataset recipe, on the same JPEG shards.

Both pipelines read the same shards of 1024 px JPEGs (phantoms rendered from real Open-I reports),
with the same DataLoader workers and batch size, and produce normalised float batches at 224 px:

- llmclip: ``make_loader`` (explicit decoders, PIL draft mode decodes the JPEG at 1/4 scale straight
  to luma, one bicubic resize+crop), then the uint8 batch is normalised (as a trainer does on device);
- peer: ``wds.WebDataset(...).decode("pilrgb")`` full-size decode, then open_clip's eval transform
  (Resize(224, bicubic), CenterCrop, RGB, ToTensor, Normalize); webdataset's default post-handlers
  (which unpickle) are left out, which does not change the work done on these shards.

    python benchmarks/loader.py [--n 256] [--workers 2] [--batch 32] [--size 224] [--rounds 2]

Prints a table and a final line ``ratio llmclip/peer: X.XXx``. Shards are built once into
``--dir`` (default ``shards/bench-jpeg1024``) and reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from llmclip.data.build import BuildOptions, build
from llmclip.data.loader import make_loader
from llmclip.data.shards import resolve_shards

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(
    1, 3, 1, 1
)  # open_clip (OpenAI) stats
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def peer_transform(size: int):
    """open_clip's eval transform (from open_clip when installed, else the same torchvision ops)."""
    try:
        from open_clip.transform import image_transform

        return image_transform(size, is_train=False), "open_clip.image_transform"
    except ImportError:
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(size),
                lambda im: im.convert("RGB"),
                T.ToTensor(),
                T.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist()),
            ]
        ), "torchvision (open_clip recipe)"


def _json(key: str, data: bytes):
    return json.loads(data) if key == ".json" else None


def run_peer(urls: list[str], size: int, batch: int, workers: int) -> int:
    tf, _ = peer_transform(size)
    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode(wds.imagehandler("pilrgb"), _json, post=[])
        .to_tuple("jpg", "json")
        .map_tuple(tf, lambda x: x)
        .batched(batch)
    )
    n = 0
    for images, _meta in DataLoader(ds, batch_size=None, num_workers=workers):
        n += images.shape[0]
    return n


def run_ours(spec: str, size: int, batch: int, workers: int) -> int:
    n = 0
    for b in make_loader(
        spec, kind="image", batch_size=batch, image_size=size, num_workers=workers, shuffle=False
    ):
        x = (b["image"].float() / 255 - MEAN) / STD  # what the peer's ToTensor+Normalize did
        n += x.shape[0]
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="shards/bench-jpeg1024")
    ap.add_argument("--n", type=int, default=256, help="images (Open-I reports) in the shards")
    ap.add_argument("--src-size", type=int, default=1024, help="side of the JPEGs in the shards")
    ap.add_argument("--size", type=int, default=224, help="output side")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--rounds", type=int, default=2, help="timed rounds per pipeline (best is kept)"
    )
    args = ap.parse_args()

    out = Path(args.dir)
    t0 = time.time()
    m = build(
        BuildOptions(
            source="openi",
            out=str(out),
            images="render",
            maxcount=args.n,
            shard_size=32,
            image_size=args.src_size,
            image_format="jpg",
            workers=2,
            splits=(1.0, 0.0, 0.0),
        ),
        progress=True,
    )
    urls = [str(s.path) for s in resolve_shards(str(out), "image")]
    mb = sum(Path(u).stat().st_size for u in urls) / 2**20
    print(
        f"shards: {m['samples']} JPEGs {args.src_size}px in {len(urls)} shards ({mb:.0f} MiB), "
        f"ready in {time.time() - t0:.0f}s; torch threads {torch.get_num_threads()}"
    )
    _, peer_name = peer_transform(args.size)

    results = {}
    for name, fn, arg in (
        ("llmclip make_loader (draft decode)", run_ours, str(out)),
        (f"webdataset decode('pilrgb') + {peer_name}", run_peer, urls),
    ):
        best = 0.0
        for _ in range(args.rounds):
            t = time.perf_counter()
            n = fn(arg, args.size, args.batch, args.workers)
            best = max(best, n / (time.perf_counter() - t))
        assert n == m["samples"], (name, n)
        results[name] = best

    print(f"\n{'pipeline':62s} {'images/s':>9s} {'ms/img/worker':>14s}")
    for name, ips in results.items():
        print(f"{name:62s} {ips:9.1f} {1000 * max(1, args.workers) / ips:14.1f}")
    ours, peer = results.values()
    print(f"\n{args.src_size}px JPEG -> {args.size}px, batch {args.batch}, {args.workers} workers")
    print(f"ratio llmclip/peer: {ours / peer:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
