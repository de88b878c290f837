"""Issue 12, fuzzing: over 10,000 messages, random bytes into every RPC of the coordinator, mutated valid
requests, and structure-aware pushes from a joined member (a valid envelope with a hostile payload
header: huge chunk sizes and shapes, NaN/Inf, 3e38, duplicate sparse indices, mixed codecs, lying byte
counts). The coordinator never crashes (no UNKNOWN, and no INTERNAL from lowband's own handlers: every
refusal is one it names) and never changes its global state (the fingerprint of `hostile.fingerprint`).

The bulk calls the servicer in this process (a real servicer over the real coordinator state, its coroutines on
an event loop of this module; the context only records the status the servicer ends a call with); a slice of
random bytes goes over real gRPC on loopback, where undecodable bytes are gRPC's own to refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compression import registry
from compression.payload import Payload, dense
from coordinator.server import CoordinatorServer
from coordinator.servicer import CoordinatorServicer
from protocols.wire import lowband_pb2 as pb
from protocols.wire import messages as m
from protocols.wire import serde
from tests.integration.fuzzing import Ended, mutated, random_message
from tests.integration.hostile import (
    UPDATE,
    chunks,
    fingerprint,
    header,
    member_envelope,
    running,
)
from worker.client import CoordinatorClient

SERVICE = "/lowband.v1.Coordinator/"
UNARY = {"Join": pb.JoinRequest, "Heartbeat": pb.HeartbeatRequest, "Leave": pb.LeaveRequest,
         "WaitRound": pb.WaitRequest, "AttestBase": pb.AttestRequest}
SERVER_STREAMING = {"PullState": pb.PullRequest, "PullAggregate": pb.AggregateRequest}
EVERY_RPC = [*UNARY, *SERVER_STREAMING, "PushUpdate"]
SENT = {"messages": 0}  # messages fed to the coordinator by every test of this module
LOOP = asyncio.new_event_loop()  # the servicer's coroutines run here, as on the server's loop


class AioRecordingContext:
    """The part of grpc.aio.ServicerContext the servicer uses: abort records the status and ends the call."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.callbacks: list[Callable[[Any], None]] = []
        self.written = 0

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)

    def done(self) -> bool:
        return False

    def terminate(self) -> None:
        """What gRPC does when the call ends, however it ends: run its callbacks."""
        for callback in self.callbacks:
            callback(self)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Ended(details)

    async def write(self, message: Any) -> None:
        self.written += 1


async def _messages(request: list[Any]) -> AsyncIterator[Any]:
    for message in request:
        yield message


@pytest.fixture(scope="module")
def coordinator() -> Iterator[tuple[CoordinatorServer, CoordinatorServicer, list[CoordinatorClient]]]:
    protocol = {"kind": "diloco", "inner_steps": 5, "compression": {"codec": "topk_global", "density": 0.5}}
    # Members stay alive through the module: an authenticated push, even one refused, is proof of life, so a member
    # that lapsed during a slow stretch of the fuzz (4 s) would be revived by the next one, a change not the fuzz's.
    with running(protocol=protocol, heartbeat_timeout_s=600.0) as (server, clients):
        yield server, CoordinatorServicer(server.state), clients


def _call(servicer: CoordinatorServicer, rpc: str, request: Any) -> grpc.StatusCode:
    """Feed one request (a list of messages for PushUpdate) in process; the status it ended with."""
    context = AioRecordingContext()
    SENT["messages"] += len(request) if isinstance(request, list) else 1
    # The fixture's real calls end on gRPC's own thread, after their clients had the reply: one of them may still
    # be counted open here, and end meanwhile. This call must leave none of its own open.
    open_before = _calls_open(servicer)
    try:
        LOOP.run_until_complete(getattr(servicer, rpc)(
            _messages(request) if isinstance(request, list) else request, context))
    except Ended:
        assert context.code is not None
        assert context.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (rpc, context.details)
        return context.code
    finally:
        context.terminate()
        assert all(n <= open_before.get(w, 0) for w, n in _calls_open(servicer).items()), (rpc, "a call left open")
    return grpc.StatusCode.OK


def _calls_open(servicer: CoordinatorServicer) -> dict[str, int]:
    return {m.worker_id: m.calls_open for m in servicer.state.members_copy()}


