"""Issue 12, security: the run's secret goes on the wire only in the handshake (Join). The join issues a
per-member session credential and every later call must carry it: the run's secret, another member's session
or a session replaced by a re-join are refused UNAUTHENTICATED and change nothing. A coordinator resumed from
its checkpoint (which holds session digests only) goes on accepting its members' sessions without a re-join,
and a member whose session it does not know (re-joined after the last checkpoint) re-joins by itself.
Real gRPC on 127.0.0.1:0; what the client sends is recorded by a gRPC client interceptor."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from compression.payload import dense
from coordinator.server import CoordinatorServer
from protocols.base import Update
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.conftest import tiny_config
from tests.integration.hostile import (
    STATE,
    TOKEN,
    UPDATE,
    chunks,
    envelope,
    fingerprint,
    good_entries,
    header,
    member_envelope,
    running,
)
from tests.integration.procs import wait_for
from worker.client import CoordinatorClient

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def _member_calls(stub: lowband_pb2_grpc.CoordinatorStub, env: m.Envelope) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Every call a member makes after its join, with `env`, as (name, thunk)."""
    yield "Heartbeat", lambda: stub.Heartbeat(serde.to_pb(m.HeartbeatRequest(envelope=env)), timeout=10)
    yield "WaitRound", lambda: stub.WaitRound(serde.to_pb(m.WaitRequest(envelope=env, after_round=0)), timeout=10)
    entries = good_entries()
    yield "PushUpdate", lambda: stub.PushUpdate(iter([header(env, entries), *chunks(entries)]), timeout=10)
    yield "PullState", lambda: list(stub.PullState(serde.to_pb(m.PullRequest(envelope=env)), timeout=10))
    aggregate = serde.to_pb(m.AggregateRequest(envelope=env, round=0))
    yield "PullAggregate", lambda: list(stub.PullAggregate(aggregate, timeout=10))
    yield "AttestBase", lambda: stub.AttestBase(serde.to_pb(m.AttestRequest(envelope=env, base_digest="ab" * 32)),
                                                timeout=10)
    yield "Leave", lambda: stub.Leave(serde.to_pb(m.LeaveRequest(envelope=env)), timeout=10)


def _all_refused(server: CoordinatorServer, env: m.Envelope, why: str) -> None:
    before = fingerprint(server)
    with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        stub = lowband_pb2_grpc.CoordinatorStub(channel)
        for name, call in _member_calls(stub, env):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == UNAUTHENTICATED, (why, name, info.value.details())
            details = info.value.details() or ""
            assert "bad token" in details and TOKEN not in details and env.token[:8] not in details, details
    assert fingerprint(server) == before


def test_after_the_join_the_runs_secret_is_refused_on_every_call_and_changes_nothing() -> None:
    with running() as (server, (first, _)):
        assert first.session and first.session != TOKEN
        _all_refused(server, envelope(first.worker_id, token=TOKEN, run_id=first.run_id), "the run's secret")


def test_another_members_session_is_refused_and_changes_nothing() -> None:
    with running() as (server, (first, second)):
        _all_refused(server, envelope(first.worker_id, token=second.session, run_id=first.run_id), "w1's session")
        first.heartbeat(1, None, None)  # its own still works


def test_a_re_join_replaces_the_session_and_the_old_one_is_refused() -> None:
    with running() as (server, (first, _)):
        old = member_envelope(first)
        again = CoordinatorClient(server.address, token=TOKEN, retry_for_s=1)  # the same worker, restarted
        try:
            again.join("test", first.worker_id)
            assert again.session not in ("", first.session)
            _all_refused(server, old, "the session a re-join replaced")
            again.heartbeat(1, None, None)
            assert server.state.members[first.worker_id].joins == 2
        finally:
            again.close()


