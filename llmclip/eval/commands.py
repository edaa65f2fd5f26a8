"""``llmclip eval``: evaluate a stage-2 model on held-out shards; ``llmclip eval text``: the
stage-1 encoder against its baselines (``llmclip.eval.text``).

    llmclip eval --model runs/stage2/demo --shards shards/openi:test [--cache DIR] [--encoder DIR]
                 [--out DIR] [--text-metrics eval_text.json]

Writes ``OUT/metrics.json`` (headline numbers at the top level, details below) and
``OUT/report.html``. Report embeddings come from the embedding cache when it holds the held-out
shards (the same rows stage 2 trained against); prompts, omitted-finding reports and anything not
cached are encoded online by the stage-1 encoder the model records (its fingerprint is checked).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from llmclip.config import ConfigError


def _report_embeddings(
    clip: Any, test: Any, texts: list[str], cache_dir: str | None, variant: str
) -> torch.Tensor | None:
    """Stage-1 embeddings of the held-out reports' ``variant`` column from the cache (None if absent)."""
    from llmclip.cache import EmbeddingCache
    from llmclip.clip.batching import cache_rows

    if not cache_dir:
        return None
    cache = EmbeddingCache(cache_dir)
    if cache.fingerprint != clip.meta.get("cache_fingerprint"):
        raise ConfigError(
            f"cache {cache_dir} was built by another encoder than the model's training cache",
            "cache",
        )
    if variant not in cache.variants or any(s not in cache.counts for s in set(test.shards)):
        return None
    rows = cache_rows(cache, test.shards, test.keys)
    return torch.from_numpy(rows[:, cache.variant_index(variant)])


def eligible_findings(synthetic: bool, classes: list[str]) -> list[str]:
    """Findings in the macro AUROC: what the phantom renderer draws for synthetic images, else all
    findings but No Finding."""
    if synthetic:
        from llmclip.data.phantom import canonical_observation

        return [c for c in classes if c != "No Finding" and canonical_observation(c) == c]
    return [c for c in classes if c != "No Finding"]


