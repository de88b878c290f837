"""Dynamic local updates: each worker runs as many inner steps as fit in the round's target time.

Asynchronous Local-SGD (Liu et al., "Asynchronous Local-SGD Training for Language Modeling",
arXiv:2401.09135) sets each worker's number of local steps from its speed (their "dynamic local updates")
so that a slow worker does not hold the round: the fastest worker runs the full `H`, a worker `k` times
slower about `H / k`. Here the aggregator names the round's target time, `H` times the fastest step time
it measured in the round before (`round_target_s`), and each worker picks its own step count from its own
measured step time (`adapted_inner_steps`). Updates are then averaged weighted by the tokens they were
trained on (`Update.weight` = tokens; `MeanAccumulator` folds `sum_i w_i d_i / sum_i w_i`), so a worker
that trained on a third of the tokens counts a third as much. Pure: no clocks, the callers measure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def round_target_s(inner_steps: int, step_seconds: Iterable[float]) -> float:
    """The round's target compute time: `inner_steps` steps at the fastest measured step time (seconds per
    inner step of each worker that reported one); 0.0 (no target: every worker runs `inner_steps`) when none
    did."""
    measured = [s for s in step_seconds if math.isfinite(s) and s > 0]
    return inner_steps * min(measured) if measured else 0.0


def adapted_inner_steps(inner_steps: int, target_s: float, step_s: float) -> int:
    """How many of the round's `inner_steps` a worker whose steps take `step_s` seconds runs to finish near
    `target_s`: `round(target_s / step_s)`, at least 1 and at most `inner_steps`. Without a target or a
    measurement yet (either <= 0), all of them."""
    if inner_steps < 1:
        return inner_steps
    if not (target_s > 0 and step_s > 0 and math.isfinite(target_s) and math.isfinite(step_s)):
        return inner_steps
    return max(1, min(inner_steps, round(target_s / step_s)))
