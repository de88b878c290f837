"""Elastic membership's shard deal (issue 12): which member trains on which data shard in a round.

With a fixed membership (`cluster.elastic: false`) a worker keeps the shard of its join index for the whole
run and a join past `cluster.workers` is refused. Under elastic membership workers may join, up to
`cluster.max_workers`, and leave; the shards are dealt again at every round boundary over the members then
alive (not departed), in join order, so shard k of n goes to the k-th of them. A member that joins while a
round is open is dealt nothing in it: it sits that round out and is dealt into the next one, so no shard is
ever trained by two workers in one round (`by_play` shards are disjoint plays; `iid` workers draw from
streams keyed by their own index and the deal's first round, so no two ever share one).

A deal is named by the round it took effect (`since`): the membership epoch that workers see in RoundInfo.
It needs no checkpoint of its own: a resumed coordinator deals anew when it reopens a round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# shard_index of a member dealt no shard in the round (it joined while the round was open).
NOT_DEALT = -1


@dataclass(frozen=True)
class Deal:
    since: int  # the round this deal took effect: the membership epoch
    members: tuple[str, ...]  # worker ids in shard order (join order)
    # worker id -> shard: every push, WaitRound and round-close check asks, a scan of the tuple made each ask
    # cost the number of workers.
    shards: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", {worker_id: k for k, worker_id in enumerate(self.members)})

    def shard_of(self, worker_id: str) -> int:
        """The shard this worker trains on, or NOT_DEALT."""
        return self.shards.get(worker_id, NOT_DEALT)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self.shards


def next_deal(previous: Deal | None, round_: int, eligible: Iterable[tuple[int, str]]) -> Deal:
    """The deal for round `round_` over `eligible` (join index, worker id) members; `previous` itself when the
    members are the same (the epoch does not move, no worker re-shards)."""
    members = tuple(worker_id for _, worker_id in sorted(eligible))
    if previous is not None and previous.members == members:
        return previous
    return Deal(round_, members)
