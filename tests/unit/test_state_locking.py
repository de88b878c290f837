"""The state machine decodes and checks a push off its lock (coordinator/state.py `submit`): a check that takes
long holds up no heartbeat and no other push, and a round that closes while a push is being checked judges
that push again as one arriving after the close would be (stale, or folded late with its staleness weight).
Once training started, heartbeats and byte counts take only the small member lock (`_tally`), so even a
round close, which holds the state lock, delays none of them."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import coordinator.pushes as pushes_module
import coordinator.state as state_module
from compression.payload import dense
from coordinator.errors import Code, Rejected
from coordinator.state import CoordinatorState
from protocols.base import CheckedUpdate, Update
from protocols.check import Expectation
from protocols.config import PROTOCOL_VERSION
from protocols.registry import build_protocol
from protocols.round import RoundAggregator
from tests.conftest import tiny_config


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _started(workers: int, late: str = "drop", quorum: int | None = None, clock: Clock | None = None
             ) -> tuple[CoordinatorState, list[str]]:
    """A run of `workers` whose round closes when all reported, or after 10 s (`clock`) with `quorum` of them."""
    cfg = tiny_config(cluster={"workers": workers, "min_workers": quorum or workers, "round_deadline_s": 10.0,
                               "heartbeat_timeout_s": 1000.0, "late": late, "stale_weight": 0.5})
    state = CoordinatorState(cfg, build_protocol(cfg), clock=clock or Clock())
    ids = [state.join("host", "", PROTOCOL_VERSION).worker_id for _ in range(workers)]
    state.offer_initial_state(ids[0], "", {"w": dense(torch.ones(3, 2))})
    return state, ids


def _update(value: float) -> Update:
    return Update({"w": dense(torch.full((3, 2), value))})


class BlockedCheck:
    """Stands in for `check_update` in coordinator.pushes: the check of `worker` waits for `release`."""

    def __init__(self, worker: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.worker = worker
        self.checking, self.release = threading.Event(), threading.Event()
        self.original = pushes_module.check_update
        self.calls: list[str] = []
        monkeypatch.setattr(pushes_module, "check_update", self)

    def __call__(self, sender: str, update: Update, expect: Expectation) -> CheckedUpdate:
        self.calls.append(sender)
        if sender.startswith(self.worker) and len([c for c in self.calls if c.startswith(self.worker)]) == 1:
            self.checking.set()
            assert self.release.wait(60)  # hang guard: the test releases it
        return self.original(sender, update, expect)


def _push(state: CoordinatorState, worker: str, round_: int, value: float) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(state.submit(worker, "", round_, _update(value), {"tokens": 1.0}, 10))
        except Rejected as err:
            outcome.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_heartbeat_and_another_push_are_served_while_an_update_is_being_checked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    state, ids = _started(3)
    blocked = BlockedCheck(ids[0], monkeypatch)
    slow, outcome = _push(state, ids[0], 0, 0.1)
    assert blocked.checking.wait(60)
    beat = threading.Thread(target=state.heartbeat, args=(ids[1], "", 7, 2.0, None))
    beat.start()
    beat.join(60)
    assert not beat.is_alive()  # served while w0's update is still being checked
    assert state.members[ids[1]].step == 7
    assert state.submit(ids[1], "", 0, _update(0.2), {"tokens": 1.0}, 10) == 0  # folds meanwhile too
    assert state.aggregator is not None and state.aggregator.senders == [ids[1]]  # nothing of w0's yet
    blocked.release.set()
    slow.join(60)
    assert outcome == [0]
    assert state.aggregator.senders == [ids[1], ids[0]]


def test_a_push_whose_round_closed_while_it_was_checked_is_refused_as_stale(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    state, ids = _started(2, quorum=1, clock=clock)
    blocked = BlockedCheck(ids[0], monkeypatch)
    slow, outcome = _push(state, ids[0], 0, 0.1)
    assert blocked.checking.wait(60)
    clock.now = 11.0  # past the deadline: w1's report, the quorum, closes the round
    state.submit(ids[1], "", 0, _update(0.2), {"tokens": 1.0}, 10)
    assert state.round == 1  # closed with w1 alone while w0's update was being checked
    blocked.release.set()
    slow.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], Rejected)
    assert outcome[0].code is Code.FAILED_PRECONDITION and outcome[0].message.startswith("stale round")
    assert state.history[0].workers == [ids[1]]
    assert state.aggregator is not None and state.aggregator.senders == []  # nothing folded into round 1
    assert state.members[ids[0]].round == 0


def test_a_push_whose_round_closed_while_it_was_checked_is_checked_again_and_folded_late(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    state, ids = _started(2, late="stale", quorum=1, clock=clock)
    blocked = BlockedCheck(ids[0], monkeypatch)
    slow, outcome = _push(state, ids[0], 0, 0.1)
    assert blocked.checking.wait(60)
    clock.now = 11.0  # past the deadline: w1's report, the quorum, closes the round
    state.submit(ids[1], "", 0, _update(0.2), {"tokens": 1.0}, 10)
    assert state.round == 1
    blocked.release.set()
    slow.join(60)
    assert outcome == [1]  # counted for the open round
    late = f"{ids[0]}@0"
    assert blocked.calls.count(late) == 1  # checked again, against round 1's expectation
    assert state.aggregator is not None and state.aggregator.senders == [late]
    assert state._current is not None and state._current.late_folded == {late: 0.5}


def test_heartbeats_and_byte_counts_are_served_while_a_round_close_holds_the_lock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    state, ids = _started(2)
    closing, release = threading.Event(), threading.Event()
    close = RoundAggregator.close

    def slow_close(self: RoundAggregator) -> Any:
        closing.set()
        assert release.wait(60)  # hang guard: the test releases it
        return close(self)

    monkeypatch.setattr(RoundAggregator, "close", slow_close)
    state.submit(ids[0], "", 0, _update(0.1), {"tokens": 1.0}, 10)
    last, _ = _push(state, ids[1], 0, 0.2)  # the last report: its fold closes the round, under the lock
    assert closing.wait(60)
    calls = [threading.Thread(target=state.heartbeat, args=(ids[0], "", 9, 1.5, None)),
             threading.Thread(target=state.count_control, args=(ids[0], 30, 40))]
    for call in calls:
        call.start()
        call.join(60)
        assert not call.is_alive()  # served while the close still holds the state lock
    assert state.members[ids[0]].step == 9 and state.members[ids[0]].control_received >= 40
    assert state.round == 0  # the close is still going on
    release.set()
    last.join(60)
    assert state.round == 1


def test_a_heartbeat_is_served_while_the_initial_state_is_being_checked_and_a_losing_offer_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(cluster={"workers": 2, "heartbeat_timeout_s": 1000.0})
    state = CoordinatorState(cfg, build_protocol(cfg), clock=Clock())
    ids = [state.join("host", "", PROTOCOL_VERSION).worker_id for _ in range(2)]
    checking, release = threading.Event(), threading.Event()
    check = state_module.check_initial_state

    def slow_check(worker_id: str, payloads: Any) -> Any:
        if worker_id == ids[0]:
            checking.set()
            assert release.wait(60)  # hang guard: the test releases it
        return check(worker_id, payloads)

    monkeypatch.setattr(state_module, "check_initial_state", slow_check)
    outcome: list[Any] = []

    def offer() -> None:
        try:
            outcome.append(state.offer_initial_state(ids[0], "", {"w": dense(torch.ones(3, 2))}, 100))
        except Rejected as err:
            outcome.append(err)

    slow = threading.Thread(target=offer)
    slow.start()
    assert checking.wait(60)
    beat = threading.Thread(target=state.heartbeat, args=(ids[1], "", 3, None, None))
    beat.start()
    beat.join(60)
    assert not beat.is_alive() and state.members[ids[1]].step == 3  # served while the state is checked
    state.offer_initial_state(ids[1], "", {"w": dense(torch.full((3, 2), 2.0))}, 100)  # wins the race
    release.set()
    slow.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], Rejected) and outcome[0].code is Code.ALREADY_EXISTS
    assert state.aggregator is not None and float(state.aggregator.replica.params["w"][0, 0]) == 2.0
    assert state.members[ids[0]].state_sent == 0 and state.members[ids[1]].state_sent == 100
