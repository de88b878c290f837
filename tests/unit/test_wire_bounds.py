"""Every number from the wire is range-checked before use (issue 12, hostile input): shapes, counts,
strings, chunk sizes, codec parameters and update magnitudes are refused by name, before anything is
allocated, and each refusal maps onto a gRPC status that says what was wrong (never UNKNOWN)."""

from __future__ import annotations

import grpc
import pytest
import torch

from compression import registry
from compression.base import MAX_CHUNK, per_entry_scales
from compression.payload import Payload, PayloadError, dense
from protocols.base import Update
from protocols.check import UpdateRejected, check_update, expectation
from protocols.diloco import DiLoCo
from protocols.refusals import Code, Rejected
from protocols.replica import Replica
from protocols.wire import lowband_pb2 as pb
from protocols.wire import messages as m
from protocols.wire.serde import EntryAssembler, encode_entries, from_pb, to_pb
from protocols.wire.servicing import refusal_status


def _spec_chunk(shape: list[int], comp_shape: list[int], byte_length: int = 0) -> pb.TensorChunk:
    spec = pb.EntrySpec(codec="dense", shape=shape, dtype=pb.DTYPE_FLOAT32)
    spec.components.add(name="values", dtype=pb.DTYPE_FLOAT32, shape=comp_shape, byte_length=byte_length)
    return pb.TensorChunk(entry="e", spec=spec)


@pytest.mark.parametrize("shape, comp_shape, message", [
    ([2**62, 2**62, 0], [0], r"shape \[4611686018427387904, 4611686018427387904, 0\] is over the limit"),
    ([0], [2**62, 2**62, 0], "over the limit of 1099511627776 elements"),
    ([1] * 17, [1], "shape has 17 dimensions, at most 16"),
])
def test_a_shape_from_the_wire_is_bounded_before_reshape(shape: list[int], comp_shape: list[int],
                                                          message: str) -> None:
    assembler = EntryAssembler(1, max_total_bytes=1 << 20)
    with pytest.raises(m.WireError, match=message):
        assembler.feed(_spec_chunk(shape, comp_shape))


def test_a_chunk_with_neither_spec_nor_data_is_refused() -> None:
    assembler = EntryAssembler(1, max_total_bytes=1 << 20)
    first, *_ = encode_entries({"e": dense(torch.zeros(4))}, chunk_bytes=8)
    assembler.feed(first)
    with pytest.raises(m.WireError, match="carries neither a spec nor data"):
        assembler.feed(pb.TensorChunk(entry="e", component="values", offset=8))


def test_oversize_is_its_own_error_and_answers_resource_exhausted() -> None:
    assembler = EntryAssembler(1, max_total_bytes=15)
    with pytest.raises(m.WireTooLarge, match="over the limit of 15") as caught:
        assembler.feed(next(encode_entries({"e": dense(torch.zeros(4))})))
    assert refusal_status(caught.value)[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal_status(m.WireError("bad"))[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert refusal_status(Rejected(Code.DEADLINE_EXCEEDED, "idle"))[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    status, message = refusal_status(ZeroDivisionError("boom"))
    assert status is grpc.StatusCode.INTERNAL and "ZeroDivisionError: boom" in message


def _envelope(**fields: object) -> pb.Envelope:
    return pb.Envelope(**{"run_id": "r", "worker_id": "w0", "round": 0, "protocol_version": 1, **fields})


@pytest.mark.parametrize("message, text", [
    (pb.HeartbeatRequest(envelope=_envelope(), inner_step=2**60), r"inner_step = 1152921504606846976 is out of range"),
    (pb.PushHeader(envelope=_envelope(), kind=pb.PUSH_KIND_UPDATE, weight=1.0, tokens=2**64 - 1),
     "tokens = 18446744073709551615 is out of range"),
    (pb.JoinRequest(envelope=_envelope(), hostname="h" * 5000), "hostname is 5000 characters long"),
    (pb.JoinRequest(envelope=_envelope(token="t" * 5000)), "token is 5000 characters long"),
    (pb.PushHeader(envelope=_envelope(), kind=pb.PUSH_KIND_UPDATE, weight=1.0,
                   metrics={f"k{i}": 1.0 for i in range(1025)}), "at most 1024 metrics"),
    (pb.ReportRequest(envelope=_envelope(), metrics={"k" * 257: 1.0}), "named in at most 256 characters"),
    (pb.WaitRequest(envelope=_envelope(), after_round=-5), "after_round = -5 is out of range"),
])
def test_counts_and_strings_from_the_wire_are_bounded(message: object, text: str) -> None:
    with pytest.raises(m.WireError, match=text):
        from_pb(message)


def test_in_range_values_and_a_long_run_config_pass() -> None:
    reply = m.JoinReply("w0", 0, "r", 3, "x" * 100_000, True, 1.0)
    assert from_pb(to_pb(reply)) == reply
    wait = m.WaitRequest(m.Envelope("r", "w0", 0, 1), after_round=-1)
    assert from_pb(to_pb(wait)) == wait


@pytest.mark.parametrize("codec", ["int8", "int4", "sign", "topk", "int2"])
@pytest.mark.parametrize("chunk", [2**62, 2**26])
def test_a_huge_codec_chunk_is_refused_before_allocation(codec: str, chunk: int) -> None:
    payload = registry.build(codec).compress(torch.randn(12), key="x")
    hostile = Payload(payload.codec, payload.shape, payload.dtype, payload.tensors, {**payload.meta, "chunk": chunk})
    with pytest.raises(PayloadError, match=f"meta 'chunk'={chunk} is over the limit of {MAX_CHUNK}"):
        registry.decode(hostile)


def test_a_codec_refuses_a_chunk_size_it_could_not_decode() -> None:
    with pytest.raises(ValueError, match=f"chunk must be in \\[1, {MAX_CHUNK}\\]"):
        registry.build("int8", chunk=MAX_CHUNK + 1)


def test_per_entry_scales_matches_repeating_each_scale_over_its_chunk() -> None:
    scales = torch.tensor([1.0, 2.0, 3.0])
    assert per_entry_scales(scales, 4, 10).tolist() == scales.repeat_interleave(4)[:10].tolist()
    assert per_entry_scales(scales[:1], MAX_CHUNK, 3).numel() == 3  # memory is numel, not chunk


def _expect(ratio: float):  # type: ignore[no-untyped-def]
    replica = Replica(0, {"w": torch.tensor([0.5, -2.0, 1.0])})
    return expectation(DiLoCo(), replica, "dense", ratio)


def test_an_update_over_the_magnitude_bound_is_refused_and_one_under_it_passes() -> None:
    expect = _expect(100.0)
    assert expect.max_abs == 200.0  # 100 x the largest |parameter| (2.0)
    assert check_update("w1", Update({"w": dense(torch.tensor([199.0, 0.0, -1.0]))}), expect).weight == 1.0
    for value in (3e38, -201.0):
        with pytest.raises(UpdateRejected, match="over the bound of 200"):
            check_update("w1", Update({"w": dense(torch.tensor([value, 0.0, 0.0]))}), expect)


def test_the_magnitude_bound_is_at_least_the_ratio_for_an_all_zero_model() -> None:
    expect = expectation(DiLoCo(), Replica(0, {"b": torch.zeros(3)}), "dense", 10.0)
    assert expect.max_abs == 10.0
    with pytest.raises(UpdateRejected, match="over the bound of 10"):
        check_update("w1", Update({"b": dense(torch.tensor([11.0, 0.0, 0.0]))}), expect)
