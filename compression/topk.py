"""Top-k sparsification: per fixed-size chunk ("topk") and over the whole tensor ("topk_global").

Top-k keeps the k largest-magnitude entries and zeros the rest. It is a contraction:
||C(x) - x||^2 <= (1 - k/n) ||x||^2, which is what error feedback needs (Stich et al. 2018,
"Sparsified SGD with memory"). Chunked top-k (as in DeMo / SparseLoCo, arXiv:2508.15706) applies it
to each chunk of `chunk` elements, so every chunk keeps k = max(1, round(density * chunk)) entries
and an index within a chunk fits in ceil(log2(chunk)) bits (12 for the default 4096). A ragged
last chunk of r < chunk elements keeps max(1, round(density * r)) entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compression.base import (
    DTYPES,
    SparseCompressor,
    check_chunks,
    component,
    dtype_name,
    meta_chunk,
    meta_dtype,
    meta_int,
)
from compression.chunks import entry_offsets
from compression.packing import index_bits, pack_bits, packed_nbytes, unpack_bits
from compression.payload import Payload, PayloadError

# On the CPU the body is processed in blocks of about this many elements: |x| of one block goes to a
# reused 16 MB buffer instead of a full-size temporary (a fresh 512 MB allocation costs more in page
# faults than the abs itself), and blocks stay big enough that each parallel region amortizes its
# thread start-up even on a busy machine.
CPU_BLOCK_ELEMENTS = 1 << 22


def keep_count(density: float, extent: int) -> int:
    """Entries kept out of `extent`: max(1, round(density * extent)), at most extent (0 if empty)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return min(extent, max(1, round(density * extent)))


def topk_indices(rows: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, k) column indices of the k largest |values| of each row (in no particular order)."""
    n_rows, width = rows.shape
    block = max(1, CPU_BLOCK_ELEMENTS // width)
    if rows.device.type != "cpu" or n_rows <= block:
        return torch.topk(rows.abs(), k, dim=1, sorted=False).indices
    out = torch.empty((n_rows, k), dtype=torch.int64)
    buf = torch.empty((block, width), dtype=rows.dtype)
    top = torch.empty((block, k), dtype=rows.dtype)
    for start in range(0, n_rows, block):  # a loop over blocks of many chunks, not over chunks
        stop = min(start + block, n_rows)
        mags = torch.abs(rows[start:stop], out=buf[: stop - start])
        torch.topk(mags, k, dim=1, sorted=False, out=(top[: stop - start], out[start:stop]))
    return out


def select_chunked(flat: torch.Tensor, chunk: int, k: int, k_last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked top-k of a flat tensor: (within-chunk indices, values), full chunks first, then the tail."""
    n = flat.numel()
    full = n // chunk
    local, values = [], []
    if full:
        body = flat[: full * chunk].view(full, chunk)
        idx = topk_indices(body, k)
        local.append(idx.reshape(-1))
        values.append(body.gather(1, idx).reshape(-1))
    if k_last:
        tail = flat[full * chunk :].view(1, -1)
        idx = topk_indices(tail, k_last)
        local.append(idx.reshape(-1))
        values.append(tail.gather(1, idx).reshape(-1))
    if not local:
        return torch.empty(0, dtype=torch.int64, device=flat.device), flat.new_empty(0)
    return torch.cat(local), torch.cat(values)


