"""Integration fixtures: no process a test started outlives it, pass or fail."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.procs import kill_leftovers


@pytest.fixture(autouse=True)
def _kill_leftover_processes() -> Iterator[None]:
    yield
    kill_leftovers()
