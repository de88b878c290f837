"""Pushes are read, decoded and folded on the servicer's push threads, never on gRPC's pool threads: a thread that
ran torch keeps torch's per-thread state for life (bench/call_memory.py), and the pool has a thread per open call.
A real coordinator on loopback, two real clients; the state machine's entry points record the thread they ran on."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from coordinator.state import CoordinatorState
from protocols.base import Update
from tests.integration.hostile import good_entries, running


def test_pushes_and_the_initial_state_are_taken_on_push_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    ran_on: list[tuple[str, str]] = []
    for method in ("submit", "offer_initial_state"):
        real = getattr(CoordinatorState, method)

        def recorded(self: CoordinatorState, *args: Any, _real: Any = real, _method: str = method,
                     **kwargs: Any) -> Any:
            ran_on.append((_method, threading.current_thread().name))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(CoordinatorState, method, recorded)
    with running() as (server, clients):
        results = [client.push(0, Update(good_entries()), {"tokens": 10.0}) for client in clients]
        assert server.state.round == 1  # both folded: the round closed
    assert all(r.accepted for r in results)
    assert sorted(m for m, _ in ran_on) == ["offer_initial_state", "submit", "submit"]
    assert all(name.startswith("lowband-push") for _, name in ran_on), ran_on
