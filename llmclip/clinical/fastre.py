"""Fast leftmost matching of many regex alternatives, dispatched on the first word.

A single ``re`` alternation of ~100 phrases tries every alternative at every position, which
made labelling ~5x too slow. ``WordStartMatcher`` expands, from the parsed pattern, the finite
set of first words each alternative can start with ("(?:the )?heart" -> {"the", "heart"}); at a
word start it only tries the alternatives that can start with the word found there (most words
start none). The result is the same as ``finditer`` on ``\\b(?:alt_1|alt_2|...)`` (leftmost match,
first alternative wins, no overlaps) on lower-cased text: lookarounds are ignored while expanding,
which only widens the candidate set, and an alternative whose first words cannot be enumerated is
tried at every word start.
"""

from __future__ import annotations

import re

try:  # Python >= 3.11
    from re import _constants as _C
    from re import _parser as _P
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _C  # type: ignore[no-redef]
    import sre_parse as _P  # type: ignore[no-redef]

_WORD = re.compile(r"\w+")
_IS_WORD = re.compile(r"\w")
_LIMIT = 4096  # give up enumerating beyond this many partial strings


class _Unknown(Exception):
    pass


def _done(s: str) -> bool:
    """A partial string is finished once it holds a non-word character (the first word ended)."""
    return bool(s) and not _IS_WORD.match(s[-1])


def _concat(left: set[str], right: set[str]) -> set[str]:
    out = set()
    for a in left:
        if _done(a):
            out.add(a)
            continue
        for b in right:
            out.add(a + b)
    if len(out) > _LIMIT:
        raise _Unknown
    return out


def _expand_seq(seq, acc: set[str]) -> set[str]:
    for op, av in seq:
        if all(_done(a) for a in acc):
            return acc
        acc = _concat(acc, _expand_item(op, av, acc))
    return acc


def _expand_item(op, av, acc) -> set[str]:
    if op is _C.LITERAL:
        return {chr(av)}
    if op is _C.IN:
        out: set[str] = set()
        for iop, iav in av:
            if iop is _C.LITERAL:
                out.add(chr(iav))
            elif iop is _C.RANGE and iav[1] - iav[0] < 64:
                out.update(chr(c) for c in range(iav[0], iav[1] + 1))
            elif iop is _C.CATEGORY and iav is _C.CATEGORY_SPACE:
                out.add(" ")  # any white space ends the first word
            else:
                raise _Unknown
        return out
    if op is _C.BRANCH:
        out = set()
        for branch in av[1]:
            out |= _expand_seq(branch, {""})
        return out
    if op is _C.SUBPATTERN:
        return _expand_seq(av[-1], {""})
    if op in (_C.MAX_REPEAT, _C.MIN_REPEAT):
        lo, hi, item = av
        one = _expand_seq(item, {""})
        if hi is _C.MAXREPEAT or hi > 4:
            if all(_done(x[:1]) for x in one):  # repeats of separators, e.g. \s+
                return ({""} if lo == 0 else set()) | {x[:1] for x in one}
            raise _Unknown
        out = {""} if lo == 0 else set()
        cur = {""}
        for k in range(1, hi + 1):
            cur = _concat(cur, one)
            if k >= lo:
                out |= cur
        return out
    if op in (_C.AT, _C.ASSERT, _C.ASSERT_NOT):
        return {""}
    raise _Unknown


def first_words(pattern: str) -> set[str] | None:
    """Words a match of ``pattern`` can start with (lower-case); None when not enumerable."""
    try:
        strings = _expand_seq(_P.parse(pattern), {""})
    except (_Unknown, RecursionError):
        return None
    words = set()
    for s in strings:
        m = _WORD.match(s)
        if not m:  # could start with a non-word character or be empty
            return None
        words.add(m.group())
    return words


def trie_regex(words: set[str] | list[str]) -> str:
    """A regex matching exactly ``words``, shaped as a trie so each position costs O(word length)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        end = "" in node
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if end else body

    return emit(trie)


class WordStartMatcher:
    """Leftmost, non-overlapping matches of named alternatives, tried only at word starts."""

    def __init__(self, alternatives: list[tuple[str, str]]):
        """``alternatives``: (group name, lower-case regex) in priority order."""
        firsts = [first_words(rx) for _name, rx in alternatives]
        always = [i for i, f in enumerate(firsts) if f is None]
        by_word: dict[str, list[int]] = {}
        for i, f in enumerate(firsts):
            for w in f or ():
                by_word.setdefault(w, []).append(i)
        compiled: dict[tuple[int, ...], re.Pattern[str]] = {}

        def build(idx: list[int]) -> re.Pattern[str]:
            key = tuple(sorted(set(idx)))
            if key not in compiled:
                compiled[key] = re.compile(
                    "|".join(f"(?P<{alternatives[i][0]}>{alternatives[i][1]})" for i in key)
                )
            return compiled[key]

        self._table = {w: build(idx + always) for w, idx in by_word.items()}
        self._fallback = build(always) if always else None
        self.n_always = len(always)
        # Words that can start a match, found by one trie-shaped regex scan in C, so Python only
        # loops over candidate words (not every word) when no alternative is tried everywhere.
        self._trigger = (
            re.compile(r"\b(?:" + trie_regex(sorted(by_word)) + r")(?!\w)") if not always else None
        )

    def finditer(self, low: str) -> list[re.Match[str]]:
        """Matches in ``low`` (already lower-cased), like ``re.finditer`` at word starts."""
        out: list[re.Match[str]] = []
        last = -1
        get, fallback = self._table.get, self._fallback
        for w in (self._trigger or _WORD).finditer(low):
            p = w.start()
            if p < last:
                continue
            rx = get(w.group(), fallback)
            if rx is None:
                continue
            m = rx.match(low, p)
            if m is not None and m.end() > p:
                out.append(m)
                last = m.end()
        return out


def lower_same_length(text: str) -> str:
    """``text.lower()`` keeping every character at its index (spans stay valid)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
