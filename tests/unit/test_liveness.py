"""Membership liveness with the default config (issue 12: detection within 5 s by default): the state machine
drops a silent member once `cluster.heartbeat_timeout_s` passed, at its next tick (coordinator/run.py ticks every
0.25 s), and keeps one that beats; a timeout not above the interval is refused."""

from __future__ import annotations

import pytest

from coordinator.errors import Rejected
from coordinator.state import CoordinatorState
from coordinator.status import worker_status
from protocols.config import PROTOCOL_VERSION, ConfigError, RunConfig, parse_config
from protocols.registry import build_protocol

TICK_S = 0.25


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_silent_worker_is_detected_within_five_seconds_by_default_and_a_beating_one_is_kept() -> None:
    cfg = RunConfig()  # every default
    clock = Clock()
    state = CoordinatorState(cfg, build_protocol(cfg), clock=clock)
    silent = state.join("host", "", PROTOCOL_VERSION).worker_id
    beating = state.join("host", "", PROTOCOL_VERSION).worker_id
    alive: dict[str, list[float]] = {silent: [], beating: []}
    while clock.now < 5.0:
        clock.now += TICK_S
        if clock.now % cfg.cluster.heartbeat_interval_s < TICK_S / 2:
            state.heartbeat(beating, "", 0, None, None)
        state.tick()
        for member in state.members_copy():
            if member.alive:
                alive[member.worker_id].append(clock.now)
    assert max(alive[silent]) < 5.0 - TICK_S, "the silent worker was still alive at 5 s"
    assert max(alive[silent]) >= cfg.cluster.heartbeat_interval_s * 2, "dropped before it missed two heartbeats"
    assert max(alive[beating]) >= 5.0


def test_a_heartbeat_timeout_not_above_the_interval_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"heartbeat_timeout_s \(2\.0\) must exceed heartbeat_interval_s \(2\.0\)"):
        parse_config({"cluster": {"heartbeat_interval_s": 2.0, "heartbeat_timeout_s": 2.0}})


def test_an_open_call_keeps_a_silent_worker_alive_and_its_silence_counts_from_the_call_s_end() -> None:
    """`attend`: a worker waiting in a long poll sends no heartbeat; the call speaks for it while it is open, and
    the timeout runs from when it ended, not from when it began."""
    cfg = RunConfig()
    clock = Clock()
    state = CoordinatorState(cfg, build_protocol(cfg), clock=clock)
    waiting = state.join("host", "", PROTOCOL_VERSION).worker_id
    end = state.attend(waiting, "")
    clock.now = 10 * cfg.cluster.heartbeat_timeout_s
    state.tick()
    assert [m.alive for m in state.members_copy()] == [True], "dropped while its call was open"
    assert worker_status(state.members_copy()[0], clock.now).last_seen_s == 0.0  # `lowband status`: heard now
    end()
    end()  # a second end (the handler and the termination callback both) counts once
    assert [m.calls_open for m in state.members_copy()] == [0]
    clock.now += cfg.cluster.heartbeat_timeout_s - TICK_S
    state.tick()
    assert [m.alive for m in state.members_copy()] == [True], "its silence was counted from the call's start"
    assert worker_status(state.members_copy()[0], clock.now).last_seen_s == cfg.cluster.heartbeat_timeout_s - TICK_S
    clock.now += 2 * TICK_S
    state.tick()
    assert [m.alive for m in state.members_copy()] == [False], "still alive a timeout after its call ended"


def test_attending_checks_the_caller_as_any_call_does() -> None:
    cfg = parse_config({"cluster": {"token": "secret"}})
    state = CoordinatorState(cfg, build_protocol(cfg), clock=Clock())
    member, session = state.join_session("host", "secret", PROTOCOL_VERSION)
    for who, token in (("nobody", session), (member.worker_id, "secret"), (member.worker_id, "forged")):
        with pytest.raises(Rejected, match="bad token"):
            state.attend(who, token)
    assert [m.calls_open for m in state.members_copy()] == [0]
    state.attend(member.worker_id, session)
    assert [m.calls_open for m in state.members_copy()] == [1]
