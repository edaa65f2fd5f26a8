"""Images/s of llmclip's loader vs the usual WebDataset + open_clip recipe: same shards, same output.

Both pipelines read the same shards of grayscale 1024 px JPEGs (phantoms rendered from real Open-I
reports), with the same DataLoader workers, batch size and output side, and hand the main process
the tensor the stage-2 trainer feeds its vision tower: float32 ``[batch, 3, size, size]``, the
grayscale replicated to 3 channels, scaled to [0, 1] and normalised with the trainer's default
``VisionConfig`` mean/std (0.5). Each side also decodes every sample's ``.json``.

- llmclip: ``make_loader(kind="image", channels=3, shuffle=False)`` -- explicit decoders; each
  JPEG is decoded with PIL draft mode straight to luma ("L") at 1/4 scale (DCT scaling: 1024 ->
  256 px), then one bicubic resize (shorter side) + centre crop to ``size``; the uint8 batch is
  replicated to 3 channels in the worker. In the main process: ``x.float() / 255``, then
  ``(x - mean) / std`` -- exactly ``CLIPModel.preprocess`` for an image already at the model size.
- peer: ``wds.WebDataset(urls).decode(wds.imagehandler("pill"), json).to_tuple(key, jpg, json)``
  -- a full-size decode, also to luma ("L"; the peer decodes one channel like llmclip, which is
  cheaper for it than webdataset's "pilrgb"), then open_clip's own eval transform
  ``open_clip.transform.image_transform(size, is_train=False, mean, std)`` (torchvision
  ``Resize(size, bicubic)``, ``CenterCrop``, ``convert("RGB")``, ``ToTensor``, ``Normalize``) per
  sample in the workers, then ``.batched(batch)`` (stacks the float32 tensors). webdataset's
  default post-handlers (which unpickle) are left out; these shards hold nothing they would touch.

The outputs are compared before timing, sample by sample (same keys): same shape and dtype, equal
channels, and pixel values within 4/255 on average. They are not bit-identical, and legitimately
so: llmclip's 1/4-scale reduction happens in the JPEG's DCT domain (libjpeg's scaled IDCT) and
its bicubic resize then goes 256 -> 224 px, while the peer decodes at full size and PIL's bicubic
filter does the whole 1024 -> 224 px reduction (an antialiasing kernel 4.6x wider). The printed
mean/max absolute difference (in 8-bit grey levels) says how far apart they are.

Timing: ``--reps`` interleaved repetitions (rotating order, one untimed warm-up each), each a full
pass over the shards by a fresh DataLoader (worker start-up included on both sides). Headline: the
ratio of median seconds per pass (= ratio of median images/s), with the per-repetition spread.

    python benchmarks/loader.py [--n 256] [--workers 2] [--batch 32] [--size 224] [--reps 7]
                                [--threads 1] [--json out.json]

Ends with ``RATIO llmclip/peer images/s: ...`` against the target of 1.5x. Shards are built once
into ``--dir`` (default ``shards/bench-jpeg1024``) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from llmclip.clip.model import VisionConfig  # noqa: E402
from llmclip.data.build import build  # noqa: E402
from llmclip.data.build_options import BuildOptions  # noqa: E402
from llmclip.data.loader import make_loader  # noqa: E402
from llmclip.data.shards import resolve_shards  # noqa: E402

TARGET = 1.5
_VC = VisionConfig()  # the stage-2 trainer's default normalisation
MEAN_L, STD_L = tuple(_VC.mean), tuple(_VC.std)
MEAN = torch.tensor(MEAN_L).view(1, 3, 1, 1)
STD = torch.tensor(STD_L).view(1, 3, 1, 1)


def peer_transform(size: int):
    """open_clip's own eval transform with the trainer's mean/std (no fallback: the peer is named)."""
    try:
        from open_clip.transform import image_transform
    except ImportError:
        sys.exit("the peer needs open_clip: pip install open_clip_torch")
    return image_transform(size, is_train=False, mean=MEAN_L, std=STD_L)


def _json(key: str, data: bytes):
    return json.loads(data) if key == ".json" else None


def _same(x):
    return x


def peer_loader(urls: list[str], size: int, batch: int, workers: int) -> DataLoader:
    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode(wds.imagehandler("pill"), _json, post=[])
        .to_tuple("__key__", "jpg", "json")
        .map_tuple(_same, peer_transform(size), _same)
        .batched(batch)
    )
    return DataLoader(ds, batch_size=None, num_workers=workers)


def ours_loader(spec: str, size: int, batch: int, workers: int):
    return make_loader(
        spec, kind="image", batch_size=batch, image_size=size, num_workers=workers,
        shuffle=False, channels=3,
    )


def ours_pixels(images: torch.Tensor) -> torch.Tensor:
    """What ``CLIPModel.preprocess`` does to a uint8 batch already at the model's size."""
    return (images.float() / 255.0 - MEAN) / STD


def run_peer(urls: list[str], size: int, batch: int, workers: int) -> int:
    n = 0
    for _keys, images, _meta in peer_loader(urls, size, batch, workers):
        n += images.shape[0]
    return n


def run_ours(spec: str, size: int, batch: int, workers: int) -> int:
    n = 0
    for b in ours_loader(spec, size, batch, workers):
        x = ours_pixels(b["image"])
        n += x.shape[0]
    return n


