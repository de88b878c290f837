"""The coordinator's round/membership state machine, driven with a fake clock (no sockets, no threads)."""

from __future__ import annotations

import pytest
import torch

from compression.payload import dense
from compression.registry import decode
from coordinator.errors import Code, Rejected
from coordinator.state import CoordinatorState, Phase
from protocols.base import Update
from protocols.config import PROTOCOL_VERSION
from protocols.registry import build_protocol
from protocols.wire.serde import state_hash
from tests.conftest import tiny_config

STATE = {"w": torch.ones(3, 2)}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(workers: int = 3, min_workers: int = 2, deadline: float = 10.0, timeout: float = 5.0
         ) -> tuple[CoordinatorState, Clock]:
    cluster = {"workers": workers, "min_workers": min_workers, "round_deadline_s": deadline,
               "heartbeat_timeout_s": timeout}
    cfg = tiny_config(cluster=cluster)
    clock = Clock()
    return CoordinatorState(cfg, build_protocol(cfg), decode=decode, hasher=state_hash, clock=clock), clock


def join_all(state: CoordinatorState, n: int) -> list[str]:
    return [state.join("host", "", PROTOCOL_VERSION).worker_id for _ in range(n)]


def update(value: float) -> Update:
    return Update({"w": dense(torch.full((3, 2), value))})


def test_only_the_first_joiner_is_asked_to_offer_the_initial_state() -> None:
    state, _ = make()
    ids = join_all(state, 3)
    assert [state.must_offer_state(w) for w in ids] == [True, False, False]
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    assert not any(state.must_offer_state(w) for w in ids)
    assert state.phase is Phase.TRAINING and state.round == 0


def test_a_dead_initializer_is_replaced_by_the_next_joiner() -> None:
    state, clock = make(timeout=5.0)
    first = state.join("host", "", PROTOCOL_VERSION).worker_id
    clock.now = 6.0
    state.tick()  # the initializer went silent before offering anything
    second = state.join("host", "", PROTOCOL_VERSION).worker_id
    assert state.must_offer_state(second) and not state.must_offer_state(first)


def test_round_closes_at_the_deadline_with_a_quorum_but_not_without() -> None:
    state, clock = make(workers=3, min_workers=2, deadline=10.0, timeout=100.0)
    ids = join_all(state, 3)
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    state.submit(ids[0], "", 0, update(0.1), {}, 10)
    clock.now = 11.0
    state.tick()
    assert state.round == 0  # one report is below the quorum of two: keep waiting
    state.submit(ids[1], "", 0, update(0.3), {}, 10)  # past the deadline, the quorum report closes it
    assert state.round == 1 and state.history[-1].closed_by == "deadline"
    assert state.history[-1].workers == sorted(ids[:2])
    with pytest.raises(Rejected) as info:  # the straggler's late update is stale now
        state.submit(ids[2], "", 0, update(9.0), {}, 10)
    assert info.value.code is Code.FAILED_PRECONDITION


def test_a_silent_worker_is_dropped_and_the_round_closes_without_it() -> None:
    state, clock = make(workers=2, min_workers=1, deadline=1000.0, timeout=5.0)
    ids = join_all(state, 2)
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    state.submit(ids[0], "", 0, update(0.5), {}, 10)
    assert state.round == 0
    clock.now = 6.0
    state.heartbeat(ids[0], "", 5, 1.0, None)  # the reporter is alive, the other is silent
    state.tick()
    assert state.round == 1 and state.history[-1].closed_by == "all"
    assert not state.members[ids[1]].alive and state.members[ids[0]].alive


def test_rejected_updates_leave_no_trace() -> None:
    state, _ = make(workers=2, min_workers=2)
    ids = join_all(state, 2)
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    before = state.state_hash
    with pytest.raises(Rejected):
        state.submit(ids[0], "", 0, Update({"w": dense(torch.full((3, 2), float("nan")))}), {}, 10)
    assert state._current is not None and state._current.acc.count == 0
    assert state.members[ids[0]].bytes_up == 0 and state.state_hash == before