class _Recorder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor):
    """Every request message a client sends, as (method, message), and the bytes it serialized to."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, bytes]] = []

    def _keep(self, method: str, request: Any) -> Any:
        self.sent.append((method.rsplit("/", 1)[-1], request, request.SerializeToString()))
        return request

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(details, self._keep(details.method, request))

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(details, self._keep(details.method, request))

    def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(details, (self._keep(details.method, r) for r in request_iterator))


def _recorded(client: CoordinatorClient) -> _Recorder:
    recorder = _Recorder()
    client.channel = grpc.intercept_channel(client.channel, recorder)
    client.stub = lowband_pb2_grpc.CoordinatorStub(client.channel)
    return recorder


def _token_of(message: Any) -> str:
    """The envelope token of a request (a push's header message carries it; its chunks carry none)."""
    fields = message.DESCRIPTOR.fields_by_name
    if "envelope" in fields:
        return str(message.envelope.token)
    if "header" in fields and message.HasField("header"):
        return str(message.header.envelope.token)
    return ""


def test_no_request_after_the_handshake_carries_the_runs_secret() -> None:
    cfg = tiny_config(protocol={"kind": "diloco", "inner_steps": 5},
                      cluster={"workers": 2, "token": TOKEN, "heartbeat_interval_s": 0.5})
    server = CoordinatorServer(cfg).start()
    clients = [CoordinatorClient(server.address, token=TOKEN) for _ in range(2)]
    recorders = [_recorded(c) for c in clients]
    try:
        for client in clients:
            client.join("test")
        clients[0].offer_state(STATE)
        for client in clients:  # a whole round, as a worker makes it: every kind of call
            client.attest_base("ab" * 32)
            client.heartbeat(1, 2.5, None)
            assert client.wait_round(-1).round == 0
            client.push(0, Update({n: dense(t) for n, t in UPDATE.items()}), {"tokens": 10.0})
        for client in clients:
            assert client.wait_round(0).round == 1
            client.pull_aggregate(0)
            client.pull(resync=True)
            client.leave()
        for client, recorder in zip(clients, recorders, strict=True):
            methods = {method for method, _, _ in recorder.sent}
            assert methods == {"Join", "ReservePush", "PushUpdate", "AttestBase", "Heartbeat", "WaitRound",
                               "PullAggregate", "PullState", "Leave"}
            for method, message, wire in recorder.sent:
                if method == "Join":
                    assert _token_of(message) == TOKEN  # the handshake: the only place the secret travels
                    continue
                assert TOKEN.encode() not in wire, method  # nowhere in the bytes sent, not only the envelope
                if _token_of(message):
                    assert _token_of(message) == client.session != TOKEN, method
            assert sum(1 for method, msg, _ in recorder.sent if _token_of(msg)) > 8
    finally:
        for client in clients:
            client.close()
        server.stop(0)


def _push(client: CoordinatorClient, round_: int, value: float) -> None:
    client.push(round_, Update({"w": dense(torch.full((3, 2), value))}), {"tokens": 10.0})


def test_a_resumed_coordinator_accepts_its_members_sessions_and_an_unknown_session_re_joins(tmp_path: Path) -> None:
    """Round 0 closes and is checkpointed (with each member's session digest); then w1 re-joins (a new session
    the checkpoint never saw) and the coordinator stops. The resumed one takes w0's session as it is (no
    re-join), refuses w1's as unknown, and w1's client re-joins by itself with the run's secret."""
    cfg = tiny_config(run_dir=str(tmp_path / "runs"), protocol={"kind": "diloco", "inner_steps": 4},
                      cluster={"workers": 2, "token": TOKEN, "heartbeat_interval_s": 0.3, "heartbeat_timeout_s": 60},
                      train__steps=12)
    run_dir = tmp_path / "runs" / "tiny"
    first = CoordinatorServer(cfg, run_dir=run_dir).start()
    address = first.address
    clients = [CoordinatorClient(address, token=TOKEN, retry_for_s=60) for _ in range(2)]
    try:
        for c in clients:
            c.join("host")
        assert clients[0].offer_state({"w": torch.ones(3, 2)})
        _push(clients[0], 0, 0.1)
        _push(clients[1], 0, 0.2)
        assert clients[0].wait_round(0).round == 1
        first.recorder.flush()  # round 0's checkpoint is on disk
        clients[1].join("host", clients[1].worker_id)  # after the checkpoint: the resumed coordinator never saw it
        first.stop(0)
        second = CoordinatorServer(cfg, bind=address, run_dir=run_dir, resume=run_dir).start()
        try:
            assert second.state.round == 1
            clients[0].heartbeat(1, None, None)  # the session outlived the restart
            assert second.state.members["w0"].alive and second.state.members["w0"].joins == 1
            clients[1].heartbeat(1, None, None)  # UNAUTHENTICATED, then a re-join with the run's secret
            assert second.state.members["w1"].joins == 2  # the checkpoint's 1, plus this re-join
            wait_for(lambda: second.state.phase.value == "training", 30, "the resumed round to open")
            _push(clients[0], 1, 0.3)
            _push(clients[1], 1, 0.4)
            assert clients[0].wait_round(1).round == 2
            second.recorder.flush()
            for path in run_dir.iterdir():  # neither the secret nor any session ever reached the run directory
                data = path.read_bytes()
                for secret in (TOKEN, clients[0].session, clients[1].session):
                    assert secret.encode() not in data, path.name
        finally:
            second.stop(0)
    finally:
        for c in clients:
            c.close()
