"""Bad wire input gets a gRPC status naming the problem, and the coordinator's state is unchanged.

A real gRPC server on 127.0.0.1:0; raw stubs send the malformed pushes, so no client-side logic
(retries, re-joins) stands between the test and the coordinator.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch

from compression.payload import Payload, dense
from coordinator.server import CoordinatorServer
from protocols.config import PROTOCOL_VERSION
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.conftest import tiny_config
from worker.client import CoordinatorClient

STATE = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(3)}
TOKEN = "s3cret"


@pytest.fixture
def coordinator() -> Iterator[tuple[CoordinatorServer, CoordinatorClient]]:
    cfg = tiny_config(cluster={"workers": 1, "token": TOKEN})
    server = CoordinatorServer(cfg).start()
    client = CoordinatorClient(server.address, token=TOKEN)
    client.join("test")
    client.offer_state(STATE)
    assert client.wait_round(-1).round == 0
    yield server, client
    client.close()
    server.stop()


def _push(address: str, worker_id: str, round_: int, entries: dict[str, Payload], token: str = TOKEN,
          run_id: str = "") -> None:
    env = m.Envelope(run_id, worker_id, round_, PROTOCOL_VERSION, token)
    header = m.PushHeader(envelope=env, kind=m.PushKind.UPDATE, weight=1.0, num_entries=len(entries),
                          total_bytes=sum(p.nbytes() for p in entries.values()))
    with grpc.insecure_channel(address, options=m.GRPC_OPTIONS) as channel:
        stub = lowband_pb2_grpc.CoordinatorStub(channel)
        stub.PushUpdate(serde.push_stream(header, entries, m.DEFAULT_CHUNK_BYTES), timeout=30)


def _good() -> dict[str, Payload]:
    return {name: dense(torch.full_like(t, 0.1)) for name, t in STATE.items()}


CASES = [
    ("wrong shape", lambda e: {**e, "w": dense(torch.zeros(3, 4))}, {}, grpc.StatusCode.INVALID_ARGUMENT,
     "has shape [3, 4], expected [4, 3]"),
    ("wrong dtype", lambda e: {**e, "b": dense(torch.zeros(3, dtype=torch.float64))}, {},
     grpc.StatusCode.INVALID_ARGUMENT, "dtype torch.float64, expected torch.float32"),
    ("unknown name", lambda e: {**e, "bogus": dense(torch.zeros(2))}, {}, grpc.StatusCode.INVALID_ARGUMENT,
     "unknown tensor name(s) ['bogus']"),
    ("missing name", lambda e: {"w": e["w"]}, {}, grpc.StatusCode.INVALID_ARGUMENT, "lacks tensor(s) ['b']"),
    ("nan", lambda e: {**e, "b": dense(torch.tensor([0.0, float("nan"), 0.0]))}, {},
     grpc.StatusCode.INVALID_ARGUMENT, "contains NaN or Inf"),
    ("inf", lambda e: {**e, "w": dense(torch.full((4, 3), float("inf")))}, {}, grpc.StatusCode.INVALID_ARGUMENT,
     "contains NaN or Inf"),
    ("stale round", lambda e: e, {"round_": 7}, grpc.StatusCode.FAILED_PRECONDITION,
     "stale round: update is for round 7, the coordinator is at round 0"),
    ("unknown worker", lambda e: e, {"worker_id": "ghost"}, grpc.StatusCode.NOT_FOUND, "unknown worker id 'ghost'"),
    ("bad token", lambda e: e, {"token": "guess"}, grpc.StatusCode.UNAUTHENTICATED, "bad token"),
    ("wrong run", lambda e: e, {"run_id": "other-run"}, grpc.StatusCode.FAILED_PRECONDITION, "wrong run id"),
]


@pytest.mark.parametrize(("case", "mutate", "fields", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_push_is_rejected_and_changes_nothing(coordinator, case, mutate, fields, code, message) -> None:  # type: ignore[no-untyped-def]
    server, client = coordinator
    state = server.state
    before = (state.round, state.state_hash, state._current.acc.count if state._current else None)
    kwargs = {"worker_id": client.worker_id, "round_": 0, **fields}
    with pytest.raises(grpc.RpcError) as info:
        _push(server.address, entries=mutate(_good()), **kwargs)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    assert (state.round, state.state_hash, state._current.acc.count if state._current else None) == before
    assert state.members[client.worker_id].bytes_up == 0

    # The coordinator kept running and still accepts a good update, which closes the round.
    _push(server.address, client.worker_id, 0, _good())
    assert client.wait_round(0).round == 1
    _, params = client.pull()
    # Outer Nesterov SGD step from a zero buffer: lr * (1 + momentum) * delta.
    torch.testing.assert_close(params["b"], STATE["b"] - 0.7 * 1.9 * 0.1)


def test_second_update_for_the_same_round_is_refused() -> None:
    server = CoordinatorServer(tiny_config(cluster={"workers": 2})).start()
    clients = [CoordinatorClient(server.address) for _ in range(2)]
    try:
        for c in clients:
            c.join("test")
        clients[0].offer_state(STATE)
        assert clients[0].wait_round(-1).round == 0
        _push(server.address, clients[0].worker_id, 0, _good(), token="")
        with pytest.raises(grpc.RpcError) as info:
            _push(server.address, clients[0].worker_id, 0, _good(), token="")
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert f"worker {clients[0].worker_id} already sent its update for round 0" in info.value.details()
        assert server.state._current is not None and server.state._current.acc.count == 1
        assert server.state.round == 0
    finally:
        for c in clients:
            c.close()
        server.stop()
