"""``report.html``: the evaluation as one self-contained page (matplotlib PNGs embedded as base64).

Sections: headline table, zero-shot ROC curves and per-finding AUROC, retrieval recall curves,
the negation / omission test, the text-encoder table (when ``eval text`` results are given), and a
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
        "negation_accuracy_all",
        "omission_accuracy",
    ]
    parts.append(_table([[k, metrics.get(k)] for k in head_keys], ["metric", "value"]))
    parts.append("<h2>Zero-shot classification</h2>")
    rows = [
        [c, e["auroc"], e["positives"], e["negatives"], "yes" if e["in_macro"] else "no"]
        for c, e in zs["per_class"].items()
    ]
    parts.append(_table(rows, ["finding", "AUROC", "positives", "negatives", "in macro"]))
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
    parts.append("<h2>Negation / omission test (CXR-Align style)</h2>")
    parts.append(
        _table(
            [[k, v["accuracy"], v["n"], v.get("mean_margin")] for k, v in metrics["align"].items()],
            ["variant", "true report preferred", "images", "mean margin"],
        )
    )
    if text_metrics:
        rows = [
            [
                r.get("encoder"),
                r.get("error_discrimination"),
                r.get("findings_to_impression_r1"),
                r.get("abbreviation_r1"),
            ]
            for r in text_metrics.get("table", [])
        ]
        if rows:
            parts.append("<h2>Text encoder (eval text)</h2>")
            parts.append(
                _table(
                    rows,
                    [
                        "encoder",
                        "error discrimination",
                        "findings->impression R@1",
                        "abbreviation R@1",
                    ],
                )
            )
    if examples:
        parts.append("<h2>Examples</h2>")
        parts.append(f"<p><img src='{examples_figure(examples)}'></p>")
    parts.append("</body></html>")
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
