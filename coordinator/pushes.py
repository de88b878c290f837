"""Pushes: how `CoordinatorState` (coordinator/state.py) judges and folds one worker's update.

A push is refused from its header alone (`check_push`) before its payload is read, then judged again in
full by `submit`: under the state lock everything but the payload (`_admit`), the payload decoded and checked
off it (`check_update`, the costly part), and under the lock again the fold (`_fold`), only if the round it
was checked against is still open. Anything refused raises `Rejected` and leaves the state as it was.

A mixin of `CoordinatorState`, which holds the state named below and the lock that guards it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from coordinator.deal import Deal
from coordinator.errors import Code, Rejected
from coordinator.membership import Member
from coordinator.phase import Phase
from coordinator.round_record import OpenRound, check_metrics
from protocols.base import CheckedUpdate, Protocol, Update
from protocols.check import Expectation
from protocols.config import RunConfig
from protocols.round import RoundAggregator, UpdateRejected, check_update


class AlreadyFolded(Exception):
    """A push for a (worker, round) whose update was already folded: acknowledged, not folded again."""

    def __init__(self, worker_id: str, round_: int) -> None:
        super().__init__(f"worker {worker_id}'s update for round {round_} was already folded")
        self.round = round_


class PushHandling:
    """`CoordinatorState`'s pushes (see the module docstring); every name below is the state's own."""

    cfg: RunConfig
    protocol: Protocol[Any, Any]
    clock: Callable[[], float]
    members: dict[str, Member]
    phase: Phase
    round: int
    aggregator: RoundAggregator | None
    deal: Deal | None
    folded: dict[int, set[str]]
    start_hashes: dict[int, str]
    _current: OpenRound | None
    _cond: threading.Condition
    _tally: threading.Lock

    def _member(self, worker_id: str, token: str) -> Member:
        raise NotImplementedError  # CoordinatorState's: the calling worker, authenticated

    def _maybe_close(self) -> None:
        raise NotImplementedError  # CoordinatorState's: close the open round if it is due

    def _wake_waiters(self) -> None:
        raise NotImplementedError  # CoordinatorState's: wake the round's long polls if the round or phase moved

    def check_push(self, worker_id: str, token: str, round_: int, initial_state: bool, base: str = "",
                   record_late: bool = True) -> None:
        """Refuse a push from its header alone (bad token, unknown worker, stale round or base, a second update
        or initial state), before its payload is read. `submit` checks all of it again under the lock.
        `record_late` False: a judgement ahead of the push (ReservePush), which counts no late update of its own."""
        with self._cond:
            if initial_state:
                self._member(worker_id, token)
                if self.aggregator is not None:
                    raise Rejected(Code.ALREADY_EXISTS, "the coordinator already holds the global state")
            else:
                self._open_round_for(worker_id, token, round_, record_late)
                self._check_base(round_, base)

    def _check_base(self, round_: int, base: str) -> None:
        """An update must have been computed against the state its round started from (under overlap, CO2's
        one-round-stale start: the state the round before started from). Refused as a stale round otherwise,
        so the worker resyncs its replica instead of feeding the average an update of another state."""
        if not base:
            return
        starts = [round_ - 1, round_] if self.protocol.overlapped else [round_]
        allowed = [self.start_hashes[r] for r in starts if r in self.start_hashes]
        if base not in allowed:
            raise Rejected(Code.FAILED_PRECONDITION,
                           f"stale round: the update for round {round_} was computed from state {base[:16]}, not "
                           f"from the state its round started from "
                           f"({', '.join(h[:16] for h in allowed) or 'no longer kept'}); pull the state again")

    def already_folded(self, worker_id: str, round_: int) -> bool:
        """Whether this worker's update for `round_` was folded (a retry after a lost reply)."""
        return worker_id in self.folded.get(round_, ())

    def _open_round_for(self, worker_id: str, token: str, round_: int,
                        record_late: bool = True) -> tuple[Member, OpenRound]:
        member = self._member(worker_id, token)
        if self.already_folded(worker_id, round_):
            raise AlreadyFolded(worker_id, round_)
        if self.phase is Phase.WAITING and self.aggregator is not None:
            # Resumed, waiting for the quorum to come back: the round opens soon, the sender waits for it.
            raise Rejected(Code.FAILED_PRECONDITION, f"early round: update is for round {round_}, the coordinator is "
                                                     f"waiting for workers to reopen round {self.round}")
        if self.phase is Phase.FINISHED and round_ < self.round:  # a straggler's update after the last round
            raise Rejected(Code.FAILED_PRECONDITION,
                           f"stale round: update is for round {round_}, the run finished after round {self.round - 1}")
        if self.phase is not Phase.TRAINING or self._current is None or self.aggregator is None:
            raise Rejected(Code.FAILED_PRECONDITION, f"no round is open (phase {self.phase.value})")
        current = self._current
        if round_ > current.number:
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"early round: update is for round {round_}, the coordinator is still at round {current.number}",
            )
        if round_ < current.number:
            if self.cfg.cluster.late == "stale":
                return member, current  # folded into the open round, weighted down (`submit`)
            if record_late:
                current.late_dropped.append(worker_id)  # counted, nothing else changes
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"stale round: update is for round {round_}, the coordinator is at round {current.number}",
            )
        if round_ == current.number and worker_id in current.reported:
            raise Rejected(Code.ALREADY_EXISTS, f"worker {worker_id} already sent its update for round {round_}")
        if self.deal is not None and worker_id not in self.deal:
            raise Rejected(Code.FAILED_PRECONDITION,
                           f"worker {worker_id} joined while round {round_} was open and is dealt no shard in it "
                           f"(elastic membership): it trains from the next round")
        return member, current

    def submit(
        self, worker_id: str, token: str, round_: int, update: Update, metrics: dict[str, float], wire_bytes: int
    ) -> int:
        """Validate and fold one worker's update into the open round. Returns the round it counted for: a late
        update under `cluster.late: stale` counts for the open round, its weight times `stale_weight` per
        round of lateness, under the sender name "worker@round" (the worker still owes its own update).

        The update is decoded and checked (`check_update`, the costly part) without the lock, against the
        open round's expectation taken under it; under the lock again it is folded only if that round is
        still open with the same expectation. If the round closed meanwhile, the push is judged again from
        the start, as one arriving now would be (stale, or folded late); nothing is ever partly applied."""
        while True:
            with self._cond:
                try:
                    sender, late_update, expect = self._admit(worker_id, token, round_, update, metrics)
                except AlreadyFolded:
                    return round_  # acknowledged again, folded once
            try:
                checked = check_update(sender, late_update, expect)
            except UpdateRejected as err:
                raise Rejected(Code.INVALID_ARGUMENT, str(err)) from None
            with self._cond:
                try:
                    again = self._admit(worker_id, token, round_, update, metrics)
                except AlreadyFolded:  # a retry of this push folded while this one was being checked
                    return round_
                if again[0] != sender or again[2] is not expect:
                    continue  # the round closed meanwhile: judge the push again against the open one
                return self._fold(worker_id, round_, sender, checked, metrics, wire_bytes)

    def _admit(self, worker_id: str, token: str, round_: int, update: Update, metrics: dict[str, float]
               ) -> tuple[str, Update, Expectation]:
        """Under the lock: everything judged before the payload is decoded (token, round, base, metrics, a
        second update). The sender name the update folds under, the update (weighted down if late) and the
        open round's expectation to check it against."""
        _, current = self._open_round_for(worker_id, token, round_)
        assert self.aggregator is not None  # _open_round_for checked it
        self._check_base(round_, update.base)
        check_metrics(worker_id, metrics)
        late = round_ < current.number
        sender = f"{worker_id}@{round_}" if late else worker_id
        if sender in self.aggregator.senders:
            raise Rejected(Code.ALREADY_EXISTS, f"worker {sender} already sent its update for round {current.number}")
        if late:
            update = dataclasses.replace(
                update, weight=update.weight * self.cfg.cluster.stale_weight ** (current.number - round_))
        return sender, update, self.aggregator.expect

    def _fold(self, worker_id: str, round_: int, sender: str, checked: CheckedUpdate, metrics: dict[str, float],
              wire_bytes: int) -> int:
        """Under the lock, after `_admit` passed again for the same round: fold and count."""
        assert self.aggregator is not None and self._current is not None
        current, member = self._current, self.members[worker_id]
        try:
            self.aggregator.fold(sender, checked, member.index)
        except UpdateRejected as err:
            raise Rejected(Code.ALREADY_EXISTS if err.duplicate else Code.INVALID_ARGUMENT, str(err)) from None
        if sender != worker_id:
            current.late_folded[sender] = checked.weight
        else:
            current.reported[worker_id] = dict(metrics)
            if current.quorum_s is None and len(current.reported) >= self.cfg.cluster.quorum:
                current.quorum_s = self.clock() - current.started
        self.folded.setdefault(round_, set()).add(worker_id)
        member.tokens += int(metrics.get("tokens", 0))
        member.round, member.last_metrics = round_ + 1, dict(metrics)
        with self._tally:
            member.bytes_sent += wire_bytes
            member.protocol_sent += wire_bytes
            if "eval_loss" in metrics:  # the live view shows it as it comes, not only at the end
                member.eval_loss = metrics["eval_loss"]
            member.last_seen, member.alive = self.clock(), True
        self._maybe_close()
        self._wake_waiters()
        return current.number
