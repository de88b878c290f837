"""Robust aggregation for the averaging protocols: one bad or malicious worker cannot wreck the model.

`protocol.robust.kind`:
- `trimmed_mean`: per coordinate, drop the `floor(trim * n)` largest and smallest of the n workers' values
  and average the rest (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018, arXiv:1803.01498).
  Weights are dropped with their values, so a trimmed worker's weight counts for nothing there.
- `median_norm_clip`: scale each worker's update of a tensor down to at most the median norm of that
  tensor across the workers, then take the weighted mean (the clipping SparseLoCo's aggregator applies per
  chunk; here per tensor, for dense updates).

Both need every update of the round (a coordinate-wise order statistic or a median norm cannot be folded
as it arrives), so the accumulator keeps them all until the round closes: memory grows with the workers.
Order-independent, so a relayed downlink refolds to the same aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protocols.base import Accumulator, CheckedUpdate
from protocols.replica import Params
from protocols.settings import RobustConfig


def trimmed_mean(values: torch.Tensor, weights: torch.Tensor, trim: float) -> torch.Tensor:
    """values: [n, *shape] the workers' tensors; weights: [n]. Per coordinate, the weighted mean of the
    values left after dropping the floor(trim * n) smallest and largest."""
    n = values.shape[0]
    k = int(trim * n)
    if n - 2 * k < 1:
        raise ValueError(f"trimming {k} of each end leaves none of {n} workers; lower protocol.robust.trim")
    order = values.sort(dim=0)
    kept = order.values[k:n - k]  # [n - 2k, *shape]
    w = weights.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    kept_w = torch.gather(w, 0, order.indices)[k:n - k]
    return (kept * kept_w).sum(dim=0) / kept_w.sum(dim=0)


def median_norm_clipped_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values: [n, *shape]; weights: [n]. Each worker's tensor scaled to at most the median norm, then the
    weighted mean."""
    norms = values.flatten(1).norm(dim=1)  # [n]
    median = norms.median()  # the lower middle value for an even n
    scales = torch.where(norms > median, median / norms.clamp_min(1e-30), torch.ones_like(norms))
    shape = (-1, *([1] * (values.dim() - 1)))
    return (values * (scales * weights).view(shape)).sum(dim=0) / weights.sum()


@dataclass
class RobustAccumulator(Accumulator):
    """Keeps each worker's dense update; `mean()` is the robust aggregate `config` names."""

    config: RobustConfig
    updates: list[tuple[str, float, Params]] = field(default_factory=list)

    def fold(self, worker_id: str, update: CheckedUpdate) -> None:
        tensors = {name: d.values.to(torch.float32) for name, d in update.tensors.items()}
        self.updates.append((worker_id, update.weight, tensors))

    @property
    def count(self) -> int:
        return len(self.updates)

    def mean(self) -> Params:
        if not self.updates:
            raise ValueError("no updates were folded into this round")
        out: Params = {}
        names = sorted({name for _, _, tensors in self.updates for name in tensors})
        for name in names:
            senders = [(w, tensors[name]) for _, w, tensors in self.updates if name in tensors]
            values = torch.stack([t for _, t in senders])
            weights = torch.tensor([w for w, _ in senders], dtype=torch.float32)
            if self.config.kind == "trimmed_mean":
                out[name] = trimmed_mean(values, weights, self.config.trim)
            else:
                out[name] = median_norm_clipped_mean(values, weights)
        return out
