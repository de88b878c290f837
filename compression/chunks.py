"""Fixed-size chunking of a flat tensor, with the ragged last chunk kept separate.

Chunked codecs treat a flattened tensor as `n // chunk` full chunks (one (rows, chunk) view, no
copy) plus, when `chunk` does not divide `n`, one short tail chunk of `n % chunk` elements. Codecs
apply the same row-wise function to both pieces (two vectorized calls instead of a padded copy,
which would cost a full extra pass over the tensor and distort per-chunk statistics).
"""

from __future__ import annotations

import functools

import torch


def num_chunks(numel: int, chunk: int) -> int:
    return -(-numel // chunk)


def chunk_rows(flat: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """[full chunks as (n // chunk, chunk)] + [tail as (1, n % chunk)], leaving out empty pieces."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = flat.numel()
    full = n // chunk
    pieces = []
    if full:
        pieces.append(flat[: full * chunk].view(full, chunk))
    if n % chunk:
        pieces.append(flat[full * chunk :].view(1, n % chunk))
    return pieces


# Payloads at most this long get their per-entry chunk offsets from a cache: a model's tensors keep their
# sizes from round to round, so each (count, per_chunk, chunk) repeats, and on a small tensor building
# the offsets costs as much as the rest of decoding it. Longer payloads build them (a cached copy would
# keep that much memory alive).
CACHED_OFFSETS = 1 << 16


@functools.lru_cache(maxsize=512)
def _cached_offsets(count: int, per_chunk: int, scale: int, device: torch.device) -> torch.Tensor:
    return _offsets(count, per_chunk, scale, device)


def _offsets(count: int, per_chunk: int, scale: int, device: torch.device) -> torch.Tensor:
    return torch.arange(count, device=device).div_(per_chunk, rounding_mode="floor").mul_(scale)


def entry_offsets(count: int, per_chunk: int, scale: int, device: torch.device) -> torch.Tensor:
    """int64 (count,): (i // per_chunk) * scale for entry i, i.e. where entry i's chunk starts when each chunk
    holds `per_chunk` entries and chunks are `scale` apart. Read-only: it may be shared (cached)."""
    if count <= CACHED_OFFSETS:
        return _cached_offsets(count, per_chunk, scale, torch.device(device))
    return _offsets(count, per_chunk, scale, device)