def _stranger_requests(run_id: str, worker_id: str) -> dict[str, Any]:
    """A valid-looking request of every unary and server-streaming RPC, with a wrong token."""
    env = serde.to_pb(m.Envelope(run_id, worker_id, 0, 1, "guess"))
    return {"Join": pb.JoinRequest(envelope=env, hostname="h"), "Heartbeat": pb.HeartbeatRequest(envelope=env),
            "Leave": pb.LeaveRequest(envelope=env), "WaitRound": pb.WaitRequest(envelope=env, max_wait_s=0.01),
            "AttestBase": pb.AttestRequest(envelope=env, base_digest="ab"),
            "PullState": pb.PullRequest(envelope=env), "PullAggregate": pb.AggregateRequest(envelope=env)}


def test_random_and_mutated_messages_into_every_rpc_change_nothing(coordinator) -> None:  # type: ignore[no-untyped-def]
    server, servicer, (first, _) = coordinator
    before = fingerprint(server)
    rng = random.Random(12)
    valid = _stranger_requests(first.run_id, first.worker_id)
    codes: dict[grpc.StatusCode, int] = {}
    for i in range(200_000):  # until 5000 requests parsed (random bytes mostly do not)
        if sum(codes.values()) >= 5000:
            break
        rpc = EVERY_RPC[i % len(EVERY_RPC)]
        if rpc == "PushUpdate":
            request: Any = [m for m in (random_message(rng, pb.PushMessage) for _ in range(rng.randrange(1, 4)))
                            if m is not None]
        elif i % 2:
            request = random_message(rng, {**UNARY, **SERVER_STREAMING}[rpc])
        else:
            request = mutated(rng, valid[rpc])
        if request is None:
            continue
        code = _call(servicer, rpc, request)
        codes[code] = codes.get(code, 0) + 1
        assert fingerprint(server) == before, (rpc, request)
    assert sum(codes.values()) == 5000 and grpc.StatusCode.OK not in codes, codes
    assert set(_calls_open(servicer).values()) == {0}  # the fixture's calls long ended, and no fuzzed one is open


# ---- structure-aware pushes from a joined member ----------------------------------------------------

CODEC = registry.build("topk_global", density=0.5)


def _good() -> dict[str, Payload]:
    return {name: CODEC.compress(t, key=name) for name, t in UPDATE.items()}


def _replace(entries: dict[str, Payload], name: str, **changes: Any) -> dict[str, Payload]:
    p = entries[name]
    fields = {"codec": p.codec, "shape": p.shape, "dtype": p.dtype, "tensors": p.tensors, "meta": p.meta, **changes}
    return {**entries, name: Payload(**fields)}


def _values(entries: dict[str, Payload], value: float, at: int) -> dict[str, Payload]:
    values = entries["w"].tensors["values"].clone()
    values[at % values.numel()] = value
    return _replace(entries, "w", tensors={**entries["w"].tensors, "values": values})


Hostile = Callable[[dict[str, Payload], int, float], dict[str, Payload]]
HOSTILE: dict[str, Hostile] = {
    "non-finite value": lambda e, k, x: _values(e, [float("nan"), float("inf"), -float("inf")][k % 3], k),
    "huge finite value": lambda e, k, x: _values(e, (-1) ** k * (3e38 if k % 3 == 0 else 1e4 + abs(x)), k),
    "duplicate indices": lambda e, k, x: _replace(e, "b", tensors={
        "indices": torch.tensor([k % 3, k % 3], dtype=torch.int32), "values": torch.tensor([x, x])},
        meta={"k": 2, "value_dtype": "float32"}),
    "index out of range": lambda e, k, x: _replace(e, "b", tensors={
        "indices": torch.tensor([0, 3 + k], dtype=torch.int32), "values": torch.tensor([0.1, 0.1])}),
    "mixed codecs": lambda e, k, x: {**e, "b": dense(UPDATE["b"])},
    "another codec": lambda e, k, x: {n: registry.build(["topk", "int8", "sign", "int2"][k % 4]).compress(t)
                                      for n, t in UPDATE.items()},
    "huge meta k": lambda e, k, x: _replace(e, "w", meta={**e["w"].meta, "k": 2 ** (20 + k % 43)}),
    "huge shape": lambda e, k, x: _replace(e, "w", shape=(2 ** (k % 63), 2 ** (k % 61), 0)),
    "wrong shape": lambda e, k, x: _replace(e, "w", shape=(k % 7 + 5, 3)),
    "negative meta": lambda e, k, x: _replace(e, "w", meta={**e["w"].meta, "k": -1 - k}),
    "wrong value dtype": lambda e, k, x: _replace(e, "w", meta={**e["w"].meta, "value_dtype": "float16"}),
    "missing tensor": lambda e, k, x: {"w": e["w"]},
}
HEADERS: dict[str, Callable[[int, float], dict[str, Any]]] = {
    "honest": lambda k, x: {},
    "weight": lambda k, x: {"weight": [0.0, -1.0, float("nan"), 1e39, float("inf")][k % 5]},
    "metrics": lambda k, x: {"metrics": {"tokens": [float("nan"), float("inf"), -float("inf")][k % 3]}},
    "span metric": lambda k, x: {"metrics": {"wall_s": -abs(x) - 1.0}},
}


