"""Reports/s of llmclip's labeler vs a negspacy (NegEx) pipeline, on the same real Open-I reports.

Every contender labels the same ``--n`` real Open-I reports (findings + impression, from the
archive the package ships, via ``_common.openi_texts``), in one process pinned to one core (no
contender uses more than one thread), in ``--reps`` interleaved repetitions (rotating order, one
untimed warm-up pass each). Headline: the ratio of median seconds per pass (= ratio of median
reports/s) of ``Labeler.label`` over the negspacy peer, with the per-repetition spread.

- llmclip: ``Labeler().label(text)`` per report -- sentence split, the lexicon's mention matcher
  (``WordStartMatcher``, first-word dispatch), cue matcher, per-mention status (negation,
  uncertainty, predicate forms), laterality / severity / size, CheXpert aggregation.
- peer (named, external): negspacy 1.1 (NegEx, Chapman et al. 2001, as a spaCy 3 component; ``pip
  install negspacy``; benchmark-only, not an llmclip dependency). ``spacy.blank("en")`` tokenizer +
  ``sentencizer`` + an entity component + ``negex`` with negspacy's ``en_clinical`` termset,
  run with ``nlp.pipe(texts, batch_size=256)``; then the same CheXpert aggregation (a mention is
  negative if NegEx negated it, else positive). negspacy has no radiology lexicon and needs
  entities from somewhere, so its entity component uses llmclip's own lexicon and mention matcher
  (the fastest one we have: the peer is not slowed by a weaker entity step); labels are the
  lexicon's observations. NegEx knows negation only (no uncertainty, no predicate forms such as
  "the heart is normal"), so it does less than the labeler; the agreement of the two CheXpert
  vectors is printed (not timed).
- secondary row, the project's earlier implementation: one plain ``re`` alternation of every
  mention phrase and one of every cue, scanned with ``finditer`` on the lower-cased report -- what
  the labeler's core did before first-word dispatch; regex passes only, no status logic.
- ``--graphs`` adds ``ReportGraph.from_report`` as a further row.

    python benchmarks/labeler.py [--n 1000] [--reps 7] [--graphs] [--json out.json]

Also prints the absolute target (``Labeler.label`` >= 2,000 reports/s on one core: 1.6M reports in
< 15 min). Ends with ``RATIO labeler/negspacy reports/s: ...`` against a target of 1.0x (at least
as fast as the peer that does less).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

TARGET = 1.0  # ratio vs the negspacy peer
ABS_TARGET = 2000.0  # reports/s on one core
PIP_PEER = "pip install negspacy"


def _one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        try:
            cpu = min(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpu})
            return f"pinned to cpu {cpu}"
        except OSError:
            pass
    return "not pinned (no sched_setaffinity)"


def negspacy_peer():
    """The negspacy pipeline and a function: list of reports -> list of CheXpert vectors."""
    try:
        import negspacy
        import spacy
        from negspacy.negation import Negex  # noqa: F401  (registers the "negex" factory)
        from negspacy.termsets import termset
        from spacy.language import Language
        from spacy.util import filter_spans
    except ImportError:
        sys.exit(f"the named peer is missing: {PIP_PEER}")
    from llmclip.clinical import labeler as lb
    from llmclip.clinical import patterns as pt
    from llmclip.clinical.fastre import lower_same_length

    @Language.component("llmclip_lexicon_ents")
    def lexicon_ents(doc):
        spans = []
        for m in pt.MENTIONS.finditer(lower_same_length(doc.text)):
            s = doc.char_span(*m.span(), label=m.lastgroup, alignment_mode="expand")
            if s is not None:
                spans.append(s)
        doc.ents = filter_spans(spans)
        return doc

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.add_pipe("llmclip_lexicon_ents")
    nlp.add_pipe("negex", config={"neg_termset": termset("en_clinical").get_patterns()})

    def vectors(texts: list[str]) -> list[dict[str, int]]:
        out = []
        for doc in nlp.pipe(texts, batch_size=256):
            mentions = []
            for e in doc.ents:
                status = "negative" if e._.negex else "positive"
                for o in pt._GROUPS[e.label_][0]:
                    st = lb._INVERT[status] if o == "No Finding" else status
                    mentions.append(SimpleNamespace(observation=o, status=st))
            out.append(lb.aggregate(mentions) if mentions else {})
        return out

    name = f"negspacy {negspacy.__version__} NegEx (spaCy {spacy.__version__}, en_clinical)"
    return vectors, name


def earlier_regex():
    """The project's earlier labeler core: one plain alternation each for mentions and cues."""
    from llmclip.clinical import patterns as pt

    mentions = re.compile(r"\b(?:" + "|".join(f"(?P<{n}>{rx})" for n, rx in pt._MENTION_ALTS) + ")")
    cues = re.compile(
        r"\b(?:"
        + "|".join(f"(?:{f})" for _k, fr in pt._CUE_ORDER for f in fr if f[0].isalpha() or f[0] == "(")
        + ")"
    )

    def scan(t: str) -> None:
        low = t.lower()
        list(mentions.finditer(low))
        list(cues.finditer(low))

    return scan


