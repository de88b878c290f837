"""Security of the gossip servers over real gRPC: a call with no token, a wrong token or another run's token
is refused UNAUTHENTICATED on every Rendezvous RPC and on a peer's Gossip, and one naming another run's id
FAILED_PRECONDITION; none changes the rendezvous' member table and rounds or the peer's replica, step floor
and inbox."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from coordinator.rendezvous_server import RendezvousServer
from protocols.config import PROTOCOL_VERSION
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.conftest import tiny_config
from tests.integration.gossip_hostile import (
    TOKEN,
    gossip_messages,
    gossip_run,
    peer_fingerprint,
    rendezvous_fingerprint,
)
from worker.transports.p2p import P2PTransport

OTHER_TOKEN = "the-other-runs-token"


def _calls(stub: lowband_pb2_grpc.RendezvousStub, peer: lowband_pb2_grpc.PeerStub, sender: P2PTransport,
           env: m.Envelope, peer_token: str | None = None) -> Iterator[tuple[str, Callable[[], object]]]:
    """Every RPC a stranger could try with `env` (the Gossip stream as if from `sender`, with `peer_token` if
    given), as (name, thunk)."""
    yield "Enroll", lambda: stub.Enroll(serde.to_pb(m.EnrollRequest(envelope=env, hostname="x", address="h:1")),
                                        timeout=10)
    yield "Roster", lambda: stub.Roster(serde.to_pb(m.RosterRequest(envelope=env)), timeout=10)
    yield "Report", lambda: stub.Report(serde.to_pb(m.ReportRequest(envelope=env, metrics={"train_loss": 1.0})),
                                        timeout=10)
    yield "Heartbeat", lambda: stub.Heartbeat(serde.to_pb(m.HeartbeatRequest(envelope=env, inner_step=4)),
                                              timeout=10)
    yield "AttestBase", lambda: stub.AttestBase(serde.to_pb(m.AttestRequest(envelope=env, base_digest="ab")),
                                                timeout=10)
    yield "Leave", lambda: stub.Leave(serde.to_pb(m.LeaveRequest(envelope=env)), timeout=10)
    token = env.token if peer_token is None else peer_token
    yield "Gossip", lambda: peer.Gossip(iter(gossip_messages(sender, token=token, run_id=env.run_id)),
                                        timeout=10)


@pytest.fixture
def other_run() -> Iterator[RendezvousServer]:
    cfg = tiny_config(protocol={"kind": "gossip", "inner_steps": 5}, cluster={"workers": 2, "token": OTHER_TOKEN})
    other = RendezvousServer(cfg).start()
    yield other
    other.stop(0)


@pytest.mark.parametrize("token", ["", "guess", OTHER_TOKEN], ids=["none", "wrong", "another-runs"])
def test_a_call_without_the_runs_token_is_refused_on_every_gossip_rpc_and_changes_nothing(token: str) -> None:
    with gossip_run() as (server, (first, second), models), \
            grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as to_rendezvous, \
            grpc.insecure_channel(first.address, options=m.GRPC_OPTIONS) as to_peer:
        before = rendezvous_fingerprint(server), peer_fingerprint(first, models[0])
        env = m.Envelope(second.run_id, second.worker_id, 0, PROTOCOL_VERSION, token)
        names = []
        for name, call in _calls(lowband_pb2_grpc.RendezvousStub(to_rendezvous), lowband_pb2_grpc.PeerStub(to_peer),
                                 second, env):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, info.value.details())
            assert "token" in (info.value.details() or ""), (name, info.value.details())
            names.append(name)
        assert names == ["Enroll", "Roster", "Report", "Heartbeat", "AttestBase", "Leave", "Gossip"]
        assert (rendezvous_fingerprint(server), peer_fingerprint(first, models[0])) == before


def test_another_runs_id_is_refused_on_every_gossip_rpc_and_changes_nothing(other_run: RendezvousServer) -> None:
    with gossip_run() as (server, (first, second), models), \
            grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as to_rendezvous, \
            grpc.insecure_channel(first.address, options=m.GRPC_OPTIONS) as to_peer:
        before = rendezvous_fingerprint(server), peer_fingerprint(first, models[0])
        other_id = other_run.rendezvous.run_id
        env = m.Envelope(other_id, second.worker_id, 0, PROTOCOL_VERSION, second.client.session)
        for name, call in _calls(lowband_pb2_grpc.RendezvousStub(to_rendezvous), lowband_pb2_grpc.PeerStub(to_peer),
                                 second, env, second.peer_token):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (name, info.value.details())
            assert f"wrong run id {other_id!r}" in (info.value.details() or ""), (name, info.value.details())
        assert (rendezvous_fingerprint(server), peer_fingerprint(first, models[0])) == before


def test_after_enroll_the_runs_token_opens_nothing_and_peers_never_see_it() -> None:
    """The run's token goes only into Enroll: a later rendezvous call carrying it is refused, and so is a Gossip
    message carrying it (peers check the run's peer token, a secret of the rendezvous' own, not the run's)."""
    with gossip_run() as (server, (first, second), models), \
            grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as to_rendezvous, \
            grpc.insecure_channel(first.address, options=m.GRPC_OPTIONS) as to_peer:
        assert second.peer_token not in ("", TOKEN) and second.client.session not in ("", TOKEN)
        assert first.peer_token == second.peer_token != second.client.session
        before = rendezvous_fingerprint(server), peer_fingerprint(first, models[0])
        env = m.Envelope(second.run_id, second.worker_id, 0, PROTOCOL_VERSION, TOKEN)
        calls = _calls(lowband_pb2_grpc.RendezvousStub(to_rendezvous), lowband_pb2_grpc.PeerStub(to_peer), second,
                       env)
        for name, call in calls:
            if name == "Enroll":  # the handshake, where the run's token belongs
                continue
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, info.value.details())
            assert TOKEN not in (info.value.details() or "")
        assert (rendezvous_fingerprint(server), peer_fingerprint(first, models[0])) == before
