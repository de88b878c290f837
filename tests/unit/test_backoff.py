"""The retry backoff every client shares: jittered waits in [0.5, 1.5) x a delay that doubles up to its cap."""

from __future__ import annotations

import pytest

from worker import backoff as backoff_module
from worker.backoff import Backoff


def test_waits_are_jittered_around_a_delay_that_doubles_up_to_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(backoff_module.time, "sleep", slept.append)
    draws = iter([0.0, 0.999, 0.5, 0.5, 0.5, 0.5])
    monkeypatch.setattr(backoff_module.random, "random", lambda: next(draws))
    b = Backoff(first_s=0.1, cap_s=0.5)
    for _ in range(6):
        b.wait()
    assert slept == pytest.approx([0.05, 0.2 * 1.499, 0.4, 0.5, 0.5, 0.5])
