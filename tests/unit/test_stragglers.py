"""Straggler controls, pure and on the coordinator's state machine (fake clock): late updates dropped or
folded with a staleness weight, dynamic local updates with token-weighted averaging, straggler factors."""

from __future__ import annotations

import math

import pytest
import torch

from compression.payload import dense
from coordinator.errors import Code, Rejected
from coordinator.state import CoordinatorState
from protocols.base import Update
from protocols.config import ConfigError, apply_overrides, parse_config
from protocols.downlink import Downlink
from protocols.local_updates import adapted_inner_steps, round_target_s
from protocols.registry import build_protocol
from protocols.replica import Replica
from protocols.round import RoundAggregator
from tests.conftest import tiny_config
from tests.unit.test_coordinator_state import STATE, Clock, join_all, update
from worker.faults import Faults


def state_for(workers: int, late: str = "drop", stale_weight: float = 0.5) -> tuple[CoordinatorState, Clock, list[str]]:
    cfg = tiny_config(cluster={"workers": workers, "min_workers": min(2, workers), "round_deadline_s": 10.0,
                               "heartbeat_timeout_s": 1e6, "late": late, "stale_weight": stale_weight},
                      train__steps=30)
    clock = Clock()
    state = CoordinatorState(cfg, build_protocol(cfg), clock=clock)
    ids = join_all(state, workers)
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    return state, clock, ids


def reference(means: list[float]) -> torch.Tensor:
    """The global parameters after rounds whose mean pseudo-gradients are `means` (one worker sends each)."""
    state, _, ids = state_for(1)
    for round_, mean in enumerate(means):
        state.submit(ids[0], "", round_, update(mean), {}, 1)
    assert state.aggregator is not None
    return state.aggregator.replica.params["w"]


def straggle_round_zero(late: str, stale_weight: float = 0.5) -> tuple[CoordinatorState, list[str]]:
    """Round 0 closes at its deadline without ids[2]; ids[2] then pushes its round-0 update late."""
    state, clock, ids = state_for(3, late, stale_weight)
    state.submit(ids[0], "", 0, update(0.1), {}, 1)
    state.submit(ids[1], "", 0, update(0.2), {}, 1)
    clock.now = 10.0
    state.tick()
    assert state.round == 1 and state.history[-1].closed_by == "deadline"
    return state, ids


def test_a_late_update_is_dropped_and_counted_under_late_drop() -> None:
    state, ids = straggle_round_zero("drop")
    with pytest.raises(Rejected) as info:
        state.submit(ids[2], "", 0, update(0.4), {"tokens": 80.0}, 1)
    assert info.value.code is Code.FAILED_PRECONDITION and info.value.message.startswith("stale round")
    for worker, value in zip(ids, (0.1, 0.1, 0.3), strict=True):
        state.submit(worker, "", 1, update(value), {}, 1)
    record = state.history[-1]
    assert record.late_dropped == [ids[2]] and record.late_folded == {}
    assert state.members[ids[2]].tokens == 0  # nothing of the dropped update counted
    assert state.aggregator is not None
    assert torch.allclose(state.aggregator.replica.params["w"], reference([0.15, 0.5 / 3]))


@pytest.mark.parametrize("stale_weight", [0.5, 0.25])
def test_a_late_update_is_folded_into_the_open_round_with_its_weight_times_the_stale_weight(
        stale_weight: float) -> None:
    state, ids = straggle_round_zero("stale", stale_weight)
    counted = state.submit(ids[2], "", 0, update(0.4), {"tokens": 80.0}, 1)
    assert counted == 1  # counted for the open round
    assert state.round == 1  # the late update is not ids[2]'s report of round 1: the round still waits for it
    for worker, value in zip(ids, (0.1, 0.1, 0.3), strict=True):
        state.submit(worker, "", 1, update(value), {}, 1)
    record = state.history[-1]
    assert record.closed_by == "all" and record.workers == sorted(ids)
    assert record.late_folded == {f"{ids[2]}@0": stale_weight} and record.late_dropped == []
    assert state.members[ids[2]].tokens == 80
    mean = (0.1 + 0.1 + 0.3 + stale_weight * 0.4) / (3 + stale_weight)  # the hand computation
    assert state.aggregator is not None
    assert torch.allclose(state.aggregator.replica.params["w"], reference([0.15, mean]))
    assert state.submit(ids[2], "", 0, update(0.4), {}, 1) == 0  # a retry is acknowledged, not folded again


def test_a_late_update_two_rounds_behind_is_weighted_by_the_stale_weight_squared() -> None:
    state, clock, ids = state_for(3, "stale", 0.5)
    for round_ in (0, 1):
        state.submit(ids[0], "", round_, update(0.1), {}, 1)
        state.submit(ids[1], "", round_, update(0.1), {}, 1)
        clock.now += 10.0
        state.tick()
    assert state.round == 2
    state.submit(ids[2], "", 0, update(0.4), {}, 1)
    for worker in ids:
        state.submit(worker, "", 2, update(0.1), {}, 1)
    assert state.history[-1].late_folded == {f"{ids[2]}@0": 0.25}


