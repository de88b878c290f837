"""The coordinator's and the rendezvous' bounds on calls in flight (coordinator/servicer.py `CallLimits`,
coordinator/rendezvous_servicer.py `RendezvousLimits`): room for every kind, scaled with the workers."""

from __future__ import annotations

from coordinator.rendezvous_servicer import RendezvousLimits
from coordinator.servicer import CallLimits
from protocols.wire.servicing import request_readers


def test_every_long_call_kind_has_its_room() -> None:
    for workers in (1, 10, 1000):
        limits = CallLimits(workers)
        assert limits.calls > limits.pushes + limits.waits + limits.reserves + limits.pulls + limits.readers
        assert limits.reserves >= workers and limits.waits >= workers  # one long poll of each per worker at once
        assert limits.max_concurrent_rpcs > limits.calls


def test_requests_being_read_at_once_scale_with_the_workers() -> None:
    assert request_readers(2) == 8  # the floor, for small runs
    assert request_readers(1000) == 125  # a fixed 8 refused hundreds of a 1,000-worker run's calls as busy
    assert CallLimits(1000).readers == RendezvousLimits(1000).readers == 125
