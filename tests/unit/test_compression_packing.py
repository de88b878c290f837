"""Bit packing: exact round trips and the documented LSB-first bit-stream layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.packing import index_bits, pack_bits, packed_nbytes, unpack_bits
from compression.payload import PayloadError

WIDTHS = [1, 2, 3, 4, 5, 7, 8, 11, 12, 13, 16]


def reference_pack(values: list[int], bits: int) -> bytes:
    """The format spelled out with Python integers: value i at stream bits [i*bits, (i+1)*bits)."""
    stream = 0
    for i, v in enumerate(values):
        stream |= v << (i * bits)
    return stream.to_bytes(packed_nbytes(len(values), bits), "little")


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from(WIDTHS), count=st.integers(0, 67), seed=st.integers(0, 2**31 - 1))
def test_pack_matches_the_reference_layout_and_round_trips(bits: int, count: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << bits, (count,), generator=gen)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(count, bits)
    assert bytes(packed.tolist()) == reference_pack(values.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, count), values)


@pytest.mark.parametrize("bits", [1, 2, 4, 12, 16])
def test_every_length_round_trips_including_non_multiples_of_a_byte(bits: int) -> None:
    for count in range(0, 40):
        # Extreme values exercise every bit position: all ones, zeros, and a ramp.
        values = (torch.arange(count) * 7919) % (1 << bits)
        values[::3] = (1 << bits) - 1
        assert torch.equal(unpack_bits(pack_bits(values, bits), bits, count), values), (bits, count)


def test_pack_accepts_other_integer_dtypes_and_shapes() -> None:
    values = torch.tensor([[1, 0, 3], [2, 2, 1]], dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(values, 2), 2, 6), values.reshape(-1).long())


def test_pack_rejects_values_that_do_not_fit_and_bad_widths() -> None:
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_bits(torch.tensor([3, 16]), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([-1]), 2)
    with pytest.raises(ValueError, match=r"bits must be in 1\.\.16"):
        pack_bits(torch.tensor([1]), 17)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_bits(torch.tensor([1.0]), 4)


def test_unpack_rejects_a_length_that_does_not_match_the_count() -> None:
    packed = pack_bits(torch.arange(10), 12)  # 15 bytes
    with pytest.raises(PayloadError, match="packed length mismatch: 14 bytes, but 10 values of 12 bits need 15"):
        unpack_bits(packed[:-1], 12, 10)
    with pytest.raises(PayloadError, match="1-D uint8"):
        unpack_bits(packed.to(torch.int32), 12, 10)


def test_index_bits() -> None:
    assert [index_bits(n) for n in (1, 2, 3, 4, 5, 4096, 4097, 65536)] == [1, 1, 2, 2, 3, 12, 13, 16]
