"""One update as one byte string (serde.update_to_bytes / update_from_bytes): bit-exact, and self-checking."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from compression import registry
from compression.payload import Payload, dense
from protocols.wire.messages import WireError
from protocols.wire.serde import update_from_bytes, update_to_bytes

CODECS = ["dense", "fp16", "bf16", "int8", "int4", "int2", "topk", "topk_global", "randomk", "sign", "lowrank"]
LIMIT = 1 << 30


def _update(codec: str) -> dict[str, Payload]:
    gen = torch.Generator().manual_seed(7)
    compressor = registry.build(codec, density=0.1, chunk=64, rank=2, seed=3)
    tensors = {"blocks.0.w": torch.randn(48, 40, generator=gen), "bias": torch.randn(40, generator=gen)}
    return {name: compressor.compress(t, key=name) for name, t in tensors.items()}


def _assert_same(got: dict[str, Payload], want: dict[str, Payload]) -> None:
    assert list(got) == list(want)
    for name, p in want.items():
        q = got[name]
        assert (q.codec, q.shape, q.dtype, q.meta) == (p.codec, p.shape, p.dtype, dict(sorted(p.meta.items())))
        assert list(q.tensors) == list(p.tensors)
        for comp, t in p.tensors.items():
            u = q.tensors[comp]
            assert u.dtype == t.dtype and u.shape == t.shape
            assert torch.equal(u.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), (name, comp)


@pytest.mark.parametrize("codec", CODECS)
def test_payloads_of_every_codec_round_trip_bit_exactly_and_still_decode(codec: str) -> None:
    entries = _update(codec)
    got, weight = update_from_bytes(update_to_bytes(entries, weight=2.5), LIMIT)
    _assert_same(got, entries)
    assert weight == 2.5
    for name in entries:
        assert torch.equal(registry.decode(got[name]), registry.decode(entries[name]))


def test_edge_cases_round_trip_nan_bits_empty_tensors_and_no_entries() -> None:
    nan_bits = torch.tensor([0x7FC00001, 0x7F800000, 0x00000001], dtype=torch.int32).view(torch.float32)
    entries = {"nan": dense(nan_bits), "empty": dense(torch.zeros(0, 3)), "scalar": dense(torch.tensor(1.5))}
    got, _ = update_from_bytes(update_to_bytes(entries), LIMIT)
    _assert_same(got, entries)
    assert update_from_bytes(update_to_bytes({}), LIMIT) == ({}, 1.0)


def test_a_large_tensor_spans_several_chunks() -> None:
    entries = {"big": dense(torch.arange(3_000_000, dtype=torch.float32))}  # 12 MB > the 4 MiB chunk
    got, _ = update_from_bytes(update_to_bytes(entries), LIMIT)
    _assert_same(got, entries)


def test_any_flipped_byte_or_truncation_is_a_wire_error() -> None:
    data = update_to_bytes(_update("int8"))
    for pos in range(0, len(data), max(1, len(data) // 97)):
        corrupted = bytearray(data)
        corrupted[pos] ^= 0x10
        with pytest.raises(WireError):
            update_from_bytes(bytes(corrupted), LIMIT)
    for cut in (0, 5, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(WireError):
            update_from_bytes(data[:cut], LIMIT)
    with pytest.raises(WireError, match="crc32"):
        update_from_bytes(data + b"\0", LIMIT)


def _with_valid_crc(body: bytes) -> bytes:
    return struct.pack("<6sI", b"LBUPD\x01", zlib.crc32(body)) + body


def test_consistent_checksum_does_not_hide_a_bad_structure() -> None:
    # Re-checksummed on purpose: the structural checks must stand on their own.
    good = update_to_bytes({"w": dense(torch.ones(4))})
    body = good[10:]
    n, total, weight = struct.unpack_from("<QQd", body)
    with pytest.raises(WireError, match="declares 16 bytes, over the limit of 15"):
        update_from_bytes(good, 15)
    with pytest.raises(WireError, match="ended after 1 entries, expected 2"):
        update_from_bytes(_with_valid_crc(struct.pack("<QQd", 2, total, weight) + body[24:]), LIMIT)
    with pytest.raises(WireError, match="weight must be finite and positive"):
        update_from_bytes(_with_valid_crc(struct.pack("<QQd", n, total, float("nan")) + body[24:]), LIMIT)
    with pytest.raises(WireError, match="brings the stream to 16 bytes, over the limit of 4"):
        update_from_bytes(_with_valid_crc(struct.pack("<QQd", n, 4, weight) + body[24:]), LIMIT)
    with pytest.raises(WireError, match="declares 32 bytes, its chunks carried 16"):
        update_from_bytes(_with_valid_crc(struct.pack("<QQd", n, 32, weight) + body[24:]), LIMIT)
    with pytest.raises(WireError, match="only 3 remain"):
        update_from_bytes(_with_valid_crc(body[:24] + struct.pack("<I", 99) + b"abc"), LIMIT)
    with pytest.raises(WireError, match="not a TensorChunk"):
        update_from_bytes(_with_valid_crc(body[:24] + struct.pack("<I", 3) + b"\xff\xff\xff"), LIMIT)
    with pytest.raises(WireError, match="expected b'LBUPD"):
        update_from_bytes(b"LBUPD\x02" + good[6:], LIMIT)


def test_a_bad_weight_is_refused_when_sending() -> None:
    for weight in (0.0, -1.0, float("inf")):
        with pytest.raises(WireError, match="weight must be finite and positive"):
            update_to_bytes({}, weight=weight)
