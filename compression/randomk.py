"""Random-k sparsification with a shared seed ("randomk"): only values travel, never indices.

The kept coordinates are k = max(1, round(density * n)) distinct positions drawn from a seeded CPU
generator; the payload carries the seed, and the receiver regenerates the same positions. Values are
not rescaled by n/k, so the codec is the contractive (biased) random-k with
E||C(x) - x||^2 = (1 - k/n) ||x||^2 (Stich et al. 2018, "Sparsified SGD with memory").

Seeds are derived from (base seed, tensor key, how many times that key was compressed), so workers
that compress the same tensors in the same order pick the same coordinates in the same round.
"""

from __future__ import annotations

import zlib
from typing import ClassVar

import torch

from compression.base import DTYPES, SparseCompressor, component, dtype_name, meta_dtype, meta_int
from compression.payload import Payload, PayloadError
from compression.topk import keep_count


def random_indices(numel: int, k: int, seed: int) -> torch.Tensor:
    """k distinct positions in [0, numel), sorted, from a CPU generator (identical on every host)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(numel, generator=gen)[:k].sort().values


class RandomK(SparseCompressor):
    """Codec "randomk": k random coordinates per tensor, chosen by a seed sent in the payload's meta."""

    codec: ClassVar[str] = "randomk"

    def __init__(self, density: float = 0.015, seed: int = 0, value_dtype: str | None = None) -> None:
        keep_count(density, 1)
        if value_dtype is not None and value_dtype not in DTYPES:
            raise ValueError(f"value_dtype must be one of {sorted(DTYPES)} or None, got {value_dtype!r}")
        self.density, self.seed, self.value_dtype = density, seed, value_dtype
        self._calls: dict[str, int] = {}

    def next_seed(self, key: str) -> int:
        """The seed for this key's next compression (then advances the key's counter)."""
        count = self._calls.get(key, 0)
        self._calls[key] = count + 1
        return zlib.crc32(f"{self.seed}:{key}:{count}".encode())

    def _encode(self, x: torch.Tensor, key: str) -> Payload:
        flat = x.reshape(-1)
        k = keep_count(self.density, flat.numel())
        seed = self.next_seed(key)
        idx = random_indices(flat.numel(), k, seed).to(flat.device)
        vdtype = DTYPES[self.value_dtype] if self.value_dtype else x.dtype
        return Payload(
            self.codec,
            tuple(x.shape),
            x.dtype,
            tensors={"values": flat[idx].to(vdtype)},
            meta={"k": k, "seed": seed, "value_dtype": dtype_name(vdtype)},
        )

    def _read(self, p: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        k = meta_int(p, "k")
        if k > p.numel:
            raise PayloadError(f"{p.codec} payload k={k} exceeds numel {p.numel}")
        seed = meta_int(p, "seed")
        values = component(p, "values", meta_dtype(p, "value_dtype"), k)
        return random_indices(p.numel, k, seed).to(values.device), values.to(p.dtype)
