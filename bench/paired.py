"""A paired comparison of two methods run on the same seeds: is `method` ahead of `baseline`, and how surely.

Used by bench.fedsvd_seeds (FedSVD against each baseline) and bench.lowrank_equal (PiSSA against LoRA). Lower is
better (losses): a positive difference means `method` is ahead on that seed.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

ALPHA = 0.05  # the level at which a paired t-test counts as showing a difference


def sign_test_p(wins: int, n: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven among n fair coin flips."""
    extreme = min(wins, n - wins)
    tail = sum(math.comb(n, k) for k in range(extreme + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(baseline: list[float], method: list[float]) -> dict[str, Any]:
    """Per seed (the lists in the same seed order) `baseline` minus `method`: `differences`, their `mean` and
    sample `std`, a two-sided paired t-test (`scipy.stats.ttest_rel`: `t`, `p`; NaN with fewer than 2 seeds),
    `wins` (seeds where `method` is lower) and the two-sided sign test's `sign_p` for that count."""
    from scipy.stats import ttest_rel

    if len(baseline) != len(method) or not baseline:
        raise ValueError(f"a paired comparison needs the same seeds on both sides, got {len(baseline)} and "
                         f"{len(method)} values")
    diffs = [b - m for b, m in zip(baseline, method, strict=True)]
    wins = sum(d > 0 for d in diffs)
    t, p = (math.nan, math.nan)
    if len(diffs) > 1:
        test = ttest_rel(baseline, method)
        t, p = float(test.statistic), float(test.pvalue)
    return {"differences": diffs, "mean": statistics.fmean(diffs),
            "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "t": t, "p": p, "wins": wins, "sign_p": sign_test_p(wins, len(diffs))}


def ahead(result: dict[str, Any]) -> bool:
    """`method` ahead on the mean, with the paired t-test at p < ALPHA."""
    return result["mean"] > 0 and result["p"] < ALPHA
