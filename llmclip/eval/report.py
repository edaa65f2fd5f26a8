"""``report.html``: the evaluation as one self-contained page (matplotlib PNGs embedded as base64).

Sections: headline table, zero-shot ROC curves and per-finding AUROC, retrieval recall curves,
CXR-Align (seen and held-out variant families), the binary tasks and the linear probe, the text-encoder table (when ``eval text`` results are given), and a
grid of held-out images with their true report and the best- and worst-matching reports.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from llmclip.eval.stats import fmt_ci


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def roc_figure(
    curves: dict[str, tuple[list[float], list[float]]], per_class: dict[str, Any]
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for cls, (fpr, tpr) in curves.items():
        auc = per_class[cls]["auroc"]
        ax.plot(fpr, tpr, label=f"{cls} ({auc:.2f}, n+={per_class[cls]['positives']})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Zero-shot ROC per finding (held-out)")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def recall_figure(curves: dict[str, list[float]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curves["k"], curves["i2t"], label="image -> report")
    ax.plot(curves["k"], curves["t2i"], label="report -> image")
    ax.plot(curves["k"], curves["i2t_chance"], "k:", label="chance (image -> report)")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_ylim(0, 1.02)
    ax.set_title("Retrieval, identical reports merged")
    ax.legend(fontsize=8)
    return _png(fig)


def examples_figure(examples: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(examples)
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.6 * n), gridspec_kw={"width_ratios": [1, 3]})
    axes = np.atleast_2d(axes)
    for row, ex in zip(axes, examples, strict=True):
        row[0].imshow(ex["image"], cmap="gray")
        row[0].set_axis_off()
        row[0].set_title(ex["key"], fontsize=7)
        lines = [
            "TRUE: " + _short(ex["true"]),
            f"BEST ({ex['best_score']:.2f}): " + _short(ex["best"]),
            f"WORST ({ex['worst_score']:.2f}): " + _short(ex["worst"]),
        ]
        row[1].text(
            0, 0.5, "\n\n".join(lines), fontsize=7, va="center", wrap=True, family="monospace"
        )
        row[1].set_axis_off()
    fig.suptitle("Rendered (synthetic) held-out images and their reports", fontsize=9)
    return _png(fig)


def _short(text: str, width: int = 110, lines: int = 3) -> str:
    import textwrap

    wrapped = textwrap.wrap(" ".join(text.split()), width)
    return "\n      ".join(wrapped[:lines]) + (" ..." if len(wrapped) > lines else "")


def _interval(d: dict[str, Any] | None) -> str:
    if not d or d.get("lo") is None:
        return "-"
    return f"[{d['lo']:.3f}, {d['hi']:.3f}]"


def _table(rows: list[list[Any]], head: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape("-" if v is None else str(v))

    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>")
    return "".join(out) + "</table>"


def write_report(
    out: Path,
    metrics: dict[str, Any],
    examples: list[dict[str, Any]],
    text_metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``out/report.html`` from the metrics (and curves) the evaluation computed."""
    zs, ret = metrics["zero_shot"], metrics["retrieval"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>llmclip evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}th{background:#eee}</style></head><body>",
        "<h1>llmclip evaluation</h1>",
        f"<p>Model: <code>{html.escape(str(metrics['model']))}</code>; held-out shards: "
        f"<code>{html.escape(str(metrics['shards']))}</code>; {metrics['n_images']} images.",
    ]
    if metrics.get("synthetic_images"):
        parts.append(
            " Images are <b>rendered from the reports' findings</b> (synthetic), not clinical images: "
            "the numbers show that the pipeline learns, not that a model is fit for clinical use."
        )
    parts.append("</p><h2>Headline</h2>")
    head_keys = [
        "zero_shot_macro_auroc",
        "competition_accuracy",
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
        "negation_accuracy",
        "seen_laterality_accuracy",
        "seen_severity_accuracy",
        "heldout_negation_accuracy",
        "heldout_omission_accuracy",
        "heldout_laterality_accuracy",
        "heldout_severity_accuracy",
        "linear_probe_macro_auroc",
    ]
    ci = metrics.get("ci") or {}
    parts.append(
        _table(
            [[k, metrics.get(k), _interval(ci.get(k)), (ci.get(k) or {}).get("n")] for k in head_keys],
            ["metric", "value", "95% interval", "n"],
        )
    )
    parts.append("<h2>Zero-shot classification</h2>")
    rows = [
        [c, e["auroc"], _interval(e.get("ci")), e["positives"], e["negatives"],
         "yes" if e["in_macro"] else "no"]
        for c, e in zs["per_class"].items()
    ]
    parts.append(_table(rows, ["finding", "AUROC", "95% interval", "positives", "negatives", "in macro"]))
    binary = metrics.get("binary") or {}
    if binary:
        parts.append("<h3>Binary zero-shot tasks (\"X\" vs \"no X\" prompts, RSNA / SIIM style)</h3>")
        parts.append(_table([[c, v.get("value"), _interval(v), v.get("positives"), v.get("negatives")]
                             for c, v in binary.items()],
                            ["finding", "AUROC", "95% interval", "positives", "negatives"]))
    probe = metrics.get("linear_probe") or {}
    if probe.get("per_class"):
        parts.append(f"<h3>Linear probe (logistic regression on frozen image features, "
                     f"{html.escape(str(probe.get('train_shards')))} -> the evaluated images)</h3>")
        parts.append(_table([[c, v.get("auroc"), _interval(v), v.get("skipped") or ""]
                             for c, v in probe["per_class"].items()],
                            ["finding", "AUROC", "95% interval", "skipped"]))
    if zs["curves"]:
        curves = {c: v for c, v in zs["curves"].items() if zs["per_class"][c]["in_macro"]} or zs[
            "curves"
        ]
        parts.append(f"<p><img src='{roc_figure(curves, zs['per_class'])}'></p>")
    comp = zs["competition"]
    parts.append(
        f"<p>CheXpert 5x200-style multi-class accuracy: {comp['accuracy']} over {comp['n']} images "
        f"(per class: {html.escape(json.dumps(comp['counts']))}).</p>"
    )
    parts.append("<h2>Retrieval</h2>")
    parts.append(f"<p>{ret['n_images']} images, {ret['n_reports']} distinct reports.</p>")
    parts.append(f"<p><img src='{recall_figure(ret['curves'])}'></p>")
    parts.append("<h2>CXR-Align: true report vs one fact wrong</h2>")
    parts.append(
        "<p><i>seen</i>: the training generators' variants; <i>held-out</i>: generators training never "
        f"uses (dropped as unconfirmed by the Labeler: "
        f"{html.escape(json.dumps(metrics['align'].get('heldout_dropped', {})))}).</p>"
    )
    parts.append(
        _table(
            [[fam, k, v["accuracy"], _interval(v), v["n"], v.get("mean_margin")]
             for fam in ("seen", "heldout") for k, v in metrics["align"][fam].items()],
            ["family", "variant", "true report preferred", "95% interval", "images", "mean margin"],
        )
    )
    if text_metrics:
        from llmclip.eval.text import TABLE_COLUMNS

        rows = [
            [r.get("encoder")] + [fmt_ci((r.get("ci") or {}).get(k)) for k, _ in TABLE_COLUMNS]
            for r in text_metrics.get("table", [])
        ]
        if rows:
            parts.append("<h2>Text encoder (eval text, %, 95% intervals)</h2>")
            parts.append(_table(rows, ["encoder"] + [name for _, name in TABLE_COLUMNS]))
    if examples:
        parts.append("<h2>Examples</h2>")
        parts.append(f"<p><img src='{examples_figure(examples)}'></p>")
    parts.append("</body></html>")
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
