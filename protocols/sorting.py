"""Sorting the coordinates of sparse updates, on the coordinator's hot path (a check and a fold per push).

On the CPU numpy's stable argsort, not `torch.sort`: at this size (~170k coordinates of the 10.75M GPT's
SparseLoCo update, bench/push_cost.py) it took 2.8 ms where torch.sort took 27 ms (stable: 113 ms) in the
coordinator's process, whose malloc maps every block of 1 MiB or more afresh (coordinator/malloc.py) and so
pays page faults for torch.sort's large temporaries on every call (5.7 ms with malloc untuned). Keys here are
distinct, so any sort gives the same order.
"""

from __future__ import annotations

import numpy as np
import torch


def argsort(keys: torch.Tensor) -> torch.Tensor:
    """The int64 permutation that sorts a 1-D integer tensor ascending (stable: equal keys keep their order)."""
    if keys.device.type != "cpu":
        return torch.sort(keys, stable=True).indices
    return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
