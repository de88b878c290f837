"""Fuzzing the gossip servers: random and mutated requests into every Rendezvous RPC and into a peer's Gossip,
hostile Gossip streams from a real member (valid token, hostile content), and random bytes over real gRPC.
Nothing comes back UNKNOWN (nor INTERNAL: every refusal is one lowband names), and nothing changes the
rendezvous' member table and rounds or the peer's replica, step floor and inbox (gossip_hostile's
fingerprints).

As in test_fuzz.py, the bulk calls the real servicers in this process (the context only records the status a
call ended with); a slice of random bytes goes over real gRPC on loopback.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from coordinator.rendezvous_server import RendezvousServer
from protocols.config import PROTOCOL_VERSION
from protocols.replica import Params
from protocols.wire import lowband_pb2 as pb
from protocols.wire import messages as m
from protocols.wire import serde
from tests.integration.fuzzing import Ended, RecordingContext, mutated, random_message
from tests.integration.gossip_hostile import (
    gossip_messages,
    gossip_run,
    params,
    peer_fingerprint,
    rendezvous_fingerprint,
)
from worker.transports.p2p import P2PTransport

RENDEZVOUS = {"Enroll": pb.EnrollRequest, "Roster": pb.RosterRequest, "Report": pb.ReportRequest,
              "Heartbeat": pb.HeartbeatRequest, "Leave": pb.LeaveRequest, "AttestBase": pb.AttestRequest}
SENT = {"messages": 0}

Run = tuple[RendezvousServer, list[P2PTransport], list[Params]]


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    with gossip_run() as running:
        yield running


def _fingerprints(running: Run) -> tuple[Any, ...]:
    server, nodes, models = running
    return rendezvous_fingerprint(server), *(peer_fingerprint(n, p) for n, p in zip(nodes, models, strict=True))


def _call(servicer: Any, rpc: str, request: Any) -> grpc.StatusCode:
    """Feed one request (a list of messages for Gossip) to a servicer in process; the status it ended with."""
    context = RecordingContext()
    SENT["messages"] += len(request) if isinstance(request, list) else 1
    try:
        getattr(servicer, rpc)(iter(request) if isinstance(request, list) else request, context)
    except Ended:
        assert context.code is not None
        assert context.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (rpc, context.details)
        return context.code
    return grpc.StatusCode.OK


def _strangers(run_id: str, worker_id: str) -> dict[str, Any]:
    """A valid-looking request of every Rendezvous RPC, with a wrong token."""
    env = serde.to_pb(m.Envelope(run_id, worker_id, 0, PROTOCOL_VERSION, "guess"))
    return {"Enroll": pb.EnrollRequest(envelope=env, hostname="h", address="127.0.0.1:1"),
            "Roster": pb.RosterRequest(envelope=env), "Report": pb.ReportRequest(envelope=env, metrics={"x": 1.0}),
            "Heartbeat": pb.HeartbeatRequest(envelope=env, inner_step=3), "Leave": pb.LeaveRequest(envelope=env),
            "AttestBase": pb.AttestRequest(envelope=env, base_digest="ab")}


def test_random_and_mutated_requests_into_every_rendezvous_rpc_change_nothing(run: Run) -> None:
    server, (first, _), _ = run
    before = _fingerprints(run)
    rng = random.Random(12)
    valid = _strangers(first.run_id, first.worker_id)
    codes: dict[grpc.StatusCode, int] = {}
    for i in range(100_000):  # until 2400 requests parsed
        if sum(codes.values()) >= 2400:
            break
        rpc = list(RENDEZVOUS)[i % len(RENDEZVOUS)]
        request = random_message(rng, RENDEZVOUS[rpc]) if i % 2 else mutated(rng, valid[rpc])
        if request is None:
            continue
        code = _call(server.servicer, rpc, request)
        codes[code] = codes.get(code, 0) + 1
        assert _fingerprints(run) == before, (rpc, request)
    assert sum(codes.values()) == 2400 and grpc.StatusCode.OK not in codes, codes


def test_random_and_mutated_gossip_streams_change_nothing(run: Run) -> None:
    _, (first, second), _ = run
    before = _fingerprints(run)
    rng = random.Random(5)
    stranger = gossip_messages(second, token="guess")
    codes: dict[grpc.StatusCode, int] = {}
    for i in range(1200):
        if i % 2:
            stream = [msg for msg in (random_message(rng, pb.PeerChunk) for _ in range(rng.randrange(1, 4))) if msg]
        else:
            stream = [flipped if (flipped := mutated(rng, msg)) is not None else msg for msg in stranger]
        code = _call(first.servicer, "Gossip", stream)
        codes[code] = codes.get(code, 0) + 1
        assert _fingerprints(run) == before, stream
    assert grpc.StatusCode.OK not in codes, codes


def _with_value(model: Params, value: float, at: int) -> Params:
    w = model["w"].clone()
    w.view(-1)[at % w.numel()] = value
    return {**model, "w": w}


Hostile = Callable[[P2PTransport, int], list[pb.PeerChunk]]


def _edited(node: P2PTransport, k: int, **fields: Any) -> list[pb.PeerChunk]:
    stream = gossip_messages(node)
    for name, value in fields.items():
        if name == "round":
            stream[0].header.envelope.round = value
        else:
            setattr(stream[0].header, name, value)
    return stream


HOSTILE: dict[str, Hostile] = {
    "non-finite value": lambda s, k: gossip_messages(s, model=_with_value(params(1), [math.nan, math.inf][k % 2], k)),
    "huge value": lambda s, k: gossip_messages(s, model=_with_value(params(1), 3e38, k)),
    "other shape": lambda s, k: gossip_messages(s, model={"w": torch.zeros(k % 5 + 5, 3), "b": torch.zeros(3)}),
    "other names": lambda s, k: gossip_messages(s, model={"x": torch.zeros(4, 3), "b": torch.zeros(3)}),
    "missing tensor": lambda s, k: gossip_messages(s, model={"w": torch.zeros(4, 3)}),
    "weight": lambda s, k: _edited(s, k, weight=[0.0, -1.0, float("nan"), 1e39, float("inf")][k % 5]),
    "sender": lambda s, k: _edited(s, k, sender=[0, 2, 1 << 30, 7][k % 4]),
    "step": lambda s, k: _edited(s, k, step=[1 << 40, 1 << 40, 9][k % 3], round=[0, 1 << 39, 4][k % 3]),
    "round": lambda s, k: _edited(s, k, round=k % 7 + 1),
    "totals": lambda s, k: _edited(s, k, total_bytes=[0, 1, 1 << 40][k % 3], num_entries=[0, 1, 3, 1 << 30][k % 4]),
    "truncated": lambda s, k: _truncated(s, k),
}


def _truncated(node: P2PTransport, k: int) -> list[pb.PeerChunk]:
    """The stream cut short: the header alone, or without its last chunk. The model's chunks fit one batched
    message (`TensorChunks`), so that message loses its last chunk instead of the stream its last message."""
    stream = gossip_messages(node)
    if k % 2 == 0:
        return stream[:1]
    last = stream[-1]
    if last.WhichOneof("body") == "chunks" and len(last.chunks.chunks) > 1:
        cut = pb.PeerChunk()
        cut.CopyFrom(last)
        del cut.chunks.chunks[-1]
        return [*stream[:-1], cut]
    return stream[:-1]


def test_hostile_gossip_from_a_member_is_refused_and_changes_nothing(run: Run) -> None:
    """A real neighbour (right token, run and sender) sending hostile content: every kind is refused."""
    _, (first, second), _ = run
    before = _fingerprints(run)
    refused: dict[str, set[grpc.StatusCode]] = {}
    for k in range(60):
        for kind, make in HOSTILE.items():
            code = _call(first.servicer, "Gossip", make(second, k))
            assert code is not grpc.StatusCode.OK, (kind, k)
            refused.setdefault(kind, set()).add(code)
            assert _fingerprints(run) == before, (kind, k)
    assert set(refused) == set(HOSTILE)


def test_random_bytes_over_real_grpc_never_come_back_unknown(run: Run) -> None:
    server, (first, second), _ = run
    before = _fingerprints(run)
    rng = random.Random(7)
    identity = lambda b: b  # noqa: E731 - raw bytes both ways
    codes: dict[grpc.StatusCode, int] = {}
    paths = [f"/lowband.v1.Rendezvous/{rpc}" for rpc in RENDEZVOUS] + ["/lowband.v1.Peer/Gossip"]
    with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as to_rendezvous, \
            grpc.insecure_channel(first.address, options=m.GRPC_OPTIONS) as to_peer:
        for i in range(420):
            path = paths[i % len(paths)]
            try:
                if "Peer" in path:
                    stream = [rng.randbytes(rng.randrange(60)) for _ in range(rng.randrange(1, 4))]
                    SENT["messages"] += len(stream)
                    to_peer.stream_unary(path, identity, identity)(iter(stream), timeout=30)
                else:
                    SENT["messages"] += 1
                    to_rendezvous.unary_unary(path, identity, identity)(rng.randbytes(rng.randrange(60)), timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
                assert code is not grpc.StatusCode.UNKNOWN, (path, err.details())
            codes[code] = codes.get(code, 0) + 1
    assert _fingerprints(run) == before
    assert grpc.StatusCode.OK not in codes, codes
    assert first.client.heartbeat(0).round == second.client.heartbeat(0).round == 0  # still serving


def test_the_fuzz_sent_thousands_of_messages() -> None:
    """Runs last in this module: the total over every test above."""
    assert SENT["messages"] >= 5000, SENT
