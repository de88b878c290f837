"""A push that reserves its admission slot first (`ReservePush`, coordinator/reservations.py) sends its payload
only once the slot is its own; one that does not sends what its stream's window lets through and waits with it
in the coordinator's buffers. With the one admitted slot held by a stalled push, a real coordinator on loopback
shows both, from the waiting client's own count of the bytes it sent."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from protocols.base import Update
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.integration.hostile import admission_held, envelope, good_entries, member_envelope, running
from tests.integration.procs import wait_for
from tests.integration.stalling import code_of
from worker.client import CoordinatorClient


@pytest.mark.parametrize("reserving", [True, False])
def test_a_reserved_push_sends_nothing_until_its_slot_is_free(reserving: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("coordinator.servicer.PUSH_READS_PER_CORE", 0)  # one admitted push, whatever the cores
    if not reserving:
        monkeypatch.setattr(CoordinatorClient, "_reserve", lambda self, round_: None)
    with running(stream_idle_s=600.0) as (server, (first, second)):
        admitted = server.servicer.admitted
        result: list[Any] = []
        with admission_held(server, first) as held:
            pusher = threading.Thread(target=lambda: result.append(
                second.push(0, Update(good_entries()), {"tokens": 10.0})))
            pusher.start()
            wait_for(lambda: admitted.waiting == 1, 60, "the member's push to wait for the slot")
            time.sleep(0.5)  # time for a stream that was opened to send what it can
            sent_while_waiting = second.traffic.protocol_sent
        pusher.join(timeout=60)
    assert code_of(held) == grpc.StatusCode.INVALID_ARGUMENT
    assert result and result[0].accepted
    update_bytes = sum(p.nbytes() for p in good_entries().values())
    if reserving:
        assert sent_while_waiting == 0  # it waited in ReservePush: no stream, no payload
    else:
        assert sent_while_waiting > update_bytes  # header and every chunk: the whole update went out to wait
    assert second.traffic.protocol_sent > update_bytes
    assert admitted.in_use == 0 and admitted.waiting == 0
    assert server.servicer.reservations.held() == 0


def test_a_reservation_is_judged_as_its_push_would_be() -> None:
    """A reservation for a round that is not open, or from a stranger, is refused as the push itself would be,
    and keeps no slot."""
    with running() as (server, (first, _)):
        stub = lowband_pb2_grpc.CoordinatorStub(first.channel)

        def reserve(env: m.Envelope) -> grpc.StatusCode:
            try:
                stub.ReservePush(serde.to_pb(m.ReserveRequest(envelope=env, max_wait_s=1.0)), timeout=10)
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        assert reserve(member_envelope(first, round_=5)) == grpc.StatusCode.FAILED_PRECONDITION  # early round
        assert reserve(envelope(first.worker_id, token="wrong", run_id=first.run_id)) == grpc.StatusCode.UNAUTHENTICATED
        assert server.servicer.reservations.held() == 0
        assert reserve(member_envelope(first)) == grpc.StatusCode.OK
        assert server.servicer.reservations.held() == 1
        assert server.servicer.admitted.in_use == 1  # kept for its push
        first.push(0, Update(good_entries()), {"tokens": 10.0})  # its own reservation again, then this push's
        assert server.servicer.reservations.held() == 0 and server.servicer.admitted.in_use == 0
        # A retry of a push already folded (its reply lost) is answered from its header: reserved, nothing kept.
        reply = serde.from_pb(stub.ReservePush(serde.to_pb(m.ReserveRequest(envelope=member_envelope(first),
                                                                            max_wait_s=1.0)), timeout=10))
        assert reply.reserved and server.servicer.reservations.held() == 0
        assert first.push(0, Update(good_entries()), {"tokens": 10.0}).accepted  # folded once
        assert server.state.aggregator is not None and server.state.aggregator.senders == [first.worker_id]


def test_reservations_waiting_at_once_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each waiting ReservePush holds a server thread, so only so many may wait (CallLimits.reserves); one more
    is refused as busy at once, and none of them keeps a slot once the wait is over."""
    monkeypatch.setattr("coordinator.servicer.PUSH_READS_PER_CORE", 0)  # one admitted push, whatever the cores
    with running(stream_idle_s=600.0) as (server, (first, second)), \
            grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        stub = lowband_pb2_grpc.CoordinatorStub(channel)
        limit = server.servicer.reserve_slots.limit
        request = serde.to_pb(m.ReserveRequest(envelope=member_envelope(second), max_wait_s=2.0))
        with admission_held(server, first) as held:
            waiting = [stub.ReservePush.future(request, timeout=30) for _ in range(limit)]
            wait_for(lambda: server.servicer.reserve_slots.in_use == limit, 60, "every reservation to wait")
            with pytest.raises(grpc.RpcError) as refused:
                stub.ReservePush(request, timeout=30)
            replies = [serde.from_pb(f.result()) for f in waiting]
    assert code_of(held) == grpc.StatusCode.INVALID_ARGUMENT  # ended without its payload
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (refused.value.details() or "").startswith(m.BUSY_PREFIXES)
    assert [r.reserved for r in replies] == [False] * limit  # the one slot stayed the stalled push's
    assert server.servicer.reserve_slots.in_use == 0 and server.servicer.reservations.held() == 0
