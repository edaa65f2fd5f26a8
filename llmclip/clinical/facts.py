"""The facts the Labeler reads in a report, per observation, and how two reports' facts differ.

A variant is kept or dropped on these: a rewrite must leave them as they were, and an edit must
change exactly the one fact it claims to (``confirm_edit``). The evaluation family
(``llmclip.eval.heldout``) is checked with the same functions, so both families mean the same
thing by "one error".
"""

from __future__ import annotations

from llmclip.clinical.labeler import LabelResult

Summary = dict[str, tuple[int, frozenset, frozenset, frozenset, frozenset]]


def summarise(result: LabelResult) -> Summary:
    """Per observation: (vector value, lateralities, severities, measurements, device terms)."""
    out: Summary = {}
    for obs, value in result.vector.items():
        if obs == "No Finding":
            continue
        ms = [m for m in result.mentions if m.observation == obs and m.status != "negative"]
        out[obs] = (
            value,
            frozenset(m.laterality for m in ms if m.laterality),
            frozenset(m.severity for m in ms if m.severity),
            frozenset(m.measurement for m in ms if m.measurement),
            frozenset(m.term for m in ms) if obs == "Support Devices" else frozenset(),
        )
    return out


_FIELDS = ("status", "laterality", "severity", "measurement", "device")


def diff(before: Summary, after: Summary) -> dict[str, list[str]]:
    """Observation -> fields that differ ("status" when it appeared or vanished)."""
    out: dict[str, list[str]] = {}
    for obs in set(before) | set(after):
        a, b = before.get(obs), after.get(obs)
        if a == b:
            continue
        if a is None or b is None:
            out[obs] = ["status"]
        else:
            out[obs] = [f for f, x, y in zip(_FIELDS, a, b, strict=True) if x != y]
    return out


def confirm_edit(kind: str, before: Summary, after: Summary, target: str | None = None) -> bool:
    """Does ``after`` differ from ``before`` by exactly the one fact an edit of ``kind`` changes?"""
    d = diff(before, after)
    if kind == "finding_swap":
        # one finding changes identity: the new observation appears; the old one may vanish
        return (
            target in d
            and d[target] == ["status"]
            and len(d) <= 2
            and all(f == ["status"] for f in d.values())
        )
    if len(d) != 1:
        return False
    ((obs, fields),) = d.items()
    if target is not None and obs != target:
        return False
    if kind == "negation_flip":
        return "status" in fields and before.get(obs, (None,))[0] != after.get(obs, (None,))[0]
    if kind in ("device_add", "device_remove"):
        return obs == "Support Devices" and bool(fields)
    want = {
        "laterality_swap": "laterality",
        "severity_change": "severity",
        "measurement_change": "measurement",
    }[kind]
    return fields == [want]
