"""Message dataclasses <-> protobuf: lossless round trips, and malformed messages refused by field name."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from compression.payload import Payload
from protocols.wire import lowband_pb2 as pb
from protocols.wire import messages as m
from protocols.wire.messages import GRPC_OPTIONS, MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, WireError
from protocols.wire.serde import encode_entries, from_pb, to_pb

ENV = m.Envelope(run_id="run-7", worker_id="w3", round=12, protocol_version=1, token="s3cret")

EXAMPLES: list[m.Message] = [
    ENV,
    m.JoinRequest(m.Envelope(run_id="", worker_id="", round=0, protocol_version=1, token="t"), hostname="gpu-box"),
    m.JoinReply(
        worker_id="w3",
        worker_index=2,
        run_id="run-7",
        round=12,
        config_yaml="protocol:\n  kind: diloco\n",
        has_global_state=True,
        heartbeat_interval_s=2.5,
    ),
    m.HeartbeatRequest(ENV, inner_step=31, last_loss=1.875, bytes_sent=2**40, eval_loss=2.0625),
    m.HeartbeatReply(round=12, phase=m.Phase.TRAINING),
    m.LeaveRequest(ENV, reason="preempted"),
    m.LeaveReply(),
    m.PullRequest(ENV),
    m.StateHeader(round=12, num_entries=40, total_bytes=2**33, state_hash="ab" * 32),
    m.PushHeader(
        ENV,
        m.PushKind.INITIAL_STATE,
        weight=4096.0,
        num_entries=40,
        total_bytes=123456,
        train_loss=2.25,
        tokens=4096,
        metrics={"compute_s": 12.5, "lr": 3e-4},
    ),
    m.PushReply(accepted=True, round=13, bytes_received=123456),
    m.WaitRequest(ENV, after_round=12, max_wait_s=30.0),
    m.RoundInfo(round=13, phase=m.Phase.FINISHED, state_hash="cd" * 32, rounds_total=20),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda msg: type(msg).__name__)
def test_every_message_round_trips_through_wire_bytes(msg: m.Message) -> None:
    proto = to_pb(msg)
    assert type(proto).__name__ == type(msg).__name__
    parsed = type(proto).FromString(proto.SerializeToString())
    assert from_pb(parsed) == msg
    assert from_pb(parsed, type(msg)) == msg


def test_every_message_type_has_an_example() -> None:
    assert {type(msg) for msg in EXAMPLES} == set(m.Message.__args__)  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", m.Message.__args__, ids=lambda cls: cls.__name__)  # type: ignore[attr-defined]
def test_dataclass_fields_mirror_the_proto_fields(cls: type) -> None:
    proto_fields = {f.name for f in getattr(pb, cls.__name__).DESCRIPTOR.fields}
    assert {f.name for f in dataclasses.fields(cls)} == proto_fields


def test_enums_round_trip_every_value() -> None:
    for phase in m.Phase:
        assert from_pb(to_pb(m.HeartbeatReply(round=1, phase=phase)), m.HeartbeatReply).phase is phase
    for kind in m.PushKind:
        header = m.PushHeader(ENV, kind, weight=1.0, num_entries=0, total_bytes=0)
        assert from_pb(to_pb(header), m.PushHeader).kind is kind


def test_nan_loss_travels_as_nan() -> None:
    got = from_pb(to_pb(m.HeartbeatRequest(ENV)), m.HeartbeatRequest)
    assert math.isnan(got.last_loss) and math.isnan(got.eval_loss)


def test_missing_envelope_is_named() -> None:
    for proto in (pb.JoinRequest(hostname="h"), pb.PushHeader(kind=pb.PUSH_KIND_UPDATE, weight=1.0)):
        with pytest.raises(WireError, match=rf"{type(proto).__name__}\.envelope is missing"):
            from_pb(proto)


def test_unset_or_unknown_enum_values_are_named() -> None:
    with pytest.raises(WireError, match=r"RoundInfo\.phase: unset or unknown Phase value 0"):
        from_pb(pb.RoundInfo(round=1))
    with pytest.raises(WireError, match=r"HeartbeatReply\.phase: unset or unknown Phase value 9"):
        from_pb(pb.HeartbeatReply(round=1, phase=9))  # type: ignore[arg-type]
    header = to_pb(m.PushHeader(ENV, m.PushKind.UPDATE, weight=1.0, num_entries=0, total_bytes=0))
    header.kind = pb.PUSH_KIND_UNSPECIFIED
    with pytest.raises(WireError, match=r"PushHeader\.kind: unset or unknown PushKind value 0"):
        from_pb(header)


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf])
def test_push_weight_must_be_finite_and_positive(weight: float) -> None:
    proto = to_pb(m.PushHeader(ENV, m.PushKind.UPDATE, weight=1.0, num_entries=0, total_bytes=0))
    proto.weight = weight
    with pytest.raises(WireError, match=r"PushHeader\.weight must be finite and positive"):
        from_pb(proto)


def test_wrong_message_type_is_refused() -> None:
    with pytest.raises(WireError, match="expected PushHeader, got protobuf message StateHeader"):
        from_pb(pb.StateHeader(round=1), m.PushHeader)
    with pytest.raises(WireError, match="expected a wire message, got protobuf message TensorChunk"):
        from_pb(pb.TensorChunk())


def test_unencodable_values_are_named() -> None:
    with pytest.raises(WireError, match=r"Envelope\.round: cannot encode -1"):
        to_pb(m.PullRequest(m.Envelope(run_id="r", worker_id="w", round=-1, protocol_version=1)))
    with pytest.raises(WireError, match=r"StateHeader\.num_entries: cannot encode 'x'"):
        to_pb(m.StateHeader(round=1, num_entries="x", total_bytes=0, state_hash=""))  # type: ignore[arg-type]


def test_largest_chunk_with_its_spec_fits_under_the_message_limit() -> None:
    """A first chunk carries both MAX_CHUNK_BYTES of data and the entry spec: both ends must accept it."""
    meta: dict[str, int | float | str | bool] = {f"key{i}": "x" * 64 for i in range(100)}
    payload = Payload("topk", (1 << 20,), torch.float32, {"values": torch.zeros(1 << 20)}, meta)
    first = next(encode_entries({"a" * 1000: payload}, chunk_bytes=MAX_CHUNK_BYTES))
    size = pb.StateChunk(chunk=first).ByteSize()
    assert MAX_CHUNK_BYTES < size < MAX_MESSAGE_BYTES
    assert dict(GRPC_OPTIONS) == {
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    }
