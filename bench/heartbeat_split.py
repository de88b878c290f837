"""Where the probe's slow heartbeats spent their time (bench.coordinator_scale `heartbeat_split`).

The probe (bench/scale_procs.py `run_probe`) times each heartbeat from its own process, so a slow one could have
waited in the probe's process or in the coordinator's. The coordinator records, in wall-clock time as the probe's,
when each Heartbeat call reached its server interceptor (the first code of ours a call runs, on the event loop) and
when the handler's work for the probe's worker began and ended (`Sections.trace_heartbeats`). A slow sample is
split into four parts that add up to its latency:
- `to_accept`: from the probe's send to the interceptor: the probe's process, the kernel, gRPC's C core and the
  wait for the event loop to start the call;
- `accept_to_handler`: the call's request read and its coroutine started, on the loop;
- `handler`: the heartbeat's own work;
- `after_handler`: the reply's way back: the loop finishing the call, gRPC, the kernel and the probe's process.
"""

from __future__ import annotations

import bisect
from typing import Any

PARTS = ("to_accept", "accept_to_handler", "handler", "after_handler")


def split_sample(sent: float, latency: float, accepts: list[float],
                 handled: list[tuple[float, float]]) -> dict[str, float] | None:
    """One probe sample's parts, or None when the coordinator recorded no handling of it (a call refused, or the
    trace missing). `accepts` and `handled` are sorted by time."""
    answered = sent + latency
    i = bisect.bisect_left(handled, (sent, sent))
    if i == len(handled) or handled[i][1] > answered:
        return None
    began, ended = handled[i]
    j = bisect.bisect_right(accepts, began) - 1
    accepted = accepts[j] if j >= 0 and accepts[j] >= sent else sent  # none seen since the send: all is before
    return {"to_accept": accepted - sent, "accept_to_handler": began - accepted, "handler": ended - began,
            "after_handler": answered - ended}


def heartbeat_split(samples: list[tuple[float, float, bool]], trace: dict[str, Any],
                    slow_s: float) -> dict[str, Any]:
    """The slowest answered sample's parts, and the parts summed over every sample slower than `slow_s`."""
    accepts = sorted(trace["accepts"])
    handled = sorted((a, b) for a, b in trace["probe_handled"])
    slow = [(lat, split_sample(t, lat, accepts, handled)) for t, lat, ok in samples if ok and lat > slow_s]
    matched = [(lat, parts) for lat, parts in slow if parts is not None]
    totals = {part: sum(parts[part] for _, parts in matched) for part in PARTS}
    slowest = max(matched, key=lambda s: s[0], default=None)
    return {"slow_s": slow_s, "probe_beats_traced": len(handled), "slow_samples": len(slow),
            "matched": len(matched), "summed_over_slow": totals,
            "slowest": None if slowest is None else {"latency_s": slowest[0], **slowest[1]}}
