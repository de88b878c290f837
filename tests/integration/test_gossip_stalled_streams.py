"""No client can hold a gossip server (the guards of protocols/wire/servicing.py, as the coordinator has them).

- A peer: stalled Gossip streams past its GOSSIP_SLOTS are refused at once with RESOURCE_EXHAUSTED; the ones
  holding a slot are ended with DEADLINE_EXCEEDED once idle past the run's `cluster.stream_idle_s` (before or
  after a valid header), and one that drips its chunks past the message deadline is ended too; an honest
  neighbour's message, refused "server busy" meanwhile, is retried and delivered.
- The rendezvous: calls that never send their request hold at most its reader slots (the rest refused at
  once), each until the idle deadline; a stranger's Roster is refused before it waits; members' Roster waits are
  bounded too; members' heartbeats are served throughout.
- A second rendezvous or peer on a port in use fails with one clear error (`lowband coordinator`: one line).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from compression.payload import dense
from coordinator.rendezvous_server import RendezvousServer
from coordinator.rendezvous_servicer import RendezvousLimits
from protocols.config import PROTOCOL_VERSION
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.conftest import tiny_config
from tests.integration.gossip_hostile import (
    TOKEN,
    gossip_messages,
    gossip_run,
    params,
    peer_fingerprint,
    rendezvous_fingerprint,
)
from tests.integration.procs import LOWBAND, finish, start_coordinator, wait_for, write_recipe
from tests.integration.stalling import STALLED, code_of, stalled
from worker.rendezvous_client import RendezvousClient
from worker.transports.p2p import P2PTransport
from worker.transports.peer_servicer import GOSSIP_SLOTS
from worker.transports.peers import PeerMessage


def test_stalled_gossip_streams_past_the_slots_are_refused_and_an_honest_message_gets_through(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("worker.transports.peer_servicer.HEADER_WAIT_S", 600.0)  # held streams stay held
    release = threading.Event()
    with gossip_run(stream_idle_s=600.0) as (server, (first, second), models), \
            grpc.insecure_channel(first.address, options=m.GRPC_OPTIONS) as channel:
        before = peer_fingerprint(first, models[0])
        stub = lowband_pb2_grpc.PeerStub(channel)
        futures = [stub.Gossip.future(stalled(release), timeout=300) for _ in range(STALLED)]
        try:
            wait_for(lambda: sum(f.done() for f in futures) >= STALLED - GOSSIP_SLOTS, 60, "the refused streams")
            assert [code_of(f) for f in futures if f.done()] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (
                STALLED - GOSSIP_SLOTS)
            assert all("server busy" in (f.exception().details() or "") for f in futures if f.done())
            wait_for(lambda: first.servicer.slots.in_use == GOSSIP_SLOTS, 60, "the stalled streams to hold the slots")
            busy = sum("server busy" in r.getMessage() for r in caplog.records)
            handle = second.send(first.index, PeerMessage(round=0, step=0, sender=second.index,
                                                         payloads={n: dense(t) for n, t in params(1).items()}))
            wait_for(lambda: sum("server busy" in r.getMessage() for r in caplog.records) > busy, 120,
                     "the honest message to be refused busy")
            assert peer_fingerprint(first, models[0]) == before  # nothing of it got in while the slots were held
            assert server.servicer.roster_slots.in_use == 0
            second.client.heartbeat(0)  # the rendezvous serves members meanwhile
        finally:
            release.set()
            for future in futures:
                future.cancel()
        assert handle.result(timeout=120) is True  # retried once a slot was free
        assert first.inbox.pending() == [(0, second.index)]


def test_a_stalled_gossip_stream_is_ended_by_the_idle_deadline() -> None:
    release = threading.Event()
    with gossip_run(stream_idle_s=1.0) as (_, (first, second), models), \
            grpc.insecure_channel(first.address, options=m.GRPC_OPTIONS) as channel:
        before = peer_fingerprint(first, models[0])
        stub = lowband_pb2_grpc.PeerStub(channel)
        try:
            for opening in (None, gossip_messages(second)[0]):  # nothing at all; a valid header, then nothing
                future = stub.Gossip.future(stalled(release, opening), timeout=300)
                wait_for(future.done, 120, "the peer to end the stalled stream")
                assert code_of(future) == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "sent nothing for 1 s" in (future.exception().details() or "")
        finally:
            release.set()
        assert peer_fingerprint(first, models[0]) == before
        assert first.servicer.slots.in_use == 0
        assert stub.Gossip(iter(gossip_messages(second)), timeout=60).step == 0  # the peer kept serving
        assert first.inbox.pending() == [(0, second.index)]


def test_a_neighbour_dripping_its_message_is_ended_by_the_message_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk within the idle limit, but the message as a whole past GOSSIP_BASE_S + bytes / rate."""
    monkeypatch.setattr("worker.transports.peer_servicer.GOSSIP_BASE_S", 1.0)
    stop = threading.Event()
    with gossip_run(stream_idle_s=60.0) as (_, (first, second), models):
        before = peer_fingerprint(first, models[0])
        head, *_ = gossip_messages(second)
        payloads = {n: dense(t) for n, t in params(second.index).items()}

        def drip() -> Iterator[Any]:
            yield head
            for chunk in serde.encode_entries(payloads, 1):  # 60 one-byte chunks, one every 0.2 s
                if stop.wait(0.2):
                    return
                yield type(head)(chunk=chunk)

        with grpc.insecure_channel(first.address, options=m.GRPC_OPTIONS) as channel:
            with pytest.raises(grpc.RpcError) as info:
                lowband_pb2_grpc.PeerStub(channel).Gossip(drip(), timeout=300)
            stop.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        assert "ran past its server-side deadline" in (info.value.details() or "")
        assert peer_fingerprint(first, models[0]) == before


