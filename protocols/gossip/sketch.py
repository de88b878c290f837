"""A random-projection sketch of a model, so the rendezvous can track consensus without seeing a tensor.

Gossip has no node that holds every model, yet "how far apart are the models" is the quantity to watch
(Kong et al., "Consensus Control for Decentralized Deep Learning", ICML 2021, arXiv:2102.04828, call it
the consensus distance: Xi^2 = (1/n) sum_i ||x_i - x_bar||^2). Each worker reports `sketch(params)`,
k numbers: the flattened model projected by one fixed Gaussian matrix P [k, d] with N(0, 1/k) entries,
the same in every process. Johnson-Lindenstrauss: E ||P u||^2 = ||u||^2 for every u, and the projection
is linear, so sketch(x_i) - mean_j sketch(x_j) = P (x_i - x_bar) and the consensus distance of the
sketches estimates the models' with a relative error of about sqrt(1 / (2k)) (~9% at k = 64).

P is never stored: it is generated chunk by chunk from a seed derived (SHA-256, not Python's salted hash)
from (seed, tensor name, chunk index), so memory stays at one [k, CHUNK] block whatever the model size,
and every process draws the same P from the same torch CPU generator. Only floating tensors count,
visited in sorted name order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch

SKETCH_DIMS = 64  # k: what the gossip loop reports, `sketch.0` .. `sketch.63`
CHUNK = 1 << 14  # entries projected per generated [k, CHUNK] block (4 MiB of float32 at k = 64)


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"lowband.gossip.sketch:{seed}:{name}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sketch(params: Mapping[str, torch.Tensor], dims: int = SKETCH_DIMS, seed: int = 0) -> list[float]:
    """P x for the flattened floating tensors of `params`: `dims` floats, with E ||P x||^2 = ||x||^2."""
    if dims < 1:
        raise ValueError(f"a sketch needs at least one dimension, got {dims}")
    acc = torch.zeros(dims, dtype=torch.float64)
    for name in sorted(params):
        t = params[name]
        if not t.dtype.is_floating_point:
            continue
        flat = t.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        for c, begin in enumerate(range(0, flat.numel(), CHUNK)):
            part = flat[begin:begin + CHUNK]
            g = torch.Generator().manual_seed(_chunk_seed(seed, name, c))
            block = torch.randn(dims, part.numel(), generator=g, dtype=torch.float32)
            acc += (block @ part).to(torch.float64)
    return (acc / math.sqrt(dims)).tolist()


def consensus_distance_from_sketches(sketches: Sequence[Sequence[float]]) -> float:
    """sqrt((1/n) sum_i ||s_i - s_bar||^2) over n sketches of equal length: the estimate of the models'
    consensus distance Xi (0 for identical models, whose sketches are identical)."""
    if not sketches:
        raise ValueError("the consensus distance needs at least one sketch")
    lengths = {len(s) for s in sketches}
    if len(lengths) != 1:
        raise ValueError(f"sketches differ in length: {sorted(lengths)}")
    stacked = torch.tensor([list(s) for s in sketches], dtype=torch.float64)
    # Centred on the first sketch before averaging: identical sketches give exactly 0, not rounding noise.
    offsets = stacked - stacked[0]
    return float(((offsets - offsets.mean(dim=0)) ** 2).sum(dim=1).mean().sqrt())
