"""What the coordinator records of each round: while it is open (`OpenRound`), and once closed (`RoundRecord`,
a metrics.jsonl row); and the metrics a worker may report with its update."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from coordinator.errors import Code, Rejected
from coordinator.membership import Member


@dataclass
class RoundRecord:
    """What the coordinator writes to metrics.jsonl when a round closes."""

    round: int
    workers: list[str]
    train_loss: float | None
    eval_loss: float | None
    tokens: int
    # Per worker, averaged over every worker that joined: bytes it sent, received, and both.
    bytes_sent_per_worker: float
    bytes_received_per_worker: float
    bytes_total_per_worker: float
    downlink_bytes: int  # this round's aggregate (component bytes)
    resyncs: int  # whole-replica pulls after the first, all workers, so far
    seconds: float
    closed_by: str  # "all" | "deadline"
    # The round's span on the workers that reported it (SPAN_METRICS), means over them; None if none did.
    wall_s: float | None = None
    compute_s: float | None = None
    blocked_s: float | None = None
    comm_s: float | None = None
    compute_utilization: float | None = None
    utilization_per_worker: dict[str, float] = field(default_factory=dict)
    tokens_per_worker: dict[str, int] = field(default_factory=dict)  # this round's reports
    deadline_s: float | None = None  # the deadline the round had (coordinator/deadline.py)
    # Late updates (pushed for a round that had closed): folded into this round, sender "worker@round" ->
    # the weight applied (`cluster.late: stale`), and the workers whose late update was dropped.
    late_folded: dict[str, float] = field(default_factory=dict)
    late_dropped: list[str] = field(default_factory=list)
    # On arrival (overlap.mode on_arrival): after how many of this round's inner steps the workers merged the
    # previous round's aggregate, the mean over those that reported it.
    merged_after_steps: float | None = None


# A worker's span of the round (worker/loop.py `RoundLoop._span`), in seconds, and compute / wall.
SPAN_METRICS = ("wall_s", "compute_s", "blocked_s", "comm_s", "utilization")


def check_metrics(worker_id: str, metrics: dict[str, float]) -> None:
    """Refuse the whole update when a reported metric is not a finite number (times: not negative)."""
    for key, value in metrics.items():
        if not math.isfinite(value) or (key in SPAN_METRICS and value < 0):
            raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id} reported metric {key!r} = {value}: "
                                                  f"metrics must be finite{' and >= 0' if key in SPAN_METRICS else ''}")


@dataclass
class OpenRound:
    number: int
    started: float
    reported: dict[str, dict[str, float]] = field(default_factory=dict)
    quorum_s: float | None = None  # seconds from opening to the quorum-th report
    late_folded: dict[str, float] = field(default_factory=dict)  # see RoundRecord
    late_dropped: list[str] = field(default_factory=list)


def closed_record(current: OpenRound, members: list[Member], closed_by: str, downlink_bytes: int, seconds: float,
                  deadline_s: float) -> RoundRecord:
    """The record of `current`, closed now; per-worker bytes are averaged over every member that joined."""
    def mean(key: str) -> float | None:
        vals = [m[key] for m in current.reported.values() if key in m]
        return sum(vals) / len(vals) if vals else None

    n = max(len(members), 1)
    sent = sum(m.bytes_sent for m in members)
    received = sum(m.bytes_received for m in members)
    return RoundRecord(
        round=current.number,
        workers=sorted(current.reported),
        train_loss=mean("train_loss"),
        eval_loss=mean("eval_loss"),
        tokens=sum(m.tokens for m in members),
        bytes_sent_per_worker=sent / n,
        bytes_received_per_worker=received / n,
        bytes_total_per_worker=(sent + received) / n,
        downlink_bytes=downlink_bytes,
        resyncs=sum(m.resyncs for m in members),
        seconds=seconds,
        closed_by=closed_by,
        wall_s=mean("wall_s"),
        compute_s=mean("compute_s"),
        blocked_s=mean("blocked_s"),
        comm_s=mean("comm_s"),
        compute_utilization=mean("utilization"),
        utilization_per_worker={w: m["utilization"] for w, m in sorted(current.reported.items())
                                if "utilization" in m},
        tokens_per_worker={w: int(m.get("tokens", 0)) for w, m in sorted(current.reported.items())},
        deadline_s=deadline_s,
        late_folded=dict(current.late_folded),
        late_dropped=list(current.late_dropped),
        merged_after_steps=mean("merged_after_steps"),
    )
