"""The round deadline policy (coordinator/deadline.py), pure, and the coordinator closing rounds by it."""

from __future__ import annotations

import math

import pytest

from coordinator.deadline import DeadlinePolicy, quantile
from coordinator.state import CoordinatorState
from protocols.registry import build_protocol
from protocols.settings import ClusterConfig
from tests.conftest import tiny_config
from tests.unit.test_coordinator_state import STATE, Clock, dense, join_all, update


def adaptive_state(**cluster: object) -> tuple[CoordinatorState, Clock]:
    """Three workers, quorum two, an adaptive deadline capped at 1000 s."""
    cfg = tiny_config(cluster={"workers": 3, "min_workers": 2, "round_deadline_s": 1000.0, "heartbeat_timeout_s": 1e6,
                               "deadline": "adaptive", **cluster}, train__steps=30)
    clock = Clock()
    return CoordinatorState(cfg, build_protocol(cfg), clock=clock), clock


def policy(**fields: object) -> DeadlinePolicy:
    return DeadlinePolicy(ClusterConfig.model_validate({"round_deadline_s": 100.0, **fields}))


def test_quantile_interpolates_between_order_statistics() -> None:
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5  # numpy's default (linear) on the sorted values
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.0) == 1.0 and quantile([4.0, 1.0, 3.0, 2.0], 1.0) == 4.0
    assert quantile([5.0], 0.9) == 5.0
    assert quantile([0.0, 10.0], 0.25) == 2.5
    with pytest.raises(ValueError, match="no values"):
        quantile([], 0.5)


def test_a_fixed_deadline_ignores_round_times() -> None:
    fixed = policy(deadline="fixed")
    for seconds in (1.0, 2.0, 3.0):
        fixed.observe(seconds)
    assert fixed.deadline_s() == 100.0


def test_the_adaptive_deadline_is_a_multiple_of_a_quantile_of_the_recent_quorum_times() -> None:
    adaptive = policy(deadline="adaptive", deadline_factor=2.0, deadline_quantile=0.5, deadline_window=3)
    assert adaptive.deadline_s() == 100.0  # nothing measured yet: the cap
    adaptive.observe(4.0)
    assert adaptive.deadline_s() == 8.0
    adaptive.observe(2.0)
    adaptive.observe(6.0)
    assert adaptive.deadline_s() == 2.0 * 4.0  # median of 4, 2, 6
    adaptive.observe(10.0)  # the window of 3 forgets the 4: median of 2, 6, 10
    assert adaptive.deadline_s() == 12.0
    adaptive.observe(None)  # a round without a quorum time changes nothing
    adaptive.observe(math.nan)
    adaptive.observe(-1.0)
    assert adaptive.deadline_s() == 12.0


def test_the_adaptive_deadline_never_exceeds_the_fixed_one() -> None:
    adaptive = policy(deadline="adaptive", deadline_factor=3.0)
    adaptive.observe(60.0)
    assert adaptive.deadline_s() == 100.0


def test_the_coordinator_closes_on_the_adaptive_deadline_learned_from_the_quorum_times() -> None:
    state, clock = adaptive_state(deadline_factor=2.0)
    ids = join_all(state, 3)
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    # Round 0: the quorum (2nd report) comes at 3 s, everyone by 5 s; closed by 'all'.
    clock.now = 1.0
    state.submit(ids[0], "", 0, update(0.1), {}, 1)
    clock.now = 3.0
    state.submit(ids[1], "", 0, update(0.1), {}, 1)
    clock.now = 5.0
    state.submit(ids[2], "", 0, update(0.1), {}, 1)
    assert state.history[-1].closed_by == "all" and state.history[-1].deadline_s == 1000.0
    assert state.deadline.deadline_s() == 6.0  # 2 x the quorum time of 3 s
    # Round 1 opened at 5 s: its quorum reports by 7 s, and it closes at 5 + 6 = 11 s, not before.
    clock.now = 7.0
    state.submit(ids[0], "", 1, update(0.1), {}, 1)
    state.submit(ids[1], "", 1, update(0.1), {}, 1)
    clock.now = 10.9
    state.tick()
    assert state.round == 1
    clock.now = 11.0
    state.tick()
    assert state.round == 2 and state.history[-1].closed_by == "deadline"
    assert state.history[-1].workers == sorted(ids[:2]) and state.history[-1].deadline_s == 6.0


def test_an_adaptive_deadline_never_closes_a_round_below_its_quorum() -> None:
    state, clock = adaptive_state()
    state.deadline.observe(1.0)
    ids = join_all(state, 3)
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    state.submit(ids[0], "", 0, update(0.1), {}, 1)
    clock.now = 500.0  # far past the adaptive deadline of 1.5 s, with one report of the two needed
    state.tick()
    assert state.round == 0
