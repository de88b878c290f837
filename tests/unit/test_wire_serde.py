"""Tensor streaming over the wire: payloads -> TensorChunk streams -> payloads, bit for bit; the whole
replica over PullState; and state_hash (the replica digest)."""

from __future__ import annotations

import math

import pytest
import torch

from compression.payload import Payload, dense
from protocols.replica import Replica
from protocols.wire import lowband_pb2 as pb
from protocols.wire.messages import Envelope, PushHeader, PushKind, StateHeader, WireError
from protocols.wire.serde import (
    BATCH_BYTES,
    EntryAssembler,
    encode_entries,
    pull_stream,
    push_stream,
    read_pull,
    read_push,
    state_hash,
)

DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64,
]  # fmt: skip
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (5, 3), (2, 3, 4)]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random *bit patterns* (NaNs with payloads, infinities, subnormals included); bools are 0/1."""
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    assert torch.equal(bits(got), bits(want.resolve_conj()))


def wire_roundtrip(entries: dict[str, Payload], chunk_bytes: int) -> dict[str, Payload]:
    """Through real wire bytes: push_stream -> SerializeToString -> FromString -> read_push."""
    total = sum(p.nbytes() for p in entries.values())
    env = Envelope(run_id="r", worker_id="w", round=1, protocol_version=1)
    header = PushHeader(env, PushKind.UPDATE, weight=1.0, num_entries=len(entries), total_bytes=total)
    wire = [msg.SerializeToString() for msg in push_stream(header, entries, chunk_bytes)]
    got_header, got = read_push((pb.PushMessage.FromString(b) for b in wire), max_total_bytes=total)
    assert got_header.num_entries == len(entries)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_dtype_and_shape_round_trips_bit_exactly(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = random_tensor(shape, dtype, seed=len(shape))
    nbytes = tensor.numel() * tensor.element_size()
    # Chunks smaller than, equal to and larger than the tensor's bytes.
    for chunk_bytes in sorted({1, max(1, nbytes // 3), max(1, nbytes), nbytes + 1}):
        got = wire_roundtrip({"t": dense(tensor)}, chunk_bytes)["t"]
        assert (got.codec, got.shape, got.dtype) == ("dense", tuple(shape), dtype)
        assert_bit_identical(got.tensors["values"], tensor)


def test_chunks_respect_the_chunk_size_and_carry_the_spec_once() -> None:
    payload = dense(random_tensor((1000,), torch.float32))
    chunks = list(encode_entries({"w": payload}, chunk_bytes=1024))
    assert [len(c.data) for c in chunks] == [1024, 1024, 1024, 928]
    assert [c.offset for c in chunks] == [0, 1024, 2048, 3072]
    assert [c.HasField("spec") for c in chunks] == [True, False, False, False]


def test_nan_payload_bit_patterns_survive() -> None:
    patterns = [0x7FC00001, 0xFFA00000, 0x7F800001, 0x7FFFFFFF, 0x80000000]  # quiet/signalling NaNs, -0.0
    values = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)
    got = wire_roundtrip({"nan": dense(values)}, chunk_bytes=6)["nan"].tensors["values"]
    assert got.view(torch.int32).tolist() == values.view(torch.int32).tolist()


def test_non_contiguous_inputs_round_trip_as_their_values() -> None:
    base = random_tensor((6, 8), torch.float32).nan_to_num()
    complex_base = torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    views = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.arange(3.0).expand(4, 3),
        "conjugated": complex_base.conj(),
        "negated_view": complex_base.conj().imag,  # a real tensor with torch's lazy negation bit set
    }
    for name, view in views.items():
        payload = Payload("custom", tuple(view.shape), view.dtype, {"v": view})
        got = wire_roundtrip({name: payload}, chunk_bytes=7)[name].tensors["v"]
        assert got.is_contiguous()
        assert torch.equal(got, view.resolve_conj().resolve_neg()), name


def test_many_entries_with_many_components_and_every_meta_type() -> None:
    meta: dict[str, int | float | str | bool] = {
        "k": 17,
        "big": -(2**62),
        "ratio": 0.95,
        "codec_version": "v2-é",
        "packed": True,
        "signed": False,
    }
    entries = {
        "layer.0.weight": Payload(
            "topk",
            (64, 32),
            torch.bfloat16,
            {
                "values": random_tensor((100,), torch.bfloat16, 1),
                "indices": random_tensor((100,), torch.int32, 2),
                "scales": random_tensor((4,), torch.float16, 3),
                "empty": torch.empty(0, 5, dtype=torch.int64),
            },
            meta,
        ),
        "layer.0.bias": dense(random_tensor((32,), torch.float32, 4)),
        "mask": Payload("mask", (9,), torch.bool, {"bits": random_tensor((9,), torch.bool, 5)}),
        "skipped": Payload("zero", (3, 3), torch.float32, {}, {"reason": "frozen"}),
        "scalar": dense(torch.tensor(2.5, dtype=torch.float64)),
    }
    for chunk_bytes in (3, 64, 1 << 20):
        got = wire_roundtrip(entries, chunk_bytes)
        assert list(got) == list(entries)
        for name, want in entries.items():
            have = got[name]
            assert (have.codec, have.shape, have.dtype) == (want.codec, want.shape, want.dtype)
            assert list(have.tensors) == list(want.tensors)
            for comp, tensor in want.tensors.items():
                assert_bit_identical(have.tensors[comp], tensor)
            assert have.meta == want.meta
            assert {k: type(v) for k, v in have.meta.items()} == {k: type(v) for k, v in want.meta.items()}


def test_unsupported_tensor_dtype_and_meta_type_are_refused_by_name() -> None:
    wide = Payload("dense", (2,), torch.complex128, {"values": torch.zeros(2, dtype=torch.complex128)})
    with pytest.raises(WireError, match=r"entry 'w'.*complex128"):
        list(encode_entries({"w": wide}))
    odd_meta = Payload("dense", (1,), torch.float32, {"values": torch.zeros(1)}, {"k": [1]})  # type: ignore[dict-item]
    with pytest.raises(WireError, match=r"entry 'm' meta 'k'.*list"):
        list(encode_entries({"m": odd_meta}))
    with pytest.raises(WireError, match="chunk_bytes"):
        list(encode_entries({"m": dense(torch.zeros(1))}, chunk_bytes=0))


def test_pull_stream_carries_the_whole_replica_and_checks_its_digest() -> None:
    params = {"a": random_tensor((10, 3), torch.float32, 7), "b": random_tensor((4,), torch.bfloat16, 8)}
    replica = Replica(4, params, momentum={"a": torch.ones(10, 3)}, outer_steps=4,
                      downlink_shift={"b": torch.zeros(4, dtype=torch.bfloat16)})
    entries = {name: dense(t) for name, t in replica.to_tensors().items()}
    total = sum(p.nbytes() for p in entries.values())
    header = StateHeader(round=4, num_entries=len(entries), total_bytes=total, state_hash=replica.digest())
    got_header, got = read_pull(pull_stream(header, entries, chunk_bytes=16), max_total_bytes=total)
    pulled = Replica.from_tensors({n: p.tensors["values"] for n, p in got.items()})
    assert got_header == header and state_hash(replica.to_tensors()) == pulled.digest() == header.state_hash
    assert (pulled.round, pulled.outer_steps, set(pulled.momentum), set(pulled.downlink_shift)) == (4, 4, {"a"}, {"b"})
    forged = StateHeader(round=4, num_entries=len(entries), total_bytes=total, state_hash="0" * 64)
    with pytest.raises(WireError, match="hashes to"):
        read_pull(pull_stream(forged, entries), max_total_bytes=total)


def test_stream_framing_errors() -> None:
    entries = {"x": dense(torch.arange(6.0))}
    env = Envelope(run_id="r", worker_id="w", round=1, protocol_version=1)
    header = PushHeader(env, PushKind.UPDATE, weight=2.0, num_entries=1, total_bytes=24)
    msgs = list(push_stream(header, entries, chunk_bytes=8))
    with pytest.raises(WireError, match="must start with a PushHeader, got nothing"):
        read_push([], max_total_bytes=100)
    with pytest.raises(WireError, match="must start with a PushHeader, got a chunk"):
        read_push(msgs[1:], max_total_bytes=100)
    with pytest.raises(WireError, match="every message must be a chunk; got header"):
        read_push([msgs[0], msgs[1], msgs[0]], max_total_bytes=100)
    with pytest.raises(WireError, match="declares 24 bytes, over the limit of 23"):
        read_push(msgs, max_total_bytes=23)
    lying = PushHeader(env, PushKind.UPDATE, weight=2.0, num_entries=1, total_bytes=30)
    with pytest.raises(WireError, match=r"\(num_entries, total_bytes\) = \(1, 30\).*\(1, 24\)"):
        list(push_stream(lying, entries))


def test_small_chunks_share_messages_and_arrive_bit_for_bit() -> None:
    """Many small components (as a sparse update has) go several to a message, none over the chunk size unless
    it is one chunk alone, in their order; what arrives is what was sent."""
    entries = {f"t{i}": Payload("custom", (1,), torch.float32, {"a": random_tensor((3 + i,), torch.float32, i),
                                                                "b": random_tensor((40,), torch.uint8, i)})
               for i in range(30)}
    entries["big"] = dense(random_tensor((400,), torch.float32, 99))  # 1600 bytes: its chunks go alone
    env = Envelope(run_id="r", worker_id="w", round=1, protocol_version=1)
    total = sum(p.nbytes() for p in entries.values())
    header = PushHeader(env, PushKind.UPDATE, weight=1.0, num_entries=len(entries), total_bytes=total)
    msgs = list(push_stream(header, entries, chunk_bytes=1024))[1:]
    batches = [list(msg.chunks.chunks) if msg.WhichOneof("body") == "chunks" else [msg.chunk] for msg in msgs]
    assert len(msgs) < len(list(encode_entries(entries, 1024))) / 4
    assert all(len(b) == 1 or sum(c.ByteSize() for c in b) <= 1024 for b in batches)
    assert [c for b in batches for c in b] == list(encode_entries(entries, 1024))
    assert [len(b) for b in batches][-2:] == [1, 1]  # the big tensor's two chunks
    got = wire_roundtrip(entries, 1024)
    assert list(got) == list(entries)
    for name, payload in entries.items():
        for comp, t in payload.tensors.items():
            assert_bit_identical(got[name].tensors[comp], t)


def test_batches_stay_small_beside_a_large_chunk_size() -> None:
    """Every message a stream has in flight sits serialized in gRPC's buffers: batches stop at BATCH_BYTES."""
    entries = {f"t{i}": dense(random_tensor((1000,), torch.float32, i)) for i in range(100)}  # 4 KB each
    env = Envelope(run_id="r", worker_id="w", round=1, protocol_version=1)
    total = sum(p.nbytes() for p in entries.values())
    header = PushHeader(env, PushKind.UPDATE, weight=1.0, num_entries=len(entries), total_bytes=total)
    msgs = list(push_stream(header, entries))[1:]  # the default chunk size, 1 MiB
    assert all(msg.WhichOneof("body") == "chunks" and msg.chunks.ByteSize() <= BATCH_BYTES + 64 for msg in msgs)
    assert len(msgs) == -(-sum(c.ByteSize() for c in encode_entries(entries)) // BATCH_BYTES)
    assert list(wire_roundtrip(entries, 1 << 20)) == list(entries)


def test_an_empty_chunks_message_is_refused() -> None:
    entries = {"x": dense(torch.arange(6.0))}
    env = Envelope(run_id="r", worker_id="w", round=1, protocol_version=1)
    msgs = list(push_stream(PushHeader(env, PushKind.UPDATE, weight=2.0, num_entries=1, total_bytes=24), entries))
    with pytest.raises(WireError, match="after the PushHeader, a chunks message carries no chunk"):
        read_push([msgs[0], pb.PushMessage(chunks=pb.TensorChunks()), *msgs[1:]], max_total_bytes=100)


# ---- the assembler refuses malformed chunk streams, naming what was wrong ------------------------------


def chunks_of(tensors: dict[str, torch.Tensor], chunk_bytes: int = 8) -> list[pb.TensorChunk]:
    payload = Payload("custom", (1,), torch.float32, tensors)
    return list(encode_entries({"e": payload}, chunk_bytes))


def feed_all(chunks: list[pb.TensorChunk], expected: int = 1, limit: int = 1 << 20) -> EntryAssembler:
    assembler = EntryAssembler(expected, max_total_bytes=limit)
    for chunk in chunks:
        assembler.feed(chunk)
    return assembler


def test_assembler_rejects_a_chunk_before_its_spec() -> None:
    chunks = chunks_of({"v": torch.zeros(4)})
    with pytest.raises(WireError, match="entry 'e' arrived before the chunk carrying its spec"):
        feed_all(chunks[1:])


def test_assembler_rejects_a_gap_in_offsets() -> None:
    chunks = chunks_of({"v": torch.zeros(6)})
    with pytest.raises(WireError, match="entry 'e' component 'v': chunk at byte offset 16, expected 8"):
        feed_all([chunks[0], chunks[2]])


def test_assembler_rejects_an_overrun() -> None:
    chunks = chunks_of({"v": torch.zeros(4)})
    extra = pb.TensorChunk(entry="e", component="v", offset=16, data=b"\0")
    with pytest.raises(WireError, match="entry 'e' component 'v': chunk ends at byte 17, past the declared length 16"):
        feed_all([*chunks, extra])


def test_assembler_rejects_a_length_that_does_not_match_shape_and_dtype() -> None:
    chunks = chunks_of({"v": torch.zeros(4)})
    chunks[0].spec.components[0].byte_length = 12
    with pytest.raises(
        WireError, match=r"component 'v': declares 12 bytes, but shape \(4,\) of torch.float32 needs 16"
    ):
        feed_all(chunks)


def test_assembler_rejects_a_duplicate_entry() -> None:
    chunks = chunks_of({"v": torch.zeros(1)})
    with pytest.raises(WireError, match="entry 'e' was sent twice"):
        feed_all([chunks[0], chunks[0]], expected=2)


def test_assembler_rejects_a_missing_component_at_finish() -> None:
    chunks = chunks_of({"v": torch.zeros(4), "w": torch.zeros(2, dtype=torch.int64)})
    assembler = feed_all(chunks[:-1])
    with pytest.raises(WireError, match="entry 'e' component 'w' is incomplete: got 8 of 16 bytes"):
        assembler.finish()


def test_assembler_rejects_unknown_dtypes() -> None:
    chunks = chunks_of({"v": torch.zeros(1)})
    chunks[0].spec.components[0].dtype = 99  # type: ignore[assignment]
    with pytest.raises(WireError, match="entry 'e' component 'v': unknown dtype enum value 99"):
        feed_all(chunks)
    chunks = chunks_of({"v": torch.zeros(1)})
    chunks[0].spec.dtype = pb.DTYPE_UNSPECIFIED
    with pytest.raises(WireError, match="entry 'e': unknown dtype enum value 0"):
        feed_all(chunks)


def test_assembler_rejects_more_bytes_than_the_limit_before_allocating() -> None:
    chunks = chunks_of({"v": torch.zeros(4)})
    with pytest.raises(WireError, match="entry 'e' brings the stream to 16 bytes, over the limit of 15"):
        feed_all(chunks[:1], limit=15)


def test_assembler_rejects_the_wrong_number_of_entries() -> None:
    chunks = chunks_of({"v": torch.zeros(1)})
    with pytest.raises(WireError, match="stream ended after 1 entries, expected 2"):
        feed_all(chunks, expected=2).finish()
    other = [pb.TensorChunk(entry="f", spec=chunks[0].spec, component="v", data=chunks[0].data)]
    with pytest.raises(WireError, match="entry 'f' is more than the 1 entries the header declared"):
        feed_all(chunks + other, expected=1)


def test_assembler_rejects_other_malformed_specs() -> None:
    chunks = chunks_of({"v": torch.zeros(1)})
    unknown_component = pb.TensorChunk(entry="e", component="nope", offset=0, data=b"\0")
    with pytest.raises(WireError, match=r"component 'nope', but its spec declares \['v'\]"):
        feed_all([chunks[0], unknown_component])
    negative = chunks_of({"v": torch.zeros(1)})
    negative[0].spec.components[0].shape[0] = -1
    with pytest.raises(WireError, match=r"component 'v': negative dimension in shape \(-1,\)"):
        feed_all(negative)
    unset_meta = chunks_of({"v": torch.zeros(1)})
    unset_meta[0].spec.meta["k"].Clear()
    with pytest.raises(WireError, match="entry 'e' meta 'k': meta scalar has no value set"):
        feed_all(unset_meta)
    bad_bool = chunks_of({"m": torch.ones(3, dtype=torch.bool)})
    bad_bool[0].data = b"\x01\x02\x00"
    with pytest.raises(WireError, match="entry 'e' component 'm': bool tensor holds bytes other than 0 and 1"):
        feed_all(bad_bool).finish()


# ---- state_hash -------------------------------------------------------------------------------------------


def test_state_hash_is_equal_for_bit_identical_states() -> None:
    state = {"a": random_tensor((5, 4), torch.float32, 1).nan_to_num(), "b": torch.arange(6)}
    reordered = {"b": state["b"].clone(), "a": state["a"].t().contiguous().t()}
    assert state_hash(state) == state_hash(reordered)
    assert len(state_hash(state)) == 64


def test_state_hash_changes_with_one_bit_name_dtype_or_shape() -> None:
    a = torch.arange(12, dtype=torch.float32)
    reference = state_hash({"a": a})
    flipped = a.clone()
    flipped.view(torch.int32)[5] ^= 1  # the lowest mantissa bit of one element
    assert state_hash({"a": flipped}) != reference
    assert state_hash({"A": a}) != reference
    assert state_hash({"a": a.view(torch.int32)}) != reference  # same bytes, other dtype
    assert state_hash({"a": a.reshape(3, 4)}) != reference  # same bytes, other shape
    assert state_hash({"a": torch.tensor([0.0])}) != state_hash({"a": torch.tensor([-0.0])})
    # Moving bytes between a name and the next tensor must not collide.
    assert state_hash({"a": a[:6], "b": a[6:]}) != state_hash({"a": a[:7], "b": a[7:]})
