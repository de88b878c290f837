"""Membership rules the state machine applies, kept apart from its rounds: the limit on members and what
a checkpoint keeps of each member."""

from __future__ import annotations

from collections.abc import Collection

from coordinator.errors import Code, Rejected

# What a checkpoint keeps of a member: everything but liveness, which a restarted coordinator learns anew.
TRANSIENT_MEMBER_FIELDS = ("alive", "last_seen")


def refuse_past_limit(known: Collection[str], limit: int, requested_id: str) -> None:
    """Refuse a new member past `cluster.workers`: shards are dealt by index, so an extra worker would
    silently train on another one's data. A known id rejoins instead (the caller never asks then)."""
    if len(known) < limit:
        return
    asked = f" as {requested_id[:64]!r}" if requested_id else ""
    raise Rejected(Code.RESOURCE_EXHAUSTED,
                   f"the run has all its cluster.workers = {limit} workers ({', '.join(sorted(known))}); a new "
                   f"worker cannot join{asked}. A restarted worker rejoins under its id: `lowband worker --name ID`")
