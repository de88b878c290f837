"""One round, one place: the aggregator half of a run, shared by every transport.

The coordinator's state machine, the all-gather transport (every rank aggregates) and the in-process
transport all run rounds through `RoundAggregator`, so an update is judged (`protocols.check`) and
folded by the same code whatever carried it, and the aggregate goes back through the same downlink.
"""

from __future__ import annotations

from typing import Any

from protocols.base import Accumulator, Aggregate, CheckedUpdate, Protocol, Update
from protocols.check import DEFAULT_MAX_UPDATE_RATIO, UpdateRejected, check_update, expectation
from protocols.downlink import Downlink, apply_aggregate
from protocols.replica import Replica

__all__ = ["RoundAggregator", "UpdateRejected", "check_update"]


class RoundAggregator:
    """The aggregator half of a run over rounds: the replica, the protocol's aggregator state and the
    downlink's encoder state, plus the open round's accumulator. Pure: no threads, clocks or I/O.

    `submit` checks and folds one update; `close` turns the round into the `Aggregate` every replica
    applies, and applies it to the aggregator's own replica with the same code the workers use.
    """

    def __init__(
        self,
        protocol: Protocol[Any, Any],
        downlink: Downlink,
        replica: Replica,
        state: Any = None,
        downlink_state: Any = None,
        fresh: bool = True,
        fold_in_order: bool = False,
    ) -> None:
        self.protocol, self.downlink, self.replica = protocol, downlink, replica
        # Fold at close in the senders' `order` instead of on arrival: the same senders give the same
        # floating-point sums whatever the arrival order (reproducible across transports), at the price of
        # keeping every checked update until the round closes.
        self.fold_in_order = fold_in_order
        self.max_update_ratio = DEFAULT_MAX_UPDATE_RATIO
        self.last_fold_order: list[str] = []
        self.state = protocol.init_aggregator_state(replica) if fresh else state
        self.downlink_state = downlink.init_state() if fresh else downlink_state
        self._open()

    def _open(self) -> None:
        self.acc: Accumulator = self.protocol.new_round()
        self.expect = expectation(self.protocol, self.replica, type(self.acc).view, self.max_update_ratio)
        self.folded: list[CheckedUpdate] = []
        self.fold_order: list[str] = []
        self.senders: list[str] = []
        self.pending: list[tuple[int, str, CheckedUpdate]] = []

    def bound_updates(self, max_update_ratio: float) -> None:
        """Refuse, from now on, updates holding a value above `max_update_ratio` times the largest parameter."""
        self.max_update_ratio = max_update_ratio
        self.expect = expectation(self.protocol, self.replica, type(self.acc).view, max_update_ratio)

    @property
    def round(self) -> int:
        return self.replica.round

    def submit(self, worker_id: str, update: Update, order: int = 0) -> None:
        """Check and fold one update into the open round (UpdateRejected: nothing was folded). `order`
        places the sender when folding in order (e.g. its join index)."""
        if worker_id in self.senders:
            raise UpdateRejected(f"worker {worker_id} already sent its update for round {self.round}", duplicate=True)
        checked = check_update(worker_id, update, self.expect)
        self.senders.append(worker_id)
        if self.fold_in_order:
            self.pending.append((order, worker_id, checked))
        else:
            self._fold(worker_id, checked)

    def _fold(self, worker_id: str, checked: CheckedUpdate) -> None:
        self.acc.fold(worker_id, checked)
        self.fold_order.append(worker_id)
        if self.downlink.may_relay:
            self.folded.append(checked)

    def _folded_in_order(self) -> tuple[Accumulator, list[str], list[CheckedUpdate]]:
        """With `fold_in_order`, a fresh accumulator with the pending updates folded by order (the open round
        keeps them pending, so a close that fails can be tried again); else the round's own."""
        if not self.fold_in_order:
            return self.acc, self.fold_order, self.folded
        acc, order, folded = self.protocol.new_round(), [], []
        for _, worker_id, checked in sorted(self.pending, key=lambda p: (p[0], p[1])):
            acc.fold(worker_id, checked)
            order.append(worker_id)
            folded.append(checked)
        return acc, order, folded

    def close(self) -> Aggregate:
        """Close the round: its aggregate (to broadcast); the aggregator's replica moves one round on.
        Atomic: if anything raises (an aggregate that overflowed to Inf, ...) nothing has changed."""
        if not self.senders:
            raise ValueError(f"round {self.round} has no updates to close")
        acc, order, folded = self._folded_in_order()
        update, state = self.protocol.close(acc, self.state)
        relayed = tuple(c.raw for c in folded) if self.downlink.may_relay else ()
        aggregate, downlink_state = self.downlink.encode(self.round, update, relayed, self.downlink_state)
        replica = apply_aggregate(self.protocol, self.downlink, aggregate, self.replica)
        self.state, self.downlink_state, self.replica = state, downlink_state, replica
        self.last_fold_order = order  # who sent the relayed updates, in order
        self._open()
        return aggregate
