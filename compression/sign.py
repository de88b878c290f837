"""Scaled sign ("sign"): one bit per entry plus an l1 scale per chunk (or per tensor).

C(x) = (||x||_1 / n) * sign(x) on each scaling unit of n entries (Bernstein et al. 2018, signSGD;
the l1 scale is the one of Karimireddy et al. 2019, "Error feedback fixes SignSGD"). With that
scale the compression error is exactly
    ||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / n = (1 - delta) ||x||^2,  delta = ||x||_1^2 / (n ||x||^2),
so C is a contraction. A zero entry is sent as +scale (its sign bit is 1), which leaves the identity
unchanged because it contributes nothing to <sign, x>.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from compression.base import Compressor, check_chunk_size, check_chunks, component, meta_chunk, per_entry_scales
from compression.chunks import chunk_rows, num_chunks
from compression.packing import pack_bits, packed_nbytes, unpack_bits
from compression.payload import Payload, PayloadError


class Sign(Compressor):
    """Codec "sign": signs bit-packed (1 = non-negative), float32 scale = mean |x| per chunk.

    chunk=None scales the whole tensor with one number (meta chunk 0).
    """

    codec: ClassVar[str] = "sign"

    def __init__(self, chunk: int | None = 4096) -> None:
        if chunk is not None:
            check_chunk_size(chunk)
        self.chunk = chunk

    def _encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.reshape(-1)
        unit = self.chunk or max(1, flat.numel())
        scales = [rows.abs().float().mean(dim=1) for rows in chunk_rows(flat, unit)]
        return Payload(
            self.codec,
            tuple(x.shape),
            x.dtype,
            tensors={
                "signs": pack_bits((flat >= 0).to(torch.uint8), 1),
                "scales": torch.cat(scales) if scales else torch.empty(0, device=x.device),
            },
            meta={"chunk": self.chunk or 0, "chunks": num_chunks(flat.numel(), unit)},
        )

    def _unit(self, p: Payload) -> int:
        chunk = meta_chunk(p, low=0)
        return chunk or max(1, p.numel)

    def _validate(self, p: Payload) -> None:
        chunks = check_chunks(p, self._unit(p))
        component(p, "scales", torch.float32, chunks)
        signs = component(p, "signs", torch.uint8)
        if signs.numel() != packed_nbytes(p.numel, 1):
            raise PayloadError(
                f"{p.codec} payload packed length mismatch: 'signs' has {signs.numel()} bytes, "
                f"{p.numel} sign bits need {packed_nbytes(p.numel, 1)}"
            )

    def _decode(self, p: Payload) -> torch.Tensor:
        scales = p.tensors["scales"]
        signs = unpack_bits(p.tensors["signs"], 1, p.numel).to(scales.device)
        per_entry = per_entry_scales(scales, self._unit(p), p.numel)
        return torch.where(signs.bool(), per_entry, -per_entry).to(p.dtype).view(p.shape)