def agreement(ours: list[dict[str, int]], peer: list[dict[str, int]]) -> dict[str, float]:
    both = same = exact = 0
    for a, b in zip(ours, peer, strict=True):
        exact += a == b
        for c in a.keys() & b.keys():
            both += 1
            same += a[c] == b[c]
    return {"reports_identical": exact / max(1, len(ours)), "class_pairs": both,
            "class_agreement": same / max(1, both)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="Open-I reports per pass (cycled)")
    ap.add_argument("--reps", type=int, default=7, help="interleaved timed repetitions")
    ap.add_argument("--graphs", action="store_true", help="also time ReportGraph.from_report")
    ap.add_argument("--json", help="write every repetition here")
    args = ap.parse_args()
    pinned = _one_core()

    from llmclip.clinical import Labeler, ReportGraph

    texts = C.openi_texts(args.n)
    labeler = Labeler()
    peer_vectors, peer_name = negspacy_peer()
    scan = earlier_regex()

    names = {
        "ours": "llmclip Labeler.label",
        "peer": f"{peer_name} [peer]",
        "regex": "re alternation scan (llmclip's earlier core; regex passes only, no logic)",
    }
    runners = {
        "ours": lambda: [labeler.label(t) for t in texts],
        "peer": lambda: peer_vectors(texts),
        "regex": lambda: [scan(t) for t in texts],
    }
    if args.graphs:
        names["graphs"] = "llmclip ReportGraph.from_report"
        runners["graphs"] = lambda: [ReportGraph.from_report(t) for t in texts]

    agree = agreement([labeler.label(t).vector for t in texts], peer_vectors(texts))
    times = C.interleaved(runners, reps=args.reps)

    n = len(texts)
    chars = sum(map(len, texts)) / n
    print(f"Open-I reports: {n} per pass (mean {chars:.0f} chars), one process {pinned}, "
          f"{args.reps} interleaved reps")
    rows = []
    for k, label in names.items():
        ts = times[k]
        rows.append([label, n / C.median(ts), f"{100 * C.spread(ts):.0f}%",
                     C.median(times["peer"]) / C.median(ts)])
    print()
    print(C.table(["contender", "reports/s", "spread", "x negspacy"], rows))
    rate = n / C.median(times["ours"])
    met = "met" if rate >= ABS_TARGET else "NOT met"
    print(f"\nLabeler.label {rate:,.0f} reports/s [absolute target >= {ABS_TARGET:,.0f}: {met}]; "
          f"1.6M reports on one core: {1.6e6 / rate / 60:.1f} min")
    print(f"CheXpert vectors, labeler vs negspacy: {100 * agree['reports_identical']:.1f}% of "
          f"reports identical; {100 * agree['class_agreement']:.1f}% of the "
          f"{agree['class_pairs']} (report, class) pairs both label agree (NegEx has no "
          f"uncertainty and no predicate forms)")
    r_regex = C.ratio_of_medians(times["ours"], times["regex"])
    print(f"labeler / earlier regex scan: {r_regex}")
    r = C.ratio_of_medians(times["ours"], times["peer"])
    C.write_json(args.json, {
        "benchmark": "labeler",
        "config": vars(args) | {"reports": n, "mean_chars": chars, "pinned": pinned},
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": sys.version},
        "contenders": names,
        "seconds_per_pass": times,
        "reports_per_s": {k: [n / t for t in ts] for k, ts in times.items()},
        "agreement": agree,
        "ratio": r.as_dict(),
        "ratio_vs_earlier_regex": r_regex.as_dict(),
        "target": TARGET,
        "absolute_target": ABS_TARGET,
    })
    print(C.verdict("labeler/negspacy reports/s", r, TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
