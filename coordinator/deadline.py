"""When a round that has its quorum closes without the stragglers: the round deadline policy. Pure.

A round closes as soon as every live worker has reported; failing that, once its deadline has passed and
at least the quorum (`cluster.min_workers`) has. The deadline, in seconds after the round opened:

- `fixed`: `cluster.round_deadline_s`;
- `adaptive`: `deadline_factor * q`, where `q` is the `deadline_quantile` (linear interpolation between
  order statistics, as numpy's default) of the quorum times of the last `deadline_window` closed rounds,
  a round's quorum time being the seconds from its opening to its `min_workers`-th report. It is capped at
  `round_deadline_s`, which is also the deadline until a first round has closed. The quorum times follow
  the workers the quorum needs, so a slow minority keeps being cut off while a cluster that slows down as
  a whole moves its deadline with it.

The deadline never lets a round close below its quorum: it only decides when the quorum is enough.
"""

from __future__ import annotations

import math
from collections import deque

from protocols.settings import ClusterConfig


def quantile(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (non-empty), linear between order statistics."""
    if not values:
        raise ValueError("the quantile of no values is undefined")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class DeadlinePolicy:
    """The deadline of the open round (`deadline_s`), learning from each closed round (`observe`)."""

    def __init__(self, cluster: ClusterConfig) -> None:
        self.kind = cluster.deadline
        self.cap_s = cluster.round_deadline_s
        self.factor, self.q = cluster.deadline_factor, cluster.deadline_quantile
        self.quorum_times: deque[float] = deque(maxlen=cluster.deadline_window)

    def deadline_s(self) -> float:
        """Seconds after its opening at which the open round may close with its quorum."""
        if self.kind == "fixed" or not self.quorum_times:
            return self.cap_s
        return min(self.cap_s, self.factor * quantile(list(self.quorum_times), self.q))

    def observe(self, quorum_s: float | None) -> None:
        """A round closed whose quorum reported `quorum_s` seconds after it opened (None: never measured,
        e.g. a round closed by workers leaving)."""
        if quorum_s is not None and math.isfinite(quorum_s) and quorum_s >= 0:
            self.quorum_times.append(quorum_s)
