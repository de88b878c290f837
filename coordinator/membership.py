"""Membership rules the state machine applies, kept apart from its rounds: a member's record, the limit on
members and what a checkpoint keeps of each member."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from coordinator.errors import Code, Rejected

# What a checkpoint keeps of a member: everything but liveness, which a restarted coordinator learns anew.
TRANSIENT_MEMBER_FIELDS = ("alive", "last_seen", "calls_open")


def refuse_past_limit(alive: Mapping[str, bool], limit: int, requested_id: str, elastic: bool = False) -> None:
    """Refuse a new member past the limit (`alive`: every member id -> whether it is alive and not departed).
    With a fixed membership the limit is `cluster.workers` counting every member that ever joined: shards are
    dealt by join index, so an extra worker would silently train on another one's data. Under elastic
    membership (coordinator/deal.py) it is `cluster.max_workers` members alive at once, since shards are
    dealt again over whoever is there. A known id rejoins instead (the caller never asks then); the refusal
    names the ids not heard from, which a restarted worker would rejoin as."""
    present = sum(alive.values()) if elastic else len(alive)
    if present < limit:
        return
    asked = f" as {requested_id[:64]!r}" if requested_id else ""
    absent = sorted(w for w, up in alive.items() if not up)
    hint = f"; not alive: {', '.join(absent)}" if absent else ""
    field = "max_workers" if elastic else "workers"
    raise Rejected(Code.RESOURCE_EXHAUSTED,
                   f"the run has all its cluster.{field} = {limit} workers "
                   f"({', '.join(sorted(w for w, up in alive.items() if up or not elastic))}{hint}); a "
                   f"new worker cannot join{asked}. A restarted worker rejoins under its id: "
                   f"`lowband worker --name ID`")


@dataclass
class Member:
    worker_id: str
    index: int
    hostname: str
    last_seen: float
    alive: bool = True
    step: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    # Bytes this worker sent to / received from the coordinator, as the coordinator counted them: the totals,
    # and their split into protocol (updates up, aggregates down), control (joins, heartbeats, waits, leaves,
    # pull requests, push replies: counted by coordinator/traffic.py) and state (the initial-state upload,
    # whole-replica pulls). Every count adds to its kind and to the total, so the three always sum to it.
    bytes_sent: int = 0
    bytes_received: int = 0
    protocol_sent: int = 0
    protocol_received: int = 0
    control_sent: int = 0
    control_received: int = 0
    state_sent: int = 0
    state_received: int = 0
    round: int = 0  # the round it trains for: one past the last round its update was folded in
    last_metrics: dict[str, float] = field(default_factory=dict)  # what its latest folded update reported
    tokens: int = 0
    resyncs: int = 0  # whole replicas pulled because the worker's fell behind or differed
    left: bool = False  # said Leave: departed until it joins again (no other call brings it back)
    pulls: int = 0  # whole replicas pulled in all (joins and rejoins included)
    joins: int = 0  # joins under this id: the first, then one per rejoin (a restarted process, a NOT_FOUND)
    session_digest: str = ""  # SHA-256 of its session credential (coordinator/sessions.py), never the credential
    # Its calls being served now that prove it alive while they last (`CoordinatorState.attend`): a worker in a
    # long poll or a stream need not beat, and is not dropped as silent until the last of them ended.
    calls_open: int = 0
