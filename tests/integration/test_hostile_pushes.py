"""Issue 12, adversarial client: pushes from a joined member with a valid envelope and a hostile payload
header are refused with a status naming the problem (never UNKNOWN), change nothing, and the coordinator
keeps folding honest updates afterwards. One regression test per finding of the campaign."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
import torch

from compression import registry
from compression.payload import Payload, dense
from coordinator.server import CoordinatorServer
from protocols.wire import lowband_pb2 as pb
from tests.conftest import tiny_config
from tests.integration.hostile import (
    STATE,
    TOKEN,
    UPDATE,
    chunks,
    fingerprint,
    good_entries,
    header,
    member_envelope,
    push,
    running,
)
from worker.client import CoordinatorClient

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
Build = Callable[[Any], list[pb.PushMessage]]


def _with(entries: dict[str, Payload], **fields: Any) -> Build:
    return lambda env: [header(env, entries, **fields), *chunks(entries)]


def _zero_byte_giant(env: Any) -> list[pb.PushMessage]:
    entries = good_entries()
    messages = [header(env, entries), *chunks(entries)]
    spec = messages[1].chunk.spec  # the first entry's spec: its one component claims [2^62, 2^62, 0]
    del spec.components[0].shape[:]
    spec.components[0].shape.extend([2**62, 2**62, 0])
    spec.components[0].byte_length = 0
    return messages


def _declared(**fields: int) -> Build:
    def build(env: Any) -> list[pb.PushMessage]:
        entries = good_entries()
        return [header(env, entries, **fields), *chunks(entries)]
    return build


def _huge(value: float) -> dict[str, Payload]:
    w = UPDATE["w"].clone()
    w[0, 0] = value
    return {"w": dense(w), "b": dense(UPDATE["b"])}


CASES: list[tuple[str, Build, grpc.StatusCode, str]] = [
    ("a finite 3e38", _with(_huge(3e38)), INVALID, "tensor 'w' holds a value of magnitude 3e+38, over the bound"),
    ("a value past the magnitude bound", _with(_huge(-1e4)), INVALID, "over the bound of"),
    ("shape [2^62, 2^62, 0] of zero bytes", _zero_byte_giant, EXHAUSTED, "is over the limit of 1099511627776 elements"),
    ("weight 1e39", _with(good_entries(), weight=1e39), INVALID, "weight must be finite and > 0, got 1e+39"),
    ("tokens NaN in the metrics", _with(good_entries(), metrics={"tokens": float("nan")}), INVALID,
     "metric 'tokens' = nan"),
    ("tokens past 2^53", _with(good_entries(), tokens=2**64 - 1), INVALID, "tokens = 18446744073709551615 is out"),
    ("more bytes declared than a push may carry", _declared(total_bytes=1 << 40), EXHAUSTED,
     "declares 1099511627776 bytes, over the limit"),
    ("a million and one entries", _declared(num_entries=(1 << 20) + 1), EXHAUSTED, "entries, over the limit"),
]


@pytest.mark.parametrize(("case", "build", "code", "text"), CASES, ids=[c[0] for c in CASES])
def test_a_hostile_push_from_a_member_is_refused_by_name_and_changes_nothing(
        case: str, build: Build, code: grpc.StatusCode, text: str) -> None:
    with running() as (server, (first, second)):
        before = fingerprint(server)
        with pytest.raises(grpc.RpcError) as info:
            push(server.address, build(member_envelope(first)))
        assert info.value.code() == code, info.value.details()
        assert text in (info.value.details() or ""), info.value.details()
        assert fingerprint(server) == before
        for member in (first, second):  # the coordinator keeps running: honest updates fold, the round closes
            push(server.address, _with(good_entries())(member_envelope(member)))
        assert first.wait_round(0).round == 1


@pytest.mark.parametrize("chunk", [2**62, 2**26])
def test_a_codec_header_with_a_huge_chunk_is_refused_before_allocation(chunk: int) -> None:
    with running(protocol={"kind": "diloco", "inner_steps": 5, "compression": {"codec": "int8"}}) as (server, (a, _)):
        int8 = registry.build("int8")
        entries = {name: int8.compress(t, key=name) for name, t in UPDATE.items()}
        entries["w"] = Payload("int8", entries["w"].shape, entries["w"].dtype, entries["w"].tensors,
                               {**entries["w"].meta, "chunk": chunk})
        before = fingerprint(server)
        with pytest.raises(grpc.RpcError) as info:
            push(server.address, _with(entries)(member_envelope(a)))
        assert info.value.code() == INVALID
        assert f"meta 'chunk'={chunk} is over the limit of 16777216" in (info.value.details() or "")
        assert fingerprint(server) == before


def test_an_initial_state_with_a_hostile_shape_is_refused_and_an_honest_one_then_installs() -> None:
    cfg = tiny_config(protocol={"kind": "diloco", "inner_steps": 5}, cluster={"workers": 1, "token": TOKEN})
    server = CoordinatorServer(cfg).start()
    member = CoordinatorClient(server.address, token=TOKEN)
    try:
        assert not member.join("test").has_global_state  # this worker is asked for the initial state
        entries = {name: dense(t) for name, t in STATE.items()}
        messages = _zero_byte_giant(member_envelope(member))
        messages[0].header.kind = pb.PUSH_KIND_INITIAL_STATE
        messages[0].header.weight = 1.0
        with pytest.raises(grpc.RpcError) as info:
            push(server.address, messages)
        assert info.value.code() == EXHAUSTED, info.value.details()
        assert server.state.aggregator is None and server.state.state_hash == ""
        assert member.offer_state({n: p.tensors["values"] for n, p in entries.items()})
        assert server.state.aggregator is not None
        assert torch.equal(server.state.aggregator.replica.params["w"], STATE["w"])
    finally:
        member.close()
        server.stop(0)


@pytest.mark.parametrize(("megabytes", "text"), [(5, "a chunk of 5242880 bytes, over the limit of 4194304"),
                                                (17, "Received message larger than max")])
def test_an_oversized_message_is_resource_exhausted(megabytes: int, text: str) -> None:
    """Per message: a chunk past MAX_CHUNK_BYTES is refused by the coordinator, a message past
    MAX_MESSAGE_BYTES by gRPC itself; both with RESOURCE_EXHAUSTED (it used to be INVALID_ARGUMENT)."""
    with running() as (server, (first, _)):
        before = fingerprint(server)
        entries = good_entries()
        messages = [header(member_envelope(first), entries), *chunks(entries)]
        messages[1].chunk.data = bytes(megabytes << 20)
        with pytest.raises(grpc.RpcError) as info:
            push(server.address, messages, max_send=64 << 20)
        assert info.value.code() == EXHAUSTED, info.value.details()
        assert text in (info.value.details() or ""), info.value.details()
        assert fingerprint(server) == before


def test_the_magnitude_bound_follows_cluster_max_update_ratio() -> None:
    with running(max_update_ratio=1e5) as (server, (first, second)):
        for member in (first, second):  # -1e4 is refused at the default ratio (above), folded at 1e5
            push(server.address, _with(_huge(-1e4))(member_envelope(member)))
        assert first.wait_round(0).round == 1
