"""Message dataclasses <-> protobuf: lossless round trips, and malformed messages refused by field name;
a round's aggregate <-> the entries and stream of PullAggregate."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from compression import registry
from compression.payload import Payload, dense
from protocols.base import Aggregate, Update
from protocols.wire import lowband_pb2 as pb
from protocols.wire import messages as m
from protocols.wire.messages import GRPC_OPTIONS, MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, WireError
from protocols.wire.serde import (
    EncodedAggregate,
    aggregate_entries,
    aggregate_from_entries,
    aggregate_stream,
    encode_entries,
    from_pb,
    read_aggregate,
    to_pb,
)

ENV = m.Envelope(run_id="run-7", worker_id="w3", round=12, protocol_version=1, token="s3cret")

EXAMPLES: list[m.Message] = [
    ENV,
    m.JoinRequest(m.Envelope(run_id="", worker_id="", round=0, protocol_version=1, token="t"), hostname="gpu-box",
                  software_version="0.1.0", config_hash="0123456789abcdef"),
    m.JoinReply(
        worker_id="w3",
        worker_index=2,
        run_id="run-7",
        round=12,
        config_yaml="protocol:\n  kind: diloco\n",
        has_global_state=True,
        heartbeat_interval_s=2.5,
        config_hash="0123456789abcdef",
        session_token="Zm9vYmFyLXNlc3Npb24",
    ),
    m.HeartbeatRequest(ENV, inner_step=31, last_loss=1.875, bytes_sent=2**40, eval_loss=2.0625),
    m.HeartbeatReply(round=12, phase=m.Phase.TRAINING),
    m.LeaveRequest(ENV, reason="preempted"),
    m.LeaveReply(),
    m.AttestRequest(ENV, base_digest="ab" * 32),
    m.AttestReply(run_base_digest="ab" * 32),
    m.PullRequest(ENV),
    m.PullRequest(ENV, resync=True),
    m.StateHeader(round=12, num_entries=40, total_bytes=2**33, state_hash="ab" * 32),
    m.AggregateRequest(ENV, round=11),
    m.AggregateHeader(round=11, num_entries=40, total_bytes=2**20, state_hash="ef" * 32),
    m.AggregateHeader(round=11, num_entries=6, total_bytes=4096, state_hash="ef" * 32,
                      relayed_weights=(1.0, 0.5, 4096.0, 1e-300), own_slot=3),
    m.PushHeader(
        ENV,
        m.PushKind.INITIAL_STATE,
        weight=4096.0,
        num_entries=40,
        total_bytes=123456,
        train_loss=2.25,
        tokens=4096,
        metrics={"compute_s": 12.5, "lr": 3e-4},
        base_state_hash="ab" * 32,
    ),
    m.PushReply(accepted=True, round=13, bytes_received=123456),
    m.ReserveRequest(ENV, max_wait_s=30.0),
    m.ReserveReply(reserved=True, hold_s=10.0),
    m.WaitRequest(ENV, after_round=12, max_wait_s=30.0),
    m.RoundInfo(round=13, phase=m.Phase.FINISHED, state_hash="cd" * 32, rounds_total=20, target_round_s=1.5),
    m.StatusRequest(m.Envelope(run_id="", worker_id="", round=0, protocol_version=1, token="t")),
    m.WorkerStatus(worker_id="w0", hostname="gpu-box", alive=True, round=3, inner_step=90, loss=2.5, eval_loss=2.75,
                   tokens=2**20, tokens_per_s=1024.5, link="10 Mbit/s, 50 ms", resyncs=1, last_seen_s=0.25,
                   protocol_sent=2**33, protocol_received=7, control_sent=8, control_received=9, state_sent=10,
                   state_received=11),
    m.StatusReply(run_id="run-7", name="diloco", protocol="diloco", phase=m.Phase.TRAINING, round=3, rounds_total=20,
                  workers=(m.WorkerStatus(worker_id="w0", loss=1.5, eval_loss=1.75, tokens_per_s=0.0),
                           m.WorkerStatus(worker_id="w1", alive=True, loss=0.0, eval_loss=3.0, tokens_per_s=9.5))),
    m.StatusReply(run_id="run-7", name="empty", protocol="sparseloco", phase=m.Phase.WAITING_FOR_WORKERS, round=0,
                  rounds_total=5),
    # gossip: the Rendezvous and Peer services
    m.EnrollRequest(ENV, hostname="gpu-box", address="10.1.2.3:50051"),
    m.EnrollReply(worker_id="w3", worker_index=3, run_id="run-7", config_yaml="protocol:\n  kind: gossip\n",
                  heartbeat_interval_s=2.5, session_token="c2Vzc2lvbg", peer_token="cGVlcg"),
    m.RosterRequest(ENV),
    m.RosterReply(round=12, workers=4, finished=False, addresses={0: "a:1", 1: "b:2", 3: "[::1]:3"}),
    m.ReportRequest(ENV, metrics={"train_loss": 2.25, "sketch.0": -1e-3}),
    m.ReportReply(),
    m.PeerHeader(ENV, step=25, sender=3, weight=0.125, num_entries=40, total_bytes=2**33),
    m.PeerAck(step=25, bytes_received=2**33 + 99),
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
    for proto in (pb.JoinRequest(hostname="h"), pb.PushHeader(kind=pb.PUSH_KIND_UPDATE, weight=1.0),
                  pb.AggregateRequest(round=3)):
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


@pytest.mark.parametrize("bad", [0.0, -2.0, math.nan, math.inf, -math.inf])
def test_relayed_weights_must_be_finite_and_positive(bad: float) -> None:
    proto = to_pb(m.AggregateHeader(round=1, num_entries=0, total_bytes=0, state_hash="", relayed_weights=(1.0, 2.0)))
    proto.relayed_weights[1] = bad
    with pytest.raises(WireError, match=r"AggregateHeader\.relayed_weights must be finite and positive"):
        from_pb(proto)


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


# ---- a round's aggregate as it travels (PullAggregate) ---------------------------------------------------


def _update(seed: int, weight: float) -> Update:
    gen = torch.Generator().manual_seed(seed)
    w, b = torch.randn(6, 4, generator=gen), torch.randn(4, generator=gen)
    return Update({"w": registry.build("topk_global", density=0.25).compress(w), "b": dense(b)}, weight)


def _assert_same_payloads(got: dict[str, Payload], want: dict[str, Payload]) -> None:
    assert list(got) == list(want)
    for name, p in want.items():
        q = got[name]
        assert (q.codec, q.shape, q.dtype, q.meta) == (p.codec, p.shape, p.dtype, p.meta)
        assert list(q.tensors) == list(p.tensors)
        assert all(torch.equal(q.tensors[c], t) for c, t in p.tensors.items()), name


def _assert_same_aggregate(got: Aggregate, want: Aggregate) -> None:
    assert got.round == want.round and len(got.relayed) == len(want.relayed)
    _assert_same_payloads(got.payloads, want.payloads)
    for have, update in zip(got.relayed, want.relayed, strict=True):
        assert have.weight == update.weight
        _assert_same_payloads(have.payloads, update.payloads)


def _over_the_wire(aggregate: Aggregate, omit: int | None = None, own: Update | None = None
                   ) -> tuple[m.AggregateHeader, Aggregate]:
    entries, weights = aggregate_entries(aggregate, omit)
    header = m.AggregateHeader(round=aggregate.round, num_entries=len(entries), state_hash="ab" * 32,
                               total_bytes=sum(p.nbytes() for p in entries.values()), relayed_weights=weights,
                               own_slot=0 if omit is None else omit + 1)
    wire = [msg.SerializeToString() for msg in aggregate_stream(header, entries, chunk_bytes=16)]
    got_header, got = read_aggregate((pb.AggregateChunk.FromString(b) for b in wire), 1 << 20, own)
    assert got_header == header
    return got_header, got


def test_a_dense_aggregate_travels_by_tensor_name() -> None:
    aggregate = Aggregate(7, payloads=_update(0, 1.0).payloads)
    entries, weights = aggregate_entries(aggregate)
    assert (list(entries), weights) == (["w", "b"], ())
    _assert_same_aggregate(aggregate_from_entries(7, entries, ()), aggregate)
    header, got = _over_the_wire(aggregate)
    assert header.relayed_weights == () and header.own_slot == 0
    _assert_same_aggregate(got, aggregate)


def test_a_relayed_aggregate_travels_as_its_senders_updates_in_fold_order() -> None:
    aggregate = Aggregate(3, relayed=(_update(1, 2.0), _update(2, 0.5), _update(3, 1.0)))
    entries, weights = aggregate_entries(aggregate)
    assert list(entries) == ["0/w", "0/b", "1/w", "1/b", "2/w", "2/b"] and weights == (2.0, 0.5, 1.0)
    _assert_same_aggregate(aggregate_from_entries(3, entries, weights), aggregate)
    header, got = _over_the_wire(aggregate)
    assert header.relayed_weights == (2.0, 0.5, 1.0)
    _assert_same_aggregate(got, aggregate)


def test_the_requesters_own_update_is_left_out_and_put_back() -> None:
    own = _update(2, 0.5)
    aggregate = Aggregate(3, relayed=(_update(1, 2.0), own, _update(3, 1.0)))
    entries, weights = aggregate_entries(aggregate, omit=1)
    assert list(entries) == ["0/w", "0/b", "2/w", "2/b"] and weights == (2.0, 0.5, 1.0)
    _, got = _over_the_wire(aggregate, omit=1, own=own)
    _assert_same_aggregate(got, aggregate)
    with pytest.raises(WireError, match="leaves out the requester's own update, and none was given"):
        _over_the_wire(aggregate, omit=1)
    with pytest.raises(WireError, match="leaves out slot 0 for the requester, but it is not an empty slot"):
        aggregate_from_entries(3, entries, weights, own=(0, own))
    with pytest.raises(WireError, match="leaves out slot 3 for the requester"):
        aggregate_from_entries(3, entries, weights, own=(3, own))


@pytest.mark.parametrize("key", ["w", "2/w", "-1/w", "x/w", "0/", "/w", "00x/w"])
def test_a_malformed_relayed_entry_name_is_a_wire_error(key: str) -> None:
    entries = {"0/w": dense(torch.ones(2)), "1/w": dense(torch.ones(2)), key: dense(torch.zeros(2))}
    with pytest.raises(WireError, match=rf"relayed aggregate entry '{re.escape(key)}' is not "
                                        r"'<sender index>/<tensor>' for 2 senders"):
        aggregate_from_entries(3, entries, (1.0, 1.0))


def test_a_relayed_sender_without_tensors_is_a_wire_error() -> None:
    """The docstring of `aggregate_from_entries` promises it: an empty relayed update is no update."""
    with pytest.raises(WireError):
        aggregate_from_entries(3, {"0/w": dense(torch.ones(2))}, (1.0, 1.0))


# Only a relayed aggregate leaves out the requester's own update.
# chunk_bytes 4096: several chunks to a message, never two senders' (a pull leaving one out drops whole messages).
@pytest.mark.parametrize("chunk_bytes", [16, 4096])
@pytest.mark.parametrize(("relayed", "omit"), [(False, None), (True, None), (True, 0), (True, 1), (True, 2)])
def test_an_aggregate_encoded_once_streams_exactly_what_encoding_it_per_pull_did(relayed: bool, omit: int | None,
                                                                                chunk_bytes: int) -> None:
    aggregate = (Aggregate(3, relayed=(_update(1, 2.0), _update(2, 0.5), _update(3, 1.0))) if relayed
                 else Aggregate(7, payloads=_update(0, 1.0).payloads))
    entries, weights = aggregate_entries(aggregate, omit)
    header = m.AggregateHeader(round=aggregate.round, num_entries=len(entries), state_hash="ab" * 32,
                               total_bytes=sum(p.nbytes() for p in entries.values()), relayed_weights=weights,
                               own_slot=0 if omit is None else omit + 1)
    per_pull = [msg.SerializeToString() for msg in aggregate_stream(header, entries, chunk_bytes=chunk_bytes)]
    encoded = EncodedAggregate.of(aggregate, chunk_bytes=chunk_bytes)
    assert encoded.header("ab" * 32, omit) == header
    for _ in range(2):  # shared: every pull streams the same messages
        assert list(encoded.stream("ab" * 32, omit)) == per_pull
    if chunk_bytes > 16:
        assert len(per_pull) == 1 + (len(aggregate.relayed) - (omit is not None) if relayed else 1)
    _, got = read_aggregate((pb.AggregateChunk.FromString(b) for b in per_pull), 1 << 20,
                            aggregate.relayed[omit] if omit is not None else None)
    _assert_same_aggregate(got, aggregate)
