"""Overlap by applying the aggregate on arrival (`overlap.mode: on_arrival`), as a pure kernel.

Douillard et al., "Streaming DiLoCo with overlapping communication: Towards a Distributed Free Lunch",
arXiv:2501.18512: round t's exchange runs during round t+1's first tau inner steps, and the outer step it
brings is merged into the worker's weights then, not a whole round later. So the outer step is the
synchronous protocol's, only tau inner steps late instead of CO2's H (protocols/co2_kernels.py), and the
aggregator runs the synchronous protocol unchanged.

The merge. The worker started round t+1 from the replica theta_t, took tau inner steps to `local`, and the
replica has just stepped to theta_{t+1}. We keep the local progress and move it by the outer step:

    local' = local + (theta_{t+1} - theta_t)                       (per tensor)

so local' - theta_{t+1} == local - theta_t: the round's pseudo-gradient, taken against theta_{t+1} at the
round's end, is exactly the inner progress of all H steps. With tau = 0 that is the synchronous round. The
paper instead mixes, local' = alpha * theta_{t+1} + (1 - alpha) * local, which for alpha < 1 keeps part of
the tau steps' progress and for alpha = 1 drops it; ours keeps all of it and needs no mixing constant.
"""

from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]


def outer_shift(before: Params, after: Params) -> Params:
    """theta_{t+1} - theta_t per tensor: what the outer step moved the replica by, and so what a worker
    mid-round adds to its local weights (`local' = local + shift`). The two must name the same tensors
    with the same shapes (ValueError naming the first that does not)."""
    if before.keys() != after.keys():
        raise ValueError(f"outer_shift: the replicas name different tensors: "
                         f"{sorted(before.keys() ^ after.keys())[:5]}")
    shift = {}
    for name, old in before.items():
        new = after[name]
        if new.shape != old.shape:
            raise ValueError(f"outer_shift: {name} has shape {tuple(old.shape)} before, {tuple(new.shape)} after")
        shift[name] = new - old  # [shape of the tensor]
    return shift
