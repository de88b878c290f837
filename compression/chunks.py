"""Fixed-size chunking of a flat tensor, with the ragged last chunk kept separate.

Chunked codecs treat a flattened tensor as `n // chunk` full chunks (one (rows, chunk) view, no
copy) plus, when `chunk` does not divide `n`, one short tail chunk of `n % chunk` elements. Codecs
apply the same row-wise function to both pieces (two vectorized calls instead of a padded copy,
which would cost a full extra pass over the tensor and distort per-chunk statistics).
"""

from __future__ import annotations

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