@dataclass(frozen=True)
class ChunkedHeader:
    """The checked header of a chunked sparse payload."""

    chunk: int
    chunks: int
    k: int
    k_last: int
    bits: int

    def kept(self, numel: int) -> int:
        return (numel // self.chunk) * self.k + self.k_last


def chunked_meta(numel: int, chunk: int, density: float) -> dict[str, int]:
    full, rem = divmod(numel, chunk)
    return {
        "chunk": chunk,
        "chunks": full + (rem > 0),
        "k": keep_count(density, chunk),
        "k_last": keep_count(density, rem) if rem else 0,
        "bits": index_bits(chunk),
    }


def chunked_header(p: Payload) -> ChunkedHeader:
    """Check a chunked sparse header and the length of its packed 'indices' (no tensor is read)."""
    chunk = meta_chunk(p)
    h = ChunkedHeader(chunk, check_chunks(p, chunk), meta_int(p, "k", 1), meta_int(p, "k_last"), meta_int(p, "bits", 1))
    full, rem = divmod(p.numel, chunk)
    if h.k > chunk:
        raise PayloadError(f"{p.codec} payload k={h.k} exceeds chunk {chunk}")
    if not (1 <= h.k_last <= rem if rem else h.k_last == 0):
        raise PayloadError(f"{p.codec} payload k_last={h.k_last} does not fit a last chunk of {rem} elements")
    if h.bits != index_bits(chunk):
        raise PayloadError(f"{p.codec} payload index bits {h.bits} do not match chunk {chunk}")
    kept = h.kept(p.numel)
    packed = component(p, "indices", torch.uint8)
    if packed.numel() != packed_nbytes(kept, h.bits):
        raise PayloadError(
            f"{p.codec} payload packed length mismatch: 'indices' has {packed.numel()} bytes, but k={h.k} "
            f"in {full} full chunks + k_last={h.k_last} at {h.bits} bits needs {packed_nbytes(kept, h.bits)}"
        )
    return h


def read_chunked_local(p: Payload) -> tuple[ChunkedHeader, torch.Tensor]:
    """Check a chunked sparse header and its packed 'indices'; return it and the int64 indices within
    their chunks (entry i belongs to chunk i // k), each checked to lie inside its chunk."""
    h = chunked_header(p)
    chunk, kept = h.chunk, h.kept(p.numel)
    full, rem = divmod(p.numel, chunk)
    packed = p.tensors["indices"]
    local = unpack_bits(packed, h.bits, kept)
    body, tail = local[: full * h.k], local[full * h.k :]
    # Indices are unsigned, so only the upper bound needs checking; 2**bits <= chunk needs no check at all.
    if body.numel() and chunk < 1 << h.bits and int(body.max()) >= chunk:
        raise PayloadError(f"{p.codec} payload index out of range: {int(body.max())} >= chunk {chunk}")
    if tail.numel() and int(tail.max()) >= rem:
        raise PayloadError(f"{p.codec} payload index out of range: {int(tail.max())} >= last chunk's {rem}")
    return h, local


def read_chunked(p: Payload) -> tuple[ChunkedHeader, torch.Tensor]:
    """Check a chunked sparse header and its packed 'indices'; return it and the flat int64 indices."""
    h, local = read_chunked_local(p)
    # Entry i is in chunk i // k (the tail's k_last <= k entries come after the full chunks' k each).
    return h, local + entry_offsets(local.numel(), h.k, h.chunk, local.device)


class ChunkedTopK(SparseCompressor):
    """Codec "topk": top-k by magnitude in each chunk; indices bit-packed, values as `value_dtype`."""

    codec: ClassVar[str] = "topk"

    def __init__(self, density: float = 0.015, chunk: int = 4096, value_dtype: str | None = None) -> None:
        keep_count(density, 1)  # checks the range
        if not 1 <= chunk <= 1 << 16:
            raise ValueError(f"chunk must be in 1..65536, got {chunk}")
        if value_dtype is not None and value_dtype not in DTYPES:
            raise ValueError(f"value_dtype must be one of {sorted(DTYPES)} or None, got {value_dtype!r}")
        self.density, self.chunk, self.value_dtype = density, chunk, value_dtype

    def _encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.reshape(-1)
        meta = chunked_meta(flat.numel(), self.chunk, self.density)
        local, values = select_chunked(flat, self.chunk, meta["k"], meta["k_last"])
        vdtype = DTYPES[self.value_dtype] if self.value_dtype else x.dtype
        return Payload(
            self.codec,
            tuple(x.shape),
            x.dtype,
            tensors={"indices": pack_bits(local, meta["bits"]), "values": values.to(vdtype)},
            meta={**meta, "value_dtype": dtype_name(vdtype)},
        )

    def _read(self, p: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        h, indices = read_chunked(p)
        values = component(p, "values", meta_dtype(p, "value_dtype"), h.kept(p.numel))
        return indices, values.to(p.dtype)


class GlobalTopK(SparseCompressor):
    """Codec "topk_global": the k = max(1, round(density * n)) largest |x| of the tensor, int32 indices."""

    codec: ClassVar[str] = "topk_global"

    def __init__(self, density: float = 0.015, value_dtype: str | None = None) -> None:
        keep_count(density, 1)
        if value_dtype is not None and value_dtype not in DTYPES:
            raise ValueError(f"value_dtype must be one of {sorted(DTYPES)} or None, got {value_dtype!r}")
        self.density, self.value_dtype = density, value_dtype

    def _encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.reshape(-1)
        if flat.numel() >= 1 << 31:
            raise ValueError(f"topk_global indexes with int32; tensor has {flat.numel()} elements")
        k = keep_count(self.density, flat.numel())
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        vdtype = DTYPES[self.value_dtype] if self.value_dtype else x.dtype
        return Payload(
            self.codec,
            tuple(x.shape),
            x.dtype,
            tensors={"indices": idx.to(torch.int32), "values": flat[idx].to(vdtype)},
            meta={"k": k, "value_dtype": dtype_name(vdtype)},
        )

    def _read(self, p: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        k = meta_int(p, "k")
        if k > p.numel:
            raise PayloadError(f"{p.codec} payload k={k} exceeds numel {p.numel}")
        indices = component(p, "indices", torch.int32, k).to(torch.int64)
        values = component(p, "values", meta_dtype(p, "value_dtype"), k)
        if k and (int(indices.min()) < 0 or int(indices.max()) >= p.numel):
            raise PayloadError(
                f"{p.codec} payload index out of range: [{int(indices.min())}, {int(indices.max())}] "
                f"not within [0, {p.numel})"
            )
        return indices, values.to(p.dtype)
