"""Report variants for contrastive training: what a variant is, and the random draws that make one.

The *training* family of variants, one module each:

- ``equivalent_rewrites`` (``rewrites.py``): the same facts in other words or another layout.
- ``one_error_edits`` (``edits.py``): exactly one clinical fact changed.
- ``negate`` (``negation.py``): every finding's status flipped.

Both generators keep a variant only when the Labeler agrees with what was meant (``facts.py``).
Evaluation uses its own generators (``llmclip.eval.heldout``), which share no lexicon entry,
template or output with these (``tests/eval/test_heldout.py``).

``rng`` may be a ``random.Random`` or a ``numpy.random.Generator``: the draws below go through
one integer function, so either gives a fixed sequence for a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """A rewritten or edited report and what was done to it."""

    text: str
    """The new report text."""
    kind: str
    """What kind of change: "abbreviate", "negation_flip", ... (see ``rewrites.py``, ``edits.py``)."""
    detail: str
    """Human-readable description of the change (e.g. "Pleural Effusion: positive -> negative")."""


# --------------------------------------------------------------------------------------------
# Random helpers working with random.Random and numpy Generators.


def _randint(rng, n: int) -> int:
    if hasattr(rng, "integers"):
        return int(rng.integers(n))
    return rng.randrange(n)


def _shuffled(rng, items: list) -> list:
    items = list(items)
    for i in range(len(items) - 1, 0, -1):
        j = _randint(rng, i + 1)
        items[i], items[j] = items[j], items[i]
    return items


def _choice(rng, items: list):
    return items[_randint(rng, len(items))]