def _half_joined(**cluster: Any) -> tuple[RendezvousServer, RendezvousClient]:
    """A 2-worker rendezvous with one member enrolled: a Roster waits for the other."""
    cfg = tiny_config(protocol={"kind": "gossip", "inner_steps": 5},
                      cluster={"workers": 2, "token": TOKEN, "heartbeat_interval_s": 0.5, **cluster})
    server = RendezvousServer(cfg).start()
    member = RendezvousClient(server.address, TOKEN, retry_for_s=60.0)
    member.enroll("test", "127.0.0.1:1")
    return server, member


def test_calls_that_never_send_their_request_past_the_reader_slots_are_refused_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("coordinator.rendezvous_server.REQUEST_WAIT_S", 600.0)  # held calls stay held
    server, member = _half_joined(stream_idle_s=600.0)
    release = threading.Event()
    readers = RendezvousLimits.of(server.cfg).readers
    try:
        before = rendezvous_fingerprint(server)
        with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
            raw = channel.stream_unary("/lowband.v1.Rendezvous/Heartbeat", lambda b: b, lambda b: b)
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
        assert rendezvous_fingerprint(server) == before
        assert member.heartbeat(0).round == 0
    finally:
        member.close()
        server.stop(0)


def test_a_call_that_never_sends_its_request_is_ended_by_the_idle_deadline() -> None:
    server, member = _half_joined(stream_idle_s=1.0)
    release = threading.Event()
    try:
        before = rendezvous_fingerprint(server)
        with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
            raw = channel.stream_unary("/lowband.v1.Rendezvous/Roster", lambda b: b, lambda b: b)
            future = raw.future(stalled(release), timeout=300)
            try:
                wait_for(future.done, 120, "the rendezvous to end the stalled call")
            finally:
                release.set()
        assert code_of(future) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent nothing for 1 s" in (future.exception().details() or "")
        assert server.request_guard.slots.in_use == 0
        assert rendezvous_fingerprint(server) == before
        assert member.heartbeat(0).round == 0  # the rendezvous kept serving
    finally:
        member.close()
        server.stop(0)


def test_a_strangers_roster_is_refused_before_it_waits_and_members_waits_are_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("coordinator.rendezvous_servicer.ROSTER_WAIT_S", 600.0)
    server, member = _half_joined()
    rosters = RendezvousLimits.of(server.cfg).rosters
    try:
        before = rendezvous_fingerprint(server)
        with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
            stub = lowband_pb2_grpc.RendezvousStub(channel)
            stranger = m.Envelope(server.rendezvous.run_id, member.worker_id, 0, PROTOCOL_VERSION, "guess")
            with pytest.raises(grpc.RpcError) as info:  # answered at once: the other worker never joins here
                stub.Roster(serde.to_pb(m.RosterRequest(envelope=stranger)), timeout=60)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert rendezvous_fingerprint(server) == before
            own = m.Envelope(server.rendezvous.run_id, member.worker_id, 0, PROTOCOL_VERSION, member.session)
            futures = [stub.Roster.future(serde.to_pb(m.RosterRequest(envelope=own)), timeout=300)
                       for _ in range(STALLED)]
            wait_for(lambda: sum(f.done() for f in futures) >= STALLED - rosters, 60, "the refused rosters")
            assert [code_of(f) for f in futures if f.done()] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (
                STALLED - rosters)
            wait_for(lambda: server.servicer.roster_slots.in_use == rosters, 60, "the waits to hold every slot")
            assert member.heartbeat(0).round == 0  # a member's quick call is served while they wait
            other = RendezvousClient(server.address, TOKEN)
            other.enroll("test", "127.0.0.1:2")  # the run is complete: every waiting Roster is answered
            other.close()
            wait_for(lambda: all(f.done() for f in futures), 120, "the waiting rosters")
            answered = [f.result() for f in futures if code_of(f) is grpc.StatusCode.OK]
            assert len(answered) == rosters and all(len(r.addresses) == 2 for r in answered)
    finally:
        member.close()
        server.stop(0)


def test_a_second_rendezvous_or_peer_on_a_port_in_use_fails_clearly() -> None:
    with gossip_run() as (server, (first, _), _models):
        with pytest.raises(OSError, match=f"cannot listen on {server.address} for the gossip rendezvous: the port "
                                          "is in use"):
            RendezvousServer(server.cfg, bind=server.address)
        with pytest.raises(OSError, match=f"cannot listen on {first.address} for the gossip Peer service: the "
                                          "port is in use"):
            P2PTransport(server.address, TOKEN, bind=first.address)
        assert first.client.heartbeat(0).round == 0  # the first servers are untouched


def test_lowband_coordinator_of_a_gossip_run_on_a_port_in_use_is_one_line_and_status_1(tmp_path: Path) -> None:
    cfg = tiny_config(run_dir=str(tmp_path / "runs"), protocol={"kind": "gossip", "inner_steps": 5},
                      cluster={"workers": 1})
    recipe = write_recipe(cfg, tmp_path / "gossip.yaml")
    first, address = start_coordinator(recipe, tmp_path)
    try:
        done = subprocess.run([*LOWBAND, "coordinator", str(recipe), "--bind", address], capture_output=True,
                              text=True, timeout=180)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"cannot listen on {address} for the gossip rendezvous: the port is in use" in lines[0]
    finally:
        first.terminate()
        finish(first, 60, tmp_path / "coordinator.log")
