"""Exact packing of n-bit unsigned integers (n in 1..16) into a uint8 byte stream.

Format: one little-endian bit stream. Value i occupies bits [i*n, (i+1)*n) of the stream, least
significant bit first, and stream bit j lives in byte j // 8 at bit position j % 8. The stream is
padded with zero bits to a whole byte, so `count` values take `packed_nbytes(count, n)` bytes.

The common widths (1, 2, 4, 8, 12, 16) have fast vectorized paths that produce exactly the generic
bit-stream layout; any other width goes through the generic (bit-matrix) path. All of it is plain
torch on the input's device.
"""

from __future__ import annotations

import functools

import torch

from compression.payload import PayloadError

MAX_BITS = 16


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for `count` values of `bits` bits each."""
    return (count * bits + 7) // 8


def index_bits(extent: int) -> int:
    """Bits needed to write any index in [0, extent): ceil(log2(extent)), at least 1."""
    return max(1, (extent - 1).bit_length())


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers < 2**bits (any integer dtype, any shape) into a 1-D uint8 tensor."""
    _check_bits(bits)
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"pack_bits needs an integer tensor, got {values.dtype}")
    v = values.reshape(-1).to(torch.int32)
    count = v.numel()
    if count and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) to pack into {bits} bits")
    if bits == 8:
        return v.to(torch.uint8)
    if 8 % bits == 0:
        out = _pack_sub_byte(v, bits)
    elif bits == 12:
        out = _pack_12(v)
    elif bits == 16:
        out = torch.stack((v & 0xFF, v >> 8), dim=1).reshape(-1).to(torch.uint8)
    else:
        out = _pack_generic(v, bits)
    return out[: packed_nbytes(count, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: `count` values as int64. Raises PayloadError on a length mismatch."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise PayloadError(f"packed data must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    expected = packed_nbytes(count, bits)
    if packed.numel() != expected:
        raise PayloadError(
            f"packed length mismatch: {packed.numel()} bytes, but {count} values of {bits} bits need {expected}"
        )
    if bits == 12:
        return _unpack_12(packed)[:count]
    if 8 % bits == 0:  # 1, 2, 4, 8: every byte holds 8 // bits whole values, least significant first
        if bits == 8:
            return packed.to(torch.int64)
        shifts = _constant(tuple(range(0, 8, bits)), packed.device)
        return ((packed.to(torch.int64).unsqueeze(1) >> shifts) & ((1 << bits) - 1)).view(-1)[:count]
    p = packed.to(torch.int32)
    if bits == 16:
        out = _pad(p, 2).view(-1, 2)
        out = out[:, 0] | (out[:, 1] << 8)
    else:
        out = _unpack_generic(p, bits, count)
    return out[:count].to(torch.int64)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small int64 constant, built once per device (decoding runs for every payload of every round: a
    fresh `torch.tensor` each time is a measurable share of decoding a small tensor). Never written to."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def _pad(v: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-v.numel()) % multiple
    return torch.nn.functional.pad(v, (0, extra)) if extra else v


def _pack_sub_byte(v: torch.Tensor, bits: int) -> torch.Tensor:
    # 8 // bits values share a byte; their bit fields never overlap, so a sum is a bitwise or.
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, device=v.device, dtype=torch.int32)
    return (_pad(v, per_byte).view(-1, per_byte) << shifts).sum(dim=1).to(torch.uint8)


def _pack_12(v: torch.Tensor) -> torch.Tensor:
    # Two 12-bit values (a, b) make three bytes: a[0:8], a[8:12] | b[0:4] << 4, b[4:12].
    pairs = _pad(v, 2).view(-1, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    return torch.stack((a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4), dim=1).reshape(-1).to(torch.uint8)


def _unpack_12(packed: torch.Tensor) -> torch.Tensor:
    # Three bytes make one 24-bit little-endian word w holding two values: w & 0xFFF and w >> 12.
    word = (_pad(packed.to(torch.int64), 3).view(-1, 3) * _constant((1, 1 << 8, 1 << 16), packed.device)).sum(dim=1)
    return ((word.unsqueeze(1) >> _constant((0, 12), packed.device)) & 0xFFF).view(-1)


def _pack_generic(v: torch.Tensor, bits: int) -> torch.Tensor:
    positions = torch.arange(bits, device=v.device, dtype=torch.int32)
    stream = ((v.unsqueeze(1) >> positions) & 1).reshape(-1)
    weights = torch.arange(8, device=v.device, dtype=torch.int32)
    return (_pad(stream, 8).view(-1, 8) << weights).sum(dim=1).to(torch.uint8)


def _unpack_generic(p: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    weights = torch.arange(8, device=p.device, dtype=torch.int32)
    stream = ((p.unsqueeze(1) >> weights) & 1).reshape(-1)[: count * bits]
    positions = torch.arange(bits, device=p.device, dtype=torch.int32)
    return (stream.view(count, bits) << positions).sum(dim=1)
