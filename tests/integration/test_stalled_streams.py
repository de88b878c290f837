"""Issue 12: no client can hold the coordinator. Twenty push streams that stall (opened, nothing sent) must
not starve members' heartbeats: past the push slots they are refused at once with RESOURCE_EXHAUSTED, and
the ones holding a slot are ended with DEADLINE_EXCEEDED once they idle past `cluster.stream_idle_s`
(the header: past min(idle, HEADER_WAIT_S)), as is a member's push that sends its header and stalls, and a
pull whose client stops reading."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from coordinator.server import CoordinatorServer
from coordinator.servicer import CallLimits
from protocols.base import Update
from protocols.wire import lowband_pb2 as pb
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.conftest import tiny_config
from tests.integration.hostile import (
    TOKEN,
    admission_held,
    fingerprint,
    good_entries,
    header,
    member_envelope,
    running,
)
from tests.integration.procs import wait_for
from tests.integration.stalling import STALLED, code_of, stalled
from worker.client import CoordinatorClient


def test_twenty_stalled_push_streams_do_not_starve_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("coordinator.servicer.HEADER_WAIT_S", 600.0)  # the held streams stay held (hang guard)
    release = threading.Event()
    with running(stream_idle_s=600.0) as (server, (first, second)), \
            grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        stub = lowband_pb2_grpc.CoordinatorStub(channel)
        slots = CallLimits.of(server.state.cfg).pushes
        futures = [stub.PushUpdate.future(stalled(release), timeout=300) for _ in range(STALLED)]
        try:
            wait_for(lambda: sum(f.done() for f in futures) >= STALLED - slots, 60, "the refused streams")
            codes = [code_of(f) for f in futures if f.done()]
            assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (STALLED - slots)
            assert sum(not f.done() for f in futures) == slots  # these hold every push slot, stalled
            for _ in range(5):  # members are served while the stalled streams are open
                assert first.heartbeat(1, 2.5, None).round == 0
                assert second.heartbeat(1, 2.5, None).round == 0
            assert first.wait_round(-1, max_wait_s=1).round == 0
            assert sum(not f.done() for f in futures) == slots
        finally:
            release.set()
            for future in futures:
                future.cancel()


def test_a_stalled_stream_is_ended_by_the_servers_idle_deadline() -> None:
    release = threading.Event()
    with running(stream_idle_s=1.0) as (server, (first, _)), \
            grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        stub = lowband_pb2_grpc.CoordinatorStub(channel)
        before = fingerprint(server)
        member_header = header(member_envelope(first), good_entries())
        try:
            for first_message in (None, member_header):  # nothing at all; a member's header, then nothing
                future = stub.PushUpdate.future(stalled(release, first_message), timeout=300)
                wait_for(future.done, 120, "the server to end the stalled stream")
                assert code_of(future) == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "sent nothing for 1 s" in (future.exception().details() or "")
        finally:
            release.set()
        assert fingerprint(server) == before
        assert first.heartbeat(1, 2.5, None).round == 0  # the coordinator kept serving


def test_a_member_that_stops_reading_its_pull_is_ended_by_the_idle_deadline(caplog: pytest.LogCaptureFixture) -> None:
    """A PullState whose client takes one message and then stops reading (flow control then blocks the
    server's send) is ended after the idle limit, so the pull slot and its thread come back."""
    cfg = tiny_config(protocol={"kind": "diloco", "inner_steps": 5},
                      cluster={"workers": 1, "token": TOKEN, "stream_idle_s": 1.0})
    server = CoordinatorServer(cfg).start()
    member = CoordinatorClient(server.address, token=TOKEN)
    try:
        member.join("test")
        member.offer_state({"w": torch.zeros(4 << 20)})  # 16 MiB: far more than the flow-control windows hold
        with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
            env = member_envelope(member)
            call = lowband_pb2_grpc.CoordinatorStub(channel).PullState(
                serde.to_pb(m.PullRequest(envelope=env)), timeout=300)
            assert next(call).WhichOneof("body") == "header"
            aggregator = server.state.aggregator
            assert aggregator is not None and aggregator._lent  # the replica is lent while the pull reads it
            wait_for(lambda: any("ending a stream" in r.getMessage() for r in caplog.records), 120,
                     "the server to end the stalled pull")
            with pytest.raises(grpc.RpcError) as info:
                for _ in call:  # what was in flight still arrives, then the status; never the whole state
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
            assert "sent nothing for 1 s" in (info.value.details() or "")
        assert member.pull().params["w"].numel() == 4 << 20  # a reading member still pulls it whole
        # Both loans are back, the ended pull's and the whole one's: the next close may step the replica in place.
        wait_for(lambda: not aggregator._lent, 60, "the pulls to give the replica back")
    finally:
        member.close()
        server.stop(0)


def test_a_member_dripping_its_push_is_ended_by_the_push_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each message within the idle limit, but the push as a whole past PUSH_BASE_S + bytes / MIN_PUSH_RATE."""
    monkeypatch.setattr("coordinator.servicer.PUSH_BASE_S", 1.0)
    stop = threading.Event()
    with running(stream_idle_s=60.0) as (server, (first, _)):
        before = fingerprint(server)
        entries = good_entries()

        def drip() -> Iterator[pb.PushMessage]:
            yield header(member_envelope(first), entries)
            for chunk in serde.encode_entries(entries, 1):  # 60 one-byte chunks, one every 0.2 s
                if stop.wait(0.2):
                    return
                yield pb.PushMessage(chunk=chunk)

        with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
            with pytest.raises(grpc.RpcError) as info:
                lowband_pb2_grpc.CoordinatorStub(channel).PushUpdate(drip(), timeout=300)
            stop.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        assert "ran past its server-side deadline" in (info.value.details() or "")
        assert fingerprint(server) == before


def test_a_member_refused_for_want_of_a_push_slot_retries_and_gets_through(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A full set of push slots makes the coordinator busy, not the member's update wrong: the worker's
    client retries the busy RESOURCE_EXHAUSTED with backoff, and its push folds once a slot is free."""
    monkeypatch.setattr("coordinator.servicer.HEADER_WAIT_S", 600.0)
    release = threading.Event()
    with running(stream_idle_s=600.0) as (server, (first, _)), \
            grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        stub = lowband_pb2_grpc.CoordinatorStub(channel)
        slots = CallLimits.of(server.state.cfg).pushes
        held = [stub.PushUpdate.future(stalled(release), timeout=300) for _ in range(slots)]
        result: list[Any] = []
        try:
            wait_for(lambda: server.servicer.push_slots.in_use == slots and server.state.aggregator is not None, 60,
                     "the stalled streams to hold every slot")
            pusher = threading.Thread(target=lambda: result.append(
                first.push(0, Update(good_entries()), {"tokens": 10.0})))
            pusher.start()
            wait_for(lambda: any("server busy" in r.getMessage() for r in caplog.records), 120,
                     "the member's push to be refused as busy")
            assert server.state.aggregator is not None and server.state.aggregator.senders == []
        finally:
            release.set()
            for future in held:
                future.cancel()
        pusher.join(timeout=120)
        assert result and result[0].accepted
        assert server.state.aggregator.senders == [first.worker_id]


def test_unary_calls_that_never_send_their_request_hold_only_the_reader_slots(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC's sync server takes a thread for a unary call before its request arrives: without the guard,
    calls that open and send nothing would hold every thread. Past the reader slots they are refused at once;
    once they go, nothing changed and members are served."""
    monkeypatch.setattr("coordinator.server.REQUEST_WAIT_S", 600.0)  # held calls stay held (hang guard)
    release = threading.Event()
    with running(stream_idle_s=600.0) as (server, (first, second)), \
            grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        readers = CallLimits.of(server.state.cfg).readers
        before = fingerprint(server)
        raw = channel.stream_unary("/lowband.v1.Coordinator/Heartbeat", lambda b: b, lambda b: b)
        futures = [raw.future(stalled(release), timeout=300) for _ in range(STALLED)]
        try:
            wait_for(lambda: sum(f.done() for f in futures) >= STALLED - readers, 60, "the refused calls")
            assert [code_of(f) for f in futures if f.done()] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (
                STALLED - readers)
            wait_for(lambda: server.request_guard.slots.in_use == readers, 60, "the held calls")
        finally:
            release.set()
            for future in futures:
                future.cancel()
        wait_for(lambda: server.request_guard.slots.in_use == 0, 60, "the cancelled calls to free their slots")
        assert fingerprint(server) == before
        assert first.heartbeat(1, 2.5, None).round == 0 and second.heartbeat(1, 2.5, None).round == 0


def test_a_unary_call_that_never_sends_its_request_is_ended_by_the_idle_deadline() -> None:
    release = threading.Event()
    with running(stream_idle_s=1.0) as (server, (first, _)), \
            grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        before = fingerprint(server)
        future = channel.stream_unary("/lowband.v1.Coordinator/Join", lambda b: b, lambda b: b).future(
            stalled(release), timeout=300)
        try:
            wait_for(future.done, 120, "the coordinator to end the stalled call")
        finally:
            release.set()
        assert code_of(future) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent nothing for 1 s" in (future.exception().details() or "")
        assert server.request_guard.slots.in_use == 0 and fingerprint(server) == before
        assert first.heartbeat(1, 2.5, None).round == 0


@pytest.mark.parametrize("wait_s", [600.0, 0.2])
def test_pushes_past_the_admitted_ones_queue_and_get_through_once_one_is_done(
        wait_s: float, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Only a few pushes per core are read and decoded at once (coordinator/servicer.py admission): with one
    admitted, held by a member whose header came and then its stream stalled, the other member's push waits
    for admission, though stream slots are free; past ADMISSION_WAIT_S it is refused as busy (not wrong) and
    its client retries with backoff. Either way it folds once the slot is free again. The member pushes without
    reserving a slot first, as a push whose reservation lapsed does (a reserved push: test_push_reservations)."""
    monkeypatch.setattr("coordinator.servicer.PUSH_READS_PER_CORE", 0)  # one admitted push, whatever the cores
    monkeypatch.setattr("coordinator.servicer.ADMISSION_WAIT_S", wait_s)
    monkeypatch.setattr(CoordinatorClient, "_reserve", lambda self, round_: None)
    with running(stream_idle_s=600.0) as (server, (first, second)):
        admitted = server.servicer.admitted
        assert admitted.limit == 1 < server.servicer.push_slots.limit
        result: list[Any] = []
        with admission_held(server, first) as held:
            pusher = threading.Thread(target=lambda: result.append(
                second.push(0, Update(good_entries()), {"tokens": 10.0})))
            pusher.start()
            if wait_s > 1:
                wait_for(lambda: admitted.waiting == 1, 60, "the member's push to wait for admission")
            else:
                wait_for(lambda: any("pushes being received and decoded" in r.getMessage() for r in caplog.records),
                         120, "the member's push to be refused as busy")
            assert server.state.aggregator is not None and server.state.aggregator.senders == []
            assert server.servicer.push_slots.in_use <= 2  # stream slots were free: admission held it back
        pusher.join(timeout=120)
        assert code_of(held) == grpc.StatusCode.INVALID_ARGUMENT
        assert result and result[0].accepted
        assert server.state.aggregator.senders == [second.worker_id]
        assert admitted.in_use == 0 and admitted.waiting == 0
        busy = any("pushes being received and decoded" in r.getMessage() for r in caplog.records)
        assert busy == (wait_s < 1)  # a push that queued in time was never refused


def test_pulls_past_the_admitted_ones_wait_their_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pulls are admitted like pushes (coordinator/servicer.py `sending`): with one admitted, held by a pull
    whose client stopped reading, a member's next pull waits for it instead of streaming alongside, and gets
    the whole state once the held one is gone."""
    monkeypatch.setattr("coordinator.servicer.SENDS_PER_CORE", 0)  # one admitted pull, whatever the cores
    cfg = tiny_config(protocol={"kind": "diloco", "inner_steps": 5},
                      cluster={"workers": 1, "token": TOKEN, "stream_idle_s": 600.0})
    server = CoordinatorServer(cfg).start()
    member = CoordinatorClient(server.address, token=TOKEN)
    try:
        member.join("test")
        member.offer_state({"w": torch.zeros(4 << 20)})  # 16 MiB: far more than the flow-control windows hold
        sending = server.servicer.sending
        assert sending.limit == 1
        with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
            env = member_envelope(member)
            held = lowband_pb2_grpc.CoordinatorStub(channel).PullState(
                serde.to_pb(m.PullRequest(envelope=env)), timeout=300)
            assert next(held).WhichOneof("body") == "header"  # then it stops reading, holding the slot
            result: list[Any] = []
            puller = threading.Thread(target=lambda: result.append(member.pull()))
            puller.start()
            wait_for(lambda: sending.waiting == 1, 60, "the member's pull to wait for admission")
            assert not result
            held.cancel()
        puller.join(timeout=120)
        assert result and result[0].params["w"].numel() == 4 << 20
        assert sending.in_use == 0 and sending.waiting == 0
    finally:
        member.close()
        server.stop(0)
