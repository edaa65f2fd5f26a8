"""``llmclip shards build | verify | stats``."""

from __future__ import annotations

import argparse
import json
import os

from llmclip.config import ConfigError
from llmclip.data.sources import SOURCES


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"must look like 0.8,0.1,0.1, got {text!r}", "--splits") from None
    if len(parts) != 3:
        raise ConfigError(f"needs three fractions (train,val,test), got {text!r}", "--splits")
    return parts  # type: ignore[return-value]


def _build(args: argparse.Namespace) -> int:
    from llmclip.data.build import build
    from llmclip.data.build_options import BuildOptions

    opts = BuildOptions(
        source=args.source,
        out=args.out,
        root=args.root,
        images=args.images,
        maxcount=args.maxcount,
        shard_size=args.shard_size,
        image_size=args.image_size,
        image_format=args.image_format,
        max_side=args.max_side,
        splits=_fractions(args.splits),
        split_mode=args.split_mode,
        workers=args.workers,
    )
    m = build(opts, progress=not args.quiet)
    print(
        f"{args.out}: {m['samples']} samples of {m['records_read']} records "
        f"(train {m['splits']['train']}, val {m['splits']['val']}, test {m['splits']['test']}) "
        f"in {len(m['shards'])} shards; skipped {m['skipped'] or 'none'}; labels: {m['label_source']}"
        f"{'; images are synthetic (rendered)' if m['synthetic_images'] else ''}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from llmclip.data.shards import verify

    r = verify(args.dir)
    for p in r.problems:
        print(f"FAIL {p}")
    print(
        f"{args.dir}: {'OK' if r.ok else 'FAILED'} ({r.samples} samples checked, {len(r.problems)} problems)"
    )
    return 0 if r.ok else 1


def _stats(args: argparse.Namespace) -> int:
    from llmclip.data.shards import stats

    s = stats(args.dir)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(
        f"source {s['source']}  labels {s['label_source']}  synthetic images {s['synthetic_images']}"
    )
    classes = sorted({c for v in s["splits"].values() for c in v["positive"]})
    print(
        f"{'split':6s} {'samples':>8s} {'patients':>8s} {'shards':>6s} {'words(mean/med/p95)':>20s}"
    )
    for split, v in s["splits"].items():
        w = v["report_words"]
        print(
            f"{split:6s} {v['samples']:8d} {v['patients']:8d} {v['shards']:6d} "
            f"{w['mean']:>8} / {w['median']:>3} / {w['p95']:>4}"
        )
    print("label prevalence (positive%, uncertain%):")
    for c in classes:
        cells = "  ".join(
            f"{sp} {100 * v['positive'].get(c, 0):5.1f} {100 * v['uncertain'].get(c, 0):4.1f}"
            for sp, v in s["splits"].items()
        )
        print(f"  {c:28s} {cells}")
    if s["skipped"]:
        print(f"skipped at build: {s['skipped']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="build, verify and describe WebDataset shards")
    ssub = p.add_subparsers(dest="shards_command", metavar="ACTION")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    b = ssub.add_parser("build", help="turn a dataset into image+text shards with a patient split")
    b.add_argument("--source", required=True, help=f"one of: {', '.join(SOURCES)}")
    b.add_argument(
        "--root", default=None, help="dataset folder/file (openi, padchest: packaged copy)"
    )
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument(
        "--images",
        default=None,
        help="'render' (phantoms from the report) or an image folder; default: the source's own "
        "images, 'render' for openi, none (text-only shards) for padchest",
    )
    b.add_argument("--maxcount", type=int, default=None, help="read at most N source records")
    b.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    b.add_argument("--image-size", type=int, default=256, help="rendered image side (default 256)")
    b.add_argument(
        "--image-format", default="jpg", choices=["jpg", "png"], help="rendered image encoding"
    )
    b.add_argument(
        "--max-side", type=int, default=0, help="re-encode source images larger than this"
    )
    b.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test patient fractions")
    b.add_argument(
        "--split-mode",
        default="auto",
        choices=["auto", "hash"],
        help="auto: official split where the dataset has one; hash: always by patient hash",
    )
    b.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes"
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)

    v = ssub.add_parser("verify", help="check checksums, counts, key alignment of a shard folder")
    v.add_argument("dir")
    v.set_defaults(func=_verify)

    s = ssub.add_parser("stats", help="counts per split, label prevalence, report length")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_stats)

