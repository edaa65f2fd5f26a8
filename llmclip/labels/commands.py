"""``llmclip labels``: label shards, evaluate the labeler on Open-I, label one text.

    llmclip labels --shards DIR[:split,...]     # DIR/labels.jsonl (+ per-shard parts, resumable)
    llmclip labels eval --openi [--tgz PATH]    # per-class P/R/F1 vs people-assigned MeSH labels
    llmclip labels show "Small left pleural effusion."   # mentions, vector, graph, negation

``DIR/labels.jsonl`` has one line per sample, in shard order:
``{"key": ..., "shard": "train-000000", "labels": {class: 1|0|-1}, "graph": {...}}`` (graph as in
``ReportGraph.to_json``), and ``DIR/labels.meta.json`` names the labeler, the graph vocabulary
fingerprint and the counts (including bad samples, which are skipped and counted, never silent).
Each shard's part is written to ``DIR/labels/{shard}.jsonl`` (temp file + rename), so a killed run
resumes where it stopped; the merged file is replaced atomically at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from llmclip.config import ConfigError
from llmclip.data.safetar import MAX_JSON_BYTES, UnreadableTar, read_members, split_key

LABELS_FORMAT = "llmclip-labels/1"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def report_text(meta: dict) -> str:
    """The one clinical text of a shard sample (``llmclip.data.text``)."""
    from llmclip.data.text import sample_text

    return sample_text(meta)


def _samples(path: Path):
    """(key, meta or None) for every sample json of a text shard; None marks a bad sample."""
    for member in read_members(path, read=lambda name: name.lower().endswith(".json"),
                               max_bytes=MAX_JSON_BYTES):
        parts = split_key(member.name)
        if parts is None or parts[1] != "json":
            continue
        if member.oversized:
            yield parts[0], None
            continue
        try:
            meta = json.loads(member.data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            yield parts[0], None
            continue
        yield parts[0], meta if isinstance(meta, dict) else None


def label_shards(spec: str, graphs: bool = True, progress: bool = True) -> dict:
    """Label every text shard of ``spec``; writes DIR/labels.jsonl and DIR/labels.meta.json."""
    from tqdm import tqdm

    from llmclip.clinical.graph import GRAPH_VOCAB_SHA, ReportGraph
    from llmclip.clinical.labeler import Labeler
    from llmclip.data.shards import parse_spec, resolve_shards

    root, _splits = parse_spec(spec)
    shards = resolve_shards(spec, "text")
    labeler = Labeler()
    parts_dir = root / "labels"
    total = sum(s.count for s in shards)
    counts = {"samples": 0, "bad": 0, "resumed_shards": 0}
    bar = tqdm(total=total, desc="labels", unit="report", disable=not progress)
    for shard in shards:
        part = parts_dir / f"{shard.name}.jsonl"
        if part.is_file():
            with part.open(encoding="utf-8") as f:
                n = sum(1 for _ in f)
            try:
                done = json.loads(part.with_suffix(".done").read_text())
            except (OSError, ValueError):
                done = None  # missing or damaged marker: label the shard again
            if done and done.get("lines") == n:
                counts["samples"] += done["samples"]
                counts["bad"] += done["bad"]
                counts["resumed_shards"] += 1
                bar.update(shard.count)
                continue
        lines, bad = [], 0
        try:
            for key, meta in _samples(shard.path):
                bar.update(1)
                if meta is None:
                    bad += 1
                    continue
                text = report_text(meta)
                row = {"key": key, "shard": shard.name, "labels": labeler.label(text).vector}
                if graphs:
                    row["graph"] = json.loads(ReportGraph.from_report(text).to_json())
                lines.append(json.dumps(row, sort_keys=True, separators=(",", ":")))
        except UnreadableTar as e:
            raise ConfigError(f"unreadable shard {e}") from e
        _atomic_write(part, "".join(line + "\n" for line in lines))
        _atomic_write(
            part.with_suffix(".done"),
            json.dumps({"lines": len(lines), "samples": len(lines), "bad": bad}),
        )
        counts["samples"] += len(lines)
        counts["bad"] += bad
    bar.close()
    merged = "".join((parts_dir / f"{s.name}.jsonl").read_text(encoding="utf-8") for s in shards)
    _atomic_write(root / "labels.jsonl", merged)
    meta = {
        "format": LABELS_FORMAT,
        "labeler": "llmclip.clinical.Labeler (rule-based CheXpert)",
        "graph_vocab_sha": GRAPH_VOCAB_SHA if graphs else None,
        "shards": [s.name for s in shards],
        "samples": counts["samples"],
        "bad_samples": counts["bad"],
    }
    _atomic_write(root / "labels.meta.json", json.dumps(meta, indent=1))
    return meta | {"resumed_shards": counts["resumed_shards"]}


def _cmd_shards(args: argparse.Namespace) -> int:
    meta = label_shards(args.shards, graphs=not args.no_graph, progress=not args.quiet)
    print(
        f"labelled {meta['samples']} reports in {len(meta['shards'])} shards "
        f"({meta['bad_samples']} bad samples skipped, {meta['resumed_shards']} shards resumed) "
        f"-> {Path(args.shards.rpartition(':')[0] or args.shards) / 'labels.jsonl'}"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from llmclip.labels.evaluate import evaluate_openi
    from llmclip.labels.openi import read_openi

    if not args.openi:
        raise ConfigError("nothing to evaluate: pass --openi", key="labels eval")
    if args.tgz:
        tgz = Path(args.tgz)
    else:
        from llmclip.assets import openi_reports_tgz

        tgz = openi_reports_tgz()
    ev = evaluate_openi(read_openi(tgz), min_support=args.min_support)
    print(ev.table())
    if args.json:
        doc = {
            "n_reports": ev.n_reports,
            "min_support": ev.min_support,
            "macro_f1": ev.macro_f1,
            "classes": {
                s.name: {
                    "support": s.support,
                    "predicted": s.predicted,
                    "precision": s.precision,
                    "recall": s.recall,
                    "f1": s.f1,
                }
                for s in ev.scores
            },
        }
        _atomic_write(Path(args.json), json.dumps(doc, indent=1))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from llmclip.clinical.graph import ReportGraph
    from llmclip.clinical.labeler import Labeler
    from llmclip.clinical.negation import negate

    text = Path(args.file).read_text(encoding="utf-8") if args.file else (args.text or "")
    res = Labeler().label(text)
    for m in res.mentions:
        attrs = ", ".join(
            f"{k}={v}"
            for k, v in (
                ("laterality", m.laterality),
                ("severity", m.severity),
                ("size", m.measurement),
            )
            if v
        )
        print(f"{m.observation:27s} {m.status:9s} {text[m.span[0] : m.span[1]]!r} {attrs}")
    print("vector:", json.dumps(res.vector))
    print("graph:", ReportGraph.from_report(text).to_json())
    print("negated:", negate(text))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "labels",
        help="CheXpert labels and report graphs: label shards, evaluate on Open-I, show one text",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shards", help="shard spec DIR or DIR:split[,split]: writes DIR/labels.jsonl")
    p.add_argument("--no-graph", action="store_true", help="labels only, no report graphs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_dispatch)
    lsub = p.add_subparsers(dest="labels_command", metavar="SUBCOMMAND")
    e = lsub.add_parser("eval", help="per-class P/R/F1 against people-assigned Open-I MeSH labels")
    e.add_argument("--openi", action="store_true", help="evaluate on the Open-I reports")
    e.add_argument("--tgz", help="Open-I reports archive (default: the one in torchxrayvision)")
    e.add_argument("--min-support", type=int, default=40, help="classes averaged in macro-F1")
    e.add_argument("--json", help="also write the scores to this JSON file")
    e.set_defaults(func=_cmd_eval)
    s = lsub.add_parser("show", help="label one report text and print mentions, vector, graph")
    s.add_argument("text", nargs="?", help="report text")
    s.add_argument("--file", help="read the report from this file")
    s.set_defaults(func=_cmd_show)


def _dispatch(args: argparse.Namespace) -> int:
    if args.shards:
        return _cmd_shards(args)
    raise ConfigError("pass --shards DIR, or a subcommand (eval, show)", key="labels")
