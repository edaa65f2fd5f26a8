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

import numpy as np
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


def _cache_holds(cache_dir: str, test: Any) -> bool:
    """Whether the cache has rows for every held-out sample (shard names alone can coincide:
    every dataset's shards are called test-000000, ...)."""
    from llmclip.cache import EmbeddingCache

    cache = EmbeddingCache(cache_dir)
    if any(s not in cache.counts for s in set(test.shards)):
        return False
    held = {s: set(cache.keys(s)) for s in set(test.shards)}
    return all(k in held[s] for s, k in zip(test.shards, test.keys, strict=True))


def eligible_findings(synthetic: bool, classes: list[str]) -> list[str]:
    """Findings in the macro AUROC: what the phantom renderer draws for synthetic images, else all
    findings but No Finding."""
    if synthetic:
        from llmclip.data.phantom_spec import canonical_observation

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
    probe_shards: str | None = None,
) -> dict[str, Any]:
    from llmclip.api import load_model
    from llmclip.clinical import CHEXPERT_CLASSES
    from llmclip.clip.batching import report_text
    from llmclip.data.shards import load_manifest, parse_spec
    from llmclip.eval import image_text as it
    from llmclip.eval.align import cxr_align
    from llmclip.eval.probe import binary_zero_shot
    from llmclip.eval.prompts import PROMPTS
    from llmclip.eval.report import write_report

    t0 = time.time()
    out = Path(out)
    clip = load_model(model, encoder=encoder)
    given_cache = cache
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
    if cache and not given_cache and not _cache_holds(cache, test):
        cache = None  # the training cache, but other images (another dataset): encode online
    raw = _report_embeddings(clip, test, texts, cache, clip.meta.get("text_variant", "report"))
    txt = clip.encode_text_embeddings(raw).cpu() if raw is not None else encode(texts)

    # CXR-Align, both variant families (``llmclip.eval.align``): the seen family's negation uses the
    # cached column stage 2 trained against, everything else is encoded online.
    raw_neg = _report_embeddings(clip, test, texts, cache, "negated")
    seen_emb = {"negated": clip.encode_text_embeddings(raw_neg).cpu() if raw_neg is not None else None}
    align = cxr_align(test.image, texts, txt, encode, seen_emb)

    classes = [c for c in CHEXPERT_CLASSES if c in PROMPTS]
    classifier = it.prompt_classifier(encode, classes)
    zs = it.zero_shot(
        test.image, test.metas, classifier, eligible_findings(synthetic, classes), min_positives
    )
    ret = it.retrieval(test.image, txt, texts)
    binary = {
        cls: binary_zero_shot(
            test.image,
            it.label_targets(test.metas, cls),
            encode(PROMPTS[cls]["positive"]),
            encode(PROMPTS[cls]["negative"]),
        )
        for cls in BINARY_TASKS
        if cls in PROMPTS
    }
    probe = _linear_probe(clip, test, shards, probe_shards, eligible_findings(synthetic, classes),
                          batch_size, num_workers, min_positives)

    metrics: dict[str, Any] = {
        "model": str(model),
        "shards": shards,
        "n_images": len(test.keys),
        "synthetic_images": synthetic,
        "zero_shot_macro_auroc": zs["macro_auroc"],
        "competition_accuracy": zs["competition"]["accuracy"],
        **{k: v for k, v in ret.items() if k.startswith(("i2t_r", "t2i_r"))},
        # CXR-Align: the seen family's negation (what stage 2 trained on) and the held-out family.
        "negation_accuracy": align["seen"]["negated"]["accuracy"],
        **{f"seen_{k}_accuracy": align["seen"][k]["accuracy"] for k in ("laterality", "severity")},
        **{f"heldout_{k}_accuracy": v["accuracy"] for k, v in align["heldout"].items()},
        "binary_auroc": {c: v["value"] for c, v in binary.items()},
        "linear_probe_macro_auroc": probe.get("macro_auroc"),
        "ci": _intervals(zs, ret, align, binary, probe),
        "zero_shot": zs,
        "retrieval": ret,
        "align": align,
        "binary": binary,
        "linear_probe": probe,
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


# Paper B's binary zero-shot tasks (RSNA pneumonia, SIIM pneumothorax style): "X" vs "no X" prompts.
BINARY_TASKS = ("Pneumonia", "Pneumothorax")


def _linear_probe(
    clip: Any,
    test: Any,
    shards: str,
    probe_shards: str | None,
    classes: list[str],
    batch_size: int,
    num_workers: int,
    min_positives: int,
) -> dict[str, Any]:
    """Logistic regression per finding on frozen image features: train split -> the test images."""
    from llmclip.data.shards import parse_spec
    from llmclip.eval import image_text as it
    from llmclip.eval.probe import linear_probe

    if probe_shards == "none":
        return {"skipped": "--probe-shards none"}
    spec = probe_shards or f"{parse_spec(shards)[0]}:train"
    train = it.embed_test_set(clip, spec, batch_size=batch_size, num_workers=num_workers)
    y_train = np.stack([it.label_targets(train.metas, c) for c in classes], axis=1)
    y_test = np.stack([it.label_targets(test.metas, c) for c in classes], axis=1)
    out = linear_probe(train.image.numpy(), y_train, test.image.numpy(), y_test, classes,
                       min_positives=min_positives)
    return {**out, "train_shards": spec, "n_train": len(train.keys)}


def _intervals(zs: dict, ret: dict, align: dict, binary: dict, probe: dict) -> dict[str, Any]:
    """The 95% interval and n of every headline figure, in one place for the table and the README."""
    out: dict[str, Any] = {"zero_shot_macro_auroc": zs.get("macro_ci")}
    out["competition_accuracy"] = zs["competition"].get("ci")
    out |= {k: v for k, v in ret.get("ci", {}).items()}
    out["negation_accuracy"] = align["seen"]["negated"]
    for fam in ("seen", "heldout"):
        for k, v in align[fam].items():
            if k != "negated":
                out[f"{fam}_{k}_accuracy"] = v
    out |= {f"binary_auroc_{c}": v for c, v in binary.items()}
    out["linear_probe_macro_auroc"] = probe.get("macro_ci")
    return {k: {f: v.get(f) for f in ("value", "lo", "hi", "n")} if v else None
            for k, v in out.items()}


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
        "seen_laterality_accuracy",
        "heldout_negation_accuracy",
        "heldout_omission_accuracy",
        "heldout_laterality_accuracy",
        "heldout_severity_accuracy",
        "linear_probe_macro_auroc",
    )
    from llmclip.eval.stats import fmt_ci

    ci = m.get("ci") or {}
    return "\n".join(
        f"{k:28s} {fmt_ci(ci[k], pct=False, digits=3)}" if ci.get(k) else f"{k:28s} -"
        for k in keys
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
        probe_shards=args.probe_shards,
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
    p.add_argument(
        "--probe-shards",
        default=None,
        help="image shards the linear probe trains on (default: the train split beside --shards; "
        "'none' skips the probe)",
    )
    p.set_defaults(func=_cmd_eval)
    inner = p.add_subparsers(dest="eval_command", metavar="{text}")
    t = inner.add_parser("text", help="stage-1 encoder vs baselines on held-out reports")
    text_eval.register_args(t)
    t.set_defaults(func=text_eval.run)