def _hostile_push(server: CoordinatorServer, member: CoordinatorClient, kind: str, head: str, k: int,
                  x: float, lie: int) -> list[pb.PushMessage]:
    entries = HOSTILE[kind](_good(), k, x)
    messages = [header(member_envelope(member, server.state.round), entries,
                       **HEADERS[head](k, x))]
    with contextlib.suppress(m.WireError):  # the sender's own encoder may refuse it: then the header alone
        messages += chunks(entries)
    if lie:  # a header that lies about its totals
        messages[0].header.total_bytes += lie
        messages[0].header.num_entries += lie % 3
    return messages


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(kind=st.sampled_from(sorted(HOSTILE)), head=st.sampled_from(sorted(HEADERS)),
       k=st.integers(0, 10_000), x=st.floats(-1e30, 1e30, allow_nan=False), lie=st.sampled_from([0, 0, 1, 7, 1 << 40]))
def test_hostile_pushes_from_a_joined_member_are_refused_and_change_nothing(coordinator, kind: str, head: str,  # type: ignore[no-untyped-def]
                                                                            k: int, x: float, lie: int) -> None:
    server, servicer, (first, second) = coordinator
    before = fingerprint(server)
    member = (first, second)[k % 2]
    code = _call(servicer, "PushUpdate", _hostile_push(server, member, kind, head, k, x, lie))
    assert code is not grpc.StatusCode.OK, (kind, head, k, x, lie)
    assert fingerprint(server) == before


def test_random_bytes_over_real_grpc_never_come_back_unknown(coordinator) -> None:  # type: ignore[no-untyped-def]
    server, _, (first, second) = coordinator
    before = fingerprint(server)
    rng = random.Random(7)
    identity = lambda b: b  # noqa: E731 - raw bytes both ways: nothing between the fuzz and the server's parser
    codes: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        for i in range(800):
            rpc = EVERY_RPC[i % len(EVERY_RPC)]
            path = SERVICE + rpc
            try:
                if rpc in UNARY:
                    channel.unary_unary(path, identity, identity)(rng.randbytes(rng.randrange(60)), timeout=30)
                elif rpc in SERVER_STREAMING:
                    list(channel.unary_stream(path, identity, identity)(rng.randbytes(rng.randrange(60)), timeout=30))
                else:
                    stream = [rng.randbytes(rng.randrange(60)) for _ in range(rng.randrange(1, 4))]
                    SENT["messages"] += len(stream) - 1
                    channel.stream_unary(path, identity, identity)(iter(stream), timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
                assert code is not grpc.StatusCode.UNKNOWN, (rpc, err.details())
            SENT["messages"] += 1
            codes[code] = codes.get(code, 0) + 1
    assert fingerprint(server) == before
    assert grpc.StatusCode.OK not in codes, codes
    assert first.heartbeat(1, 2.5, None).round == server.state.round  # still serving its members
    assert second.heartbeat(1, 2.5, None).round == server.state.round


def test_the_fuzz_sent_at_least_ten_thousand_messages() -> None:
    """Runs last in this module (pytest keeps file order): the total over every test above."""
    assert SENT["messages"] >= 10_000, SENT
