"""Bad wire input gets a gRPC status naming the problem, nothing of it is folded, and the coordinator
keeps running.

A real gRPC server on 127.0.0.1:0, run in this process so the test can look at the aggregator's open
round (`server.state.aggregator.acc` / `.senders`); raw stubs send the malformed pushes, so no client-side
logic (retries, re-joins) stands between the test and the coordinator. The run's uplink codec is
`topk_global` (DiLoCo with a compressed uplink), so codec, index and payload cases can be built by hand.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from compression import registry
from compression.payload import Payload, dense
from coordinator.server import CoordinatorServer
from protocols.config import PROTOCOL_VERSION
from protocols.wire import lowband_pb2 as pb
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.conftest import tiny_config
from worker.client import CoordinatorClient

STATE = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(3)}
UPDATE = {"w": torch.linspace(-0.3, 0.25, 12).reshape(4, 3), "b": torch.tensor([0.1, -0.2, 0.3])}
TOKEN = "s3cret"
CODEC = registry.build("topk_global", density=0.5)
INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


def _good() -> dict[str, Payload]:
    return {name: CODEC.compress(t, key=name) for name, t in UPDATE.items()}


def _topk_global(shape: tuple[int, ...], indices: list[int], values: list[float], k: int | None = None) -> Payload:
    """A hand-built topk_global payload (int32 indices, float32 values)."""
    return Payload("topk_global", shape, torch.float32,
                   {"indices": torch.tensor(indices, dtype=torch.int32), "values": torch.tensor(values)},
                   {"k": len(indices) if k is None else k, "value_dtype": "float32"})


def _poisoned(value: float) -> Callable[[dict[str, Payload]], dict[str, Payload]]:
    def mutate(entries: dict[str, Payload]) -> dict[str, Payload]:
        values = entries["w"].tensors["values"].clone()
        values[1] = value
        return {**entries, "w": Payload("topk_global", (4, 3), torch.float32,
                                        {**entries["w"].tensors, "values": values}, entries["w"].meta)}
    return mutate


@pytest.fixture
def coordinator() -> Iterator[tuple[CoordinatorServer, list[CoordinatorClient]]]:
    cfg = tiny_config(protocol={"kind": "diloco", "inner_steps": 5,
                                "compression": {"codec": "topk_global", "density": 0.5}},
                      cluster={"workers": 2, "token": TOKEN})
    server = CoordinatorServer(cfg).start()
    clients = [CoordinatorClient(server.address, token=TOKEN) for _ in range(2)]
    try:
        for client in clients:
            client.join("test")
        clients[0].offer_state(STATE)
        assert clients[0].wait_round(-1).round == 0
        yield server, clients
    finally:
        for client in clients:
            client.close()
        server.stop()


def _header(worker_id: str, round_: int, entries: dict[str, Payload], token: str, run_id: str,
            weight: float = 1.0) -> m.PushHeader:
    env = m.Envelope(run_id, worker_id, round_, PROTOCOL_VERSION, token)
    return m.PushHeader(envelope=env, kind=m.PushKind.UPDATE, weight=weight, num_entries=len(entries),
                        total_bytes=sum(p.nbytes() for p in entries.values()))


def _push(address: str, worker_id: str, round_: int, entries: dict[str, Payload], token: str,
          run_id: str = "", weight: float = 1.0) -> None:
    messages: Any = serde.push_stream(_header(worker_id, round_, entries, token, run_id), entries, 64)
    if weight != 1.0:  # the dataclass would refuse to encode it: patch the protobuf header itself
        first = next(messages)
        first.header.weight = weight
        messages = iter([first, *messages])
    with grpc.insecure_channel(address, options=m.GRPC_OPTIONS) as channel:
        lowband_pb2_grpc.CoordinatorStub(channel).PushUpdate(messages, timeout=30)


def _open_round(server: CoordinatorServer) -> tuple[Any, ...]:
    agg = server.state.aggregator
    assert agg is not None
    acc = agg.acc
    sums = {name: t.clone() for name, t in acc.sums.items()}
    return agg.round, acc.count, acc.total_weight, list(acc.workers), sums, list(agg.senders), server.state.state_hash


CASES: list[tuple[str, Callable[[dict[str, Payload]], dict[str, Payload]], dict[str, Any], grpc.StatusCode, str]] = [
    ("mixed codecs", lambda e: {**e, "b": dense(UPDATE["b"])}, {}, INVALID,
     "tensor 'b' is encoded with codec 'dense', this run's uplink codec is 'topk_global'"),
    ("other codec", lambda e: {n: registry.build("topk", density=0.5, chunk=4).compress(t) for n, t in UPDATE.items()},
     {}, INVALID, "is encoded with codec 'topk', this run's uplink codec is 'topk_global'"),
    ("duplicate indices", lambda e: {**e, "b": _topk_global((3,), [1, 1], [0.5, 0.5])}, {}, INVALID,
     "tensor 'b' repeats indices"),
    ("index past the end", lambda e: {**e, "b": _topk_global((3,), [0, 3], [0.5, 0.5])}, {}, INVALID,
     "tensor 'b': topk_global payload index out of range"),
    ("negative index", lambda e: {**e, "b": _topk_global((3,), [-1, 0], [0.5, 0.5])}, {}, INVALID,
     "tensor 'b': topk_global payload index out of range"),
    ("payload contradicts its header", lambda e: {**e, "b": _topk_global((3,), [0, 1], [0.5, 0.5], k=3)}, {},
     INVALID, "tensor 'b': topk_global payload component 'indices' has 2 elements, header implies 3"),
    ("nan", _poisoned(float("nan")), {}, INVALID, "tensor 'w' contains NaN or Inf"),
    ("inf", _poisoned(float("-inf")), {}, INVALID, "tensor 'w' contains NaN or Inf"),
    ("wrong shape", lambda e: {**e, "w": CODEC.compress(torch.ones(3, 4))}, {}, INVALID,
     "tensor 'w' has shape [3, 4], expected [4, 3]"),
    ("wrong dtype", lambda e: {**e, "b": CODEC.compress(UPDATE["b"].double())}, {}, INVALID,
     "tensor 'b' has dtype torch.float64, expected "),
    ("missing tensor", lambda e: {"w": e["w"]}, {}, INVALID, "update lacks tensor(s) ['b']"),
    ("extra tensor", lambda e: {**e, "bogus": CODEC.compress(torch.ones(2))}, {}, INVALID,
     "unknown tensor name(s) ['bogus']"),
    ("zero weight", lambda e: e, {"weight": 0.0}, INVALID, "PushHeader.weight must be finite and positive"),
    ("early round", lambda e: e, {"round_": 7}, PRECONDITION,
     "early round: update is for round 7, the coordinator is still at round 0"),
    # A stranger learns nothing: an unknown id has no session, so it is refused as the bad token it is.
    ("unknown worker", lambda e: e, {"worker_id": "ghost"}, grpc.StatusCode.UNAUTHENTICATED,
     "bad token: not the session of worker 'ghost'"),
    ("bad token", lambda e: e, {"token": "guess"}, grpc.StatusCode.UNAUTHENTICATED, "bad token"),
    ("wrong run id", lambda e: e, {"run_id": "other-run"}, PRECONDITION, "wrong run id 'other-run'"),
]


@pytest.mark.parametrize(("case", "mutate", "fields", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_push_is_refused_by_name_and_nothing_of_it_is_folded(coordinator, case, mutate, fields, code,  # type: ignore[no-untyped-def]
                                                                 message) -> None:
    server, (first, second) = coordinator
    before, sent = _open_round(server), server.state.members[first.worker_id].bytes_sent
    with pytest.raises(grpc.RpcError) as info:
        _push(server.address, entries=mutate(_good()),
              **{"worker_id": first.worker_id, "round_": 0, "token": first.session, **fields})
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details(), info.value.details()
    after = _open_round(server)
    assert after[:4] == before[:4] and after[5:] == before[5:]  # round, count, weight, folders, senders, hash
    assert after[4].keys() == before[4].keys() == set()
    assert server.state.members[first.worker_id].bytes_sent == sent  # a refused push is not counted as sent

    # The coordinator kept running: a valid push still folds, and with the second worker's the round closes.
    _push(server.address, first.worker_id, 0, _good(), first.session)
    agg = server.state.aggregator
    assert agg is not None and agg.acc.count == 1 and agg.senders == [first.worker_id]
    _push(server.address, second.worker_id, 0, _good(), second.session)
    assert first.wait_round(0).round == 1
    replica = first.pull()
    # Outer Nesterov SGD from a zero buffer: lr * (1 + momentum) * the mean of the two (equal) updates.
    want = {name: STATE[name] - 0.7 * 1.9 * registry.decode(p) for name, p in _good().items()}
    torch.testing.assert_close(replica.params, want)


def test_a_second_push_for_a_round_is_acknowledged_and_not_folded_again(coordinator) -> None:  # type: ignore[no-untyped-def]
    server, (first, _) = coordinator
    _push(server.address, first.worker_id, 0, _good(), first.session)
    before = _open_round(server)
    assert before[1] == 1 and before[5] == [first.worker_id]
    _push(server.address, first.worker_id, 0, _good(), first.session)  # a retry after a lost reply: push is idempotent
    after = _open_round(server)
    assert after[:4] == before[:4] and after[5:] == before[5:]
    assert all(torch.equal(after[4][n], before[4][n]) for n in before[4])
    assert server.state.round == 0


@pytest.mark.parametrize(("fields", "code"), [({"token": "guess"}, grpc.StatusCode.UNAUTHENTICATED),
                                              ({"round_": 7}, PRECONDITION)], ids=["bad token", "early round"])
def test_a_refusable_header_is_refused_before_the_payload_arrives(coordinator, fields, code) -> None:  # type: ignore[no-untyped-def]
    """DESIGN.md: inconsistent pushes are "checked from the first message before payload is buffered".
    The stream sends its header, then holds its chunks back until the call has returned: a coordinator
    that judges the header at once answers with the header's problem; one that first buffers the whole
    payload sees the stream end short after 20 s and answers with that instead."""
    server, (first, _) = coordinator
    entries = _good()
    header = _header(**{"worker_id": first.worker_id, "round_": 0, "token": first.session, "run_id": "", **fields},
                     entries=entries)
    answered = threading.Event()

    def stream() -> Iterator[pb.PushMessage]:
        messages = serde.push_stream(header, entries, 64)
        yield next(messages)
        answered.wait(20)
        yield from messages if answered.is_set() else ()

    with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        with pytest.raises(grpc.RpcError) as info:
            lowband_pb2_grpc.CoordinatorStub(channel).PushUpdate(stream(), timeout=120)
        answered.set()
    assert info.value.code() == code, info.value.details()
    assert server.state.aggregator is not None and server.state.aggregator.acc.count == 0


def test_a_wait_of_nan_or_negative_seconds_is_refused(coordinator) -> None:  # type: ignore[no-untyped-def]
    server, (first, _) = coordinator
    with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        stub = lowband_pb2_grpc.CoordinatorStub(channel)
        for wait in (float("nan"), -1.0, float("inf")):
            env = m.Envelope(first.run_id, first.worker_id, 0, PROTOCOL_VERSION, first.session)
            with pytest.raises(grpc.RpcError) as info:
                stub.WaitRound(serde.to_pb(m.WaitRequest(envelope=env, after_round=0, max_wait_s=wait)), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_wait_s" in (info.value.details() or "")


def test_a_join_naming_another_run_is_refused(coordinator) -> None:  # type: ignore[no-untyped-def]
    server, _ = coordinator
    with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        stub = lowband_pb2_grpc.CoordinatorStub(channel)
        env = m.Envelope("another-run", "", 0, PROTOCOL_VERSION, TOKEN)
        with pytest.raises(grpc.RpcError) as info:
            stub.Join(serde.to_pb(m.JoinRequest(envelope=env, hostname="x")), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "wrong run id" in (info.value.details() or "")
    assert len(server.state.members) == 2