def test_the_round_target_is_h_fastest_steps_and_each_worker_fits_its_steps_in_it() -> None:
    assert round_target_s(10, [0.3, 0.1, math.nan, 0.0, 0.2]) == pytest.approx(1.0)
    assert round_target_s(10, []) == 0.0
    assert adapted_inner_steps(10, 1.0, 0.1) == 10
    assert adapted_inner_steps(10, 1.0, 0.3) == 3  # 3x slower: a third of the steps
    assert adapted_inner_steps(10, 1.0, 0.05) == 10  # never more than H
    assert adapted_inner_steps(10, 1.0, 100.0) == 1  # never fewer than one
    assert adapted_inner_steps(10, 0.0, 0.3) == 10 and adapted_inner_steps(10, 1.0, 0.0) == 10  # nothing known
    assert adapted_inner_steps(4, 1.0, 0.3) == 3  # a short last round caps it too


def test_token_weighted_averaging_is_the_token_weighted_mean_of_the_pseudo_gradients() -> None:
    """sum_i t_i d_i / sum_i t_i, through the same RoundAggregator every transport runs."""
    cfg = tiny_config(protocol={"kind": "diloco", "inner_steps": 5, "outer_lr": 1.0, "outer_momentum": 0.0,
                                "adaptive_inner_steps": True})
    protocol = build_protocol(cfg)
    aggregator = RoundAggregator(protocol, Downlink.of(cfg.protocol, protocol), Replica(0, {"w": torch.zeros(4)}))
    deltas = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([-1.0, 0.0, 5.0, 2.0])}
    tokens = {"a": 3072.0, "b": 1024.0}
    for worker, delta in deltas.items():
        aggregator.submit(worker, Update({"w": dense(delta)}, weight=tokens[worker]))
    aggregator.close()
    expected = (3072.0 * deltas["a"] + 1024.0 * deltas["b"]) / 4096.0
    # Outer SGD with lr 1 and no momentum: theta <- theta - mean pseudo-gradient.
    assert torch.allclose(aggregator.replica.params["w"], -expected)


def test_straggler_factors_resolve_the_same_everywhere_and_bad_ones_are_refused() -> None:
    def factors(value: str, workers: int = 4) -> list[float]:
        cfg = parse_config(apply_overrides({"cluster": {"workers": workers}}, [f"faults.stragglers={value}"]))
        return [cfg.faults.slowdown(i, workers, cfg.seed) for i in range(workers)]

    assert factors("{factors: [3, 1]}") == [3.0, 1.0, 3.0, 1.0]
    drawn = factors("{fraction: 0.25, factor: 3}")
    assert sorted(drawn) == [1.0, 1.0, 1.0, 3.0] and drawn == factors("{fraction: 0.25, factor: 3}")
    assert sorted(factors("{fraction: 0.5, factor: 2}", 8)) == [1.0] * 4 + [2.0] * 4
    spread = factors("{lognormal_sigma: 0.5}", 16)
    assert all(f >= 1.0 for f in spread) and len(set(spread)) == 16
    assert parse_config({}).faults.slowdown(0, 4, 0) == 1.0
    for bad, named in (("{factors: [0.5]}", "factors"), ("{factors: [3], fraction: 0.5}", "exactly one"),
                       ("{}", "exactly one"), ("{fraction: 0.5, factor: 0.5}", "factor")):
        with pytest.raises(ConfigError, match=named):
            factors(bad)


def test_straggler_controls_are_refused_where_they_do_not_apply() -> None:
    with pytest.raises(ConfigError, match=r"cluster.late 'stale' is for protocol.kind diloco or sparseloco"):
        parse_config(apply_overrides({}, ["protocol.kind=econtrol", "cluster.late=stale"]))
    with pytest.raises(ConfigError, match=r"adaptive_inner_steps needs a coordinator"):
        parse_config(apply_overrides({}, ["protocol.adaptive_inner_steps=true", "cluster.transport=allgather"]))
    with pytest.raises(ConfigError, match=r"cluster\.deadline"):
        parse_config(apply_overrides({}, ["cluster.deadline=sometimes"]))


def test_a_slowed_step_sleeps_its_factor_minus_one_times_its_measured_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.faults

    slept: list[float] = []
    monkeypatch.setattr(worker.faults.time, "sleep", slept.append)
    Faults(slowdown=3.0).after_step(0.05)
    Faults().after_step(10.0)  # no slowdown: no sleep
    Faults(slowdown=2.0).after_step(0.0)
    assert slept == [pytest.approx(0.1)]



def test_the_stragglers_recipe_resolves_by_name_with_what_its_comments_say() -> None:
    from deploy.cli import recipe_path
    from protocols.config import load_config

    cfg = load_config(recipe_path("stragglers"))
    assert cfg.protocol.kind == "diloco" and getattr(cfg.protocol, "adaptive_inner_steps", False)
    cluster = cfg.cluster
    assert (cluster.workers, cluster.quorum, cluster.deadline, cluster.late) == (4, 3, "adaptive", "stale")
    assert sorted(cfg.faults.slowdown(i, 4, cfg.seed) for i in range(4)) == [1.0, 1.0, 1.0, 3.0]
