"""The join handshake over real gRPC: a worker client sends its lowband version and, on a re-join, the hash of
the config it took at its first join; a mismatch is refused with FAILED_PRECONDITION and changes nothing."""

from __future__ import annotations

import grpc
import pytest

from protocols.config import PROTOCOL_VERSION
from protocols.handshake import LOWBAND_VERSION
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.integration.hostile import TOKEN, fingerprint, running


def _join(address: str, **fields: str) -> grpc.RpcError | m.JoinReply:
    env = m.Envelope(run_id="", worker_id="w-new", round=0, protocol_version=PROTOCOL_VERSION, token=TOKEN)
    with grpc.insecure_channel(address) as channel:
        try:
            reply = lowband_pb2_grpc.CoordinatorStub(channel).Join(
                serde.to_pb(m.JoinRequest(envelope=env, hostname="elsewhere", **fields)), timeout=30)
        except grpc.RpcError as err:
            return err
    return serde.from_pb(reply, m.JoinReply)


def test_a_client_carries_the_runs_config_hash_from_its_first_join() -> None:
    with running() as (server, (first, _)):
        assert first.config_hash == server.state.config_hash != ""
        first.join("test", first.worker_id)  # a re-join sends it back, and it matches
        assert server.state.members[first.worker_id].joins == 2


@pytest.mark.parametrize("fields,says", [
    ({"software_version": "0.0.0-elsewhere"}, "version mismatch"),
    ({"software_version": LOWBAND_VERSION, "config_hash": "feedfacefeedface"}, "config mismatch"),
])
def test_a_mismatched_handshake_is_refused_and_changes_nothing(fields: dict[str, str], says: str) -> None:
    with running() as (server, _):
        before = fingerprint(server)
        err = _join(server.address, **fields)
        assert isinstance(err, grpc.RpcError)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and says in (err.details() or "")
        assert fingerprint(server) == before and "w-new" not in server.state.members
