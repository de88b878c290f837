"""Symmetric absmax quantization per chunk ("int8", "int4").

Each chunk of `chunk` entries gets a float32 scale s = max|x| / qmax (qmax = 127 for 8 bits, 7 for
4 bits) and every entry is sent as round(x / s) in [-qmax, qmax], so the error per entry is at most
s / 2. int8 codes travel as an int8 tensor; int4 codes travel offset by +8 (in 1..15) and packed
two per byte.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from compression.base import (
    Compressor,
    check_chunk_size,
    check_chunks,
    component,
    meta_chunk,
    meta_int,
    per_entry_scales,
)
from compression.chunks import chunk_rows
from compression.packing import pack_bits, packed_nbytes, unpack_bits
from compression.payload import Payload, PayloadError


def absmax_quantize(rows: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric quantization: (int32 codes in [-qmax, qmax], float32 scale per row)."""
    x = rows.float()
    scale = x.abs().amax(dim=1) / qmax
    # An all-zero row has scale 0; divide by 1 instead so it encodes as zeros, not NaN.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x / safe[:, None]).clamp_(-qmax, qmax).to(torch.int32)
    return codes, scale


class _AbsMax(Compressor):
    bits: ClassVar[int]

    def __init__(self, chunk: int = 4096) -> None:
        check_chunk_size(chunk)
        self.chunk = chunk

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def _encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.reshape(-1)
        pieces = [absmax_quantize(rows, self.qmax) for rows in chunk_rows(flat, self.chunk)]
        if pieces:
            codes = torch.cat([c.reshape(-1) for c, _ in pieces])
            scales = torch.cat([s for _, s in pieces])
        else:
            codes = flat.new_empty(0, dtype=torch.int32)
            scales = flat.new_empty(0, dtype=torch.float32)
        return Payload(
            self.codec,
            tuple(x.shape),
            x.dtype,
            tensors={"codes": self._wire_codes(codes), "scales": scales},
            meta={"chunk": self.chunk, "chunks": len(scales), "bits": self.bits},
        )

    def _validate(self, p: Payload) -> None:
        chunk = meta_chunk(p)
        chunks = check_chunks(p, chunk)
        if meta_int(p, "bits") != self.bits:
            raise PayloadError(f"{p.codec} payload meta bits={p.meta['bits']} is not {self.bits}")
        component(p, "scales", torch.float32, chunks)
        self._check_codes(p)

    def _decode(self, p: Payload) -> torch.Tensor:
        scales = p.tensors["scales"]
        codes = self._read_codes(p).to(scales.device)
        per_entry = per_entry_scales(scales, int(p.meta["chunk"]), p.numel)
        return (codes.float() * per_entry).to(p.dtype).view(p.shape)

    def _wire_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.int8)

    def _check_codes(self, p: Payload) -> None:
        component(p, "codes", torch.int8, p.numel)

    def _read_codes(self, p: Payload) -> torch.Tensor:
        return p.tensors["codes"]


class Int8(_AbsMax):
    """Codec "int8": per-chunk absmax int8, error <= max|x_chunk| / 254 per entry."""

    codec: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8


class Int4(_AbsMax):
    """Codec "int4": per-chunk absmax 4-bit (codes -7..7), error <= max|x_chunk| / 14 per entry."""

    codec: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4

    def _wire_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_bits(codes + 8, 4)

    def _check_codes(self, p: Payload) -> None:
        packed = component(p, "codes", torch.uint8)
        if packed.numel() != packed_nbytes(p.numel, 4):
            raise PayloadError(
                f"{p.codec} payload packed length mismatch: 'codes' has {packed.numel()} bytes, "
                f"{p.numel} 4-bit codes need {packed_nbytes(p.numel, 4)}"
            )

    def _read_codes(self, p: Payload) -> torch.Tensor:
        return unpack_bits(p.tensors["codes"], 4, p.numel) - 8
