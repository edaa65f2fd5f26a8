"""The evaluation family of report variants: generators that training never uses.

Training (stage-1 pairs, stage-2 hard negatives) draws on ``llmclip.clinical``: ``equivalent_rewrites``
(the training abbreviation lexicon, telegraphic style, shuffle, synonyms), ``one_error_edits``
(in-place cue flips, nearest-word side and severity swaps, the training device sentences and
neighbour map) and ``negate``. An evaluation built from those measures how well a model learned
the templates. This module is the held-out family, written apart from them:

- **styles** (meaning-preserving): ``enumerate`` numbers the sentences ("1. ... 2. ..."), as many
  real reports are written; ``abbreviate`` uses ``EVAL_ABBREVIATIONS``, a lexicon disjoint from the
  training one (short and long forms); each kept only where the ``Labeler`` sees the same facts.
- **edits** (one clinical error, confirmed by the ``Labeler``'s ``confirm_edit``): ``negation``
  rewrites the sentences of one finding as a template with cue words the training negation never
  writes ("X is not seen.", "Negative for X.", "X is absent.", "X is present."); ``laterality``
  mirrors left and right in every sentence that states one finding; ``severity`` regrades its
  severity word with a map unlike the training one; ``device`` adds a sentence from
  ``EVAL_DEVICE_SENTENCES``; ``finding`` substitutes a finding by ``EVAL_NEIGHBOURS``;
  ``omission`` (CXR-Align) removes every sentence, in every section, that mentions one finding.

Every held-out variant is carried by a held-out style: each wrong report is ``style(edit(report))``
and its true counterpart ``style(report)`` (image-text CXR-Align: they differ only in the fact) or
``style(abbreviate(report))`` (the text error test: reworded, like the seen family's rewrites), so no
training generator (which never numbers sentences nor uses this lexicon) can produce either string.
``tests/eval/test_heldout.py`` checks that over the Open-I test split. A variant the ``Labeler``
does not confirm is dropped and counted, never kept.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from llmclip.clinical import Labeler
from llmclip.clinical.edits import template_flip
from llmclip.clinical.facts import confirm_edit, summarise
from llmclip.clinical.patterns import _sentences

_LABELER = Labeler()

# (long, short): clinical short forms absent from the training lexicon (``lexicon.ABBREVIATIONS``).
EVAL_ABBREVIATIONS: list[tuple[str, str]] = [
    ("within normal limits", "WNL"),
    ("cardiomediastinal", "cardiomed."),
    ("silhouette", "silh."),
    ("pulmonary", "pulm."),
    ("vascularity", "vasc."),
    ("vasculature", "vasc."),
    ("mediastinal", "mediast."),
    ("mediastinum", "mediast."),
    ("examination", "exam"),
    ("radiographs", "films"),
    ("radiograph", "film"),
    ("previous", "prev."),
    ("compared", "cf."),
    ("history", "hx"),
    ("status post", "s/p"),
    ("postoperative", "post-op"),
    ("degenerative", "degen."),
    ("vertebral", "vert."),
    ("hemidiaphragms", "hemidiaphs"),
    ("hemidiaphragm", "hemidiaph."),
    ("diaphragm", "diaph."),
    ("increased", "incr."),
    ("decreased", "decr."),
    ("interval", "intvl"),
    ("patient", "pt"),
    ("calcified", "calc."),
    ("anterior", "ant."),
    ("posterior", "post."),
    ("superior", "sup."),
    ("inferior", "inf."),
    ("consistent with", "c/w"),
    ("unchanged", "unchgd"),
    ("stable", "stbl"),
    ("osseous", "oss."),
    ("structures", "structs"),
    ("soft tissues", "soft tiss."),
    ("abdomen", "abd."),
    ("tracheostomy", "trach"),
    ("sternotomy", "sternot."),
    ("atherosclerotic", "athero."),
    ("aortic", "Ao"),
    ("catheter", "cath."),
    ("projects", "proj."),
    ("visualized", "vis."),
    ("identified", "ID'd"),
    ("contours", "contrs"),
    ("contour", "contr"),
    ("cardiac", "card."),
    ("thoracic", "thor."),
    ("dextroscoliosis", "dextroscol."),
    ("granulomatous", "granulom."),
    ("lymph nodes", "LNs"),
    ("left ventricular", "LV"),
    ("upper abdominal", "upper abd."),
    ("paratracheal", "paratrach."),
    ("chest x-ray", "CXR"),
    ("chest radiograph", "CXR"),
]
_EVAL_ABBREV_RX = [
    (re.compile(rf"(?<![\w/.-]){re.escape(a)}(?![\w/-])", re.IGNORECASE), b)
    for a, b in EVAL_ABBREVIATIONS
]

# Negation templates: the whole sentence of the finding, with cues the training negation never writes.
_NEGATIVE_TEMPLATES = ("{T} is not seen.", "Negative for {t}.", "{T} is absent.")
_POSITIVE_TEMPLATES = ("{T} is present.",)
# Severity regrade: every source word maps elsewhere than the training ``_SEVERITY_SWAP`` does.
EVAL_SEVERITY = {
    "trace": "moderate",
    "tiny": "moderate",
    "small": "moderate",
    "minimal": "moderate",
    "mild": "moderate",
    "mildly": "moderately",
    "slight": "moderate",
    "slightly": "moderately",
    "moderate": "large",
    "moderately": "markedly",
    "large": "moderate",
    "massive": "moderate",
    "severe": "moderate",
    "severely": "moderately",
    "marked": "moderate",
    "markedly": "moderately",
    "borderline": "moderate",
}
_SEVERITY_RX = re.compile(r"\b(" + "|".join(EVAL_SEVERITY) + r")\b", re.IGNORECASE)
_SIDE_RX = re.compile(r"\b(left|right)\b", re.IGNORECASE)
EVAL_DEVICE_SENTENCES = [
    "A left-sided dual-chamber pacer is noted.",
    "Enteric tube is seen coursing into the stomach.",
    "Tracheostomy tube is in standard position.",
    "A left internal jugular venous catheter ends at the cavoatrial junction.",
]
# Finding substitution: each finding goes to another one than the training neighbour map sends it to.
EVAL_NEIGHBOURS = {
    "atelectasis": "edema",
    "consolidation": "pleural effusion",
    "pneumonia": "atelectasis",
    "edema": "consolidation",
    "pleural effusion": "consolidation",
    "effusion": "consolidation",
    "pneumothorax": "atelectasis",
    "nodule": "pneumothorax",
    "cardiomegaly": "pneumothorax",
    "fracture": "atelectasis",
    "opacity": "pneumothorax",
    "granuloma": "effusion",
}
EDIT_KINDS = ("negation", "laterality", "severity", "device", "finding")
ALIGN_KINDS = ("negation", "omission", "laterality", "severity")


@dataclass(frozen=True)
class HeldoutVariant:
    """A held-out variant: the edited text and what changed."""

    text: str
    kind: str
    target: str | None
    """CheXpert observation the edit is about (None for style changes)."""


@dataclass
class Dropped:
    """Variants the Labeler did not confirm, counted by kind (reported beside every figure)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


