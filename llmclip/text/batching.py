"""Length batching of report texts: reports vary about 5x in length, so how rows are grouped
decides how much of the encoder's work goes to padding.

- ``balanced_batches``: token-budget batches for inference (``LLMEncoder.encode``);
- ``_split_points``: a fixed number of length buckets per training batch
  (``LLMEncoder.tokenize_buckets``).
"""

from __future__ import annotations


def balanced_batches(padded: list[int], budget: int) -> list[tuple[int, int]]:
    """``(start, end)`` runs of a longest-first length list, each at most ``budget`` padded tokens,
    as few as the greedy fill needs but evened out: the greedy fill leaves a small last batch per
    call, and a 3-row batch runs the decoder's matmuls far below their speed at 30 rows. The
    budget is lowered while the count stays the same, which spreads the rows evenly."""

    def fill(cap: int) -> list[tuple[int, int]]:
        runs, start = [], 0
        while start < len(padded):
            size = max(1, cap // max(1, padded[start]))
            runs.append((start, min(start + size, len(padded))))
            start += size
        return runs

    count = len(fill(budget))
    lo, hi = 1, budget  # the smallest cap that needs no more runs than the full budget
    while lo < hi:
        mid = (lo + hi) // 2
        if len(fill(mid)) <= count:
            hi = mid
        else:
            lo = mid + 1
    return fill(lo)


def _split_points(lengths: list[int], k: int) -> list[int]:
    """Cut points of sorted ``lengths`` into min(k, n) groups minimising sum(len(group) * max)."""
    n = len(lengths)
    if n == 0:
        return []
    k = max(1, min(k, n))
    inf = float("inf")
    # best[j][i]: least padded area of the first i items in j groups; a group (a, i] costs (i-a)*len[i-1].
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(1, n + 1):
            for a in range(j - 1, i):
                cost = best[j - 1][a] + (i - a) * lengths[i - 1]
                if cost < best[j][i]:
                    best[j][i], back[j][i] = cost, a
    # Exactly min(k, n) groups, even where fewer would pad as little: every rank of a ZeRO-3 run
    # must run the same number of forwards (each one gathers the weights collectively).
    j = k
    cuts, i = [], n
    while j > 1:
        i = back[j][i]
        cuts.append(i)
        j -= 1
    return sorted(c for c in cuts if 0 < c < n)