def compare_outputs(spec: str, urls: list[str], size: int, batch: int) -> dict:
    """Both pipelines' tensors for the same samples (the first shard, in-process): must agree."""
    keys, peer_x, _ = next(iter(peer_loader(urls[:1], size, batch, 0)))
    b = next(iter(ours_loader(spec, size, batch, 0)))
    ours = dict(zip(b["key"], ours_pixels(b["image"]), strict=True))
    common = [i for i, k in enumerate(keys) if k in ours]
    if not common:
        sys.exit("output check: the two pipelines share no sample key in their first batch")
    p = peer_x[common]
    o = torch.stack([ours[keys[i]] for i in common])
    if p.shape != o.shape or p.dtype != o.dtype:
        sys.exit(f"output check: peer {tuple(p.shape)} {p.dtype} vs llmclip {tuple(o.shape)} {o.dtype}")
    levels = (p - o).abs() * STD * 255  # normalised units -> 8-bit grey levels
    res = {
        "samples": len(common),
        "shape": list(o.shape[1:]),
        "dtype": str(o.dtype),
        "mean_abs_diff_levels": float(levels.mean()),
        "p99_abs_diff_levels": float(levels.flatten().quantile(0.99)),
        "max_abs_diff_levels": float(levels.max()),
        "channels_equal": bool((o[:, :1] == o).all() and (p[:, :1] == p).all()),
    }
    if not res["channels_equal"] or res["mean_abs_diff_levels"] > 4.0:
        sys.exit(f"output check failed: {res}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="shards/bench-jpeg1024")
    ap.add_argument("--n", type=int, default=256, help="images (Open-I reports) in the shards")
    ap.add_argument("--src-size", type=int, default=1024, help="side of the JPEGs in the shards")
    ap.add_argument("--size", type=int, default=224, help="output side")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    ap.add_argument("--reps", type=int, default=7, help="interleaved timed repetitions")
    ap.add_argument("--threads", type=int, default=1, help=C.THREADS_HELP)
    ap.add_argument("--json", help="write every repetition here")
    args = ap.parse_args()
    threads = C.set_threads(args.threads)

    out = Path(args.dir)
    t0 = time.time()
    m = build(
        BuildOptions(
            source="openi", out=str(out), images="render", maxcount=args.n, shard_size=32,
            image_size=args.src_size, image_format="jpg", workers=2, splits=(1.0, 0.0, 0.0),
        ),
        progress=True,
    )
    urls = [str(s.path) for s in resolve_shards(str(out), "image")]
    mb = sum(Path(u).stat().st_size for u in urls) / 2**20
    print(
        f"shards: {m['samples']} grayscale JPEGs {args.src_size}px in {len(urls)} shards "
        f"({mb:.0f} MiB), ready in {time.time() - t0:.0f}s; torch threads {threads}, "
        f"{args.workers} workers, batch {args.batch}, -> float32 [B, 3, {args.size}, {args.size}] "
        f"mean {MEAN_L[0]} std {STD_L[0]}"
    )

    check = compare_outputs(str(out), urls, args.size, args.batch)
    print(
        f"output check ({check['samples']} samples, same keys): both {check['dtype']} "
        f"{check['shape']}, channels equal; |peer - llmclip| in grey levels: mean "
        f"{check['mean_abs_diff_levels']:.2f}, p99 {check['p99_abs_diff_levels']:.1f}, "
        f"max {check['max_abs_diff_levels']:.1f} (DCT-domain 1/4 decode + 256->224 bicubic vs "
        f"full decode + 1024->224 bicubic)"
    )

    names = {
        "ours": "llmclip make_loader (draft 'L' decode) + preprocess",
        "peer": "webdataset decode('pill') + open_clip image_transform",
    }
    counts: dict[str, int] = {}

    def runner(key: str, fn, arg):
        def go() -> None:
            counts[key] = fn(arg, args.size, args.batch, args.workers)
            if counts[key] != m["samples"]:
                sys.exit(f"{names[key]} yielded {counts[key]} of {m['samples']} samples")
        return go

    times = C.interleaved(
        {"ours": runner("ours", run_ours, str(out)), "peer": runner("peer", run_peer, urls)},
        reps=args.reps,
    )
    n = m["samples"]
    rows = []
    for key in ("ours", "peer"):
        ts = times[key]
        ips = n / C.median(ts)
        rows.append([names[key], C.median(ts), ips, f"{100 * C.spread(ts):.0f}%",
                     1000 * max(1, args.workers) / ips])
    print()
    print(C.table(["pipeline", "s/pass (median)", "images/s", "spread", "ms/img/worker"], rows))
    r = C.ratio_of_medians(times["ours"], times["peer"])
    print(f"\n{args.src_size}px JPEG -> {args.size}px, {n} images/pass, {args.reps} interleaved reps; "
          f"spread = half the inter-quartile range of s/pass, relative")
    C.write_json(args.json, {
        "benchmark": "loader",
        "config": vars(args) | {"threads": threads, "samples": n, "shards": len(urls),
                                "mean": MEAN_L, "std": STD_L},
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": sys.version},
        "pipelines": names,
        "output_check": check,
        "seconds_per_pass": times,
        "images_per_s": {k: [n / t for t in ts] for k, ts in times.items()},
        "ratio": r.as_dict(),
        "target": TARGET,
    })
    print(C.verdict("llmclip/peer images/s", r, TARGET))


if __name__ == "__main__":
    main()