def evaluate(
    model: str,
    shards: str,
    out: str | Path,
    cache: str | None = None,
    encoder: str | None = None,
    text_metrics: str | None = None,
    batch_size: int = 64,
    num_workers: int = 1,
    min_positives: int = 10,
) -> dict[str, Any]:
    from llmclip.clinical import CHEXPERT_CLASSES, Labeler, negate
    from llmclip.clip.batching import report_text
    from llmclip.clip.inference import load
    from llmclip.data.shards import load_manifest, parse_spec
    from llmclip.eval import image_text as it
    from llmclip.eval.prompts import PROMPTS
    from llmclip.eval.report import write_report

    t0 = time.time()
    out = Path(out)
    clip = load(model, encoder=encoder)
    cache = cache or clip.meta.get("cache")
    if cache and not Path(cache).is_dir():
        cache = None
    root, _ = parse_spec(shards)
    synthetic = bool(load_manifest(root).get("synthetic_images", False))

    test = it.embed_test_set(clip, shards, batch_size=batch_size, num_workers=num_workers)
    texts = [report_text(m) for m in test.metas]

    def encode(strings: list[str]) -> torch.Tensor:
        return clip.encode_text(strings).cpu()

    # True reports: cached rows when available (exactly what training paired), else online.
    raw = _report_embeddings(clip, test, texts, cache, clip.meta.get("text_variant", "report"))
    txt = clip.encode_text_embeddings(raw).cpu() if raw is not None else encode(texts)

    # Negated and omitted variants (only where the variant text differs from the report).
    labeler = Labeler()
    neg_texts = [negate(t) for t in texts]
    neg_idx = [
        i
        for i, (a, b) in enumerate(zip(texts, neg_texts, strict=True))
        if it.normalise_report(a) != it.normalise_report(b)
    ]
    raw_neg = _report_embeddings(clip, test, texts, cache, "negated")
    if raw_neg is not None:
        neg_emb = (
            clip.encode_text_embeddings(raw_neg[neg_idx]).cpu()
            if neg_idx
            else torch.zeros(0, txt.shape[1])
        )
    else:
        neg_emb = (
            encode([neg_texts[i] for i in neg_idx]) if neg_idx else torch.zeros(0, txt.shape[1])
        )
    omitted = [it.omit_one_finding(t, labeler.label(t).mentions) for t in texts]
    om_idx = [i for i, o in enumerate(omitted) if o is not None]
    om_emb = encode([omitted[i] for i in om_idx]) if om_idx else torch.zeros(0, txt.shape[1])
    # CXR-Align style: the headline negation score is over images with a positive finding (their
    # negated report denies what the image shows); over every image it is reported beside it.
    abnormal = [
        any(v == 1 for c, v in (m.get("labels") or {}).items() if c != "No Finding")
        for m in test.metas
    ]
    neg_abn = [j for j, i in enumerate(neg_idx) if abnormal[i]]
    align = {
        "negated": it.preference(
            test.image[[neg_idx[j] for j in neg_abn]],
            txt[[neg_idx[j] for j in neg_abn]],
            neg_emb[neg_abn],
        ),
        "negated_all": it.preference(test.image[neg_idx], txt[neg_idx], neg_emb),
        "omitted": it.preference(test.image[om_idx], txt[om_idx], om_emb),
    }

    classes = [c for c in CHEXPERT_CLASSES if c in PROMPTS]
    classifier = it.prompt_classifier(encode, classes)
    zs = it.zero_shot(
        test.image, test.metas, classifier, eligible_findings(synthetic, classes), min_positives
    )
    ret = it.retrieval(test.image, txt, texts)

    metrics: dict[str, Any] = {
        "model": str(model),
        "shards": shards,
        "n_images": len(test.keys),
        "synthetic_images": synthetic,
        "zero_shot_macro_auroc": zs["macro_auroc"],
        "competition_accuracy": zs["competition"]["accuracy"],
        **{k: v for k, v in ret.items() if k.startswith(("i2t_r", "t2i_r"))},
        "negation_accuracy": align["negated"]["accuracy"],
        "omission_accuracy": align["omitted"]["accuracy"],
        "zero_shot": zs,
        "retrieval": ret,
        "align": align,
        "report_embeddings": "cache" if raw is not None else "online",
        "seconds": round(time.time() - t0, 1),
    }
    tm = None
    if text_metrics and Path(text_metrics).is_file():
        tm = json.loads(Path(text_metrics).read_text(encoding="utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, metrics, _examples(test, txt, texts), tm)
    tmp = out / f"metrics.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "metrics.json")  # last: its presence means the evaluation is complete
    return metrics


def _examples(test: Any, txt: torch.Tensor, texts: list[str]) -> list[dict[str, Any]]:
    index = {k: i for i, k in enumerate(test.keys)}
    out = []
    for key, image in list(test.thumbs.items())[:6]:
        i = index[key]
        sims = (test.image[i] @ txt.T).numpy()
        best, worst = int(sims.argmax()), int(sims.argmin())
        out.append(
            {
                "key": key,
                "image": image,
                "true": texts[i],
                "best": texts[best],
                "best_score": float(sims[best]),
                "worst": texts[worst],
                "worst_score": float(sims[worst]),
            }
        )
    return out


def _headline(m: dict[str, Any]) -> str:
    keys = (
        "zero_shot_macro_auroc",
        "i2t_r1",
        "i2t_r5",
        "t2i_r1",
        "t2i_r5",
        "negation_accuracy",
        "omission_accuracy",
    )
    return "\n".join(
        f"{k:24s} {m[k]:.3f}" if isinstance(m.get(k), float) else f"{k:24s} -" for k in keys
    )


def _cmd_eval(args: argparse.Namespace) -> int:
    if not args.model or not args.shards:
        raise ConfigError(
            "llmclip eval needs --model RUN and --shards SPEC (or the 'text' sub-command)", "model"
        )
    out = args.out or str(Path(args.model) / "eval")
    m = evaluate(
        args.model,
        args.shards,
        out,
        cache=args.cache,
        encoder=args.encoder,
        text_metrics=args.text_metrics,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        min_positives=args.min_positives,
    )
    print(_headline(m))
    print(f"wrote {Path(out) / 'metrics.json'} and {Path(out) / 'report.html'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from llmclip.eval import text as text_eval

    p = sub.add_parser(
        "eval",
        help="evaluate a stage-2 model (zero-shot, retrieval, negation) or, with "
        "'text', a stage-1 encoder",
    )
    p.add_argument("--model", default=None, help="stage-2 run folder (RUN or RUN/final)")
    p.add_argument(
        "--shards", default=None, help="held-out image shards SPEC, e.g. shards/openi:test"
    )
    p.add_argument(
        "--cache",
        default=None,
        help="embedding cache with the held-out reports (default: training cache)",
    )
    p.add_argument(
        "--encoder",
        default=None,
        help="stage-1 encoder folder (default: the one the model records)",
    )
    p.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    p.add_argument("--text-metrics", default=None, help="eval text JSON to include in report.html")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=1, help="image decoding workers")
    p.add_argument(
        "--min-positives",
        type=int,
        default=10,
        help="positive (and negative) images a finding needs to enter the macro AUROC",
    )
    p.set_defaults(func=_cmd_eval)
    inner = p.add_subparsers(dest="eval_command", metavar="{text}")
    t = inner.add_parser("text", help="stage-1 encoder vs baselines on held-out reports")
    text_eval.register_args(t)
    t.set_defaults(func=text_eval.run)
