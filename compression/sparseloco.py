"""The payload SparseLoCo sends ("sparseloco"): chunked top-k, 2-bit values, 12-bit indices.

SparseLoCo (Sarfi et al., arXiv:2508.15706) keeps the top density * 4096 (default 1.5%, k = 61)
entries of every 4096-entry chunk of the error-feedback buffer, sends their positions within the
chunk as 12-bit integers and their values as 2-bit codes whose 4 levels (float16 bin means, see
`compression.twobit`) are fitted to each chunk's kept values. Per full chunk that is
ceil(61 * 12 / 8) + ceil(61 / 4) + 8 ~ 116 bytes instead of 16 KiB of float32.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from compression.base import SparseCompressor
from compression.chunks import entry_offsets
from compression.packing import pack_bits, unpack_bits
from compression.payload import Payload, PayloadError
from compression.sparseloco_batch import encode_flat, read_many
from compression.topk import chunked_meta, keep_count, read_chunked_local, select_chunked
from compression.twobit import check_codes, dequantize_2bit_chunked, quantize_2bit_chunked


class SparseLoCo(SparseCompressor):
    """Codec "sparseloco": top-k per chunk; kept values 2-bit quantized per chunk; indices bit-packed."""

    codec: ClassVar[str] = "sparseloco"

    def __init__(self, density: float = 0.015, chunk: int = 4096, range_sigmas: float = 2.0) -> None:
        keep_count(density, 1)
        if not 1 <= chunk <= 1 << 16:
            raise ValueError(f"chunk must be in 1..65536, got {chunk}")
        if range_sigmas <= 0:
            raise ValueError(f"range_sigmas must be > 0, got {range_sigmas}")
        self.density, self.chunk, self.range_sigmas = density, chunk, range_sigmas

    def _encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.reshape(-1)
        meta = chunked_meta(flat.numel(), self.chunk, self.density)
        local, values = select_chunked(flat, self.chunk, meta["k"], meta["k_last"])
        # Each chunk's kept values form one quantization unit: k per full chunk, k_last <= k for the tail.
        codes, means = quantize_2bit_chunked(values, meta["k"], self.range_sigmas)
        return Payload(
            self.codec,
            tuple(x.shape),
            x.dtype,
            tensors={
                "indices": pack_bits(local, meta["bits"]),
                "codes": pack_bits(codes, 2),
                "means": means,
            },
            meta={**meta},
        )

    def compress_flat(self, flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> tuple[list[Payload], torch.Tensor]:
        """Every tensor's payload and the decoded payloads laid out as `flat`, at once (see
        compression/sparseloco_batch.py; the same payloads as `compress` tensor by tensor)."""
        if flat.dtype != torch.float32:
            return super().compress_flat(flat, shapes)
        return encode_flat(self, flat.detach(), shapes)

    def sparse_many(self, payloads: list[Payload]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """`sparse` of every payload, read together (compression/sparseloco_batch.py `read_many`); None when
        some payload must be read on its own (`sparse` then raises what is wrong with it)."""
        try:
            for p in payloads:
                self._check_common(p)
            return read_many(payloads)
        except PayloadError:
            return None

    def _read(self, p: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        h, local = read_chunked_local(p)
        if h.k_last > h.k:
            raise PayloadError(f"{p.codec} payload k_last={h.k_last} exceeds k={h.k}")
        kept = h.kept(p.numel)
        check_codes(p, kept, h.chunks)
        means = p.tensors["means"]
        codes = unpack_bits(p.tensors["codes"], 2, kept).to(means.device)
        # Entry i is in chunk i // k: at i // k * chunk in the tensor, its 4 means at i // k * 4.
        indices = local.to(means.device) + entry_offsets(kept, h.k, h.chunk, means.device)
        return indices, dequantize_2bit_chunked(codes, means, h.k).to(p.dtype)