def _sents(text: str) -> list[str]:
    out = [text[a:b].strip() for a, b in _sentences(text)]
    return [s if s.endswith((".", "!", "?")) else s + "." for s in out if s]


def _case(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


# ------------------------------------------------------------------------------------- styles
def enumerate_style(text: str) -> str | None:
    """Numbered sentences, "1. ... 2. ..."; None for a text that already numbers its lines."""
    if re.search(r"(^|\s)\d\.\s", text):
        return None
    sents = _sents(text)
    return " ".join(f"{i}. {s}" for i, s in enumerate(sents, 1)) if sents else None


def abbreviate(text: str) -> str | None:
    """The held-out lexicon's short forms, each kept only where the Labeler sees the same facts."""
    ref = summarise(_LABELER.label(text))
    out, hits = text, 0
    for rx, short in _EVAL_ABBREV_RX:
        new = rx.sub(short, out)
        if new != out and summarise(_LABELER.label(new)) == ref:
            out, hits = new, hits + 1
    return out if hits else None


def style(text: str) -> str | None:
    """The held-out style every evaluation variant is written in (None when it cannot apply)."""
    return enumerate_style(text)


# -------------------------------------------------------------------------------------- edits
def _by_observation(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for m in _LABELER.label(text).mentions:
        if m.observation != "No Finding":
            out.setdefault(m.observation, []).append(m)
    return out


def _replace_sentences(text: str, idx: set[int], new: dict[int, str] | None = None) -> str:
    spans = _sentences(text)
    parts = []
    for i, (a, b) in enumerate(spans):
        s = text[a:b].strip()
        if i in idx:
            s = (new or {}).get(i, "")
        if s:
            parts.append(s if s.endswith((".", "!", "?")) else s + ".")
    return " ".join(parts)


def _negation(text: str, obs: str, rng: random.Random) -> str | None:
    return template_flip(text, _LABELER.label(text).mentions, obs, rng,
                         negated=_NEGATIVE_TEMPLATES, affirmed=_POSITIVE_TEMPLATES)


def _in_sentences(text: str, idx: set[int], rx: re.Pattern[str], fn) -> str:
    spans = _sentences(text)
    out, last = [], 0
    for i, (a, b) in enumerate(spans):
        if i in idx:
            out.append(text[last:a] + rx.sub(fn, text[a:b]))
            last = b
    return "".join(out) + text[last:]


def _laterality(text: str, ms: list) -> str | None:
    if not any(m.status == "positive" and m.laterality in ("left", "right") for m in ms):
        return None
    idx = {m.sentence_index for m in ms if m.status == "positive"}
    swap = {"left": "right", "right": "left"}
    return _in_sentences(text, idx, _SIDE_RX, lambda h: _case(swap[h.group(1).lower()], h.group(1)))


def _severity(text: str, ms: list) -> str | None:
    for m in ms:
        if m.status != "positive" or not m.severity:
            continue
        lo = max(0, m.span[0] - 30)
        hits = [h for h in _SEVERITY_RX.finditer(text, lo, m.span[0])]
        if hits:
            h = hits[-1]
            word = _case(EVAL_SEVERITY[h.group(1).lower()], h.group(1))
            return text[: h.start()] + word + text[h.end() :]
    return None


def _omission(text: str, ms: list) -> str | None:
    if not any(m.status == "positive" for m in ms):
        return None
    out = _replace_sentences(text, {m.sentence_index for m in ms})
    return out or None


def _edit(text: str, kind: str, obs: str | None, ms: list, rng: random.Random) -> str | None:
    if kind == "negation":
        return _negation(text, obs, rng)
    if kind == "laterality":
        return _laterality(text, ms)
    if kind == "severity":
        return _severity(text, ms)
    if kind == "omission":
        return _omission(text, ms)
    if kind == "device":
        t = text.rstrip()
        return (t + ("" if t.endswith((".", "!", "?")) else ".") + " " + rng.choice(EVAL_DEVICE_SENTENCES))
    if kind == "finding":
        for m in ms:
            word = text[m.span[0] : m.span[1]]
            new = EVAL_NEIGHBOURS.get(word.lower())
            if m.status == "positive" and m.form == "term" and new:
                rx = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
                return rx.sub(lambda h, new=new: _case(new, h.group()), text)
        return None
    raise ValueError(f"unknown held-out edit kind {kind!r}")


def _confirmed(kind: str, before, text: str, obs: str | None) -> str | None:
    """The observation an edit changed when the Labeler sees exactly that one fact changed."""
    after = summarise(_LABELER.label(text))
    if kind == "omission":
        # The finding is no longer positive (it is not mentioned at all), nothing else changed.
        rest = {k: v for k, v in before.items() if k not in (obs, "No Finding")}
        rest_after = {k: v for k, v in after.items() if k not in (obs, "No Finding")}
        return obs if obs not in after and rest == rest_after else None
    training_kind = {
        "negation": "negation_flip",
        "laterality": "laterality_swap",
        "severity": "severity_change",
        "device": "device_add",
        "finding": "finding_swap",
    }[kind]
    target = obs
    if kind == "finding":
        new = [o for o in after if o not in before]
        target = new[0] if len(new) == 1 else None
    elif kind == "device":
        target = "Support Devices"
    return target if target and confirm_edit(training_kind, before, after, target) else None


def edit(text: str, kind: str, rng: random.Random, dropped: Dropped | None = None,
         target: str | None = None) -> HeldoutVariant | None:
    """One confirmed held-out edit of ``kind`` (on one finding, chosen by ``rng`` unless given)."""
    by_obs = _by_observation(text)
    before = summarise(_LABELER.label(text))
    if kind == "device":
        if before.get("Support Devices", (None,))[0] == 1:
            return None
        candidates: list[str | None] = [None]
    else:
        candidates = sorted(by_obs) if target is None else [target] if target in by_obs else []
        rng.shuffle(candidates)
    for obs in candidates:
        ms = by_obs.get(obs, []) if obs else []
        new = _edit(text, kind, obs, ms, rng)
        if not new or new == text:
            continue
        changed = _confirmed(kind, before, new, obs)
        if changed:
            return HeldoutVariant(new, kind, changed)
        if dropped is not None:
            dropped.add(kind)
    return None


def positive_findings(text: str) -> list[str]:
    """Observations the report states as present (the findings an image would show)."""
    return sorted({m.observation for m in _LABELER.label(text).mentions
                   if m.status == "positive" and m.observation != "No Finding"})
