"""Issue 12, security: a request without the run's token, with a wrong one or another run's, a plain-text
client against a TLS coordinator and a client certificate from another CA (mutual TLS) are each refused
with a status that says so, and change nothing (the coordinator's state fingerprint: replica hash, round,
open round, members, history). Certificates come from `lowband certs` (deploy/certs.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coordinator.server import CoordinatorServer
from deploy.certs import make_certs
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.conftest import tiny_config
from tests.integration.hostile import (
    STATE,
    TOKEN,
    chunks,
    envelope,
    fingerprint,
    good_entries,
    header,
    member_envelope,
    running,
)
from worker.client import CoordinatorClient

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def _calls(stub: lowband_pb2_grpc.CoordinatorStub, env: m.Envelope) -> Iterator[tuple[str, object]]:
    """Every kind of call a stranger could try with `env`, as (name, thunk)."""
    yield "Join", lambda: stub.Join(serde.to_pb(m.JoinRequest(envelope=env, hostname="x")), timeout=10)
    yield "Heartbeat", lambda: stub.Heartbeat(serde.to_pb(m.HeartbeatRequest(envelope=env)), timeout=10)
    yield "WaitRound", lambda: stub.WaitRound(serde.to_pb(m.WaitRequest(envelope=env, after_round=0)), timeout=10)
    entries = good_entries()
    yield "PushUpdate", lambda: stub.PushUpdate(iter([header(env, entries), *chunks(entries)]), timeout=10)
    yield "PullState", lambda: list(stub.PullState(serde.to_pb(m.PullRequest(envelope=env)), timeout=10))


@pytest.mark.parametrize("token, why", [("", "no token"), ("guess", "a wrong token")], ids=["none", "wrong"])
def test_a_call_without_the_runs_token_is_refused_and_changes_nothing(token: str, why: str) -> None:
    with running() as (server, (first, _)):
        before = fingerprint(server)
        with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
            stub = lowband_pb2_grpc.CoordinatorStub(channel)
            for name, call in _calls(stub, envelope(first.worker_id, token=token)):
                with pytest.raises(grpc.RpcError) as info:
                    call()  # type: ignore[operator]
                assert info.value.code() == UNAUTHENTICATED, (name, why, info.value.details())
                assert "token" in (info.value.details() or ""), (name, info.value.details())
        assert fingerprint(server) == before


def test_another_runs_token_and_run_id_are_refused_and_change_nothing() -> None:
    other = CoordinatorServer(tiny_config(cluster={"workers": 1, "token": "the-other-runs-token"})).start()
    try:
        with running() as (server, (first, _)):
            before = fingerprint(server)
            with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
                stub = lowband_pb2_grpc.CoordinatorStub(channel)
                for name, call in _calls(stub, envelope(first.worker_id, token="the-other-runs-token")):
                    with pytest.raises(grpc.RpcError) as info:
                        call()  # type: ignore[operator]
                    assert info.value.code() == UNAUTHENTICATED, (name, info.value.details())
                for name, call in _calls(stub, envelope(first.worker_id, run_id=other.state.run_id)):
                    with pytest.raises(grpc.RpcError) as info:
                        call()  # type: ignore[operator]
                    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (name, info.value.details())
                    assert f"wrong run id {other.state.run_id!r}" in (info.value.details() or "")
            assert fingerprint(server) == before
    finally:
        other.stop(0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run's CA with a server and a client certificate, and a second CA with its own client certificate."""
    run, stranger = tmp_path_factory.mktemp("run-ca"), tmp_path_factory.mktemp("other-ca")
    make_certs(run, ["localhost", "127.0.0.1"], client="worker")
    make_certs(stranger, client="intruder")
    return {"ca": run / "ca.pem", "cert": run / "server.pem", "key": run / "server.key",
            "client": run / "worker.pem", "client_key": run / "worker.key",
            "other_ca": stranger / "ca.pem", "intruder": stranger / "intruder.pem",
            "intruder_key": stranger / "intruder.key"}


def test_lowband_certs_writes_a_ca_server_and_client_pair_with_private_keys(pki: dict[str, Path]) -> None:
    for name in ("ca", "cert", "client"):
        assert pki[name].read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    for name in ("key", "client_key"):
        assert b"PRIVATE KEY-----" in pki[name].read_bytes()
        assert pki[name].stat().st_mode & 0o077 == 0  # the owner's only


def _mtls_run(pki: dict[str, Path]):  # type: ignore[no-untyped-def]
    return running(tls=(pki["cert"].read_bytes(), pki["key"].read_bytes(), pki["ca"].read_bytes()))


def _client(server: CoordinatorServer, pki: dict[str, Path], cert: str, key: str) -> CoordinatorClient:
    return CoordinatorClient(server.address, token=TOKEN, tls_ca=pki["ca"].read_bytes(), retry_for_s=1,
                             tls_client=(pki[cert].read_bytes(), pki[key].read_bytes()))


def test_mutual_tls_admits_the_runs_client_certificate_and_refuses_the_rest(pki: dict[str, Path]) -> None:
    with _mtls_run(pki) as (server, _):
        members = [_client(server, pki, "client", "client_key") for _ in range(2)]
        try:
            for member in members:
                member.join("test")
            members[0].offer_state(STATE)
            assert members[0].wait_round(-1).round == 0  # the run's own certificates work end to end
            before = fingerprint(server)
            env = member_envelope(members[0])
            strangers = {
                "plain text": grpc.insecure_channel(server.address),
                "TLS without a client certificate": grpc.secure_channel(
                    server.address, grpc.ssl_channel_credentials(pki["ca"].read_bytes())),
                "a client certificate from another CA": grpc.secure_channel(
                    server.address, grpc.ssl_channel_credentials(
                        pki["ca"].read_bytes(), pki["intruder_key"].read_bytes(), pki["intruder"].read_bytes())),
            }
            for why, channel in strangers.items():
                with channel:
                    stub = lowband_pb2_grpc.CoordinatorStub(channel)
                    for name, call in _calls(stub, env):  # the right token: only the transport is wrong
                        with pytest.raises(grpc.RpcError) as info:
                            call()  # type: ignore[operator]
                        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (why, name, info.value.details())
            assert fingerprint(server) == before
        finally:
            for member in members:
                member.close()


def test_a_plain_text_client_against_a_tls_coordinator_is_refused(pki: dict[str, Path]) -> None:
    with running(tls=(pki["cert"].read_bytes(), pki["key"].read_bytes())) as (server, _):
        member = CoordinatorClient(server.address, token=TOKEN, tls_ca=pki["ca"].read_bytes())
        try:
            member.join("test")
            before = fingerprint(server)
            with grpc.insecure_channel(server.address) as channel:
                stub = lowband_pb2_grpc.CoordinatorStub(channel)
                for name, call in _calls(stub, member_envelope(member)):
                    with pytest.raises(grpc.RpcError) as info:
                        call()  # type: ignore[operator]
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (name, info.value.details())
            assert fingerprint(server) == before
        finally:
            member.close()
