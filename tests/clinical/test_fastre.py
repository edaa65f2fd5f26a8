"""First-word dispatch gives exactly what one plain regex alternation gives, on real reports."""

from __future__ import annotations

import re

from llmclip.clinical import patterns as pt
from llmclip.clinical.fastre import WordStartMatcher, first_words, lower_same_length, trie_regex


def test_first_words():
    assert first_words(r"(?:the )?(?:heart|cardiac) size") == {"the", "heart", "cardiac"}
    assert first_words(r"pneumo-?thora(?:x|ces)") == {"pneumo", "pneumothorax", "pneumothoraces"}
    assert first_words(r"\w+ effusion") is None
    assert first_words(r"(?:a )?") is None  # may match empty


def test_trie_regex_matches_exactly_the_words():
    words = ["no", "not", "nodule", "nodules", "normal", "n"]
    rx = re.compile(r"\b(?:" + trie_regex(words) + r")(?!\w)")
    for w in words:
        assert rx.fullmatch(w)
    for w in ["nod", "noda", "nx", "nodulesx"]:
        assert not rx.fullmatch(w)


def test_same_matches_as_plain_alternation(openi_texts):
    plain = re.compile(r"\b(?:" + "|".join(f"(?P<{n}>{rx})" for n, rx in pt._MENTION_ALTS) + ")")
    fast = WordStartMatcher(pt._MENTION_ALTS)
    extra = ["Pneumo-thorax. The heart is not enlarged; w/o effusion.", "İstanbul heart is large"]
    for t in openi_texts[:1500] + extra:
        low = lower_same_length(t)
        assert len(low) == len(t)
        a = [(m.span(), m.lastgroup) for m in plain.finditer(low)]
        b = [(m.span(), m.lastgroup) for m in fast.finditer(low)]
        assert a == b, t
