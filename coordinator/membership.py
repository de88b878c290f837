"""Membership rules the state machine applies, kept apart from its rounds: the limit on members and what
a checkpoint keeps of each member."""

from __future__ import annotations

from collections.abc import Mapping

from coordinator.errors import Code, Rejected

# What a checkpoint keeps of a member: everything but liveness, which a restarted coordinator learns anew.
TRANSIENT_MEMBER_FIELDS = ("alive", "last_seen")


def refuse_past_limit(alive: Mapping[str, bool], limit: int, requested_id: str) -> None:
    """Refuse a new member past `cluster.workers` (`alive`: every member id -> whether it is alive): shards
    are dealt by index, so an extra worker would silently train on another one's data. A known id rejoins
    instead (the caller never asks then); the refusal names the ids not heard from, which a restarted
    worker would rejoin as."""
    if len(alive) < limit:
        return
    asked = f" as {requested_id[:64]!r}" if requested_id else ""
    absent = sorted(w for w, up in alive.items() if not up)
    hint = f"; not alive: {', '.join(absent)}" if absent else ""
    raise Rejected(Code.RESOURCE_EXHAUSTED,
                   f"the run has all its cluster.workers = {limit} workers ({', '.join(sorted(alive))}{hint}); a "
                   f"new worker cannot join{asked}. A restarted worker rejoins under its id: "
                   f"`lowband worker --name ID`")
