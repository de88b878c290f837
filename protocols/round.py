"""One round, one place: the aggregator half of a run, shared by every transport.

The coordinator's state machine, the all-gather transport (every rank aggregates) and the in-process
transport all run rounds through `RoundAggregator`, so an update is judged (`protocols.check`) and
folded by the same code whatever carried it, and the aggregate goes back through the same downlink.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from protocols.base import Accumulator, Aggregate, CheckedUpdate, Protocol, Update
from protocols.check import DEFAULT_MAX_UPDATE_RATIO, Expectation, UpdateRejected, check_update, expectation
from protocols.downlink import Downlink, apply_aggregate, apply_update
from protocols.replica import Replica

__all__ = ["RoundAggregator", "UpdateRejected", "check_update", "union_bound"]


class RoundAggregator:
    """The aggregator half of a run over rounds: the replica, the protocol's aggregator state and the
    downlink's encoder state, plus the open round's accumulator. Pure: no threads, clocks or I/O (one lock
    guards the replica's loans, `lend`, which readers release from their own threads).

    `submit` checks and folds one update; `close` turns the round into the `Aggregate` every replica
    applies, and applies it to the aggregator's own replica with the same code the workers use. A caller that
    serves many senders at once (the coordinator) runs the two halves apart: `check_update` against a
    snapshot of `expect` (pure, no shared state: any thread, no lock), then `fold` under its lock.

    For a downlink that may relay, the round keeps the senders' encoded updates (`CheckedUpdate.raw`), never
    the decoded ones, and only while relaying them could still be smaller than the union of their coordinates
    (`relay_bound`): past that it drops them and the round closes union-only, which is the form the downlink
    would have chosen anyway, so its memory stays bounded whatever the number of senders.
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
        in_place: bool = False,
    ) -> None:
        self.protocol, self.downlink, self.replica = protocol, downlink, replica
        # Step the replica in its own tensors at a close while nobody borrowed it (`lend`): for a caller whose
        # replica nobody else holds unlent (the coordinator), so a close never holds two replicas at once.
        self.in_place = in_place
        # loan -> the replica lent. Weakly: a replica that is no longer the current one is never stepped, so a loan
        # never given back costs nothing once its replica is replaced (a close while it is lent builds a new one).
        self._lent: dict[int, weakref.ref[Replica]] = {}
        self._loans = itertools.count()
        self._lending = threading.Lock()  # readers release from their own threads, the holder's lock not held
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
        self.fold_order: list[str] = []
        self.senders: list[str] = []
        self.pending: list[tuple[int, str, CheckedUpdate]] = []
        # The encoded updates a relayed downlink would send, in fold order (with `fold_in_order`, `pending`
        # holds them instead); None once relaying cannot win (or never could): the round closes union-only.
        self.relayed: list[Update] | None = [] if self.downlink.may_relay else None
        self.relay_bytes = 0  # their bytes, as `Aggregate.nbytes` counts them; always below `relay_bound`
        self.relay_bound = union_bound(self.expect)

    def lend(self) -> Callable[[], None]:
        """Lend the current replica to a reader outside its holder's lock (a checkpoint being written, a state
        pull being sent; called under the lock `close` runs under): until the returned release is called (once;
        again is harmless), closes build the next replica anew instead of stepping this one in place. A release
        never called costs one close a copy, not values: the close after it replaces the lent replica."""
        with self._lending:
            loan = next(self._loans)
            self._lent[loan] = weakref.ref(self.replica)

        def release() -> None:
            with self._lending:
                self._lent.pop(loan, None)

        return release

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
        self._refuse_duplicate(worker_id)
        self.fold(worker_id, check_update(worker_id, update, self.expect), order)

    def _refuse_duplicate(self, worker_id: str) -> None:
        if worker_id in self.senders:
            raise UpdateRejected(f"worker {worker_id} already sent its update for round {self.round}", duplicate=True)

    def fold(self, worker_id: str, checked: CheckedUpdate, order: int = 0) -> None:
        """Fold an update `check_update` passed against this round's `expect` (the caller makes sure it is
        still this round's); UpdateRejected (duplicate) for a second one from `worker_id`, nothing folded."""
        self._refuse_duplicate(worker_id)
        self.senders.append(worker_id)
        self._keep_for_relay(checked.raw)
        if self.fold_in_order:
            self.pending.append((order, worker_id, checked))
        else:
            self.acc.fold(worker_id, checked)
            self.fold_order.append(worker_id)

    def _keep_for_relay(self, raw: Update) -> None:
        """Keep `raw` for a relayed downlink while relaying the round can still be smaller than its union;
        drop every kept one as soon as it cannot (the relay would then have `relay_bound` bytes or more, and
        the union never has more: `union_bound`)."""
        if self.relayed is None:
            return
        nbytes = raw.nbytes()
        if self.relay_bytes + nbytes >= self.relay_bound:
            self.relayed, self.relay_bytes = None, 0
            return
        self.relay_bytes += nbytes
        if not self.fold_in_order:
            self.relayed.append(raw)

    def _folded_in_order(self) -> tuple[Accumulator, list[str], tuple[Update, ...] | None]:
        """With `fold_in_order`, a fresh accumulator with the pending updates folded by order (the open round
        keeps them pending, so a close that fails can be tried again); else the round's own. Last, the
        updates to relay in fold order, or None when the round is union-only."""
        if not self.fold_in_order:
            return self.acc, self.fold_order, None if self.relayed is None else tuple(self.relayed)
        acc, order, relayed = self.protocol.new_round(), [], []
        for _, worker_id, checked in sorted(self.pending, key=lambda p: (p[0], p[1])):
            acc.fold(worker_id, checked)
            order.append(worker_id)
            relayed.append(checked.raw)
        return acc, order, None if self.relayed is None else tuple(relayed)

    def close(self) -> Aggregate:
        """Close the round: its aggregate (to broadcast); the aggregator's replica moves one round on.
        Atomic: if anything raises (an aggregate that overflowed to Inf, ...) nothing has changed."""
        if not self.senders:
            raise ValueError(f"round {self.round} has no updates to close")
        acc, order, relayed = self._folded_in_order()
        update, state = self.protocol.close(acc, self.state)
        aggregate, downlink_state = self.downlink.encode(self.round, update, relayed, self.downlink_state)
        with self._lending:
            in_place = self.in_place and not any(lent() is self.replica for lent in self._lent.values())
            self._lent = {loan: lent for loan, lent in self._lent.items() if lent() is not None}
        if aggregate.relayed:
            # Every replica folds the relayed updates again, in this fold order, to exactly `update` (bit for bit:
            # tests/unit/test_downlink.py): the aggregator has it already, and skips the fold and its dense copy.
            replica = apply_update(self.protocol, update, self.replica, in_place=in_place)
        else:
            # The update is not needed past here (replicas apply the aggregate): dropped before the apply, so the
            # two are never held at once (a dense aggregate holds on to it anyway).
            del update
            replica = apply_aggregate(self.protocol, self.downlink, aggregate, self.replica, in_place=in_place)
        self.state, self.downlink_state, self.replica = state, downlink_state, replica
        self.last_fold_order = order  # who sent the relayed updates, in order
        self._open()
        return aggregate


def union_bound(expect: Expectation) -> int:
    """The most bytes a union aggregate (`protocols.downlink.union_payload`) of a round can have: every tensor
    an update carries, dense, in its values' dtype (the update's float dtype, at least float32); a sparser
    union sends indices instead, only while they make it smaller."""
    return sum(math.prod(shape) * torch.promote_types(expect.dtypes[name], torch.float32).itemsize
               for name, shape in expect.shapes.items())
