"""Labeler throughput on one core, on the real Open-I reports (findings + impression).

    python benchmarks/labeler.py [--repeat 3] [--graphs]

Prints reports/s for ``Labeler.label`` (target >= 2,000/s: 1.6M reports in < 15 min on one
core) and, as the named peer, the same lexicon run the plain way: one ``re`` alternation of every
phrase and cue scanned with ``finditer`` (what the labeler did before first-word dispatch). The
ratio is labeler / plain. Threads are pinned to one core where the OS allows it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        except OSError:
            pass


def _rate(fn, texts: list[str], repeat: int) -> float:
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for t in texts:
            fn(t)
        best = max(best, len(texts) / (time.perf_counter() - t0))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="best of N passes")
    ap.add_argument("--graphs", action="store_true", help="also time ReportGraph.from_report")
    args = ap.parse_args()
    _one_core()

    from llmclip.assets import openi_reports_tgz
    from llmclip.clinical import Labeler, ReportGraph
    from llmclip.clinical import labeler as lb
    from llmclip.clinical.openi import read_openi

    texts = [r.text for r in read_openi(openi_reports_tgz()) if r.text]
    labeler = Labeler()
    rate = _rate(labeler.label, texts, args.repeat)

    # Peer: the same phrases as one plain alternation each for mentions and cues.
    plain_mentions = re.compile(
        r"\b(?:" + "|".join(f"(?P<{n}>{rx})" for n, rx in lb._MENTION_ALTS) + ")"
    )
    plain_cues = re.compile(
        r"\b(?:"
        + "|".join(
            f"(?:{f})" for _k, fr in lb._CUE_ORDER for f in fr if f[0].isalpha() or f[0] == "("
        )
        + ")"
    )

    def plain(t: str) -> None:
        low = t.lower()
        list(plain_mentions.finditer(low))
        list(plain_cues.finditer(low))

    peer = _rate(plain, texts, max(1, args.repeat - 1))
    chars = sum(map(len, texts)) / len(texts)
    print(f"Open-I reports: {len(texts)} (mean {chars:.0f} chars), one core")
    print(f"Labeler.label              {rate:8.0f} reports/s  (target >= 2000)")
    print(f"plain-alternation scan     {peer:8.0f} reports/s  (regex passes only, no logic)")
    print(f"ratio labeler / plain      {rate / peer:8.2f}x")
    print(f"1.6M reports on one core   {1.6e6 / rate / 60:8.1f} min")
    if args.graphs:
        g = _rate(ReportGraph.from_report, texts, 1)
        print(f"ReportGraph.from_report    {g:8.0f} reports/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
